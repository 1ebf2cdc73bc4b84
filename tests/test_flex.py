"""FlexAttention backend and the position-bias ScoreMods.

On CPU flex has no backward and dispatch never picks it, so these tests prove: the ScoreMods'
dense() is exactly the bias modules' output (nothing changes on CPU); each flex score_mod,
evaluated on index grids, equals that dense bias; the dispatcher's choices and reasons; and, with
the CUDA check lifted and eager (uncompiled) flex_attention standing in for the compiled kernel,
a forward of the model on the flex path equals the explicit path, with the dense bias never
materialised and one block mask per forward. GPU numbers: benchmarks/gpu_check_positional.py.
"""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, flex
from x_transformers.attend import AttendRequest, BackendNotSupported, attend, attend_backend, choose_backend, rejection_reasons
from x_transformers.positional import AlibiPositionalBias, T5RelativePositionBias, TUPEPositionalBias



def padded_positions(b=2, n=40, m=None, seed=0):
    """Per-row positions as the layer stack makes them: left padding shifts row 1; with m > n the
    queries are the last n of m keys (a cache)."""
    m = m or n
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[1, :5] = False
    k_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return k_pos[:, m - n:], k_pos, mask


def grid(sm, b, h, n, m):
    """Evaluate a flex score_mod at every (b, h, q, kv) on a zero score: the bias it adds."""
    idx = [torch.arange(s).view([-1 if i == j else 1 for j in range(4)]) for i, s in enumerate((b, h, n, m))]
    score = torch.zeros(b, h, n, m)
    return torch.broadcast_to(sm.flex_score_mod(b)(score, *idx), (b, h, n, m))


def schemes(h=4, d=16):
    torch.manual_seed(0)
    t5_causal = T5RelativePositionBias(h, causal=True, num_buckets=8, max_distance=16)
    t5_bidir = T5RelativePositionBias(h, causal=False, num_buckets=8, max_distance=16)
    tupe = TUPEPositionalBias(h * d, h, d, max_seq_len=64, untie_cls=True)
    with torch.no_grad():
        tupe.cls_theta.normal_()
    return {
        "alibi": (AlibiPositionalBias(h), lambda mod, q, k: mod(q, k), lambda mod, q, k: mod.score_mod(q, k)),
        "alibi_some_heads": (AlibiPositionalBias(h, 2), lambda mod, q, k: mod(q, k), lambda mod, q, k: mod.score_mod(q, k)),
        "t5_causal": (t5_causal, lambda mod, q, k: mod(q, k), lambda mod, q, k: mod.score_mod(q, k)),
        "t5_bidir": (t5_bidir, lambda mod, q, k: mod(q, k), lambda mod, q, k: mod.score_mod(q, k)),
        "tupe_r_cls": (tupe, lambda mod, q, k: mod(q, k, t5_bidir(q, k)),
                       lambda mod, q, k: mod.score_mod(q, k, t5_bidir.score_mod(q, k))),
    }


@pytest.mark.parametrize("scheme", list(schemes()))
@pytest.mark.parametrize("cache", [False, True])
def test_score_mod_dense_and_flex_equal_the_bias_module(scheme, cache):
    # offsets up to 44 > max_distance 16: the T5 offset table's clamping is exercised
    q_pos, k_pos, _ = padded_positions(n=6 if cache else 45, m=45)
    mod, old, new = schemes()[scheme]
    ref = old(mod, q_pos, k_pos)
    sm = new(mod, q_pos, k_pos)
    assert torch.equal(sm.dense(), ref)  # CPU paths see the very same tensor as before
    assert sm.dense() is sm.dense()  # materialised once per forward
    b, h, n, m = 2, 4, q_pos.shape[1], k_pos.shape[1]
    torch.testing.assert_close(grid(sm, b, h, n, m), ref.expand(b, h, n, m), rtol=0, atol=1e-6)
    # memory key/values: zero bias on the 3 prepended keys, the scheme shifted right
    mem = sm.with_memory(3)
    torch.testing.assert_close(mem.dense(), F.pad(ref, (3, 0)))
    torch.testing.assert_close(grid(mem, b, h, n, m + 3), F.pad(ref, (3, 0)).expand(b, h, n, m + 3), rtol=0, atol=1e-6)


def test_t5_offset_table_gradient_reaches_the_learned_table():
    q_pos, k_pos, _ = padded_positions()
    mod = T5RelativePositionBias(4, causal=True, num_buckets=8, max_distance=16)
    sm = mod.score_mod(q_pos, k_pos)
    w = torch.randn(2, 4, 40, 40)
    (grid(sm, 2, 4, 40, 40) * w).sum().backward()
    g_flex = mod.relative_attention_bias.weight.grad.clone()
    mod.zero_grad()
    (mod(q_pos, k_pos) * w).sum().backward()
    torch.testing.assert_close(g_flex, mod.relative_attention_bias.weight.grad, rtol=1e-5, atol=1e-4)  # summation order


def qkv(b=2, h=4, g=4, n=8, m=8, d=16):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, n, d, generator=gen), torch.randn(b, g, m, d, generator=gen),
            torch.randn(b, g, m, d, generator=gen))


def test_dispatch_on_cpu_never_picks_flex_and_says_why():
    q, k, v = qkv()
    q_pos, k_pos, mask = padded_positions(n=8)
    req = AttendRequest(q=q, k=k, v=v, mask=mask[:, None, None], causal=True,
                        score_mod=AlibiPositionalBias(4).score_mod(q_pos, k_pos))
    assert choose_backend(req).name == "sdpa"
    assert any("CUDA" in r for r in rejection_reasons(req)["flex"])
    with pytest.raises(BackendNotSupported, match="CUDA"):
        attend(q, k, v, score_mod=req.score_mod, force_backend="flex")


def test_flex_reasons_name_each_unsupported_feature():
    q, k, v = qkv()
    q_pos, k_pos, _ = padded_positions(n=8)
    sm = AlibiPositionalBias(4).score_mod(q_pos, k_pos)
    reasons = flex.FlexBackend().not_supported_reasons
    assert any("score_mod" in r for r in reasons(AttendRequest(q=q, k=k, v=v, bias=torch.zeros(1, 4, 8, 8))))
    for field, value, words in [("dropout", 0.1, "dropout"), ("pre_mix", torch.eye(4), "talking heads"),
                                ("normalizer", "entmax15", "normalizer"), ("sparse_topk", 2, "top-k"),
                                ("need_weights", True, "weights"), ("bias", torch.zeros(1, 4, 8, 8), "dense bias")]:
        assert any(words in r for r in reasons(AttendRequest(q=q, k=k, v=v, score_mod=sm, **{field: value}))), field


def test_dispatch_prefers_flex_where_measured_faster(flex_on_cpu, monkeypatch):
    q, k, v = qkv()
    q_pos, k_pos, _ = padded_positions(n=8)
    alibi = AttendRequest(q=q, k=k, v=v, causal=True, score_mod=AlibiPositionalBias(4).score_mod(q_pos, k_pos))
    t5 = AttendRequest(q=q, k=k, v=v, causal=True, score_mod=T5RelativePositionBias(4, causal=True).score_mod(q_pos, k_pos))
    # ALiBi is measured faster on flex in the compiled training step users run (eager: equal); T5 is not
    assert choose_backend(alibi).name == "sdpa"
    assert any("outside torch.compile" in r for r in rejection_reasons(alibi)["flex"])
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert choose_backend(alibi).name == "flex"
    # the rule itself: a scheme that does not declare itself faster on flex gets SDPA unless forced
    monkeypatch.setattr(type(alibi.score_mod), "prefer_flex", False)
    assert choose_backend(alibi).name == "sdpa"
    assert any("not measured faster" in r for r in rejection_reasons(alibi)["flex"])
    assert choose_backend(alibi, "flex").name == "flex"
    monkeypatch.setattr(type(alibi.score_mod), "prefer_flex", True)
    assert choose_backend(t5).name == "sdpa"  # flex can, but was not measured faster: only when forced
    assert any("not measured faster" in r for r in rejection_reasons(t5)["flex"])
    assert choose_backend(t5, "flex").name == "flex"
    # keys from a cache (fewer queries than keys): the dense bias, not flex, unless forced
    q1 = q[:, :, -1:]
    cached = AttendRequest(q=q1, k=k, v=v, causal=True, score_mod=AlibiPositionalBias(4).score_mod(q_pos[:, -1:], k_pos))
    assert choose_backend(cached).name == "sdpa"
    assert any("keys from a cache" in r for r in rejection_reasons(cached)["flex"])
    assert choose_backend(cached, "flex").name == "flex"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["alibi_decoder_padded", "t5_encoder_gqa", "tupe_r_mem_kv", "alibi_cache_rows_dead"])
def test_flex_forward_matches_explicit(case, flex_on_cpu):
    q_pos, k_pos, mask = padded_positions(n=8 if "cache" in case else 24, m=24)
    b, n, m = 2, q_pos.shape[1], k_pos.shape[1]
    h, g = 4, 2 if "gqa" in case else 4
    q, k, v = qkv(h=h, g=g, n=n, m=m)
    key_mask = mask[:, None, None]
    if "dead" in case:  # row 1's keys all padded: its outputs must be zeros, not NaN
        key_mask = key_mask.clone()
        key_mask[1] = False
    if case.startswith("alibi"):
        sm = AlibiPositionalBias(h).score_mod(q_pos, k_pos)
    elif case.startswith("t5"):
        sm = T5RelativePositionBias(h, causal=False, num_buckets=8, max_distance=8).score_mod(q_pos, k_pos)
    else:
        t5 = T5RelativePositionBias(h, causal=True, num_buckets=8, max_distance=8)
        sm = TUPEPositionalBias(64, h, 16, max_seq_len=64, untie_cls=True).score_mod(q_pos, k_pos, t5.score_mod(q_pos, k_pos))
    causal = "decoder" in case or "cache" in case or "mem" in case
    if "mem" in case:  # 3 memory keys, always visible, zero bias
        k, v = torch.cat((torch.randn(b, g, 3, 16), k), -2), torch.cat((torch.randn(b, g, 3, 16), v), -2)
        key_mask, sm = F.pad(key_mask, (3, 0), value=True), sm.with_memory(3)
    with torch.no_grad():
        got, _ = attend(q, k, v, mask=key_mask, causal=causal, score_mod=sm, scale=0.3, force_backend="flex")
        ref, _ = attend(q, k, v, mask=key_mask, causal=causal, bias=sm.dense(), scale=0.3, force_backend="explicit")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if "dead" in case:
        assert (got[1] == 0).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_on_flex_path_skips_dense_bias_and_builds_one_block_mask(flex_on_cpu, monkeypatch):
    torch.manual_seed(0)
    model = Decoder(dim=64, depth=3, heads=4, alibi_pos_bias=True).eval()
    x = torch.randn(2, 24, 64)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad(), attend_backend("explicit"):
        ref = model(x, mask)
    materialised = []
    real = type(model.rel_pos).forward
    monkeypatch.setattr(type(model.rel_pos), "forward", lambda self, *a: materialised.append(1) or real(self, *a))
    with torch.no_grad(), attend_backend("flex"):
        got = model(x, mask)  # flex: the bias as a score_mod
    assert materialised == []  # the (b, h, n, m) bias was never built
    assert flex_on_cpu["create_block_mask"] == 1  # one block mask shared by the 3 layers
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_cpu_model_materialises_bias_once_per_forward(monkeypatch):
    model = Encoder(dim=32, depth=3, heads=4, rel_pos_bias=True)
    calls = []
    real = T5RelativePositionBias.forward
    monkeypatch.setattr(T5RelativePositionBias, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    model(torch.randn(2, 10, 32)).sum().backward()
    assert calls == [1]
    assert model.rel_pos.relative_attention_bias.weight.grad is not None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_static_decode_on_the_flex_path_equals_uncached(flex_on_cpu, monkeypatch):
    """The compiled decode step reaches block_mask_for with the static cache's mask: its memo must
    trace (an id() of a tensor made in the graph did not: issue 25, ALiBi on GPU). With keys from a
    cache, automatic dispatch takes SDPA's dense bias (flex's score_mod failed inductor's lowering
    in a GPU decode step); forced, flex must still trace. With memory key/values each layer pads the
    mask (a block mask per layer); with grouped key/value heads flex gets enable_gqa. Two batch
    sizes, ragged prompts, one process."""
    from torch.nn.attention import flex_attention as flex_api

    from x_transformers import AutoregressiveWrapper, TransformerWrapper

    # the fixture's call counter would be traced into the graph and guarded on (a recompile per step)
    monkeypatch.setattr(flex, "create_block_mask", flex_api.create_block_mask)
    graphs = []

    def recording_backend(gm, example_inputs):  # runs the captured graph as it is, keeping it to look at
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    calls = [[torch.randint(0, 64, (n,), generator=g) for n in (5, 9, 1)], torch.randint(0, 64, (2, 5), generator=g)]
    for layers in (dict(), dict(attn_num_mem_kv=2), dict(attn_kv_heads=2)):
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=64, max_seq_len=64,
                                 attn_layers=Decoder(dim=64, depth=1, heads=4, alibi_pos_bias=True, **layers))
        ar = AutoregressiveWrapper(net).eval()
        for prompts in calls:
            with attend_backend("explicit"):
                want = ar.generate(prompts, 4, temperature=0.0, cache_kv=False)
            for forced in (None, "flex"):
                graphs.clear()
                with attend_backend(forced):
                    got = ar.generate(prompts, 4, temperature=0.0, compile=dict(backend=recording_backend))
                assert len(graphs) == 1  # one graph for the whole generation
                used_flex = any(node.target is torch.ops.higher_order.flex_attention for node in graphs[0].graph.nodes)
                assert used_flex == (forced == "flex"), (layers, forced)
                assert torch.equal(got, want), (layers, forced)
