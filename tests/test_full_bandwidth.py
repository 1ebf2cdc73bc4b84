"""FullBandwidth (2608.08888): one pass is the plain model; a feedback pass's position t reads the
latent of t - 1 only; the dynamic rollout weights; cached generation equals recomputation; a toy
run; the inputs it refuses. (Upstream's 2.26.4 test file predates the module: no verbatim test.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.full_bandwidth import (RECIRC_SHORTCUTS, TRANSITIONS, FullBandwidth, LossBreakdown,
                                           dynamic_rollout_loss_weights, resolve_recirc_pairs)
from train_helpers import assert_loss_falls

V, D = 20, 16


def _net(depth=3, seed=0, wrapper=None, **layers):
    torch.manual_seed(seed)
    kw = dict(dict(tie_embedding=True, post_emb_norm=True), **(wrapper or {}))
    return TransformerWrapper(num_tokens=V, max_seq_len=64, **kw, attn_layers=Decoder(
        dim=D, depth=depth, heads=2, rotary_pos_emb=True, depth_scale_residual=True, **layers))


def _sharpen(model, scale=3.0):
    """Larger weights: logits far from uniform, so greedy choices are not ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    return model


def test_one_pass_is_the_plain_next_token_loss():
    fb = FullBandwidth(_net(), temporal_parallel_passes=1)
    x = torch.randint(0, V, (3, 9))
    plain = F.cross_entropy(fb.net(x[:, :-1]).transpose(1, 2), x[:, 1:])
    torch.testing.assert_close(fb(x), plain)
    # more passes weighted 0: the first pass is still the plain model
    fb = FullBandwidth(fb.net, temporal_parallel_passes=3, feedback_pass_weight=0.0)
    torch.testing.assert_close(fb(x), plain)


@pytest.mark.parametrize("pairs", [None, "top_and_prev", "dense"])
def test_a_feedback_pass_position_t_reads_the_latent_of_t_minus_1_only(pairs):
    fb = FullBandwidth(_net(), recirc_pairs=pairs).eval()
    x = torch.randint(0, V, (2, 10))
    _, inter = fb.net(x, return_intermediates=True)
    latents = [h.clone() for h in inter.block_hiddens]

    def feedback(hs):
        fake = SimpleNamespace(block_hiddens=hs, last_hidden=hs[-1])
        return fb.net(x, transform_block_inputs=fb.make_transforms(fake))

    base = feedback(latents)
    t = 5
    later = [h.clone() for h in latents]
    for h in later:
        h[:, t:] += torch.randn_like(h[:, t:]) * 3  # latents at t and after
    moved = feedback(later)
    torch.testing.assert_close(moved[:, :t + 1], base[:, :t + 1], rtol=0, atol=0)
    assert not torch.allclose(moved[:, t + 1:], base[:, t + 1:])
    prev = [h.clone() for h in latents]
    for h in prev:
        h[:, t - 1] += 3.0  # the latent of t - 1 reaches position t
    assert not torch.allclose(feedback(prev)[:, t], base[:, t])
    # the whole model stays causal across passes: a later token changes no earlier logits of any pass
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    _, a = fb(x, return_loss=False, return_all_pass_logits=True)
    _, b = fb(y, return_loss=False, return_all_pass_logits=True)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa[:, :7], pb[:, :7], rtol=0, atol=0)


def test_dynamic_rollout_weights_match_the_formula():
    losses = torch.tensor([2.5, 0.4, 1.7, 3.0])
    decay, threshold = 0.7, 1.0
    expected, before = [], 0.0
    for step in losses.tolist():
        expected.append(torch.tensor(-decay * before).exp())
        before += max(step - threshold, 0.0)
    torch.testing.assert_close(dynamic_rollout_loss_weights(losses, decay, threshold), torch.stack(expected))


def test_the_loss_combines_the_passes_as_configured():
    x = torch.randint(0, V, (2, 9))
    fb = FullBandwidth(_net(), temporal_parallel_passes=3, feedback_pass_weight=0.5, jitter_noise_delta=0.0)
    loss, bd = fb(x, return_loss_breakdown=True)
    assert isinstance(bd, LossBreakdown) and len(bd.all_pass_losses) == 3
    torch.testing.assert_close(loss, bd.first_pass_loss + 0.5 * torch.stack(bd.feedback_pass_losses).mean())
    # the feedback losses are over positions 1.. (position 0 got no latent), by hand from the pass logits
    _, logits = fb(x, return_all_pass_logits=True)
    for lg, fl in zip(logits[1:], bd.feedback_pass_losses):
        torch.testing.assert_close(fl, F.cross_entropy(lg[:, 1:].transpose(1, 2), x[:, 2:]))
    loss, bd = fb(x, return_loss_breakdown=True, dynamic_rollout_loss_weight=True, dynamic_loss_decay=2.0,
                  dynamic_loss_threshold=0.5)
    ls = [v.item() for v in bd.all_pass_losses]
    w = [torch.exp(torch.tensor(-2.0 * (max(ls[0] - 0.5, 0)))),
         torch.exp(torch.tensor(-2.0 * (max(ls[0] - 0.5, 0) + max(ls[1] - 0.5, 0))))]
    feedback = (w[0] * ls[1] + w[1] * ls[2]) / (w[0] + w[1])
    torch.testing.assert_close(loss, torch.tensor(ls[0] + 0.5 * feedback.item()))


def test_jitter_noise_perturbs_the_fed_back_latents_in_training_only():
    x = torch.randint(0, V, (2, 9))
    fb = FullBandwidth(_net(), jitter_noise_delta=0.5)
    (a_first, *_), (b_first, *_) = [fb(x, return_loss_breakdown=True).loss_breakdown.all_pass_losses for _ in "ab"]
    fa, fb_ = [fb(x, return_loss_breakdown=True).loss_breakdown.feedback_pass_losses[0] for _ in "ab"]
    assert torch.equal(a_first, b_first) and not torch.equal(fa, fb_)  # the first pass reads no latent
    fb.eval()
    assert torch.equal(fb(x), fb(x))
    quiet = FullBandwidth(fb.net, jitter_noise_delta=0.0)
    quiet.transitions.load_state_dict(fb.transitions.state_dict())
    assert torch.equal(quiet(x), quiet(x))


@pytest.mark.parametrize("pairs, passes", [(None, 2), ("top_and_prev", 3), ("self", 2)])
def test_cached_generation_equals_recomputation_without_a_cache(pairs, passes):
    fb = _sharpen(FullBandwidth(_net(), recirc_pairs=pairs, temporal_parallel_passes=passes, transition="gru"))
    prompts = torch.randint(0, V, (2, 5))
    every_other = lambda step: step % 2 == 0  # noqa: E731
    for kw in (dict(), dict(should_fuse_latent=every_other), dict(process_prompt=False)):
        cached = fb.generate(prompts, 12, temperature=0.0, **kw)
        recomputed = fb.generate(prompts, 12, temperature=0.0, cache_kv=False, **kw)
        assert torch.equal(cached, recomputed), kw
    plain = fb.generate(prompts, 12, temperature=0.0, temporal_parallel_passes=1)
    fused = fb.generate(prompts, 12, temperature=0.0)
    assert not torch.equal(plain, fused)  # the latents do change what is generated
    assert fb.generate(prompts[0], 4).shape == (4,)


@pytest.mark.parametrize("transition", sorted(TRANSITIONS))
def test_every_transition_trains_and_every_parameter_gets_a_gradient(transition):
    fb = FullBandwidth(_net(depth=2), transition=transition, recirc_pairs="top_and_prev")
    x = torch.randint(0, V, (2, 8))
    fb(x).backward()
    for name, p in fb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("transitions."):
            assert p.grad.abs().sum() > 0, name


def test_toy_run_loss_falls():
    torch.manual_seed(0)
    data = torch.randint(0, V, (4, 12))
    fb = FullBandwidth(_net(depth=2), temporal_parallel_passes=2)
    assert_loss_falls(fb, data, steps=200, lr=3e-3)


def test_recirc_pairs_shortcuts_and_per_pair_transitions():
    assert resolve_recirc_pairs(3, None) == ((3, 1),)
    assert RECIRC_SHORTCUTS["prev"](3) == ((2, 1), (3, 2))
    assert RECIRC_SHORTCUTS["top_and_prev"](2) == ((2, 1),)
    assert RECIRC_SHORTCUTS["prev_with_self"](3) == ((1, 1), (2, 1), (3, 2))
    assert len(RECIRC_SHORTCUTS["dense"](3)) == 9
    fb = FullBandwidth(_net(), recirc_pairs=((3, 1), (2, 2, "linear"), (1, 3)),
                       transitions={(3, 1): "residual", 3: lambda dim: TRANSITIONS["gru"](dim)})
    kinds = {k: type(v).__name__ for k, v in fb.transitions.items()}
    assert kinds == {"3->1": "ResidualTransition", "2->2": "LinearTransition", "1->3": "GRUGatingTransition"}
    assert fb.routes_by_in_depth == {1: [3], 2: [2], 3: [1]}


def test_return_conventions():
    fb = FullBandwidth(_net(), temporal_parallel_passes=2).eval()
    x = torch.randint(0, V, (2, 7))
    assert fb(x).ndim == 0
    logits = fb(x, return_loss=False)
    assert logits.shape == (2, 7, V)
    out = fb(x, return_loss=False, return_all_pass_logits=True)
    assert out._fields == ("logits", "all_pass_logits") and torch.equal(out.all_pass_logits[-1], logits)
    out = fb(x, return_all=True)
    assert out._fields == ("loss", "loss_breakdown", "all_pass_logits")
    torch.testing.assert_close(out.loss, fb(x))


@pytest.mark.parametrize("make, match", [
    (lambda: FullBandwidth(TransformerWrapper(num_tokens=V, max_seq_len=8, tie_embedding=True, post_emb_norm=True,
                                              attn_layers=Encoder(dim=D, depth=1, heads=2, depth_scale_residual=True))),
     "attn_layers must be a Decoder"),
    (lambda: FullBandwidth(TransformerWrapper(num_tokens=V, max_seq_len=8, tie_embedding=True, post_emb_norm=True,
                                              attn_layers=Decoder(dim=D, depth=1, heads=2))), "depth_scale_residual=True"),
    (lambda: FullBandwidth(_net(wrapper=dict(tie_embedding=False))), "tie_embedding=True"),
    (lambda: FullBandwidth(_net(wrapper=dict(post_emb_norm=False))), "post_emb_norm=True"),
    (lambda: FullBandwidth(_net(wrapper=dict(num_memory_tokens=2))), "num_memory_tokens must be 0"),
    (lambda: FullBandwidth(_net(reversible=True)), "reversible=True"),
    (lambda: FullBandwidth(_net(), temporal_parallel_passes=0), "temporal_parallel_passes must be an integer >= 1"),
    (lambda: FullBandwidth(_net(), transition="lstm"), "transition: unknown name 'lstm'"),
    (lambda: FullBandwidth(_net(), recirc_pairs="everything"), "recirc_pairs: unknown shortcut"),
    (lambda: FullBandwidth(_net(), recirc_pairs=((4, 1),)), r"recirc_pairs: each entry is \(out depth, in depth"),
    (lambda: FullBandwidth(_net(), recirc_pairs=((3, 1), (3, 1))), "given twice"),
    (lambda: FullBandwidth(_net(), jitter_noise_delta=-1), "jitter_noise_delta must lie in"),
    (lambda: FullBandwidth(nn.Linear(2, 2)), "net must be a TransformerWrapper"),
])
def test_bad_construction_is_a_one_line_error_naming_the_keyword(make, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line_errors_before_any_work():
    fb = FullBandwidth(_net())
    x = torch.randint(0, V, (2, 6))
    calls = [
        (lambda: fb(x.float()), "token_ids must be integer token ids"),
        (lambda: fb(x[0]), r"token_ids must be integer token ids of shape \(b, n\)"),
        (lambda: fb(x[:, :1]), "at least 2 tokens"),
        (lambda: fb(x, temporal_parallel_passes=0), "temporal_parallel_passes must be an integer >= 1"),
        (lambda: fb(x, transform_block_inputs={}), "transform_block_inputs is set by the wrapper"),
        (lambda: fb(x, transition="glu"), "transition must be a callable"),
        (lambda: fb.generate(x, 0), "seq_len must be an integer >= 1"),
        (lambda: fb.generate(x.float(), 3), "prompts must be non-empty integer token ids"),
        (lambda: fb.generate(x + V, 3), r"prompts holds ids outside \[0, 20\)"),
        (lambda: fb.generate(x, 3, temperature=-1.0), "temperature must be"),
        (lambda: fb.generate(x, 3, filter_kwargs=dict(q=1)), "top_k takes no keyword 'q'"),
        (lambda: fb.generate(x, 3, cache=None), "cache is set by the wrapper"),
    ]
    for call, match in calls:
        with pytest.raises((ValueError, TypeError), match=match) as err:
            call()
        assert "\n" not in str(err.value)
