"""orthog_residual (2505.11881) and mv_split_residual (2605.06169): the updates against their
formulas computed here, causality in a decoder, padding, the cache (agreement / refusal), the
residual_fn_kwargs and the declared refusals."""

import pytest
import torch

from attention_helpers import assert_cache_decoding_equals_full_forward
from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.cache import KVCache
from x_transformers.config import ConfigConflictError

DIM = 16


def _stack(cls, **kw):
    torch.manual_seed(0)
    return cls(dim=DIM, depth=2, heads=2, attn_dim_head=8, **kw).eval()


def _first_block_io(stack, x, **kw):
    """(skip, branch output, new x) of the first block."""
    block, got = stack.blocks[0], {}
    hook = block.register_forward_hook(lambda m, a, o: got.update(skip=a[0], new=o[0]))
    branch = block.branch
    block.branch = lambda *a, **k: got.setdefault("out", branch(*a, **k))
    stack(x, **kw)
    hook.remove()
    del block.branch
    return got["skip"], got["out"][0], got["new"]


def test_orthogonal_update_adds_the_part_orthogonal_to_the_stream():
    stack = _stack(Decoder, orthog_residual=True)
    skip, out, new = _first_block_io(stack, torch.randn(2, 5, DIM))
    u = skip / skip.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(new, skip + out - (out * u).sum(-1, keepdim=True) * u, atol=1e-6, rtol=1e-5)
    assert (new - skip).mul(skip).sum(-1).abs().max() < 1e-4  # orthogonal to the stream, per token
    assert_cache_decoding_equals_full_forward(TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=stack))


@pytest.mark.parametrize("causal", [False, True])
def test_mean_variation_split_formula(causal):
    stack = _stack(Decoder if causal else Encoder, mv_split_residual=True,
                   residual_fn_kwargs=dict(init_alpha=0.5, init_beta=0.2))
    x, mask = torch.randn(2, 5, DIM), torch.tensor([[True] * 5, [False, True, True, False, True]])
    skip, out, new = _first_block_io(stack, x, mask=mask)
    w = mask[..., None].float()

    def mean(t):  # over kept tokens; prefix means (tokens <= t) when causal
        if causal:
            return (t * w).cumsum(1) / w.cumsum(1).clamp(min=1)
        return (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)

    ref = skip + (out - mean(out)) * 0.2 + (mean(out) - mean(skip)) * 0.5
    torch.testing.assert_close(new[mask], ref[mask], atol=1e-6, rtol=1e-5)


def test_mean_variation_split_keeps_causality_and_refuses_the_cache():
    stack = _stack(Decoder, mv_split_residual=True, residual_fn_kwargs=dict(learned=True))
    x = torch.randn(1, 6, DIM)
    later = x.clone()
    later[:, 4:] += 1.0
    torch.testing.assert_close(stack(x)[:, :4], stack(later)[:, :4])  # later tokens change nothing before them
    with pytest.raises(ValueError, match="mv_split_residual"):
        stack(x, cache=KVCache())


def test_learned_gains_start_at_the_constant_ones():
    learned = _stack(Encoder, mv_split_residual=True, residual_fn_kwargs=dict(learned=True))
    fixed = _stack(Encoder, mv_split_residual=True)
    fixed.load_state_dict(learned.state_dict(), strict=False)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(learned(x), fixed(x))


@pytest.mark.parametrize("kw", [dict(orthog_residual=True, gate_residual=True),
                                dict(mv_split_residual=True, num_residual_streams=2),
                                dict(orthog_residual=True, mv_split_residual=True),
                                dict(mv_split_residual=True, reversible=True)])
def test_refusals_are_declared(kw):
    with pytest.raises(ConfigConflictError):
        Decoder(dim=DIM, depth=1, heads=2, **kw)


def test_residual_fn_kwargs_are_checked():
    with pytest.raises(ValueError, match="residual_fn_kwargs"):
        Decoder(dim=DIM, depth=1, heads=2, mv_split_residual=True, residual_fn_kwargs=dict(init_gamma=1.0))
    with pytest.raises(ValueError, match="mv_split_residual"):
        Decoder(dim=DIM, depth=1, heads=2, residual_fn_kwargs=dict(learned=True))
    Decoder(dim=DIM, depth=1, heads=2, residual_fn_kwargs={})  # upstream's default spelled out
