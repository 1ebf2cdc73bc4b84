"""How scores become weights, and the norms of q, k, v (issue 20): sigmoid attention, signed (cog)
weights, L2-distance scores, LASER, query/key/value RMSNorm. Each against its formula written out
in float64, with the dispatcher's reasons, cache agreement and the conflict entries."""

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import assert_cache_decoding_equals_full_forward

from x_transformers import CrossAttender, Decoder, Encoder, TransformerWrapper, XTransformer
from x_transformers.attend import AttendRequest, attend, choose_backend, rejection_reasons
from x_transformers.config import ConfigConflictError
from x_transformers.x_transformers import Attention


def qkv(b=2, h=4, n=6, m=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g) for s in (n, m, m))


def causal_keep(n, m):
    return torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)


def test_sigmoid_weights_are_unnormalised_sigmoids_of_the_logits():
    q, k, v = qkv()
    out, w = attend(q, k, v, causal=True, scale=0.5, normalizer="sigmoid", need_weights=True)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    expect = torch.sigmoid(logits) * causal_keep(6, 6)
    torch.testing.assert_close(w.double(), expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), expect @ v.double(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(w.sum(-1), torch.ones(()))  # rows do not sum to one


def test_signed_weights_carry_the_logits_sign():
    q, k, v = qkv()
    out, w = attend(q, k, v, causal=True, scale=0.5, signed=True, need_weights=True)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    keep = causal_keep(6, 6)
    a = logits.abs().masked_fill(~keep, float("-inf")).softmax(-1) * logits.sign()
    torch.testing.assert_close(w.double(), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), a @ v.double(), atol=1e-5, rtol=1e-5)
    assert (w < 0).any() and torch.equal(w.abs().sum(-1) > 0.999, torch.ones_like(w[..., 0], dtype=torch.bool))


def test_signed_weights_with_a_sink_use_its_magnitude():
    q, k, v = qkv()
    sink = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    _, w = attend(q, k, v, scale=0.5, signed=True, sink=sink, need_weights=True)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    denom = logits.abs().exp().sum(-1, keepdim=True) + sink.double().abs().exp().view(1, 4, 1, 1)
    torch.testing.assert_close(w.double(), logits.abs().exp() / denom * logits.sign(), atol=1e-6, rtol=1e-5)


def test_l2_distance_scores_are_negative_squared_distances():
    q, k, v = qkv(m=9, n=3)  # keys from a cache too
    k = k[:, :2]  # grouped: 2 key heads for 4 query heads
    v = v[:, :2]
    out, w = attend(q, k, v, causal=True, scale=0.3, l2_distance=True, need_weights=True)
    ke = k.double().repeat_interleave(2, 1)
    dist2 = (q.double()[..., :, None, :] - ke[..., None, :, :]).square().sum(-1)
    a = (-dist2 * 0.3).masked_fill(~causal_keep(3, 9), float("-inf")).softmax(-1)
    torch.testing.assert_close(w.double(), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), a @ v.double().repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)


def _top_k_keep(logits, keep, k):
    """The k largest logits of each row among the kept keys (no ties in random data)."""
    masked = logits.masked_fill(~keep, float("-inf"))
    kth = masked.topk(k, dim=-1).values[..., -1:]
    return keep & (masked >= kth)


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_top_k_of_l2_distance_scores_keeps_the_k_nearest_keys(normalizer):
    """L2 distance sets the logits, top-k keeps each query's k nearest keys, the normaliser turns
    the kept logits into weights; every other key gets weight 0 (upstream refuses these pairs)."""
    q, k, v = qkv(n=5, m=7)
    out, w = attend(q, k, v, causal=True, scale=0.3, l2_distance=True, sparse_topk=3, normalizer=normalizer,
                    need_weights=True)
    dist2 = (q.double()[..., :, None, :] - k.double()[..., None, :, :]).square().sum(-1)
    logits, keep = -dist2 * 0.3, causal_keep(5, 7)
    nearest = _top_k_keep(logits, keep, 3)
    assert torch.equal(nearest, _top_k_keep(-dist2, keep, 3))  # the largest logits are the nearest keys
    a = (logits.masked_fill(~nearest, float("-inf")).softmax(-1) if normalizer == "softmax"
         else torch.sigmoid(logits) * nearest)
    torch.testing.assert_close(w.double(), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), a @ v.double(), atol=1e-5, rtol=1e-5)
    assert torch.equal(w != 0, nearest.expand_as(w))


def test_top_k_sigmoid_weights_are_sigmoids_of_the_k_largest_logits():
    q, k, v = qkv()
    out, w = attend(q, k, v, scale=0.5, normalizer="sigmoid", sparse_topk=2, need_weights=True)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    top = _top_k_keep(logits, torch.ones(6, 6, dtype=torch.bool), 2)
    torch.testing.assert_close(w.double(), torch.sigmoid(logits) * top, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), (torch.sigmoid(logits) * top) @ v.double(), atol=1e-5, rtol=1e-5)


def test_sigmoid_of_l2_distance_scores():
    q, k, v = qkv()
    _, w = attend(q, k, v, causal=True, scale=0.1, normalizer="sigmoid", l2_distance=True, need_weights=True)
    dist2 = (q.double()[..., :, None, :] - k.double()[..., None, :, :]).square().sum(-1)
    torch.testing.assert_close(w.double(), torch.sigmoid(-dist2 * 0.1) * causal_keep(6, 6), atol=1e-6, rtol=1e-5)


def test_dispatch_sends_these_to_the_explicit_backend_and_says_why():
    q, k, v = qkv()
    for field, value, words in (("normalizer", "sigmoid", "not softmax"), ("signed", True, "signed"),
                                ("l2_distance", True, "L2")):
        req = AttendRequest(q=q, k=k, v=v, **{field: value})
        assert choose_backend(req).name == "explicit"
        assert any(words in r for r in rejection_reasons(req)["sdpa"])
    with pytest.raises(ConfigConflictError, match="attn_sigmoid"):
        Decoder(dim=32, depth=1, attn_sigmoid=True, attn_backend="sdpa")


def bare(**kw):
    torch.manual_seed(0)
    return Attention(32, dim_head=8, heads=4, causal=True, project_out=False, **kw)


def test_laser_is_log_of_attention_over_exp_values():
    attn = bare(laser=True, laser_softclamp_value=2.0)
    x = torch.randn(2, 5, 32)
    b, n = 2, 5
    q, k, v = (p(x).view(b, n, 4, 8).transpose(1, 2).double() for p in (attn.to_q, attn.to_k, attn.to_v))
    a = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).masked_fill(~causal_keep(5, 5), float("-inf")).softmax(-1)
    ev = (2.0 * torch.tanh(v / 2.0)).exp()
    expect = (a @ ev).log().transpose(1, 2).reshape(b, n, 32)
    torch.testing.assert_close(attn(x).double(), expect, atol=1e-5, rtol=1e-5)
    # every output lies within the softcapped values' range (a log-sum-exp of them)
    assert attn(x).abs().max() <= 2.0


@pytest.mark.parametrize("which", ["qk", "k", "v"])
def test_rmsnorm_of_queries_keys_values(which):
    kw = {"qk": dict(qk_rmsnorm=True), "k": dict(k_rmsnorm=True), "v": dict(value_rmsnorm=True)}[which]
    attn = bare(kv_heads=2, **kw)
    x = torch.randn(2, 5, 32)
    norms = [m for m in (attn.to_q_norm, attn.to_k_norm, attn.to_v_norm) if m is not None]
    assert len(norms) == (2 if which == "qk" else 1)
    with torch.no_grad():
        for m in norms:
            m.g.uniform_(0.5, 2.0)

    def rms(t, g):
        t = t.double()
        return t / t.square().mean(-1, keepdim=True).sqrt() * g.double()

    b, n = 2, 5
    q = attn.to_q(x).view(b, n, 4, 8).transpose(1, 2)
    k, v = (p(x).view(b, n, 2, 8).transpose(1, 2) for p in (attn.to_k, attn.to_v))
    q = rms(q, attn.to_q_norm.g) if attn.to_q_norm is not None else q.double()
    k = rms(k, attn.to_k_norm.g) if attn.to_k_norm is not None else k.double()
    v = rms(v, attn.to_v_norm.g) if attn.to_v_norm is not None else v.double()
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    a = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).masked_fill(~causal_keep(5, 5), float("-inf")).softmax(-1)
    expect = (a @ v).transpose(1, 2).reshape(b, n, 32)
    torch.testing.assert_close(attn(x).double(), expect, atol=1e-5, rtol=1e-5)


VARIANTS = {
    "sigmoid": dict(attn_sigmoid=True),
    "cog_signed": dict(attn_cog_signed=True, attn_head_learned_sink=True),
    "l2_distance": dict(attn_l2_distance=True, attn_kv_heads=2),
    "laser": dict(attn_laser=True, attn_add_zero_kv=True, attn_num_mem_kv=2),
    "l2_qk_norm": dict(attn_l2_distance=True, attn_qk_norm=True),
    "l2_top_k": dict(attn_l2_distance=True, attn_sparse_topk=2),
    "sigmoid_top_k_l2": dict(attn_sigmoid=True, attn_sparse_topk=3, attn_l2_distance=True),
    "rmsnorms": dict(attn_qk_rmsnorm=True, attn_value_rmsnorm=True),
    "k_rmsnorm": dict(attn_k_rmsnorm=True, attn_kv_heads=1),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=32, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_dim_head=8, rotary_pos_emb=True, **VARIANTS[name])).eval()
    assert_cache_decoding_equals_full_forward(net)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_model_kind_accepts(name):
    kw = VARIANTS[name]
    x = torch.randn(2, 6, 32)
    assert torch.isfinite(Encoder(dim=32, depth=1, heads=4, **kw)(x)).all()
    assert torch.isfinite(CrossAttender(dim=32, depth=1, heads=4, **kw)(x, context=torch.randn(2, 5, 32))).all()
    side = {f"{s}_{k}": v for k, v in kw.items() for s in ("enc", "dec")}
    xt = XTransformer(dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=4, enc_max_seq_len=16, dec_num_tokens=20,
                      dec_depth=1, dec_heads=4, dec_max_seq_len=16, **side)
    t = torch.randint(0, 20, (2, 6))
    assert torch.isfinite(xt(t, t)).all()


@pytest.mark.parametrize("kw", [dict(attn_sigmoid=True, attn_use_entmax15=True),
                                dict(attn_qk_rmsnorm=True, attn_k_rmsnorm=True),
                                dict(attn_qk_rmsnorm=True, attn_qk_norm=True),
                                dict(attn_k_rmsnorm=True, attn_shared_qk=True),
                                dict(attn_cog_signed=True, attn_shared_qk=True),
                                dict(attn_laser=True, attn_cog_signed=True)])
def test_conflicts_are_refused_naming_both(kw):
    a, b = list(kw)
    with pytest.raises(ConfigConflictError, match=f"{a}.*{b}|{b}.*{a}"):
        Decoder(dim=32, depth=1, **kw)


def test_laser_softclamp_value_needs_laser():
    with pytest.raises(ValueError, match="attn_laser_softclamp_value configures attn_laser"):
        Decoder(dim=32, depth=1, attn_laser_softclamp_value=5.0)


def test_l2_distance_with_qk_norm_scales_the_unit_distance():
    attn = bare(l2_distance=True, qk_norm=True)
    with torch.no_grad():
        attn.qk_scale.copy_(torch.tensor([1.0, 2.0, 5.0, 10.0]).view(4, 1, 1))
    x = torch.randn(2, 5, 32)
    b, n = 2, 5
    q, k, v = (F.normalize(p(x).view(b, n, 4, 8).transpose(1, 2).double(), dim=-1) if i < 2 else
               p(x).view(b, n, 4, 8).transpose(1, 2).double() for i, p in enumerate((attn.to_q, attn.to_k, attn.to_v)))
    dist2 = (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)  # in [0, 4]
    logits = -dist2 * torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64).view(1, 4, 1, 1)
    a = logits.masked_fill(~causal_keep(5, 5), float("-inf")).softmax(-1)
    torch.testing.assert_close(attn(x).double(), (a @ v).transpose(1, 2).reshape(b, n, 32), atol=1e-5, rtol=1e-5)
