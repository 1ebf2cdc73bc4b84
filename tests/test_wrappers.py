"""TransformerWrapper, XTransformer and the seed's snippet."""

import pytest
import torch

from x_transformers import CrossAttender, Decoder, Encoder, TransformerWrapper, XTransformer


def test_seed_snippet_verbatim():
    torch.manual_seed(0)
    # --- the seed, verbatim ---
    import torch as _torch  # noqa: F401
    from x_transformers import XTransformer
    model = XTransformer(num_tokens=256, dim=512, depth=6, heads=8, max_seq_len=1024)
    src = torch.randint(0, 256, (1, 1024)); tgt = torch.randint(0, 256, (1, 1024))  # noqa: E702
    logits = model(src, tgt)   # (1, 1024, 256); return_embeddings=True gives (1, 1024, 512)
    # ---
    assert logits.shape == (1, 1024, 256) and torch.isfinite(logits).all()
    hidden = model(src, tgt, return_embeddings=True)
    assert hidden.shape == (1, 1024, 512)
    # the logits are the tied-free head applied to those hidden states
    torch.testing.assert_close(model.decoder.to_logits(hidden), logits)


def test_xtransformer_prefixes_route_to_one_side():
    model = XTransformer(dim=32, num_tokens=20, max_seq_len=16, depth=2, heads=4, enc_depth=3,
                         dec_rotary_pos_emb=True, enc_attn_num_mem_kv=2)
    assert len(model.encoder.attn_layers.blocks) == 6 and len(model.decoder.attn_layers.blocks) == 6
    assert model.decoder.attn_layers.rotary is not None and model.encoder.attn_layers.rotary is None
    assert model.encoder.attn_layers.blocks[0].fn.mem_k is not None
    assert model.decoder.attn_layers.blocks[0].fn.mem_k is None
    assert model.decoder.pos_emb is None and model.encoder.pos_emb is not None


def test_context_mask_is_honoured():
    torch.manual_seed(0)
    model = XTransformer(dim=32, num_tokens=20, max_seq_len=16, depth=1, heads=4).eval()
    src, tgt = torch.randint(0, 20, (1, 6)), torch.randint(0, 20, (1, 5))
    mask = torch.tensor([[True] * 4 + [False] * 2])
    out = model(src, tgt, mask=mask)
    src2 = src.clone()
    src2[:, 4:] = (src2[:, 4:] + 7) % 20  # change only masked source tokens
    torch.testing.assert_close(model(src2, tgt, mask=mask), out)
    assert not torch.allclose(model(src2, tgt), model(src, tgt))  # and they do matter unmasked


def test_return_attn_gives_post_softmax_maps():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=32, depth=2, heads=4)).eval()
    x = torch.randint(0, 20, (2, 6))
    logits, attns = model(x, return_attn=True)
    assert len(attns) == 2 and attns[0].shape == (2, 4, 6, 6)
    for a in attns:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 6))
        assert (a.triu(1) == 0).all()  # causal
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)  # explicit path == fused path


def test_layers_callable_on_embeddings_and_cross_attender():
    torch.manual_seed(0)
    enc = Encoder(dim=32, depth=1, heads=4).eval()
    x = torch.randn(2, 5, 32)
    # permuting a position-free encoder's inputs permutes its outputs
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(enc(x)[:, perm], enc(x[:, perm]), atol=1e-5, rtol=1e-5)
    ca = CrossAttender(dim=32, depth=1, heads=4).eval()
    ctx = torch.randn(2, 3, 32)
    out = ca(x, context=ctx)
    assert ca.layout_string == "c f"
    # no self-attention: each position depends on itself and the context only
    torch.testing.assert_close(ca(x[:, :2], context=ctx), out[:, :2], atol=1e-6, rtol=1e-6)


def test_tied_embedding_and_memory_tokens_stripped():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, tie_embedding=True, logits_scale=1.0,
                               num_memory_tokens=3, attn_layers=Encoder(dim=32, depth=1, heads=4)).eval()
    x = torch.randint(0, 20, (2, 6))
    hidden = model(x, return_embeddings=True)
    assert hidden.shape == (2, 6, 32)
    torch.testing.assert_close(model(x), hidden @ model.token_emb.weight.t())
    assert model.to_logits is None


def test_repr_shows_layout_and_norm_placement():
    text = repr(Decoder(dim=32, depth=2, heads=4, sandwich_norm=True, macaron=True))
    assert "layout=f*0.5 a f*0.5 f*0.5 a f*0.5" in text and "placement=sandwich" in text


def test_xtransformer_encoder_has_no_head_and_every_parameter_learns():
    """The encoder's output head was never used: no gradient (DDP without find_unused_parameters
    fails) and vocab x dim wasted parameters. Every parameter must get a gradient from a loss on
    the decoder's logits, and the state dict must round-trip."""
    torch.manual_seed(0)
    kw = dict(dim=32, num_tokens=20, max_seq_len=16, depth=1, heads=4)
    model = XTransformer(**kw)
    assert model.encoder.to_logits is None and model.decoder.to_logits is not None
    src, tgt = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 5))
    model(src, tgt).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.encode(src).shape == (2, 6, 32)
    assert model.encoder(src).shape == (2, 6, 32)  # hidden states: it has nothing else to give

    again = XTransformer(**kw)
    again.load_state_dict(model.state_dict())  # strict
    model.eval(), again.eval()
    torch.testing.assert_close(again(src, tgt), model(src, tgt))
    assert not any(k.startswith("encoder.to_logits") for k in model.state_dict())


def test_return_only_embed_has_no_head_and_returns_the_hidden_states():
    import pytest as _pytest
    torch.manual_seed(0)
    m = TransformerWrapper(num_tokens=10, max_seq_len=8, return_only_embed=True,
                           attn_layers=Encoder(dim=16, depth=1, heads=2))
    x = torch.randint(0, 10, (2, 5))
    assert m.to_logits is None
    torch.testing.assert_close(m(x), m(x, return_embeddings=True), rtol=0, atol=0)
    assert m(x).shape == (2, 5, 16)
    with _pytest.raises(ValueError, match="no output head"):
        m.logits_weight


# ---------------------------------------------------------------------------------------------
# memory tokens under TUPE's untied [CLS] (tupe_untie_cls): they share position 0 with the [CLS]


def _tupe_model(M, causal=False, seed=0, **kw):
    torch.manual_seed(seed)
    stack = (Decoder if causal else Encoder)(dim=32, depth=2, heads=4, tupe=True, tupe_max_seq_len=32,
                                             tupe_untie_cls=True, **kw)
    model = TransformerWrapper(num_tokens=29, max_seq_len=32, num_memory_tokens=M, attn_layers=stack).eval()
    with torch.no_grad():  # distinct thetas, so the [CLS] row and column are recognisable
        stack.tupe.cls_theta.copy_(torch.tensor([[3.0, -2.0, 1.5, 0.5], [-1.0, 2.5, 0.25, -3.0]]))
    return model


def _stack_positions(model, x, mask=None):
    seen = {}
    handle = model.attn_layers.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(x, mask)
    finally:
        handle.remove()
    return seen["positions"]


def test_tupe_untie_cls_with_memory_tokens_the_cls_is_the_first_real_token():
    """Memory tokens sit at position 0 with the [CLS]; the tokens keep the positions (so TUPE's
    table entries) they have without memory tokens, and the first real token is the untied [CLS]."""
    x = torch.randint(0, 29, (2, 6), generator=torch.Generator().manual_seed(1))
    with_mem, without = _tupe_model(3), _tupe_model(0)
    pos, pos0 = _stack_positions(with_mem, x), _stack_positions(without, x)
    assert pos.tolist()[0] == [0, 0, 0, 0, 1, 2, 3, 4, 5] and torch.equal(pos[:, 3:], pos0)
    # the positional term of TUPE: theta_1 on the rows of position 0 (memory + [CLS]), theta_2 on their
    # columns elsewhere, the learned correlation between the tokens exactly as without memory tokens
    tupe = with_mem.attn_layers.tupe
    tupe.load_state_dict(without.attn_layers.tupe.state_dict())
    bias, bias0 = tupe(pos, pos), tupe(pos0, pos0)
    theta = tupe.cls_theta.detach()
    assert torch.equal(bias[:, :, :4], theta[0].view(1, 4, 1, 1).expand(pos.shape[0], -1, 4, 9))
    assert torch.equal(bias[:, :, 4:, :4], theta[1].view(1, 4, 1, 1).expand(pos.shape[0], -1, 5, 4))
    torch.testing.assert_close(bias[:, :, 3:, 3:], bias0)


def test_tupe_untie_cls_with_memory_tokens_decodes_exactly_with_a_cache():
    """Causal decoding with KVCache and StaticKVCache (left-padded prompt, then one token at a time)
    gives the full forward's logits: positions continue after the kept tokens, memory not counted."""
    from x_transformers.cache import KVCache, StaticKVCache

    model = _tupe_model(2, causal=True, rel_pos_bias=True)  # TUPE-R: the T5 term is reset at the [CLS] too
    x = torch.randint(0, 29, (2, 8), generator=torch.Generator().manual_seed(2))
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False
    ref = model(x, keep)
    for cache in (KVCache(), StaticKVCache.for_model(model, 2, 2 + 8)):
        outs = [model(x[:, :4], keep[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 8)]
        torch.testing.assert_close(torch.cat(outs, dim=1)[keep], ref[keep], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# custom token embedding and output head (upstream's token_emb / to_logits modules)


class Factorised(torch.nn.Module):
    """A token embedding of our own: a small table times a projection (ALBERT's factorisation)."""

    def __init__(self, num_tokens, dim, rank=4):
        super().__init__()
        self.table = torch.nn.Embedding(num_tokens, rank)
        self.up = torch.nn.Linear(rank, dim, bias=False)

    def forward(self, x):
        return self.up(self.table(x))


def test_custom_token_emb_is_what_the_model_consumes():
    torch.manual_seed(0)
    emb = Factorised(29, 32)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, token_emb=emb,
                               attn_layers=Decoder(dim=32, depth=1, heads=4)).eval()
    assert model.token_emb is emb
    x = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = model(x)
    # the module's output, and nothing else, is the token embedding: replacing its output replaces the input
    seen = {}
    handle = model.attn_layers.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    model(x)
    handle.remove()
    torch.testing.assert_close(seen["h"], emb(x) + model.pos_emb(torch.arange(7)[None]))
    logits.square().mean().backward()
    assert emb.table.weight.grad[x.unique()].abs().sum(dim=-1).min() > 0 and emb.up.weight.grad.abs().sum() > 0
    unused = torch.ones(29, dtype=torch.bool)
    unused[x.unique()] = False
    assert not emb.table.weight.grad[unused].any()  # only the rows of the tokens given


def test_custom_to_logits_is_the_head():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 29))
    model = TransformerWrapper(num_tokens=29, max_seq_len=16, to_logits=head,
                               attn_layers=Encoder(dim=32, depth=1, heads=4)).eval()
    x = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(3))
    logits, hidden = model(x, return_logits_and_embeddings=True)
    torch.testing.assert_close(logits, head(hidden))
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_custom_modules_refused_where_ambiguous():
    import pytest

    from x_transformers import ConfigConflictError

    def build(**kw):
        return TransformerWrapper(num_tokens=29, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4), **kw)

    with pytest.raises(ConfigConflictError, match="token_emb.*tie_embedding"):
        build(token_emb=torch.nn.Embedding(29, 32), tie_embedding=True)
    with pytest.raises(ConfigConflictError, match="to_logits.*num_output_heads"):
        build(to_logits=torch.nn.Linear(32, 29), num_output_heads=2)
    with pytest.raises(TypeError, match="token_emb must be an nn.Module"):
        build(token_emb=lambda x: x)
    model = build(token_emb=torch.nn.Embedding(29, 16))  # emb_dim is 32 (dim): the wrong width
    with pytest.raises(ValueError, match="token_emb must map"):
        model(torch.zeros(1, 3, dtype=torch.long))
    # a bias-free linear custom head still gives the chunked loss its weight; another head does not
    assert build(to_logits=torch.nn.Linear(32, 29, bias=False)).logits_weight.shape == (29, 32)
    with pytest.raises(ValueError, match="logits_weight"):
        build(to_logits=torch.nn.Linear(32, 29)).logits_weight


def test_xtransformer_routes_custom_modules_to_a_side():
    emb = torch.nn.Embedding(20, 32)
    model = XTransformer(dim=32, depth=1, heads=4, num_tokens=20, max_seq_len=16, dec_token_emb=emb)
    assert model.decoder.token_emb is emb and model.encoder.token_emb is not emb


# ---------------------------------------------------------------------------------------------
# memory tokens interspersed every n tokens (upstream's memory_tokens_interspersed_every)


def _interspersed(every=3, M=2, seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=29, max_seq_len=32, num_memory_tokens=M, memory_tokens_interspersed_every=every,
                              attn_layers=Decoder(dim=32, depth=2, heads=4, **kw)).eval()


def test_interspersed_memory_tokens_appear_before_every_nth_token():
    model = _interspersed(every=3, M=2)
    x = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(1))
    seen = {}
    handle = model.attn_layers.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0], **k), with_kwargs=True)
    out = model(x)
    handle.remove()
    h, mem = seen["h"], model.memory_tokens
    # columns: [m m] x0 x1 x2 [m m] x3 x4 x5 [m m] x6
    assert h.shape[1] == 7 + 3 * 2
    for group in (0, 5, 10):
        assert torch.equal(h[:, group:group + 2], mem.expand(2, -1, -1))
    tokens_at = [2, 3, 4, 7, 8, 9, 12]
    assert torch.equal(h[:, tokens_at], model.token_emb(x) + model.pos_emb(torch.arange(7)[None]))
    assert seen["positions"].tolist()[0] == list(range(13))  # each memory group just before its chunk
    assert out.shape == (2, 7, 29)
    # the memory tokens are read: a chunk's tokens change when the memory tokens do
    with torch.no_grad():
        model.memory_tokens.add_(1.0)
    assert not torch.allclose(model(x)[:, 3:], out[:, 3:])


def test_interspersed_memory_tokens_stay_causal():
    model = _interspersed(every=2, M=1, rotary_pos_emb=True)
    x = torch.randint(0, 29, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = model(x)
    for t in range(1, 7):
        torch.testing.assert_close(model(x[:, :t]), ref[:, :t], atol=1e-5, rtol=1e-5)


def test_interspersed_memory_tokens_decode_exactly_with_a_cache():
    """A left-padded prompt, then one token at a time: the memory group enters the cache when a
    chunk's first token arrives; KVCache and StaticKVCache give the full forward's logits."""
    from x_transformers import AutoregressiveWrapper
    from x_transformers.cache import KVCache, StaticKVCache

    for kw in (dict(), dict(rotary_pos_emb=True), dict(alibi_pos_bias=True)):
        model = _interspersed(every=3, M=2, **kw)
        x = torch.randint(0, 29, (2, 9), generator=torch.Generator().manual_seed(3))
        keep = torch.ones(2, 9, dtype=torch.bool)
        keep[1, :2] = False
        ref = model(x, keep)
        for cache in (KVCache(), StaticKVCache.for_model(model, 2, 9 + 2 * 3)):
            outs = [model(x[:, :4], keep[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
            torch.testing.assert_close(torch.cat(outs, dim=1)[keep], ref[keep], atol=1e-5, rtol=1e-5)
        ar = AutoregressiveWrapper(model)
        prompt = x[:, :2]
        assert torch.equal(ar.generate(prompt, 6, temperature=0.0, cache_kv=True),
                           ar.generate(prompt, 6, temperature=0.0, cache_kv=False))


def test_interspersed_memory_tokens_refusals():
    import pytest

    from x_transformers import ConfigConflictError

    with pytest.raises(ConfigConflictError, match="num_memory_tokens"):
        TransformerWrapper(num_tokens=29, max_seq_len=16, memory_tokens_interspersed_every=2,
                           attn_layers=Decoder(dim=32, depth=1, heads=4))
    with pytest.raises(ConfigConflictError, match="bidirectional"):
        TransformerWrapper(num_tokens=29, max_seq_len=16, memory_tokens_interspersed_every=2, num_memory_tokens=1,
                           attn_layers=Encoder(dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match="memory_tokens_interspersed_every"):
        _interspersed(every=0)


@pytest.mark.parametrize("layers", [dict(depth=1, custom_layers=("f", "f")), dict(depth=2, top_attn_to_ff=2),
                                    dict(depth=1, only_cross=True)],
                         ids=["custom_layers", "top_attn_to_ff", "only_cross"])
def test_memory_tokens_on_a_layout_without_self_attention_are_a_documented_no_op(layers):
    """Memory tokens could reach no other position without self-attention: none are built (upstream
    builds them, and they never get a gradient), and the model is the one without them."""
    from x_transformers import ContinuousTransformerWrapper

    context = torch.randn(2, 3, 32)
    kw = dict(context=context) if layers.get("only_cross") else {}
    x = torch.randint(0, 20, (2, 6))
    models = []
    for mem in (2, None):
        torch.manual_seed(0)
        models.append(TransformerWrapper(num_tokens=20, max_seq_len=8, num_memory_tokens=mem,
                                         attn_layers=Encoder(dim=32, heads=4, **layers)).eval())
    with_mem, without = models
    assert with_mem.memory_tokens is None and with_mem.num_memory_tokens == 0
    assert with_mem.state_dict().keys() == without.state_dict().keys()
    torch.testing.assert_close(with_mem(x, **kw), without(x, **kw))
    cont = ContinuousTransformerWrapper(dim_in=5, max_seq_len=8, num_memory_tokens=2,
                                        attn_layers=Encoder(dim=32, heads=4, **layers))
    assert cont.num_memory_tokens == 0 and not any("memory" in n for n, _ in cont.named_parameters())
    # with a self-attention block left, they are built and read
    kept = TransformerWrapper(num_tokens=20, max_seq_len=8, num_memory_tokens=2,
                              attn_layers=Encoder(dim=32, heads=4, depth=2, top_attn_to_ff=1))
    assert kept.memory_tokens.shape == (2, 32)
