"""TransformerWrapper's pooling, output heads and input keywords (heads.py), upstream's names.

Against the real upstream package (2.31.10, child process, ``tests/upstream.py``): for each
configuration upstream builds with a seed and perturbed parameters, runs a fixed input and saves
its state dict and outputs; here the same keywords build our model, the state dict goes through
:func:`x_transformers.upstream.load_state_dict`, and parameter counts and outputs must agree. Then
the defining property of each keyword, checked directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from x_transformers import ConfigConflictError, Decoder, Encoder, TransformerWrapper, XTransformer
from x_transformers.upstream import load_state_dict

from upstream import run as run_upstream

DIM, TOKENS, B, N = 32, 40, 2, 9
STACK = dict(dim=DIM, depth=2, heads=4, attn_dim_head=8)

CHILD = r"""
import json, os, torch
from x_transformers import TransformerWrapper, Encoder, Decoder
spec = json.loads(os.environ["PAYLOAD"])
results = {}
for case in spec["cases"]:
    torch.manual_seed(0)
    layers = dict(Encoder=Encoder, Decoder=Decoder)[case["kind"]](**case["layers"])
    model = TransformerWrapper(attn_layers=layers, **case["wrapper"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    inputs = torch.load(spec["inputs"])
    kw = {k: inputs[k] for k in case["inputs"]}
    if "embed_ids" in case["inputs"]:
        kw["embed_ids"] = dict(kind=inputs["embed_ids"])
    with torch.no_grad():
        out = model(inputs["x"], **kw, **case["forward"])
    if case["forward"].get("return_attn_z_loss"):
        out = (out[0], out[1].attn_z_loss)
    results[case["name"]] = dict(state_dict=model.state_dict(), out=out,
                                 n_params=sum(p.numel() for p in model.parameters()))
torch.save(results, spec["out"])
print(json.dumps("ok"))
"""


def case(name, kind="Encoder", inputs=("mask",), forward=None, **wrapper):
    return dict(name=name, kind=kind, layers=STACK, inputs=list(inputs), forward=forward or {},
                wrapper=dict(num_tokens=TOKENS, max_seq_len=32, **wrapper))


CASES = [
    case("cls", use_cls_token=True),
    case("cls_3", use_cls_token=True, num_cls_tokens=3),
    case("average_pool", average_pool_embed=True),
    case("attn_pool", attn_pool=True),
    case("attn_pool_deep", attn_pool=True, attn_pool_depth=2, num_pooled_tokens=3, dim_pooled_tokens=16),
    case("post_emb_norm", "Decoder", inputs=(), post_emb_norm=True),
    case("l2norm_embed", "Decoder", inputs=(), l2norm_embed=True),
    case("emb_frac_gradient", "Decoder", inputs=(), emb_frac_gradient=0.1),
    case("embed_num_tokens", "Decoder", inputs=("embed_ids",), embed_num_tokens=dict(kind=3)),
    case("prepend", "Decoder", inputs=("prepend_embeds",)),
    # (upstream averages with the tokens' mask alone, which fails with prepended columns: attn_pool here)
    case("prepend_masked_pool", inputs=("mask", "prepend_embeds", "prepend_mask"), attn_pool=True),
    case("output_heads", "Decoder", inputs=(), num_output_heads=3),
    case("mixture_of_softmax", "Decoder", inputs=(), mixture_of_softmax=True, mixture_of_softmax_k=3),
    case("sigsoftmax", "Decoder", inputs=(), sigsoftmax_logits=True),
    case("squeeze", inputs=(), logits_dim=1, squeeze_out_last_dim=True),
    case("z_loss", "Decoder", inputs=(), forward=dict(return_attn_z_loss=True, attn_z_loss_weight=0.5)),
    case("z_loss_masked_encoder", inputs=("mask",), forward=dict(return_attn_z_loss=True)),
]


def make_inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 6:] = False
    prepend_mask = torch.ones(B, 3, dtype=torch.bool)
    prepend_mask[0, 0] = False
    return dict(x=torch.randint(0, TOKENS, (B, N), generator=g), mask=mask,
                prepend_embeds=torch.randn(B, 3, DIM, generator=g), prepend_mask=prepend_mask,
                embed_ids=torch.randint(0, 3, (B, N), generator=g))


@pytest.fixture(scope="module")
def upstream_results():
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs()
        torch.save(inputs, Path(tmp) / "inputs.pt")
        run_upstream(CHILD, dict(cases=CASES, inputs=str(Path(tmp) / "inputs.pt"), out=str(Path(tmp) / "out.pt")))
        return inputs, torch.load(Path(tmp) / "out.pt", weights_only=False)


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_matches_upstream(c, upstream_results):
    inputs, results = upstream_results
    up = results[c["name"]]
    layers = dict(Encoder=Encoder, Decoder=Decoder)[c["kind"]](**c["layers"])
    model = TransformerWrapper(attn_layers=layers, **c["wrapper"]).eval()
    assert sum(p.numel() for p in model.parameters()) == up["n_params"]
    load_state_dict(model, up["state_dict"])
    kw = {k: inputs[k] for k in c["inputs"]}
    if "embed_ids" in kw:
        kw["embed_ids"] = dict(kind=inputs["embed_ids"])
    with torch.no_grad():
        out = model(inputs["x"], **kw, **c["forward"])
    if c["forward"].get("return_attn_z_loss"):
        out = (out[0], out[1].attn_z_loss)
    ours, theirs = _flat(out), _flat(up["out"])
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        if a.ndim >= 2 and a.shape[:2] == (B, N) and "mask" in c["inputs"] and "prepend_embeds" not in c["inputs"]:
            a, b = a[inputs["mask"]], b[inputs["mask"]]  # padded positions are numbered differently (kept count)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# properties


def enc(**kw):
    return TransformerWrapper(num_tokens=TOKENS, max_seq_len=32, attn_layers=Encoder(**STACK), **kw)


def dec(**kw):
    return TransformerWrapper(num_tokens=TOKENS, max_seq_len=32, attn_layers=Decoder(**STACK), **kw)


def test_cls_token_pooling_returns_the_cls_positions_hidden_state():
    model = enc(use_cls_token=True).eval()
    x = make_inputs()["x"]
    captured = {}
    model.attn_layers.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    pooled = model(x, return_embeddings=True)
    torch.testing.assert_close(pooled, captured["out"][:, 0])


def test_average_pool_respects_the_mask():
    model = enc(average_pool_embed=True).eval()
    i = make_inputs()
    pooled = model(i["x"], i["mask"], return_embeddings=True)
    x2 = i["x"].clone()
    x2[1, 6:] = (x2[1, 6:] + 1) % TOKENS  # change only masked tokens
    torch.testing.assert_close(model(x2, i["mask"], return_embeddings=True), pooled)
    seq = model(i["x"], i["mask"], return_embeddings_and_intermediates=True)[1].last_hidden
    torch.testing.assert_close(pooled[1], seq[1, :6].mean(0))


def test_attn_pool_queries_are_learned_and_encoders_return_pooled_tokens():
    model = enc(attn_pool=True, num_pooled_tokens=2)
    out = model(make_inputs()["x"])
    assert out.shape == (B, 2, DIM)
    out.sum().backward()
    assert model.attn_pool.queries.grad is not None and model.attn_pool.queries.grad.abs().sum() > 0
    logits, inter = dec(attn_pool=True)(make_inputs()["x"], return_intermediates=True)
    assert logits.shape == (B, N, TOKENS) and inter.attn_pooled_tokens.shape == (B, 1, DIM)


def test_emb_frac_gradient_scales_the_embedding_gradient_and_keeps_the_forward():
    torch.manual_seed(0)
    full = dec().eval()
    frac = dec(emb_frac_gradient=0.25).eval()
    frac.load_state_dict(full.state_dict())
    x = make_inputs()["x"]
    a, b = full(x), frac(x)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(frac.token_emb.weight.grad, full.token_emb.weight.grad * 0.25)
    torch.testing.assert_close(frac.to_logits.weight.grad, full.to_logits.weight.grad)


def test_l2norm_embed_gives_unit_norm_embeddings():
    model = dec(l2norm_embed=True)
    captured = {}
    model.attn_layers.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    x = make_inputs()["x"]
    model(x)
    tok = torch.nn.functional.normalize(model.token_emb(x), dim=-1)
    pos = torch.nn.functional.normalize(model.pos_emb(torch.arange(N)), dim=-1)
    torch.testing.assert_close(captured["h"], tok + pos)
    assert model.token_emb.weight.std() < 1e-4  # upstream's small init


def test_z_loss_is_the_formula_on_the_attention_logits():
    torch.manual_seed(0)
    model = enc().eval()
    x = make_inputs()["x"]
    _, inter = model(x, return_attn_z_loss=True, attn_z_loss_weight=1.0)
    # by hand: the logits of each layer from its own q and k, logsumexp over keys, summed over layers
    h = model.token_emb(x) + model.pos_emb(torch.arange(N))
    lse = 0
    for block in model.attn_layers.blocks:
        if block.fn.__class__.__name__ == "Attention":
            normed = block.pre_norm(h)
            q = block.fn.to_q(normed).view(B, N, 4, 8).transpose(1, 2)
            k = block.fn.to_k(normed).view(B, N, 4, 8).transpose(1, 2)
            lse = lse + (q @ k.transpose(-1, -2) * 8 ** -0.5).logsumexp(dim=-1)
        h = block(h)[0]
    torch.testing.assert_close(inter.attn_z_loss, lse.square().sum(1).mean())
    inter.attn_z_loss.backward()
    assert model.attn_layers.blocks[0].fn.to_q.weight.grad.abs().sum() > 0


def test_prepend_embeds_excised_and_masked():
    model = dec().eval()
    i = make_inputs()
    out = model(i["x"], prepend_embeds=i["prepend_embeds"], excise_prepend_embeds=True)
    assert out.shape == (B, N, TOKENS)
    with pytest.raises(ValueError, match="prepend_embeds must be"):
        model(i["x"], prepend_embeds=torch.randn(B, 3, DIM + 1))
    with pytest.raises(ValueError, match="prepend_mask without"):
        model(i["x"], prepend_mask=i["prepend_mask"])


def test_embed_ids_are_summed_and_required():
    model = dec(embed_num_tokens=dict(kind=3)).eval()
    i = make_inputs()
    with pytest.raises(ValueError, match="embed_ids must give ids"):
        model(i["x"])
    a = model(i["x"], embed_ids=dict(kind=torch.zeros_like(i["x"])))
    sum_embeds = model.embeds["kind_embed"](torch.zeros_like(i["x"]))
    plain = dec().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embeds.")})
    torch.testing.assert_close(a, plain(i["x"], sum_embeds=sum_embeds))


def test_refusals_name_the_keywords():
    with pytest.raises(ValueError, match="use_cls_token"):
        dec(use_cls_token=True)
    with pytest.raises(ConfigConflictError, match="use_cls_token cannot be combined with attn_pool"):
        enc(use_cls_token=True, attn_pool=True)
    with pytest.raises(ConfigConflictError, match="num_output_heads"):
        enc(num_output_heads=2, tie_embedding=True)
    with pytest.raises(ValueError, match="num_cls_tokens configures use_cls_token"):
        enc(num_cls_tokens=2)
    with pytest.raises(ValueError, match="emb_frac_gradient"):
        enc(emb_frac_gradient=0.0)
    with pytest.raises(ValueError, match="use_cls_token is not for an encoder-decoder"):
        XTransformer(dim=DIM, depth=1, num_tokens=TOKENS, max_seq_len=16, enc_use_cls_token=True)
    with pytest.raises(ValueError, match="prepend_embeds with cache"):
        model = dec()
        _, inter = model(make_inputs()["x"], return_intermediates=True)
        model(make_inputs()["x"], cache=inter, prepend_embeds=make_inputs()["prepend_embeds"])


def test_hub_round_trip_of_the_new_keywords(tmp_path):
    model = enc(use_cls_token=True, post_emb_norm=True, embed_num_tokens=dict(kind=3), num_output_heads=2).eval()
    model.save_pretrained(tmp_path)
    again = TransformerWrapper.from_pretrained(tmp_path)
    i = make_inputs()
    ids = dict(kind=i["embed_ids"])
    for a, b in zip(model(i["x"], embed_ids=ids), again(i["x"], embed_ids=ids)):
        torch.testing.assert_close(a, b)
