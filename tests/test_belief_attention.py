"""Belief attention (attn_orthog_projected_values / _per_head, openreview Ard2QzPAUK): each query's
attention output loses its component along the query's own value."""

from __future__ import annotations

import pytest
import torch

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.attention import Attention
from x_transformers.cache import KVCache
from x_transformers.conflicts import ConfigConflictError


def _model(**kwargs):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=32, max_seq_len=64, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_dim_head=8, attn_kv_heads=2, rotary_pos_emb=True, **kwargs)).eval()


def _capture(model):
    """Per attention block: (its input x, what its output projection reads)."""
    seen = []
    for mod in model.modules():
        if isinstance(mod, Attention):
            entry = {}
            mod.register_forward_pre_hook(lambda m, args, e=entry: e.update(x=args[0]))
            mod.to_out.register_forward_pre_hook(lambda m, args, e=entry: e.update(out=args[0]))
            seen.append((mod, entry))
    return seen


@pytest.mark.parametrize("which", ["all", "head", "both"])
def test_output_is_orthogonal_to_each_querys_own_value(which):
    model = _model(attn_orthog_projected_values=which in ("all", "both"),
                   attn_orthog_projected_values_per_head=which in ("head", "both"))
    seen = _capture(model)
    model(torch.randint(0, 32, (2, 9)))
    for mod, entry in seen:
        b, n, _ = entry["x"].shape
        own = mod.to_v(entry["x"]).view(b, n, 2, 8).repeat_interleave(2, dim=2)  # (b, n, h, e) per query head
        parts = entry["out"].view(b, n, -1, 4, 8).unbind(2)
        assert len(parts) == (2 if which == "both" else 1)
        for part, over in zip(parts, ["all", "head"] if which == "both" else [which]):
            dims = (-2, -1) if over == "all" else (-1,)
            dot = (part * own).sum(dim=dims)
            assert dot.abs().max() < 1e-5 * part.abs().max() * own.abs().max() * 32
            assert part.abs().max() > 1e-3  # not vacuously zero
        if which == "all":  # per head the dot products need not vanish, over all heads they do
            assert (parts[0] * own).sum(-1).abs().max() > 1e-4


def test_cached_decoding_matches_the_full_forward_and_gradients_flow():
    model = _model(attn_orthog_projected_values=True, attn_orthog_projected_values_per_head=True)
    x = torch.randint(0, 32, (2, 7))
    full = model(x)
    cache = KVCache()
    steps = [model(x[:, :4], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    model.train()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_output_projection_reads_one_copy_per_option():
    assert _model(attn_orthog_projected_values=True, attn_orthog_projected_values_per_head=True) \
        .attn_layers.blocks[0].fn.to_out.in_features == 2 * 4 * 8


@pytest.mark.parametrize("build", [
    lambda: Encoder(dim=32, depth=1, only_cross=True, attn_orthog_projected_values=True),
    lambda: Decoder(dim=32, depth=1, heads=4, attn_dim_head=8, attn_project_out=False,
                    attn_orthog_projected_values_per_head=True),
])
def test_refused_where_there_is_no_own_value_or_no_projection(build):
    with pytest.raises(ConfigConflictError, match="attn_orthog_projected_values"):
        build()
