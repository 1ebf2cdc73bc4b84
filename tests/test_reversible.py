"""Reversible layers (2001.04451): the recomputing backward equals autograd of the same coupling."""

import contextlib

import pytest
import torch

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers import reversible as rev
from x_transformers.cache import KVCache
from x_transformers.config import ConfigConflictError
from x_transformers.reversible import ReversibleStack, coupling_steps

CONFIGS = {
    "encoder": (Encoder, dict()),
    "decoder_cross_t5": (Decoder, dict(cross_attend=True, rel_pos_bias=True)),  # context and bias need grads
    "macaron_sandwich_norm": (Encoder, dict(macaron=True, sandwich_norm=True)),
    "rezero_rotary": (Decoder, dict(use_rezero=True, rotary_pos_emb=True)),
    "dropout_everywhere": (Decoder, dict(attn_dropout=0.3, ff_dropout=0.3, layer_dropout=0.3, cross_attend=True)),
    # TUPE-R: TUPE's and T5's tables reach the blocks only through the bias input of the Function
    "encoder_tupe_t5": (Encoder, dict(tupe=True, tupe_max_seq_len=16, rel_pos_bias=True)),
    "decoder_alibi_mem_kv": (Decoder, dict(alibi_pos_bias=True, attn_num_mem_kv=2)),
}


@contextlib.contextmanager
def plain_autograd():
    """Run reversible stacks through the same coupling under ordinary autograd."""
    call = ReversibleStack.__call__
    ReversibleStack.__call__ = lambda self, *args, **kw: self.coupled(*args, **kw)
    try:
        yield
    finally:
        ReversibleStack.__call__ = call


def grads(model, x, ctx, weight, seed):
    torch.manual_seed(seed)
    kw = dict(context=ctx) if model.needs_context else {}
    out = model(x, **kw)
    inputs = [x] + ([ctx] if kw else []) + list(model.parameters())
    return out, torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def setup(name, depth=3):
    cls, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = cls(dim=32, depth=depth, heads=4, reversible=True, **kw).double()
    if name == "rezero_rotary":  # leave the identity of init, so the branches matter
        with torch.no_grad():
            for b in model.blocks:
                b.gate.fill_(0.7)
    model.train(name == "dropout_everywhere")
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 7, 32, dtype=torch.float64)
    return model, x, ctx, weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_equal_autograd_of_the_coupled_function(name):
    model, x, ctx, weight = setup(name)
    out, g = grads(model, x, ctx, weight, seed=3)
    with plain_autograd():
        ref_out, ref_g = grads(model, x, ctx, weight, seed=3)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    assert len(g) == len(ref_g)
    for a, b in zip(g, ref_g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # returned by autograd, not accumulated aside


def test_dropout_replay_is_what_makes_training_gradients_right():
    model, x, ctx, weight = setup("dropout_everywhere")
    with plain_autograd():
        _, ref = grads(model, x, ctx, weight, seed=3)
    replay = rev._replay
    rev._replay = lambda state, device: contextlib.nullcontext()  # recompute with fresh random draws
    try:
        _, wrong = grads(model, x, ctx, weight, seed=3)
    finally:
        rev._replay = replay
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(wrong, ref) if a is not None)


def test_backward_leaves_the_callers_random_state_alone():
    model, x, ctx, weight = setup("dropout_everywhere")
    out = model(x, context=ctx)
    before = torch.get_rng_state()
    (out * weight).sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def saved_numel(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_saved_activations_do_not_grow_with_depth():
    x = torch.randn(2, 16, 32, requires_grad=True)
    saved = {}
    for reversible in (False, True):
        for depth in (2, 8):
            torch.manual_seed(0)
            model = Decoder(dim=32, depth=depth, heads=4, reversible=reversible)
            saved[reversible, depth] = saved_numel(model, x)
    assert saved[True, 2] == saved[True, 8]  # the two final streams (+ the final norm), whatever the depth
    assert saved[False, 8] > 3 * saved[False, 2]
    assert saved[True, 8] < saved[False, 8] / 10


def test_output_is_the_mean_of_the_two_streams():
    torch.manual_seed(0)
    model = Encoder(dim=32, depth=1, heads=4, custom_layers=("f",), reversible=True)
    x = torch.randn(2, 5, 32)
    branch, _ = model.blocks[0].branch(x)
    # x1 = x + F(x), x2 = x: the mean is x + F(x) / 2
    torch.testing.assert_close(model(x), model.final_norm(x + branch / 2))
    rezero = Decoder(dim=32, depth=3, heads=4, use_rezero=True, reversible=True)
    assert torch.equal(rezero(x), x)  # identity at init survives the coupling


def test_coupling_steps_group_runs_of_one_family():
    steps = coupling_steps(Decoder(dim=32, depth=2, heads=4, cross_attend=True, reversible=True).layout)
    assert steps == ((0, 1), (2,), (3, 4), (5,))  # (self-attn, cross-attn) then ff: Reformer's pairs
    steps = coupling_steps(Encoder(dim=32, depth=2, heads=4, macaron=True).layout)
    assert steps == ((0,), (1,), (2, 3), (4,), (5,))


def test_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=29, max_seq_len=32,
                               attn_layers=Decoder(dim=32, depth=2, heads=4, reversible=True, rotary_pos_emb=True)).eval()
    tokens = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_return_attn_gives_maps_and_the_same_output():
    torch.manual_seed(0)
    model = Decoder(dim=32, depth=2, heads=4, cross_attend=True, reversible=True).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    out, attns = model(x, context=ctx, return_attn=True)
    assert len(attns) == 4 and attns[0].shape == (2, 4, 6, 6) and attns[1].shape == (2, 4, 6, 4)
    torch.testing.assert_close(out, model(x, context=ctx), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 6))


def test_post_norm_cannot_be_reversible():
    with pytest.raises(ConfigConflictError, match="reversible.*pre_norm=False"):
        Encoder(dim=32, depth=2, heads=4, reversible=True, pre_norm=False)
