"""chunked_cross_entropy: equal to F.cross_entropy on the full logits, with far less saved."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, TransformerWrapper
from x_transformers.loss import chunked_cross_entropy


def reference(hidden, weight, targets, ignore_index=-100):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


def leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def loss_and_grads(fn, hidden, weight, targets, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_values_and_gradients_match_float32(chunk_size):
    hidden, weight = leaves((3, 21, 16), (37, 16))
    targets = torch.randint(0, 37, (3, 21), generator=torch.Generator().manual_seed(1))
    ref = loss_and_grads(reference, hidden, weight, targets)
    ours = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk_size),
                          hidden, weight, targets)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_ignore_index(ignore_index):
    hidden, weight = leaves((2, 15, 8), (11, 8))
    targets = torch.randint(1, 11, (2, 15), generator=torch.Generator().manual_seed(2))
    targets[0, :6] = ignore_index
    targets[1, -3:] = ignore_index
    ref = loss_and_grads(reference, hidden, weight, targets, ignore_index=ignore_index)
    ours = loss_and_grads(lambda h, w, t, **kw: chunked_cross_entropy(h, w, t, chunk_size=4, **kw),
                          hidden, weight, targets, ignore_index=ignore_index)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (ours[1][0, :6] == 0).all()  # ignored positions get no gradient


def test_every_target_ignored_is_nan_with_zero_grads_like_torch():
    hidden, weight = leaves((4, 8), (5, 8))
    targets = torch.full((4,), -100)
    loss, gh, gw = loss_and_grads(chunked_cross_entropy, hidden, weight, targets)
    assert torch.isnan(loss) and (gh == 0).all() and (gw == 0).all()


def test_upstream_gradient_scales_and_no_grad_path():
    hidden, weight = leaves((9, 8), (13, 8))
    targets = torch.randint(0, 13, (9,))
    (2.5 * chunked_cross_entropy(hidden, weight, targets, chunk_size=4)).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (2.5 * reference(h2, w2, targets)).backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets), reference(hidden, weight, targets))


def test_bf16_autocast_close_to_float32():
    hidden, weight = leaves((2, 33, 32), (101, 32))
    targets = torch.randint(0, 101, (2, 33))
    ref = loss_and_grads(reference, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=16),
                                      hidden, weight, targets)
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh, ref[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref[2], rtol=5e-2, atol=2e-3)


def saved_bytes(fn):
    """Bytes of every tensor autograd keeps for backward (allocator-agnostic, works on CPU)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(total)


def test_saves_far_less_than_full_logits():
    n, d, v = 512, 32, 4096  # the saved-for-backward logits dominate when v >> d
    hidden, weight = leaves((n, d), (v, d))
    targets = torch.randint(0, v, (n,))
    plain = saved_bytes(lambda: reference(hidden, weight, targets))
    fused = saved_bytes(lambda: chunked_cross_entropy(hidden, weight, targets, chunk_size=64))
    assert plain >= n * v * 4  # at least the float32 log-softmax
    assert fused <= (n * d + v * d) * 4  # only the two gradients
    assert fused * 10 < plain


def test_model_hidden_and_logits_weight_give_the_logits_loss():
    for tie in (False, True):
        torch.manual_seed(0)
        model = TransformerWrapper(num_tokens=50, max_seq_len=16, tie_embedding=tie,
                                   attn_layers=Decoder(dim=16, depth=1, heads=2))
        x = torch.randint(0, 50, (2, 13))
        assert model.logits_weight is (model.token_emb.weight if tie else model.to_logits.weight)
        plain = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        # a tied head scales the hidden states by dim ** -0.5 (upstream's default), as the training loop does
        hidden = model(x[:, :-1], return_embeddings=True) * model.logits_scale
        assert model.logits_scale == (16 ** -0.5 if tie else 1.0)
        fused = chunked_cross_entropy(hidden, model.logits_weight, x[:, 1:])
        torch.testing.assert_close(fused, plain)


def test_shape_errors():
    hidden, weight = leaves((2, 5, 8), (7, 8))
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(hidden, weight.t(), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, torch.zeros(2, 5, dtype=torch.long), chunk_size=0)


def test_chunk_step_matches_the_eager_loop_and_compiles_to_the_same_values():
    """The CUDA path's per-chunk function (compiled there by inductor) against the definition."""
    from x_transformers.loss import chunk_step

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([0, 3, 10, 2, 2, 7])
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    nll, grad = chunk_step(logits, targets, valid)
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(nll, -(logp[torch.arange(6), targets] * valid).sum().float().double(), rtol=1e-6, atol=1e-6)
    expected = logp.exp() - torch.nn.functional.one_hot(targets, 11)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)
    compiled = torch.compile(chunk_step, backend="aot_eager", fullgraph=True)
    nll_c, grad_c = compiled(logits, targets, valid)
    torch.testing.assert_close((nll_c, grad_c), (nll, grad))
