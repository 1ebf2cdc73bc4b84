"""PoPE (polar_pos_emb, 2509.10534): the logit formula against a reference computed here, the
learned key phase's init and gradients (reversible too), cache agreement and the refusals (its
agreement with the real upstream package: test_upstream_checkpoint's decoder_polar / encoder_polar_masked)."""

import math

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import assert_cache_decoding_equals_full_forward
from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.config import ConfigConflictError
from x_transformers.positional import PolarEmbedding, apply_polar


def test_logits_are_the_papers_and_depend_on_distance_only():
    torch.manual_seed(0)
    d, h = 6, 2
    pope = PolarEmbedding(d, h, bias_uniform_init=True)
    assert (pope.learned_bias <= 0).all() and (pope.learned_bias >= -2 * math.pi).all() and pope.learned_bias.std() > 0
    q, k = torch.randn(1, h, 1, d, dtype=torch.float64), torch.randn(1, h, 1, d, dtype=torch.float64)
    angles, phase = pope(torch.arange(12)[None])

    def logit(i, j):
        qi = apply_polar(q, angles[:, :, i:i + 1].double())
        kj = apply_polar(k, (angles[:, :, j:j + 1] + phase).double())
        return (qi * kj).sum(-1)[0, :, 0]  # (h,)

    theta = 10000.0 ** (-torch.arange(d, dtype=torch.float64) / d)
    ref = (F.softplus(q) * F.softplus(k) * torch.cos((9 - 2) * theta - phase.double())).sum(-1)[0, :, 0]
    torch.testing.assert_close(logit(9, 2), ref, atol=1e-6, rtol=1e-6)  # (angles are float32)
    torch.testing.assert_close(logit(9, 2), logit(11, 4), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reversible", [False, True])
def test_key_phase_gets_gradients_and_the_cache_agrees(reversible):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=16, depth=2, heads=2, attn_dim_head=8, polar_pos_emb=True, polar_bias_uniform_init=True,
        reversible=reversible))
    net(torch.randint(0, 20, (2, 7))).sum().backward()
    grad = net.attn_layers.polar.learned_bias.grad
    assert grad is not None and grad.abs().sum() > 0
    if not reversible:
        assert_cache_decoding_equals_full_forward(net)


@pytest.mark.parametrize("kw", [dict(rotary_pos_emb=True), dict(attn_num_mem_kv=2), dict(attn_kv_heads=1),
                                dict(attn_shared_qk=True)])
def test_refusals_are_declared(kw):
    with pytest.raises(ConfigConflictError):
        Encoder(dim=16, depth=1, heads=2, polar_pos_emb=True, **kw)
    Encoder(dim=16, depth=1, heads=2, polar_pos_emb=True, attn_kv_heads=2)  # kv_heads == heads: plain attention
