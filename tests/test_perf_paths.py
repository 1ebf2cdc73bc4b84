"""The fast paths compute what the plain ones do: fused q/k/v projection, rotary in bf16,
one-sync token id check."""

import pytest
import torch

from x_transformers import Decoder, TransformerWrapper
from x_transformers.attention import Attention
from x_transformers.config import AttentionConfig
from x_transformers.positional import RotaryEmbedding, apply_rotary


@pytest.mark.parametrize("kw", [dict(bias=True), dict(kv_heads=2)])
def test_fused_qkv_equals_separate_projections(kw):
    torch.manual_seed(0)
    attn = Attention(32, 4, AttentionConfig(**kw), causal=True)
    x = torch.randn(2, 7, 32)
    q, k, v = attn._fused_qkv(x)
    torch.testing.assert_close(q, attn.to_q(x))
    torch.testing.assert_close(k, attn.to_k(x))
    torch.testing.assert_close(v, attn.to_v(x))


def test_rotary_in_bf16_is_close_to_float32():
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(16)(torch.arange(1024)[None])
    x = torch.randn(2, 4, 1024, 32)
    ref = apply_rotary(x, cos, sin)
    got = apply_rotary(x.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_token_id_check_names_the_offending_id():
    model = TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match=r"token id 12 is outside"):
        model(torch.tensor([[1, 2, 12, 3]]))
    with pytest.raises(ValueError, match=r"token id -3 is outside"):
        model(torch.tensor([[1, -3, 2, 3]]))
    model(torch.tensor([[0, 9]]))
