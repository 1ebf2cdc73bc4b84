"""torch.compile(fullgraph=True): the model traces as one graph, and compiled equals eager.

Graph breaks are found by Dynamo whatever the backend, so these use ``aot_eager`` (Dynamo +
AOTAutograd, no code generation) to stay fast on CPU.
"""

import pytest
import torch
import torch._dynamo as dynamo

from x_transformers import Decoder, TransformerWrapper, XTransformer
from x_transformers.loss import chunked_cross_entropy

VARIANTS = {
    "plain": {},
    "llama": dict(rotary_pos_emb=True, ff_glu=True, ff_activation="swish", use_rmsnorm=True, ff_no_bias=True,
                  attn_kv_heads=2),
    "t5": dict(rel_pos_bias=True),  # compiled, its lookup is a one-hot product (positional.py)
}


def tiny(**kw):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4, **kw))


@pytest.fixture(autouse=True)
def _reset():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_has_no_graph_breaks(name):
    model = tiny(**VARIANTS[name])
    x = torch.randint(0, 64, (2, 16))
    explained = dynamo.explain(model)(x)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fullgraph_forward_backward_matches_eager(name):
    model = tiny(**VARIANTS[name])
    x = torch.randint(0, 64, (2, 17))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, :3] = False  # left padding: the masked SDPA path
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def run(m):
        model.zero_grad(set_to_none=True)
        hidden = m(x[:, :-1], mask, return_embeddings=True)
        loss = chunked_cross_entropy(hidden, model.logits_weight, x[:, 1:], chunk_size=8)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_e, grads_e = run(model)
    loss_c, grads_c = run(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_fullgraph_logits_and_encoder_decoder():
    model = tiny()
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
    torch.manual_seed(0)
    xt = XTransformer(dim=32, num_tokens=32, depth=1, heads=4, max_seq_len=16)
    src, tgt = torch.randint(0, 32, (2, 12)), torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(torch.compile(xt, fullgraph=True, backend="aot_eager")(src, tgt), xt(src, tgt))


def test_fullgraph_layer_dropout_trains():
    model = tiny(layer_dropout=0.5).train()
    x = torch.randint(0, 64, (2, 16))
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.float().mean().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_and_chunked_loss_compile_as_one_graph(name):
    """The training step compiles forward + loss together (training.distributed.compile_step):
    the chunked loss's autograd.Function must trace inside the same graph, with equal grads."""
    model = tiny(**VARIANTS[name])
    x = torch.randint(0, 64, (2, 17))

    def forward_loss(m):
        hidden = m(x[:, :-1], return_embeddings=True)
        return chunked_cross_entropy(hidden, m.logits_weight, x[:, 1:], chunk_size=8)

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_e, grads_e = run(forward_loss)
    loss_c, grads_c = run(torch.compile(forward_loss, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
