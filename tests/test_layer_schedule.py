"""Per-layer keyword values (upstream's tuples, layout.py) and upstream's ``layer_schedule`` helper."""

import math

import pytest
import torch

from x_transformers import Decoder, Encoder, layer_schedule


def test_layer_schedule_curves():
    assert layer_schedule(0.0, 1.0, 5, "linear") == (0.0, 0.25, 0.5, 0.75, 1.0)
    cos = layer_schedule(6.0, 2.0, 4, "cosine")
    assert cos == tuple(6.0 - 4.0 * 0.5 * (1 - math.cos(math.pi * t)) for t in (0, 1 / 3, 2 / 3, 1))
    assert cos[0] == 6.0 and cos[-1] == 2.0
    assert layer_schedule(0.0, 0.5, 3, lambda a, b, t: a + (b - a) * t ** 2) == (0.0, 0.125, 0.5)
    with pytest.raises(ValueError, match="schedule must be"):
        layer_schedule(0, 1, 3, "square")
    with pytest.raises(ValueError, match="depth >= 2"):
        layer_schedule(0, 1, 1)


def test_per_layer_values_reach_their_blocks():
    net = Decoder(dim=16, depth=3, heads=2, ff_mult=(1, 2, 4), attn_dropout=(0.0, 0.1, 0.2))
    ffs = [b.fn for b in net.blocks if type(b.fn).__name__ == "FeedForward"]
    attns = [b.fn for b in net.blocks if type(b.fn).__name__ == "Attention"]
    assert [sum(p.numel() for p in ff.parameters()) for ff in ffs] == [2 * 16 * 16 * m + 16 * m + 16 for m in (1, 2, 4)]
    assert [a.cfg.dropout for a in attns] == [0.0, 0.1, 0.2]


@pytest.mark.parametrize("cls", [Decoder, Encoder])
def test_a_constant_tuple_is_the_single_value(cls):
    torch.manual_seed(0)
    one = cls(dim=16, depth=3, heads=2, ff_mult=2, attn_num_mem_kv=2).eval()
    torch.manual_seed(0)
    many = cls(dim=16, depth=3, heads=2, ff_mult=(2, 2, 2), attn_num_mem_kv=(2, 2, 2)).eval()
    x = torch.randn(2, 5, 16)
    assert torch.equal(one(x), many(x))


def test_cross_attention_keeps_the_single_values():
    net = Decoder(dim=16, depth=2, heads=2, cross_attend=True, attn_num_mem_kv=(1, 3))
    kinds = [(b.fn.cross, b.fn.mem_k) for b in net.blocks if type(b.fn).__name__ == "Attention"]
    assert [m.shape[1] if m is not None else 0 for cross, m in kinds if not cross] == [1, 3]
    assert all(m is None for cross, m in kinds if cross)  # upstream: a per-layer tuple is self-attention's


@pytest.mark.parametrize("kw, match", [
    (dict(ff_mult=(1, 2)), "one value per feed-forward block: the layout has 3"),
    (dict(attn_dim_head=(8, 8, 8)), "one value for the whole stack"),
    (dict(attn_dropout=(0.0, 2.0, 0.0)), "dropout"),
    # each layer's values meet the conflict table: two entmax variants together only in the last layer
    (dict(attn_use_entmax15=(False, False, True), attn_entmax_alpha=(None, None, 1.5)), "entmax"),
])
def test_per_layer_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        Decoder(dim=16, depth=3, heads=2, **kw)
