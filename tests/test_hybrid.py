"""What joins the heads' output (hybrid.py): a user's recurrent module beside attention, and belief
attention's projection orthogonal to the token's own values. Legend: b batch, h heads, n tokens, e head dim."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention_helpers import DIM, HEADS, D, assert_cache_decoding_equals_full_forward, attention, copy_weights, \
    heads, inputs
from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.cache import KVCache


def _heads_output(a, x, **kw):
    """What block a's output projection reads (b, n, c), captured by a hook."""
    seen = {}
    handle = a.to_out.register_forward_hook(lambda mod, args, out: seen.setdefault("in", args[0]))
    try:
        a(x, **kw)
    finally:
        handle.remove()
    return seen["in"]


def _rms(t):  # per head, gain 1 at init: (b, n, h*e) -> (b, h, n, e)
    t = heads(t, HEADS)
    return F.normalize(t, dim=-1) * t.shape[-1] ** 0.5


def _gru():
    return nn.GRU(DIM, HEADS * D, batch_first=True)


@pytest.mark.parametrize("learned_mix", [False, True])
def test_hybrid_output_mixes_the_normed_heads_and_the_modules_output(learned_mix):
    a = attention(causal=True, attn_hybrid_module=_gru(), attn_hybrid_learned_mix=learned_mix)
    plain = attention(causal=True)
    assert all(name.startswith("hybrid.") for name in copy_weights(a, plain))  # the same projections
    x = inputs()
    attn = _rms(_heads_output(plain, x))
    rnn = _rms(a.hybrid.module(x)[0])
    if learned_mix:
        mix = torch.sigmoid(x @ a.hybrid.to_mix.weight.t()).transpose(1, 2)[..., None]  # (b, h, n, 1)
        expected = attn + mix * (rnn - attn)
    else:
        expected = 0.5 * (attn + rnn)
    got = heads(_heads_output(a, x), HEADS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hybrid_fold_runs_the_module_over_strided_folds():
    a = attention(causal=True, attn_hybrid_module=_gru(), attn_hybrid_fold_axial_dim=3)
    x = inputs(n=7)  # not a multiple of 3: the last fold is padded at its end
    got = a.hybrid._run(x, None, {})[0]
    for r in range(3):
        torch.testing.assert_close(got[:, r::3], a.hybrid.module(x[:, r::3])[0], atol=1e-6, rtol=1e-6)


def test_hybrid_decoding_carries_the_recurrent_state_in_the_cache():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=D, rotary_pos_emb=True, attn_hybrid_module=_gru(),
        attn_hybrid_fold_axial_dim=1))
    assert_cache_decoding_equals_full_forward(net)
    cache = KVCache()
    x = torch.randint(0, 20, (2, 4))
    net(x, cache=cache)
    state = cache.layer(0).get_state("hybrid")  # the GRU's (layers, b, H) state after the prompt
    torch.testing.assert_close(state, net.attn_layers.blocks[0].fn.hybrid.module(_block_input(net, x))[1])
    cache.reorder(torch.tensor([1, 0]))
    torch.testing.assert_close(cache.layer(0).get_state("hybrid"), state[:, [1, 0]])


def _block_input(net, x):
    """The first block's normed input, captured."""
    seen = {}
    fn = net.attn_layers.blocks[0].fn
    handle = fn.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return seen["x"]


def test_hybrid_mask_keyword_reaches_the_module_in_a_bidirectional_stack():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(DIM, HEADS * D)

        def forward(self, x, keep=None):
            Recorder.seen = keep
            return self.proj(x) * keep[..., None]

    enc = Encoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, attn_hybrid_module=Recorder(),
                  attn_hybrid_mask_kwarg="keep")
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    enc(torch.randn(2, 6, DIM), mask=keep)
    assert torch.equal(Recorder.seen, keep)


def test_hybrid_refusals():
    with pytest.raises(ValueError, match="bidirectional recurrent module"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D,
                attn_hybrid_module=nn.GRU(DIM, HEADS * D // 2, batch_first=True, bidirectional=True))
    with pytest.raises(ValueError, match="outputs 16 channels"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, attn_hybrid_module=nn.GRU(DIM, 16, batch_first=True))
    with pytest.raises(ValueError, match="attn_hybrid_learned_mix configures attn_hybrid_module"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_hybrid_learned_mix=True)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=1, heads=HEADS, attn_dim_head=D, attn_hybrid_module=_gru(), attn_hybrid_fold_axial_dim=2))
    with pytest.raises(ValueError, match="strided folds"):
        net(torch.randint(0, 20, (1, 4)), cache=KVCache())


@pytest.mark.parametrize("whole, per_head", [(True, False), (False, True), (True, True)])
def test_belief_attention_output_is_orthogonal_to_the_tokens_own_values(whole, per_head):
    a = attention(causal=True, attn_kv_heads=2, attn_orthog_projected_values=whole,
                  attn_orthog_projected_values_per_head=per_head)
    x = inputs()
    got = _heads_output(a, x)  # (b, n, c * h * e)
    v = heads(x @ a.to_v.weight.t(), 2).repeat_interleave(2, dim=1).transpose(1, 2)  # (b, n, h, e), query head order
    parts = got.split(HEADS * D, dim=-1)
    assert len(parts) == int(whole) + int(per_head)
    plain = attention(causal=True, attn_kv_heads=2)  # the same q, k, v (the output projection is wider in a)
    plain.load_state_dict({k: t for k, t in a.state_dict().items() if not k.startswith("to_out")}, strict=False)
    raw = _heads_output(plain, x)  # the heads' output before the projection
    if whole:
        o = parts[0]
        assert (o * v.flatten(2)).sum(-1).abs().max() < 1e-5  # orthogonal to the token's values
        removed = raw - o  # what was taken away lies along the values
        cos = F.cosine_similarity(removed, v.flatten(2), dim=-1).abs()
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-4, rtol=0)
    if per_head:
        o = parts[-1].view(2, 8, HEADS, D)
        assert (o * v).sum(-1).abs().max() < 1e-5  # each head orthogonal to its own values
        cos = F.cosine_similarity(raw.view(2, 8, HEADS, D) - o, v, dim=-1).abs()  # removed: along each head's values
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-4, rtol=0)
        assert a.to_out.in_features == (int(whole) + 1) * HEADS * D


def test_belief_attention_is_cache_exact():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=D, attn_kv_heads=2, rotary_pos_emb=True,
        attn_orthog_projected_values=True, attn_orthog_projected_values_per_head=True))
    assert_cache_decoding_equals_full_forward(net)
