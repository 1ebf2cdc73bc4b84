"""Positions from the content (data_positions.py): CoPE and the forgetting transformer's bias, each
against its paper's formula computed here token by token. Legend: b batch, h heads, n queries, m keys."""

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import DIM, HEADS, assert_cache_decoding_equals_full_forward, attention, heads, inputs, \
    plain_logits, weights
from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.data_positions import COPE_SOFT_TEMP

N = 8
CAUSAL = torch.ones(N, N, dtype=torch.bool).tril()


def _softmax(logits, keep):
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def _cope_term(a, x, logits, soft=False):
    """q_i . e[p_ij], p_ij = sum over k in [j, i] of sigmoid(mixed logits), computed by loops."""
    cope, b = a.cope, x.shape[0]
    q = heads(a.to_q(x), HEADS)
    gate_logits = logits if cope.mix is None else torch.einsum("bhnm,gh->bgnm", logits, cope.mix)
    gates = torch.sigmoid(gate_logits)
    term = torch.zeros(b, HEADS, N, N)
    for i in range(N):
        for j in range(i + 1):
            p = gates[:, :, i, j:i + 1].sum(-1).clamp(max=cope.max_pos - 1)  # (b, h)
            at = q[:, :, i] @ cope.pos_emb.t()  # (b, h, P): q_i . e[p] at every integer p
            if soft:
                w = (-(p[..., None] - torch.arange(cope.max_pos)).abs() / COPE_SOFT_TEMP).softmax(-1)
                term[:, :, i, j] = (w * at).sum(-1)
            else:
                lo, hi = p.floor().long(), p.ceil().long()
                frac = p - p.floor()
                term[:, :, i, j] = at.gather(-1, lo[..., None])[..., 0] * (1 - frac) + \
                    at.gather(-1, hi[..., None])[..., 0] * frac
    return term


@pytest.mark.parametrize("kw", [dict(), dict(attn_cope_soft_onehot_pos=True), dict(attn_cope_talking_heads=True)],
                         ids=["interpolated", "soft-onehot", "talking-heads"])
def test_cope_positions_are_reverse_cumulative_sums_of_sigmoid_gates(kw):
    a = attention(causal=True, attn_use_cope=True, attn_cope_max_pos=4, **kw)
    with torch.no_grad():
        a.cope.pos_emb.normal_()
    x = inputs(scale=3.0)  # logits large enough that the gates spread over (0, 1)
    logits = plain_logits(a, x)
    expected = _softmax(logits + _cope_term(a, x, logits.masked_fill(~CAUSAL, float("-inf")),
                                            soft=bool(kw.get("attn_cope_soft_onehot_pos"))), CAUSAL)
    torch.testing.assert_close(weights(a, x), expected, atol=1e-5, rtol=1e-5)
    # p_ij counts at most the i - j + 1 keys from j to i, and at least the query's own gate
    pos = a.cope.positions(logits, CAUSAL)
    span = (torch.arange(N)[:, None] - torch.arange(N)[None, :] + 1).clamp(min=0).float()
    assert (pos <= span + 1e-6).all() and (pos[..., CAUSAL] > 0).all()


def test_cope_is_causal_and_cache_exact():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, attn_use_cope=True, attn_cope_max_pos=5,
        attn_cope_talking_heads=True))
    with torch.no_grad():
        for p in net.parameters():
            if p.shape == (5, 8):
                p.normal_()
    x = torch.randint(0, 20, (1, 9))
    later = torch.cat((x[:, :5], torch.randint(0, 20, (1, 4))), dim=1)
    net.eval()
    torch.testing.assert_close(net(x)[:, :5], net(later)[:, :5])
    assert_cache_decoding_equals_full_forward(net)


def test_cope_padding_keys_open_no_gate():
    a = attention(causal=True, attn_use_cope=True, attn_cope_max_pos=6)
    x = inputs(scale=3.0)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[:, :3] = False  # left padding: masked keys, whose gates must not count
    pos = a.cope.positions(plain_logits(a, x), keep[:, None, None, :] & CAUSAL)
    alone = a.cope.positions(plain_logits(a, x[:, 3:]), CAUSAL[3:, 3:])  # the kept tokens without the padding
    torch.testing.assert_close(pos[..., 3:, 3:], alone)


def _forget_gates(a, x):
    """log f_t (b, H, n): the gates' linear map read by hand."""
    lin = a.forget_bias.to_gates
    return F.logsigmoid(x @ lin.weight.t() + lin.bias).transpose(1, 2)


def test_forgetting_bias_is_the_cumulative_sum_of_log_forget_gates():
    a = attention(causal=True, attn_data_dependent_alibi=True,
                  attn_data_dependent_alibi_kwargs=dict(bias_init=0.5, post_log_scale=2.0))
    x = inputs()
    logf = _forget_gates(a, x) * 2.0
    bias = torch.zeros(2, HEADS, N, N)
    for i in range(N):
        for j in range(i + 1):
            bias[:, :, i, j] = logf[:, :, j + 1:i + 1].sum(-1)  # the gates of the tokens after j, up to i
    torch.testing.assert_close(weights(a, x), _softmax(plain_logits(a, x) + bias, CAUSAL), atol=1e-5, rtol=1e-5)
    assert (bias[..., CAUSAL] <= 0).all()  # forgetting only: further keys never gain
    torch.testing.assert_close(a.forget_bias.to_gates.bias, torch.full((HEADS,), 0.5))


def test_bidirectional_forgetting_bias_uses_a_second_set_of_gates_after_the_query():
    a = attention(causal=False, attn_data_dependent_alibi=True)
    x = inputs()
    fwd, bwd = _forget_gates(a, x).chunk(2, dim=1)
    bias = torch.zeros(2, HEADS, N, N)
    for i in range(N):
        for j in range(N):
            bias[:, :, i, j] = fwd[:, :, j + 1:i + 1].sum(-1) if j <= i else bwd[:, :, i + 1:j + 1].sum(-1)
    torch.testing.assert_close(weights(a, x), plain_logits(a, x).add(bias).softmax(-1), atol=1e-5, rtol=1e-5)


def test_per_row_forgetting_bias_sums_query_dependent_gates():
    a = attention(causal=True, attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True,
                  attn_data_dependent_alibi_per_row_dim_head=4)
    x = inputs()
    fq, fk = heads(x @ a.forget_bias.to_qk.weight.t(), 2 * HEADS).chunk(2, dim=1)  # (b, h, n, 4) each
    bias = torch.zeros(2, HEADS, N, N)
    for i in range(N):
        for j in range(i + 1):
            for t in range(j, i):  # the tokens from j up to, not including, the query
                bias[:, :, i, j] += F.logsigmoid((fq[:, :, i] * fk[:, :, t]).sum(-1) / 2.0)
    torch.testing.assert_close(weights(a, x), _softmax(plain_logits(a, x) + bias, CAUSAL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_forgetting_transformer_is_causal_and_cache_exact(per_row):
    torch.manual_seed(0)
    kw = dict(attn_data_dependent_alibi_per_row=True) if per_row else dict(
        attn_data_dependent_alibi_kwargs=dict(bias_init=0.0))  # strong forgetting: a bias far from zero
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, attn_data_dependent_alibi=True, attn_num_mem_kv=1, **kw))
    net.eval()
    x = torch.randint(0, 20, (1, 9))
    later = torch.cat((x[:, :5], torch.randint(0, 20, (1, 4))), dim=1)
    torch.testing.assert_close(net(x)[:, :5], net(later)[:, :5])
    assert_cache_decoding_equals_full_forward(net)


def test_forgetting_bias_keyword_checks():
    with pytest.raises(ValueError, match="attn_data_dependent_alibi_kwargs: unknown key 'slope'"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_data_dependent_alibi=True,
                attn_data_dependent_alibi_kwargs=dict(slope=1.0))
    with pytest.raises(ValueError, match="unknown key 'bias_init'"):  # the per-row gates have no bias
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True,
                attn_data_dependent_alibi_kwargs=dict(bias_init=1.0))
    with pytest.raises(ValueError, match="attn_cope_max_pos configures attn_use_cope"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_cope_max_pos=8)
    from x_transformers.config import ConfigConflictError
    with pytest.raises(ConfigConflictError, match="attn_use_cope"):
        Encoder(dim=DIM, depth=1, heads=HEADS, attn_use_cope=True)
