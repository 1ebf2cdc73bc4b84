"""AutoregressiveWrapper's loss: fused with the head (chunked, no full logits) wherever the head is
one linear map, with the value and gradients of the plain cross-entropy on the logits."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers import loss as loss_module


def _model(seed=0, **wrapper):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=97, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4), **wrapper)


def _plain_loss(net, x, mask=None, ignore_index=-100):
    inp, target = x[:, :-1], x[:, 1:]
    inp = inp.masked_fill(inp == ignore_index, 0)
    if mask is not None:
        target = target.masked_fill(~mask[:, 1:], ignore_index)
    logits = net(inp, None if mask is None else mask[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=ignore_index)


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("wrapper", [dict(), dict(tie_embedding=True), dict(logits_scale=0.5)],
                         ids=["untied", "tied", "logits_scale"])
def test_the_fused_loss_equals_cross_entropy_on_the_logits_in_value_and_gradients(wrapper, monkeypatch):
    calls = []
    real = loss_module.chunked_cross_entropy
    monkeypatch.setattr("x_transformers.autoregressive.chunked_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    net = _model(**wrapper)
    x = torch.randint(0, 97, (3, 17))
    x[0, 5] = -100  # an ignored target (and, as an input, fed as the pad value)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[2, 12:] = False
    want = _plain_loss(net, x, mask)
    want.backward()
    want_grads = _grads(net)
    net.zero_grad()
    got = AutoregressiveWrapper(net)(x, mask)
    got.backward()
    assert calls, "the fused loss was not used"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name, g in _grads(net).items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-7, rtol=1e-5, msg=name)


def test_heads_that_are_more_than_one_weight_keep_the_plain_loss(monkeypatch):
    monkeypatch.setattr("x_transformers.autoregressive.chunked_cross_entropy",
                        lambda *a, **k: pytest.fail("fused loss used for a head that is not one linear map"))
    x = torch.randint(0, 97, (2, 9))
    for wrapper in (dict(mixture_of_softmax=True, mixture_of_softmax_k=2), dict(sigsoftmax_logits=True)):
        net = _model(**wrapper)
        torch.testing.assert_close(AutoregressiveWrapper(net)(x), _plain_loss(net, x))
    net = _model()
    torch.testing.assert_close(AutoregressiveWrapper(net, fused_loss=False)(x), _plain_loss(net, x))


def test_return_outputs_still_gives_the_logits_and_the_same_loss():
    net = _model()
    x = torch.randint(0, 97, (2, 9))
    wrapper = AutoregressiveWrapper(net)
    loss, (logits, _) = wrapper(x, return_outputs=True)
    torch.testing.assert_close(loss, wrapper(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, net(x[:, :-1]))


def test_the_fused_loss_compiles_with_the_wrapper():
    net = _model()
    wrapper = AutoregressiveWrapper(net)
    x = torch.randint(0, 97, (2, 9))
    torch._dynamo.reset()
    compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), _plain_loss(net, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrapper", [dict(mixture_of_softmax=True, mixture_of_softmax_k=2), dict(sigsoftmax_logits=True),
                                     dict(num_output_heads=2)], ids=["mixture", "sigsoftmax", "two_heads"])
def test_logits_weight_refuses_heads_that_are_not_one_weight(wrapper):
    """The training loop fuses its loss through logits_weight: a mixture of softmaxes once passed
    (True == 1 made a membership test miss it), and its loss would silently have been wrong."""
    with pytest.raises(ValueError, match=next(iter(wrapper))):
        _model(**wrapper).logits_weight


def test_the_training_loss_of_a_mixture_head_is_the_plain_loss_on_its_log_probabilities():
    from x_transformers.training.loop import lm_loss

    net = _model(mixture_of_softmax=True, mixture_of_softmax_k=2)
    x = torch.randint(0, 97, (2, 9))
    got = lm_loss(net, net, [x[:, :-1]], x[:, 1:])
    torch.testing.assert_close(got, _plain_loss(net, x))
