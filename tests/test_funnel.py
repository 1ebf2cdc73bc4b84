"""FunnelEncoder (2006.03236): lengths, pooling rules, padding invariance, upsampling, gradients."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import ConfigConflictError, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.attention import Attention
from x_transformers.config import AttentionConfig
from x_transformers.funnel import mean_pool, pool_mask, upsample_index
from x_transformers.positional import RotaryEmbedding

DIM, HEADS, VOCAB = 32, 4, 29


def funnel(depths=(1, 1, 1), seed=0, **kwargs):
    torch.manual_seed(seed)
    return FunnelEncoder(DIM, depths=depths, heads=HEADS, **kwargs).eval()


def wrapped(depths=(1, 1, 1), seed=0, **kwargs):
    torch.manual_seed(seed)
    stack = FunnelEncoder(DIM, depths=depths, heads=HEADS, **kwargs)
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=stack).eval()


def tokens(b, n, seed=0):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def ceil_half(n, cls):
    return cls + -(-(n - cls) // 2)


# ---------------------------------------------------------------------------------------------
# lengths


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 13])
def test_length_after_each_block(n, cls):
    # the attention maps show every block's query and key lengths: block i's first layer has
    # pooled queries over the previous block's unpooled keys (query-only pooling)
    model = funnel(separate_cls=cls)
    out, attns = model(torch.randn(2, n, DIM), return_attn=True)
    lengths = [n]
    for _ in range(2):
        lengths.append(ceil_half(lengths[-1], int(cls)))
    assert [tuple(a.shape[-2:]) for a in attns] == [(lengths[0], lengths[0]), (lengths[1], lengths[0]),
                                                    (lengths[2], lengths[1])]
    assert out.shape == (2, lengths[2], DIM) and model.output_length(n) == lengths[2]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("n", [1, 6, 9, 11])
def test_upsampled_output_has_input_length(n, cls):
    model = funnel(separate_cls=cls, upsample=True)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, max(1, n - 2):] = False
    out = model(torch.randn(2, n, DIM), mask)
    assert out.shape == (2, n, DIM) and model.output_length(n) == n
    assert torch.isfinite(out).all()
    assert torch.equal(model.output_mask(mask), mask)


def test_upsample_index_inverts_pooling():
    # position i is held, after k poolings, by the pooled token whose sources include it
    for cls in (False, True):
        for n in (1, 5, 8, 13):
            for k in (1, 2, 3):
                owner = torch.arange(n)
                for _ in range(k):
                    owner = torch.where(owner < int(cls), owner, int(cls) + (owner - int(cls)) // 2)
                assert torch.equal(upsample_index(n, k, int(cls), "cpu"), owner)


# ---------------------------------------------------------------------------------------------
# pooling rules


def test_pooled_mask_rule():
    mask = torch.tensor([[True, True, True, False, False], [False, True, False, False, True]])
    assert pool_mask(mask, False).tolist() == [[True, True, False], [True, False, True]]
    # the first token stays, the rest pools
    assert pool_mask(mask, True).tolist() == [[True, True, False], [False, True, True]]


def test_mean_over_kept_sources_and_first_kept_position():
    x = torch.arange(10.0).view(1, 5, 2)  # tokens (0,1) (2,3) (4,5) (6,7) (8,9)
    mask = torch.tensor([[False, True, True, True, True]])
    pos = torch.tensor([[0, 0, 1, 2, 3]])
    pooled, pmask, ppos = mean_pool(x, mask, pos, lead=0)
    # window 0 keeps only token 1; window 1 averages tokens 2, 3; window 2 is token 4 alone (odd)
    assert pooled.tolist() == [[[2.0, 3.0], [5.0, 6.0], [8.0, 9.0]]]
    assert pmask.tolist() == [[True, True, True]] and ppos.tolist() == [[0, 1, 3]]
    # no mask: plain means, odd tail alone; positions are the first source's
    pooled, pmask, ppos = mean_pool(x, None, torch.arange(5)[None], lead=1)
    assert pooled.tolist() == [[[0.0, 1.0], [3.0, 4.0], [7.0, 8.0]]]
    assert pmask is None and ppos.tolist() == [[0, 1, 3]]


# ---------------------------------------------------------------------------------------------
# padding invariance


@pytest.mark.parametrize("kwargs", [dict(), dict(separate_cls=True), dict(rotary_pos_emb=True),
                                    dict(alibi_pos_bias=True, separate_cls=True), dict(rel_pos_bias=True),
                                    dict(upsample=True, separate_cls=True)])
@pytest.mark.parametrize("n", [7, 9])
def test_right_padding_invariance_odd_lengths(n, kwargs):
    model = wrapped(**kwargs)
    x = tokens(2, n)
    ref = model(x, return_embeddings=True)
    for pad in (1, 2, 5):
        xp = torch.cat((x, tokens(2, pad, seed=pad)), dim=1)
        keep = torch.ones_like(xp, dtype=torch.bool)
        keep[:, n:] = False
        out = model(xp, keep, return_embeddings=True)
        kept = model.attn_layers.output_mask(keep)
        assert kept[:, : ref.shape[1]].all() and not kept[:, ref.shape[1]:].any()
        torch.testing.assert_close(out[:, : ref.shape[1]], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(rotary_pos_emb=True), dict(alibi_pos_bias=True)])
def test_left_padding_aligned_with_the_windows(kwargs):
    # two poolings: left padding by 4 keeps every window whole, so kept outputs shift by one
    model = wrapped(**kwargs)
    x = tokens(2, 9)
    ref = model(x, return_embeddings=True)
    xp = torch.cat((tokens(2, 4, seed=3), x), dim=1)
    keep = torch.ones_like(xp, dtype=torch.bool)
    keep[:, :4] = False
    out = model(xp, keep, return_embeddings=True)
    torch.testing.assert_close(out[:, 1:], ref, atol=1e-5, rtol=1e-5)


def test_padding_changes_output_without_the_kept_mean():
    # the property above is not vacuous: the same padded input with the padding kept differs
    model = wrapped()
    x = tokens(1, 7)
    xp = torch.cat((x, tokens(1, 1, seed=9)), dim=1)
    ref = model(x, return_embeddings=True)
    out = model(xp, return_embeddings=True)
    assert not torch.allclose(out[:, -1], ref[:, -1], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# gradients and equivalences


@pytest.mark.parametrize("kwargs", [dict(), dict(upsample=True, separate_cls=True, rotary_pos_emb=True)])
def test_gradients_reach_every_block(kwargs):
    model = wrapped(depths=(2, 1, 1), **kwargs).train()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    model(tokens(2, 11), mask).square().mean().backward()
    stack = model.attn_layers
    parts = list(stack.blocks) + ([stack.upsampler] if stack.upsampler is not None else [])
    for i, part in enumerate(parts):
        for name, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient in part {i}: {name}"


def test_single_block_is_a_plain_encoder():
    # depths=(n,) never pools: the funnel's own layer loop must compute what Encoder computes
    kw = dict(rotary_pos_emb=True, attn_kv_heads=2, rel_pos_bias=False)
    torch.manual_seed(0)
    enc = Encoder(DIM, 2, HEADS, **kw).eval()
    fun = funnel(depths=(2,), **kw)
    fun.blocks[0].load_state_dict(enc.state_dict())
    x = torch.randn(2, 9, DIM)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    torch.testing.assert_close(fun(x, mask), enc(x, mask), atol=1e-6, rtol=1e-6)


def test_attention_kv_equal_to_x_is_self_attention():
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, AttentionConfig())
    x = torch.randn(2, 5, DIM)
    rot = RotaryEmbedding(8)(torch.arange(5)[None])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    ref, _ = attn(x, mask=mask, rotary=rot)
    out, _ = attn(x, mask=mask, rotary=rot, kv=x, kv_rotary=rot)
    torch.testing.assert_close(out, ref)


def test_xtransformer_with_funnel_encoder():
    torch.manual_seed(0)
    model = XTransformer(dim=DIM, depth=1, heads=HEADS, num_tokens=VOCAB, max_seq_len=64, enc_funnel=True,
                         enc_depths=(1, 1, 1), enc_separate_cls=True).eval()
    assert isinstance(model.encoder.attn_layers, FunnelEncoder)
    src, tgt = tokens(2, 9), tokens(2, 5, seed=1)
    assert model.encode(src).shape == (2, 3, DIM)  # CLS + pooled rest: 9 -> 5 -> 3
    ref = model(src, tgt)
    src_p = torch.cat((src, tokens(2, 3, seed=2)), dim=1)
    keep = torch.ones_like(src_p, dtype=torch.bool)
    keep[:, 9:] = False
    torch.testing.assert_close(model(src_p, tgt, mask=keep), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# refusals


def test_refusals_name_the_keywords():
    with pytest.raises(TypeError, match="'upsample'"):
        FunnelEncoder(DIM, depths=(1, 1), heads=HEADS, upsampel=True)
    with pytest.raises(TypeError, match="'depths'"):
        FunnelEncoder(DIM, (1, 1), HEADS, depth=3)
    with pytest.raises(ConfigConflictError, match="upsample_depth.*upsample=False"):
        FunnelEncoder(DIM, depths=(1, 1), heads=HEADS, upsample_depth=3)
    with pytest.raises(ValueError, match="depths"):
        FunnelEncoder(DIM, depths=(2, 0), heads=HEADS)
    with pytest.raises(ValueError, match="bidirectional"):
        FunnelEncoder(DIM, depths=(1, 1), heads=HEADS, causal=True)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        funnel()(torch.randn(1, 4, DIM), num_memory_tokens=5)
    with pytest.raises(ConfigConflictError, match="enc_depth.*enc_funnel"):
        XTransformer(dim=DIM, depth=1, heads=HEADS, num_tokens=VOCAB, max_seq_len=16, enc_funnel=True, enc_depth=2)
    model = funnel(separate_cls=True)
    with pytest.raises(ValueError, match="separate_cls"):
        model(torch.randn(1, 4, DIM), torch.tensor([[False, True, True, True]]))


# ---------------------------------------------------------------------------------------------
# memory tokens (TransformerWrapper's num_memory_tokens): never pooled


def _stack_inputs(model, x, mask=None):
    """What the wrapper hands its stack: (embedded sequence with memory tokens first, mask, positions)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(h=args[0], mask=args[1], positions=kwargs["positions"])

    handle = model.attn_layers.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(x, mask, return_embeddings=True)
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("kwargs", [dict(), dict(rotary_pos_emb=True), dict(rel_pos_bias=True)])
def test_one_memory_token_is_pooled_like_a_separate_cls(kwargs):
    """A leading memory token is never pooled, so a funnel over [memory; tokens] computes exactly
    what the same weights compute with separate_cls=True, the memory token in the [CLS]'s place
    (an older, independently tested path)."""
    torch.manual_seed(0)
    stack = FunnelEncoder(DIM, depths=(1, 1, 1), heads=HEADS, **kwargs)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, num_memory_tokens=1, attn_layers=stack).eval()
    ref_stack = FunnelEncoder(DIM, depths=(1, 1, 1), heads=HEADS, separate_cls=True, **kwargs).eval()
    ref_stack.load_state_dict(stack.state_dict())
    x = tokens(2, 9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    out, seen = _stack_inputs(model, x, keep)
    ref = ref_stack(seen["h"], seen["mask"], positions=seen["positions"])
    assert out.shape == (2, model.attn_layers.output_length(9), DIM)
    kept = model.attn_layers.output_mask(keep)
    torch.testing.assert_close(out[kept], ref[:, 1:][kept], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", [False, True])
def test_memory_tokens_survive_every_pooling(cls):
    """Every block sees all M memory tokens: the attention maps' key lengths are M + the pooled
    length at each level, and the memory rows are in the output before the pooled tokens."""
    model = funnel(separate_cls=cls)
    M, n = 3, 9
    out, attns = model(torch.randn(2, M + n, DIM), num_memory_tokens=M, return_attn=True)
    lengths = [n]
    for _ in range(2):
        lengths.append(ceil_half(lengths[-1], int(cls)))
    assert [tuple(a.shape[-2:]) for a in attns] == [(M + lengths[0], M + lengths[0]), (M + lengths[1], M + lengths[0]),
                                                    (M + lengths[2], M + lengths[1])]
    assert out.shape == (2, M + model.output_length(n), DIM)


def test_memory_tokens_on_an_unpooled_funnel_equal_the_encoder():
    """depths=(d,): no pooling, so with memory tokens the funnel is the Encoder of the same weights."""
    torch.manual_seed(0)
    enc = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, num_memory_tokens=2,
                             attn_layers=Encoder(DIM, 2, HEADS, rotary_pos_emb=True)).eval()
    fun = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, num_memory_tokens=2,
                             attn_layers=FunnelEncoder(DIM, depths=(2,), heads=HEADS, rotary_pos_emb=True)).eval()
    state = {(k.replace("attn_layers.", "attn_layers.blocks.0.", 1) if k.startswith("attn_layers.") else k): v
             for k, v in enc.state_dict().items()}
    fun.load_state_dict(state)
    x = tokens(2, 7)
    torch.testing.assert_close(fun(x), enc(x), atol=1e-6, rtol=1e-6)


def test_memory_tokens_get_gradients_through_a_pooling_funnel():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, num_memory_tokens=2,
                               attn_layers=FunnelEncoder(DIM, depths=(1, 1, 1), heads=HEADS))
    model(tokens(2, 9)).square().mean().backward()
    assert model.memory_tokens.grad is not None and model.memory_tokens.grad.abs().min() > 0


def test_cross_attend_reads_the_context_in_every_block():
    model = funnel(cross_attend=True, upsample=True)
    x, ctx = torch.randn(2, 7, DIM), torch.randn(2, 5, DIM)
    ref = model(x, context=ctx)
    ctx_p = torch.cat((ctx, torch.randn(2, 3, DIM)), dim=1)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[:, 5:] = False
    torch.testing.assert_close(model(x, context=ctx_p, context_mask=keep), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, context=ctx + 1), ref, atol=1e-3)
    with pytest.raises(ValueError, match="context"):
        model(x)


# ---------------------------------------------------------------------------------------------
# every Encoder keyword is honoured in every block (the blocks run through the shared runner)


def test_tupe_is_honoured_in_every_block():
    # the funnel used to run its own layer loop without TUPE's positional term: TUPE's parameters
    # got no gradient and, TUPE replacing the absolute embedding, the model had no position signal
    model = funnel(depths=(1, 1, 1), tupe=True, tupe_max_seq_len=32, upsample=True).train()
    x = torch.randn(2, 9, DIM)
    ref = model(x)
    ref.square().mean().backward()
    for part in list(model.blocks) + [model.upsampler]:
        for name, p in part.tupe.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    shifted = model(x, positions=torch.arange(9)[None] + 5)
    assert (shifted - ref).abs().max() > 1e-5  # (small weights at init: a small, real difference)


def test_tupe_funnel_through_the_wrapper_depends_on_token_order():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=FunnelEncoder(
        DIM, depths=(1,), heads=HEADS, tupe=True, tupe_max_seq_len=64)).eval()
    t = tokens(1, 6)
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    # without positions an encoder is permutation-equivariant: out[perm] == f(t[perm])
    assert (model(t)[:, perm] - model(t[:, perm])).abs().max() > 1e-5


REVERSIBLE_KW = [dict(), dict(rel_pos_bias=True, separate_cls=True), dict(tupe=True, tupe_max_seq_len=32, upsample=True),
                 dict(rotary_pos_emb=True, cross_attend=True)]


def _funnel_grads(model, x, ctx, coupled):
    from x_transformers.reversible import ReversibleStack
    call = ReversibleStack.__call__
    if coupled:  # the same coupling under ordinary autograd (keeps every activation)
        ReversibleStack.__call__ = lambda self, *args, **kw: self.coupled(*args, **kw)
    try:
        kw = dict(context=ctx) if model.needs_context else {}
        out = model(x, **kw)
        inputs = [x] + ([ctx] if kw else []) + [p for p in model.parameters()]
        return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)).sum(),
                                        inputs, allow_unused=True)
    finally:
        ReversibleStack.__call__ = call


@pytest.mark.parametrize("kw", REVERSIBLE_KW)
def test_reversible_funnel_is_the_reversible_coupling(kw):
    # reversible=True used to give exactly the plain funnel. Query pooling is sound under the
    # coupling: the unpooled keys/values are an input of the block (like a cross-attention
    # context), so each step still inverts exactly; its gradient is returned by the Function.
    torch.manual_seed(0)
    model = FunnelEncoder(DIM, depths=(2, 1, 1), heads=HEADS, reversible=True, **kw).double()
    plain = FunnelEncoder(DIM, depths=(2, 1, 1), heads=HEADS, **kw).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 9, DIM, dtype=torch.double, requires_grad=True)
    ctx = torch.randn(2, 4, DIM, dtype=torch.double, requires_grad=True)
    assert all(b.reversible is not None for b in model.blocks)
    out, grads = _funnel_grads(model, x, ctx, coupled=False)
    ref_out, ref_grads = _funnel_grads(model, x, ctx, coupled=True)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)
    plain_out = plain(x, context=ctx) if plain.needs_context else plain(x)
    assert not torch.allclose(out, plain_out, atol=1e-3)


def test_funnel_refusals_are_declared_entries():
    from x_transformers import conflicts

    entries = [e for e in conflicts.CONFLICTS if e.kinds == ("funnel",)]
    assert entries
    for entry in entries:
        kw = dict(entry.example)
        with pytest.raises(ConfigConflictError) as info:
            FunnelEncoder(DIM, heads=HEADS, **kw)
        assert info.value.conflict is entry


# ---------------------------------------------------------------------------------------------
# blocks without self-attention, shared-QK under pooling


@pytest.mark.parametrize("kw", [dict(depths=(2, 1), top_attn_to_ff=1), dict(depths=(1, 1), custom_layers=("f",)),
                                dict(depths=(1, 1), custom_layers=("a", "f"), top_attn_to_ff=1)])
def test_a_block_without_self_attention_runs_over_the_mean_pooled_sequence(kw):
    """No query to pool: the block's feed-forwards read the mean-pooled sequence, so the funnel's
    output is the next block run over mean_pool(previous block's output), token by token."""
    model = funnel(**kw)
    assert not any(s.kind == "a" for s in model.blocks[1].layout)
    x = torch.randn(2, 7, DIM)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    pos = torch.arange(7)[None]
    h = model.blocks[0](x, keep)
    pooled, pooled_keep, _ = mean_pool(h, keep, pos, False)
    torch.testing.assert_close(model(x, keep), model.blocks[1](pooled, pooled_keep))
    # position-wise: changing one pooled window changes only its own output
    x2 = x.clone()
    x2[:, 6] += 1.0
    out, out2 = model(x, keep), model(x2, keep)
    if all(s.kind != "a" for s in model.blocks[0].layout):
        torch.testing.assert_close(out[:, :3], out2[:, :3])


def test_only_cross_funnel_pools_and_reads_the_context_in_every_block():
    model = funnel(depths=(1, 1), only_cross=True)
    x, ctx = torch.randn(2, 6, DIM), torch.randn(2, 5, DIM)
    out = model(x, context=ctx)
    assert out.shape == (2, 3, DIM)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shared_qk_funnel_keys_are_the_unpooled_sequences_normalised_queries():
    """Under pooling the first self-attention of a later block takes pooled queries; with shared-QK
    its keys are the unit-normalised query projections of the unpooled sequence (no to_k), and
    every parameter gets a gradient."""
    model = funnel(depths=(1, 1), attn_shared_qk=True)
    attn = model.blocks[1].blocks[0].fn
    assert attn.shared_qk and attn.to_k is None
    x = torch.randn(2, 6, DIM)
    h = model.blocks[0](x)
    pooled, _, _ = mean_pool(h, None, torch.arange(6)[None], False)
    norm = model.blocks[1].blocks[0].pre_norm
    _, w = attn(norm(pooled), kv=norm(h), need_weights=True)
    q = attn.to_q(norm(pooled)).view(2, 3, HEADS, -1).transpose(1, 2)
    k = F.normalize(attn.to_q(norm(h)).view(2, 6, HEADS, -1).transpose(1, 2), dim=-1)
    torch.testing.assert_close(w, (q @ k.transpose(-1, -2) * attn.dim_head ** -0.5).softmax(-1))
    out = model(x)
    assert out.shape == (2, 3, DIM)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("norm", [dict(use_derf=True), dict(use_dynamic_tanh=True), {}, dict(sandwich_norm=True)])
def test_pooled_attention_reads_keys_and_values_through_its_pre_norm(norm):
    """Pre-norm attention is x + attn(norm(x)): under query-only pooling both sides of the pooled
    attention, the pooled queries and the unpooled keys/values, enter through the block's norm.
    (Only the queries used to: with QK-norm, which undoes any query scale, a DyT/Derf pre-norm's
    scalar alpha then got a gradient a million times smaller than its neighbours', zero in fp32.)"""
    model = funnel(depths=(1, 1), attn_qk_norm=True, **norm).double()
    x = torch.randn(2, 6, DIM, dtype=torch.double)
    res = model.blocks[1].blocks[0]
    seen = {}
    hook = res.fn.register_forward_pre_hook(lambda m, a, kw: seen.update(q=a[0], kv=kw["kv"]), with_kwargs=True)
    h = model.blocks[0](x)
    model(x)
    hook.remove()
    pooled, _, _ = mean_pool(h, None, torch.arange(6)[None], False)
    torch.testing.assert_close(seen["q"], res.pre_norm(pooled))
    torch.testing.assert_close(seen["kv"], res.pre_norm(h))
    # every parameter of the norm moves the output as much as the unpooled block's own norm does
    model(x).square().sum().backward()
    for (name, p), (_, ref) in zip(res.pre_norm.named_parameters(), model.blocks[0].blocks[0].pre_norm.named_parameters()):
        assert p.grad.abs().max() > 1e-2 * ref.grad.abs().max(), name
