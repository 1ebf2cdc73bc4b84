"""torch.compile(fullgraph=True): the model traces as one graph, and compiled equals eager.

Graph breaks are found by Dynamo whatever the backend, so these use ``aot_eager`` (Dynamo +
AOTAutograd, no code generation) to stay fast on CPU.
"""

import warnings

import pytest
import torch
import torch._dynamo as dynamo

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper, XTransformer
from x_transformers.feedforward import FeedForward
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


# ----------------------------------------------------------------------------------------------
# compiled decoding (generate(compile=...)): many models, batch sizes and prompt shapes in one process

DECODE_MODELS = {  # name: (layer keywords, wrapper keywords)
    "rotary_gqa": (dict(rotary_pos_emb=True, attn_kv_heads=2), {}),
    "qk_norm_glu": (dict(attn_qk_norm=True, ff_glu=True), {}),
    "plain": ({}, {}),
    "t5_mem_kv": (dict(rel_pos_bias=True, attn_num_mem_kv=2), {}),
    "alibi": (dict(alibi_pos_bias=True), {}),
    "memory_tokens": ({}, dict(num_memory_tokens=2)),
    "multi_query_dim_head": (dict(attn_kv_heads=1, attn_dim_head=12), {}),
    "shared_qk_rotary": (dict(attn_shared_qk=True, rotary_pos_emb=True), {}),
    "tupe_r": (dict(tupe=True, tupe_max_seq_len=64, rel_pos_bias=True), {}),
    "talking_heads_rmsnorm": (dict(attn_talking_heads=True, use_rmsnorm=True), {}),
}


def decode_model(name):
    layers, wrapper = DECODE_MODELS[name]
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=64, max_seq_len=64, **wrapper,
                             attn_layers=Decoder(dim=32, depth=1, heads=4, **layers))
    return AutoregressiveWrapper(net).eval()


def test_compiled_decoding_of_many_models_in_one_process_equals_uncached():
    """Issue 25: after one model compiled its decode step for two batch sizes, the next models'
    steps failed to compile (sizes made symbolic by automatic dynamic shapes, recorded per source
    location across models: grouped-query attention's decision became a SymBool), and every model
    added its graphs to the one shared decode_step, whose recompile limit (8) then failed the
    ninth. Ten models, each with ragged prompts and two batch sizes, one after another: every
    compiled static-cache greedy decode equals the uncached loop, token for token, and none falls
    back to the uncompiled step."""
    g = torch.Generator().manual_seed(0)
    calls = [[torch.randint(0, 64, (n,), generator=g) for n in (5, 9, 1)],  # ragged, batch 3
             torch.randint(0, 64, (2, 5), generator=g),  # batch 2: a second graph
             torch.randint(0, 64, (2, 6), generator=g)]  # a cache length in the same bucket: no new graph
    for name in DECODE_MODELS:
        ar = decode_model(name)
        for prompts in calls:
            want = ar.generate(prompts, 8, temperature=0.0, cache_kv=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = ar.generate(prompts, 8, temperature=0.0, compile=dict(backend="aot_eager"))
            fallbacks = [str(w.message) for w in caught if "does not compile" in str(w.message)]
            assert not fallbacks, f"{name}: {fallbacks[0]}"
            assert torch.equal(got, want), f"{name}: compiled static-cache decoding differs from the uncached loop"


def test_decode_step_that_cannot_compile_warns_in_one_line_and_decodes_uncompiled(monkeypatch):
    real = FeedForward.forward

    def untraceable(self, x):  # a feature dynamo cannot put in one graph
        torch._dynamo.graph_break()
        return real(self, x)

    monkeypatch.setattr(FeedForward, "forward", untraceable)
    ar = decode_model("rotary_gqa")
    prompts = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2])]
    want = ar.generate(prompts, 6, temperature=0.0, cache_kv=False)
    for attempt in range(2):  # the second call says so again without compiling again
        frames = dynamo.utils.counters["frames"]["total"]
        with pytest.warns(UserWarning, match=r"does not compile") as caught:
            got = ar.generate(prompts, 6, temperature=0.0, compile=dict(backend="aot_eager"))
        assert torch.equal(got, want)
        messages = [str(w.message) for w in caught if "does not compile" in str(w.message)]
        assert len(messages) == 1 and "\n" not in messages[0]
        assert "rotary_pos_emb=True, attn_kv_heads=2" in messages[0]  # names the model's features
        assert "Unsupported" in messages[0] and "uncompiled" in messages[0]
        if attempt:
            assert dynamo.utils.counters["frames"]["total"] == frames


def test_recompile_limit_is_per_model_and_said_when_reached():
    first, second = decode_model("plain"), decode_model("alibi")
    two, three = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (3, 5))
    kw = dict(temperature=0.0, compile=dict(backend="aot_eager"))
    with dynamo.config.patch(recompile_limit=1):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one graph each: another model's graph does not count
            first.generate(two, 4, **kw)
            second.generate(two, 4, **kw)
        with pytest.warns(UserWarning, match=r"recompile_limit \(1\) reached"):
            got = first.generate(three, 4, **kw)  # a second shape for the same model
        assert torch.equal(got, first.generate(three, 4, temperature=0.0, cache_kv=False))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first.generate(two, 4, **kw)  # the graph compiled before still serves its shape
