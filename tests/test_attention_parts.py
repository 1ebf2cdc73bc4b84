"""Attention's widths and QK-norm's parts (issue 20): attn_value_dim_head, attn_qk_norm_groups,
attn_qk_norm_dim_scale, attn_rotate_num_heads; each against a hand computation or the invariance
that defines it, and decoding with both caches."""

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import (DIM, HEADS, D, assert_cache_decoding_equals_full_forward, attention, heads, inputs,
                               plain_logits, weights)
from x_transformers import Decoder, TransformerWrapper
from x_transformers.cache import StaticKVCache


def test_values_sized_apart_from_keys():
    a = attention(attn_value_dim_head=5)
    assert a.to_v.out_features == HEADS * 5 and a.to_out.in_features == HEADS * 5 and a.to_q.out_features == HEADS * D
    x = inputs()
    out, w = a(x, need_weights=True)
    v = heads(a.to_v(x), HEADS)  # (b, h, n, 5)
    torch.testing.assert_close(out, a.to_out((w @ v).transpose(1, 2).reshape(2, 8, -1)))


def test_value_width_reaches_every_cache_and_memory_values():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, attn_value_dim_head=3, attn_kv_heads=2, attn_num_mem_kv=1,
        attn_value_rmsnorm=True, rotary_pos_emb=True))
    layer = StaticKVCache.for_model(net, 2, 9).layer(0)
    assert layer.k.shape[-1] == 8 and layer.v.shape == (2, 2, 9, 3)
    assert_cache_decoding_equals_full_forward(net)


def _unit_groups(t, groups):
    return torch.cat([F.normalize(c, dim=-1) for c in t.chunk(groups, dim=-1)], dim=-1)


def test_qk_norm_groups_normalise_each_group_and_are_invariant_to_a_groups_scale():
    a = attention(attn_qk_norm=True, attn_qk_norm_groups=2)
    x = inputs()
    q, k = heads(a.to_q(x), HEADS), heads(a.to_k(x), HEADS)
    logits = (_unit_groups(q, 2) @ _unit_groups(k, 2).transpose(-1, -2)) * a.qk_scale  # (per head scale)
    torch.testing.assert_close(weights(a, x), logits.softmax(-1))
    # each group is unit length, so scaling one group of the query channels changes nothing; without
    # groups it moves the whole vector's direction
    for groups, same in ((2, True), (1, False)):
        a = attention(attn_qk_norm=True, attn_qk_norm_groups=groups)
        before = weights(a, x)
        with torch.no_grad():
            a.to_q.weight.view(HEADS, D, DIM)[:, : D // 2] *= 3.0
        assert torch.allclose(weights(a, x), before, atol=1e-6) == same


def test_qk_norm_groups_must_leave_three_channels():
    with pytest.raises(ValueError, match="attn_qk_norm_groups"):
        attention(attn_qk_norm=True, attn_qk_norm_groups=4)  # 2 channels per group of an 8-wide head
    with pytest.raises(ValueError, match="attn_qk_norm_groups configures attn_qk_norm"):
        attention(attn_qk_norm_groups=2)


def test_qk_norm_dim_scale_learns_per_channel_gains_at_a_fixed_scale():
    a = attention(attn_qk_norm=True, attn_qk_norm_dim_scale=True)
    assert a.qk_scale is None and a.q_gain.shape == (HEADS, 1, D) and torch.all(a.q_gain == D ** 0.25)
    x = inputs()
    with torch.no_grad():
        a.q_gain.normal_(1.0, 0.3)
        a.k_gain.normal_(1.0, 0.3)
    q = F.normalize(heads(a.to_q(x), HEADS), dim=-1) * a.q_gain
    k = F.normalize(heads(a.to_k(x), HEADS), dim=-1) * a.k_gain
    torch.testing.assert_close(weights(a, x), (q @ k.transpose(-1, -2) * D ** -0.5).softmax(-1))
    out, _ = a(x)
    gq, gk = torch.autograd.grad(out.square().sum(), [a.q_gain, a.k_gain])
    assert gq.abs().amin(dim=-1).gt(0).all() and gk.abs().amin(dim=-1).gt(0).all()  # every channel learns


def test_rotate_num_heads_turns_only_the_last_heads():
    x = inputs()
    partial = attention(causal=True, rotary_pos_emb=True, rotate_num_heads=1)  # upstream's layers-level spelling
    full = attention(causal=True, rotary_pos_emb=True)
    assert partial.rotate_num_heads == 1
    torch.manual_seed(0)
    rot = Decoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, rotary_pos_emb=True).rotary(torch.arange(8)[None])
    w = weights(partial, x, rotary=rot)
    torch.testing.assert_close(w[:, :-1], weights(full, x)[:, :-1])  # unrotated heads: content only
    torch.testing.assert_close(w[:, -1:], weights(full, x, rotary=rot)[:, -1:])
    assert not torch.allclose(w[:, -1:], weights(full, x)[:, -1:], atol=1e-3)


def test_multi_latent_attention_projects_through_low_rank_latents_with_decoupled_rope_heads():
    kw = dict(attn_use_latent_q=True, attn_dim_latent_q=12, attn_use_latent_kv=True, attn_dim_latent_kv=10,
              attn_latent_rope_subheads=1, rotary_pos_emb=True)
    a = attention(causal=True, **kw)
    x = inputs()
    torch.manual_seed(0)
    rot = Decoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, rotary_pos_emb=True).rotary(torch.arange(8)[None])
    from x_transformers.positional import apply_rotary

    q = heads(a.to_q(a.to_latent_q(x)), HEADS)
    lat = a.to_latent_kv(x)  # (b, n, 10): k and v of every head come from it, but for the rope head
    k = torch.cat((heads(a.to_k(lat), HEADS - 1), heads(a.to_rope_k(x), 1)), dim=1)
    q = torch.cat((q[:, :-1], apply_rotary(q[:, -1:], *rot)), dim=1)
    k = torch.cat((k[:, :-1], apply_rotary(k[:, -1:], *rot)), dim=1)
    logits = (q @ k.transpose(-1, -2)) * D ** -0.5
    logits = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    out, w = a(x, rotary=rot, need_weights=True)
    torch.testing.assert_close(w, logits.softmax(-1))
    v = heads(a.to_v(lat), HEADS)
    torch.testing.assert_close(out, a.to_out((w @ v).transpose(1, 2).reshape(2, 8, -1)))
    # the content keys' and the values' maps factor through the 10-wide latent
    assert torch.linalg.matrix_rank(a.to_k.weight @ a.to_latent_kv.weight) <= 10 < DIM
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=DIM, depth=2, heads=HEADS,
                                                                                attn_dim_head=8, **kw))
    assert_cache_decoding_equals_full_forward(net)


def _mla_reference(a, x, rot, kv_heads, rope_heads):
    """MLA's logits by hand: content keys from the latent, the last rope_heads key heads from x; every
    key head shared by its heads // kv_heads query heads (contiguous groups, as attend's GQA); the
    rope key heads and the query heads they serve rotated, nothing else."""
    from x_transformers.positional import apply_rotary

    per = HEADS // kv_heads
    q = heads(a.to_q(a.to_latent_q(x)), HEADS)
    rope = heads(a.to_rope_k(x), rope_heads)
    k = rope if a.to_k is None else torch.cat((heads(a.to_k(a.to_latent_kv(x)), kv_heads - rope_heads), rope), dim=1)
    turned_q = rope_heads * per
    q = torch.cat((q[:, :HEADS - turned_q], apply_rotary(q[:, HEADS - turned_q:], *rot)), dim=1)
    k = torch.cat((k[:, :kv_heads - rope_heads], apply_rotary(k[:, kv_heads - rope_heads:], *rot)), dim=1)
    k = k.repeat_interleave(per, dim=1)  # (b, h, n, d): query head i reads key head i // per
    logits = (q @ k.transpose(-1, -2)) * D ** -0.5
    return logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))


@pytest.mark.parametrize("kv_heads,rope_heads", [(2, 1), (1, 1), (2, 2)])
def test_multi_latent_rope_heads_with_grouped_key_heads(kv_heads, rope_heads):
    """MLA's decoupled rope under grouped-query attention (upstream refuses it): the last rope_heads
    key heads come from x and turn, with exactly the query heads that read them; all rope heads
    (rope_heads = kv_heads, as upstream allows for heads) leave no content keys. Equal to the hand
    computation (rotation included), relative (shifting every position leaves the weights), and decoded
    exactly with both caches."""
    kw = dict(attn_use_latent_q=True, attn_dim_latent_q=12, attn_use_latent_kv=True, attn_dim_latent_kv=10,
              attn_latent_rope_subheads=rope_heads, attn_kv_heads=kv_heads, rotary_pos_emb=True)
    a = attention(causal=True, **kw)
    assert (a.to_k is None) == (rope_heads == kv_heads)
    x = inputs()
    torch.manual_seed(0)
    rotary = Decoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, rotary_pos_emb=True).rotary
    rot = rotary(torch.arange(8)[None])
    w = weights(a, x, rotary=rot)
    torch.testing.assert_close(w, _mla_reference(a, x, rot, kv_heads, rope_heads).softmax(-1))
    torch.testing.assert_close(weights(a, x, rotary=rotary(torch.arange(8)[None] + 5)), w, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=DIM, depth=2, heads=HEADS,
                                                                                attn_dim_head=8, **kw))
    assert_cache_decoding_equals_full_forward(net)


def test_relative_projection_bias_reads_each_querys_curve_at_the_distance():
    a = attention(causal=True, attn_use_rel_proj_pos_bias=True, attn_rel_proj_num_distance_basis=3,
                  attn_rel_proj_max_dist=5)
    x = inputs()
    with torch.no_grad():
        a.rel_proj.bank.normal_()
    pos = torch.arange(8)[None]
    w = a.rel_proj.to_weights(x).view(2, 8, HEADS, 3)  # (b, n, h, r)
    bias = torch.zeros(2, HEADS, 8, 8)
    for i in range(8):
        for j in range(8):
            if 0 <= i - j < 5:  # further back than max_dist, or ahead: no bias
                bias[:, :, i, j] = w[:, i] @ a.rel_proj.bank[:, i - j]
    logits = plain_logits(a, x) + bias
    logits = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(weights(a, x, positions=(pos, pos)), logits.softmax(-1))
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, attn_use_rel_proj_pos_bias=True, attn_rel_proj_max_dist=4))
    assert_cache_decoding_equals_full_forward(net)
