"""ContinuousTransformerWrapper and ContinuousAutoregressiveWrapper: cached generation equals the
uncached loop, masks are honoured, every parameter learns, the losses are the ones documented."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from upstream import required_path

from x_transformers import Decoder, Encoder
from x_transformers.continuous import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper


def make(dim_in=6, dim_out=6, stack=Decoder, stack_kw=None, **kw):
    kw.setdefault("max_seq_len", 64)
    return ContinuousTransformerWrapper(dim_in=dim_in, dim_out=dim_out,
                                        attn_layers=stack(dim=32, depth=2, heads=4, **(stack_kw or {})), **kw)


VARIANTS = {
    "learned": ({}, {}),
    "memory": ({"num_memory_tokens": 3}, {}),
    "rotary": ({}, {"rotary_pos_emb": True}),
    "sinusoidal+postnorm": ({"scaled_sinu_pos_emb": True, "post_emb_norm": True}, {}),
    "alibi+memory": ({"num_memory_tokens": 2}, {"alibi_pos_bias": True}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("probabilistic", [False, True])
def test_cached_generate_equals_uncached_loop(name, probabilistic):
    wrapper_kw, stack_kw = VARIANTS[name]
    torch.manual_seed(0)
    net = make(stack_kw=stack_kw, probabilistic=probabilistic, **wrapper_kw).double()
    model = ContinuousAutoregressiveWrapper(net)
    prompt = torch.randn(2, 5, 6, dtype=torch.float64)
    outs = []
    for cache_kv in (True, False):
        g = torch.Generator().manual_seed(7)
        outs.append(model.generate(prompt, 9, cache_kv=cache_kv, generator=g))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    # and the uncached loop is what it says: each frame the net's last output on everything so far
    if not probabilistic:
        seq = prompt
        for _ in range(9):
            seq = torch.cat((seq, net.eval()(seq)[:, -1:]), dim=1)
        torch.testing.assert_close(outs[1], seq[:, 5:], atol=1e-12, rtol=1e-12)


def test_generate_unbatched_and_restores_training_mode():
    torch.manual_seed(0)
    model = ContinuousAutoregressiveWrapper(make()).train()
    out = model.generate(torch.randn(4, 6), 3)
    assert out.shape == (3, 6) and model.net.training


def test_generate_temperature_zero_takes_the_mean():
    torch.manual_seed(0)
    net = make(probabilistic=True).double().eval()
    model = ContinuousAutoregressiveWrapper(net)
    prompt = torch.randn(1, 4, 6, dtype=torch.float64)
    out = model.generate(prompt, 1, temperature=0)
    torch.testing.assert_close(out[:, 0], net(prompt)[0][:, -1])


@pytest.mark.parametrize("stack", [Encoder, Decoder])
@pytest.mark.parametrize("memory", [0, 2])
def test_padding_invariance(stack, memory):
    torch.manual_seed(0)
    net = make(stack=stack, num_memory_tokens=memory).double().eval()
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    alone = net(x)
    pad = torch.randn(1, 3, 6, dtype=torch.float64) * 100  # garbage that must not leak
    kept = torch.ones(1, 5, dtype=torch.bool)
    dropped = torch.zeros(1, 3, dtype=torch.bool)
    right = net(torch.cat((x, pad), 1), torch.cat((kept, dropped), 1))[:, :5]
    left = net(torch.cat((pad, x), 1), torch.cat((dropped, kept), 1))[:, 3:]
    torch.testing.assert_close(right, alone)
    torch.testing.assert_close(left, alone)
    # lens is the same mask (right padding)
    torch.testing.assert_close(net(torch.cat((x, pad), 1), lens=torch.tensor([5]))[:, :5], alone)


def test_average_pool_ignores_padding():
    torch.manual_seed(0)
    net = make(stack=Encoder, average_pool_embed=True).double().eval()
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    padded = torch.cat((x, torch.randn(1, 2, 6, dtype=torch.float64)), 1)
    out = net(padded, lens=torch.tensor([5]))
    assert out.shape == (1, 6)
    torch.testing.assert_close(out, net(x))


@pytest.mark.parametrize("kw", [dict(num_memory_tokens=2, post_emb_norm=True), dict(scaled_sinu_pos_emb=True),
                                dict(probabilistic=True)])
def test_gradients_reach_every_parameter(kw):
    torch.manual_seed(0)
    model = ContinuousAutoregressiveWrapper(make(**kw))
    x = torch.randn(2, 8, 6)
    model(x, mask=torch.tensor([[True] * 8, [True] * 6 + [False] * 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_loss_counts_only_kept_predictions():
    torch.manual_seed(0)
    model = ContinuousAutoregressiveWrapper(make().eval())
    x = torch.randn(2, 8, 6)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    loss = model(x, mask=mask)
    y = x.clone()
    y[1, 5:] = 1e3  # padded frames: neither inputs nor targets count
    torch.testing.assert_close(model(y, mask=mask), loss)
    # by hand: per-element squared errors of the kept (input, target) pairs, averaged
    out = model.net(x[:, :-1], mask[:, :-1])
    keep = mask[:, :-1] & mask[:, 1:]
    torch.testing.assert_close(loss, ((out - x[:, 1:]) ** 2)[keep].mean())
    # equal_loss_weight_batch: each row's mean, then the mean of rows
    eq = ContinuousAutoregressiveWrapper(model.net, equal_loss_weight_batch=True)(x, mask=mask)
    rows = [((out[i] - x[i, 1:]) ** 2)[keep[i]].mean() for i in range(2)]
    torch.testing.assert_close(eq, torch.stack(rows).mean())


def test_probabilistic_loss_is_gaussian_nll():
    torch.manual_seed(0)
    net = make(probabilistic=True).double().eval()
    model = ContinuousAutoregressiveWrapper(net)
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    mean, var = net(x[:, :-1])
    assert (var > 0).all()
    nll = 0.5 * (torch.log(var) + (x[:, 1:] - mean) ** 2 / var)
    torch.testing.assert_close(model(x), nll.mean())
    l1 = ContinuousAutoregressiveWrapper(make(), use_l1_loss=True)
    torch.testing.assert_close(l1(x.float()), (l1.net(x[:, :-1].float()) - x[:, 1:].float()).abs().mean())


def test_external_projections_and_identity():
    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(project_in=nn.Linear(16, 32, bias=False), project_out=nn.Linear(32, 16),
                                       attn_layers=Encoder(dim=32, depth=1, heads=4), max_seq_len=32)
    assert net(torch.randn(1, 16, 16)).shape == (1, 16, 16)
    same = make(dim_in=32, dim_out=32, use_identity_if_same_dim=True)
    assert isinstance(same.project_in, nn.Identity) and isinstance(same.project_out, nn.Identity)
    assert make(dim_in=None, dim_out=None)(torch.randn(1, 3, 32)).shape == (1, 3, 32)


def test_prepend_embeds_are_a_prefix():
    torch.manual_seed(0)
    net = make(stack=Decoder, stack_kw={"rotary_pos_emb": True}).double().eval()
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    prefix = torch.randn(1, 2, 32, dtype=torch.float64)
    out = net(x, prepend_embeds=prefix)
    assert out.shape == (1, 4, 6)
    assert not torch.allclose(out, net(x))  # the frames see the prefix
    # a masked-out prefix is as if absent (rotary positions count kept tokens only)
    torch.testing.assert_close(net(x, prepend_embeds=prefix, prepend_mask=torch.zeros(1, 2, dtype=torch.bool)), net(x))


@pytest.mark.parametrize("build, message", [
    (lambda: make(project_in=nn.Linear(6, 32)), "pass dim_in or project_in"),
    (lambda: make(dim_out=None, probabilistic=True), "probabilistic=True needs dim_out"),
    (lambda: make(emb_dropout=1.5), "emb_dropout"),
    (lambda: make(max_seq_len="64"), "max_seq_len"),
    (lambda: make(dim_inn=3), "did you mean 'dim_in'"),
    (lambda: ContinuousAutoregressiveWrapper(make(probabilistic=True), use_l1_loss=True), "use_l1_loss"),
])
def test_construction_errors(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_call_errors():
    model = ContinuousAutoregressiveWrapper(make(max_seq_len=8))
    with pytest.raises(ValueError, match="7 features per frame but this wrapper takes 6"):
        model.net(torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model.generate(torch.randn(1, 4, 6), 6)
    assert model.generate(torch.randn(1, 4, 6), 6, cache_kv=False).shape == (1, 6, 6)  # a sliding window
    with pytest.raises(ValueError, match="dim_out must equal dim_in"):
        ContinuousAutoregressiveWrapper(make(dim_out=3)).generate(torch.randn(1, 2, 6), 2)
    with pytest.raises(ValueError, match="causal"):
        ContinuousAutoregressiveWrapper(make(stack=Encoder)).generate(torch.randn(1, 2, 6), 2)
    with pytest.raises(ValueError, match="NaN"):
        model.net(torch.full((1, 2, 6), math.nan))


UPSTREAM_COUNT = r"""
import json, sys, torch
from x_transformers import Decoder
from x_transformers.continuous import ContinuousTransformerWrapper
kw = json.loads(sys.argv[1])
stack = json.loads(sys.argv[2])
m = ContinuousTransformerWrapper(attn_layers=Decoder(dim=32, depth=1, heads=4, **stack), **kw)
print(json.dumps({n: p.numel() for n, p in m.named_parameters() if not n.startswith("attn_layers.")}))
"""


@pytest.mark.parametrize("kw, stack", [
    (dict(dim_in=7, dim_out=5, max_seq_len=64), {}),
    (dict(dim_in=7, dim_out=5, max_seq_len=64, num_memory_tokens=3, post_emb_norm=True, probabilistic=True), {}),
    (dict(dim_in=32, dim_out=32, max_seq_len=64, use_identity_if_same_dim=True), {"rotary_pos_emb": True}),
    (dict(dim_in=7, max_seq_len=64, scaled_sinu_pos_emb=True), {}),
])
def test_wrapper_parameters_match_upstream(kw, stack):
    """The wrapper's own parameters (projections, positions, memory tokens, norms) have upstream's
    count for the same keywords; the stacks differ by design."""
    env = {**os.environ, "PYTHONPATH": str(required_path()), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", UPSTREAM_COUNT, json.dumps(kw), json.dumps(stack)], cwd="/tmp",
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    net = ContinuousTransformerWrapper(attn_layers=Decoder(dim=32, depth=1, heads=4, **stack), **kw)
    ours = {n: p.numel() for n, p in net.named_parameters() if not n.startswith("attn_layers.")}
    assert sum(ours.values()) == sum(theirs.values()), (ours, theirs)


def test_memory_tokens_under_tupe_untie_cls_share_position_0_and_decode_exactly():
    # as TransformerWrapper: the memory tokens sit at 0 with the [CLS] (the first frame); frames keep
    # the positions they have without memory tokens; a cache continues after the kept frames
    from x_transformers.cache import KVCache

    torch.manual_seed(0)
    model = make(stack_kw=dict(tupe=True, tupe_max_seq_len=32, tupe_untie_cls=True), num_memory_tokens=2).eval()
    x = torch.randn(2, 6, 6)
    seen = {}
    handle = model.attn_layers.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    ref = model(x)
    handle.remove()
    assert seen["positions"].tolist()[0] == [0, 0, 0, 1, 2, 3, 4, 5]
    cache = KVCache()
    outs = [model(x[:, :3], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_shift_tokens_with_memory_tokens_compose_and_ignore_left_padding():
    """shift_tokens beside memory tokens (once refused): the first frame shifts in the last memory
    token's features, and left padding between them changes nothing (the shift counts kept frames)."""
    torch.manual_seed(0)
    model = make(stack_kw=dict(shift_tokens=1), num_memory_tokens=2).eval()
    x = torch.randn(2, 5, 6)
    ref = model(x)
    xp = torch.cat((torch.randn(2, 2, 6), x), dim=1)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[:, :2] = False
    torch.testing.assert_close(model(xp, mask=keep)[:, 2:], ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the rollout loss (forward(rollout_steps=k), upstream's; V-JEPA 2-AC, 2506.09985)


def _rollout_reference(net, x, k, start):
    """Each row from a context of ``start`` frames, k predictions each fed back: the mean MSE."""
    seq, preds = x[:, :start], []
    for _ in range(k):
        pred = net(seq)[:, -1:]
        preds.append(pred)
        seq = torch.cat((seq, pred), dim=1)
    return ((torch.cat(preds, dim=1) - x[:, start:start + k]) ** 2).mean()


def test_rollout_feeds_each_prediction_back_and_scores_k_frames():
    torch.manual_seed(0)
    net = make().eval()
    wrapper = ContinuousAutoregressiveWrapper(net)
    x = torch.randn(3, 4, 6)
    # four frames for three steps: every row's context is its first frame
    loss = wrapper(x, rollout_steps=3)
    torch.testing.assert_close(loss, _rollout_reference(net, x, 3, 1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # the rollout differs from teacher forcing: the second prediction reads the first, not x[:, 1]
    assert not torch.allclose(loss, wrapper(x[:, :4]))
    # one step is the plain next-frame loss
    torch.testing.assert_close(wrapper(x, rollout_steps=1), wrapper(x))


def test_rollout_contexts_are_random_left_padded_windows_of_each_row():
    torch.manual_seed(0)
    net = make(stack_kw=dict(rotary_pos_emb=True)).eval()
    wrapper = ContinuousAutoregressiveWrapper(net)
    x = torch.randn(2, 9, 6)
    lens = torch.tensor([9, 2])  # the second row is too short for two steps: left out
    torch.manual_seed(3)
    starts = 1 + (torch.rand(1) * (9 - 2)).long()  # the draw the loss makes for the one row kept
    torch.manual_seed(3)
    loss = wrapper(x, lens=lens, rollout_steps=2)
    torch.testing.assert_close(loss, _rollout_reference(net, x[:1], 2, int(starts)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rollout_steps=0), "rollout_steps must be an integer >= 1"),
    (dict(rollout_steps=9), "no row has the 10 frames"),
    (dict(rollout_steps=2, mask=torch.tensor([[False] + [True] * 8] * 2)), "needs right padding"),
])
def test_rollout_refuses_bad_inputs_in_one_line(kwargs, message):
    wrapper = ContinuousAutoregressiveWrapper(make())
    with pytest.raises(ValueError, match=message):
        wrapper(torch.randn(2, 9, 6), **kwargs)
    with pytest.raises(ValueError, match="output width"):
        ContinuousAutoregressiveWrapper(make(dim_out=4))(torch.randn(2, 9, 6), rollout_steps=2)


def test_a_probabilistic_rollout_trains_through_its_samples():
    torch.manual_seed(0)
    net = make(probabilistic=True)
    loss = ContinuousAutoregressiveWrapper(net)(torch.randn(2, 8, 6), rollout_steps=3)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("kw", [dict(), dict(num_memory_tokens=2, stack_kw=dict(rotary_pos_emb=True)),
                                dict(stack_kw=dict(attn_hybrid_module=nn.GRU(16, 32, batch_first=True),
                                                   attn_hybrid_fold_axial_dim=1))],
                         ids=["learned positions", "memory tokens + rotary", "hybrid GRU"])
def test_upstream_style_cache_gives_the_full_forward(kw):
    """Upstream's return_intermediates / cache= / input_not_include_cache on the continuous wrapper:
    frames run chunk by chunk through the returned caches (x the whole sequence so far, or only the
    new frames) give the full forward's outputs, a left-padded row included; calls are functional."""
    kw = dict(kw)
    stack_kw = dict(dim=16, depth=2, heads=2, attn_dim_head=16) | kw.pop("stack_kw", {})
    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(dim_in=6, dim_out=5, max_seq_len=32, attn_layers=Decoder(**stack_kw),
                                       **kw).eval()
    x = torch.randn(2, 7, 6)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, :2] = False  # row 1 left-padded
    full = net(x, keep)
    out1, inter = net(x[:, :3], keep[:, :3], return_intermediates=True)
    assert inter.cache_length == 3
    out2, inter2 = net(x[:, :5], keep[:, :5], cache=inter, return_intermediates=True)  # the whole sequence so far
    out3, inter3 = net(x[:, 5:], keep[:, 5:], cache=inter2, return_intermediates=True, input_not_include_cache=True)
    torch.testing.assert_close(torch.cat((out1, out2, out3), 1)[keep], full[keep], atol=1e-5, rtol=1e-5)
    assert inter3.cache_length == 7 and inter.cache_length == 3  # the one given is left as it was
    again, _ = net(x[:, 3:5], keep[:, 3:5], cache=inter, return_intermediates=True, input_not_include_cache=True)
    torch.testing.assert_close(again, out2)
    with pytest.raises(ValueError, match="give more than 3 frames"):
        net(x[:, :3], cache=inter)
    with pytest.raises(ValueError, match="input_not_include_cache=True needs cache="):
        net(x, input_not_include_cache=True)
