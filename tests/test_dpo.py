"""DPO (2305.18290): the loss is -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) over summed
completion log-probs; log 2 at initialisation; the reference is frozen and never changes; pads
and prompt tokens do not count; upstream's per-token mean on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from x_transformers import DPO, Decoder, TransformerWrapper
from x_transformers.upstream import load_state_dict

import upstream as up

V, PAD = 20, 0


def lm(seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4))


def pairs(b=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(1, V, (b, n), generator=g)
    l = torch.randint(1, V, (b, n), generator=g)
    l[:, :4] = w[:, :4]  # a shared prompt of 4 tokens
    w[0, -2:] = PAD  # right padding
    l[1, -3:] = PAD
    prompt = torch.arange(n).expand(b, -1) < 4
    return w, l, prompt


def perturb(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def by_hand(model, seq, keep):
    """Summed log p(token t | tokens < t) over the tokens t marked in keep (b, n)."""
    logp = model(seq[:, :-1]).log_softmax(-1)
    tok = logp.gather(-1, seq[:, 1:, None]).squeeze(-1)
    return (tok * keep[:, 1:]).sum(-1)


def test_loss_is_log_two_at_initialisation():
    dpo = DPO(lm(), beta=0.1, pad_id=PAD)
    w, l, prompt = pairs()
    torch.testing.assert_close(dpo(w, l, prompt_mask=prompt), torch.tensor(math.log(2)))


def test_loss_equals_the_formula_by_hand():
    dpo = DPO(lm(), beta=0.3, pad_id=PAD).eval()
    perturb(dpo.policy_model)
    w, l, prompt = pairs()
    keep_w, keep_l = (w != PAD) & ~prompt, (l != PAD) & ~prompt
    with torch.no_grad():
        pw, pl = by_hand(dpo.policy_model, w, keep_w), by_hand(dpo.policy_model, l, keep_l)
        rw, rl = by_hand(dpo.ref_model, w, keep_w), by_hand(dpo.ref_model, l, keep_l)
        want = -F.logsigmoid(0.3 * ((pw - rw) - (pl - rl))).mean()
        got = dpo(w, l, prompt_mask=prompt)
    torch.testing.assert_close(got, want)
    assert abs(got.item() - math.log(2)) > 1e-3
    # the per-token mean of reduction="mean"
    mean = DPO(lm(), beta=0.3, pad_id=PAD, reduction="mean").eval()
    mean.load_state_dict(dpo.state_dict())
    nw, nl = keep_w[:, 1:].sum(-1), keep_l[:, 1:].sum(-1)
    want_mean = -F.logsigmoid(0.3 * ((pw - rw) / nw - (pl - rl) / nl)).mean()
    torch.testing.assert_close(mean(w, l, prompt_mask=prompt), want_mean)


def test_padding_and_prompt_tokens_do_not_count():
    dpo = DPO(lm(), pad_id=PAD).eval()
    perturb(dpo.policy_model)
    w, l, prompt = pairs()
    base = dpo(w, l, prompt_mask=prompt)
    # more right padding: the same loss
    pad = torch.full((3, 3), PAD)
    longer = dpo(torch.cat((w, pad), 1), torch.cat((l, pad), 1), prompt_mask=F.pad(prompt, (0, 3)))
    torch.testing.assert_close(longer, base, atol=1e-5, rtol=1e-5)
    # explicit masks equal to the pad-derived ones: the same loss
    explicit = DPO(lm(), pad_id=None).eval()
    explicit.load_state_dict(dpo.state_dict())
    torch.testing.assert_close(explicit(w, l, prompt_mask=prompt, preferred_seq_mask=w != PAD,
                                        unpreferred_seq_mask=l != PAD), base)


def test_the_reference_gets_no_gradient_and_never_changes():
    dpo = DPO(lm(), beta=0.5, pad_id=PAD)
    ref_before = {k: v.clone() for k, v in dpo.ref_model.state_dict().items()}
    policy_before = {k: v.clone() for k, v in dpo.policy_model.state_dict().items()}
    assert {id(p) for p in dpo.parameters()} == {id(p) for p in dpo.policy_model.parameters()}
    opt = torch.optim.Adam(dpo.parameters(), lr=1e-3)
    w, l, prompt = pairs()
    dpo.train()
    assert not dpo.ref_model.training and dpo.policy_model.training
    losses = []
    for _ in range(5):
        loss = dpo(w, l, prompt_mask=prompt)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in dpo.ref_model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.equal(v, ref_before[k]) for k, v in dpo.ref_model.state_dict().items())
    assert any(not torch.equal(v, policy_before[k]) for k, v in dpo.policy_model.state_dict().items())
    assert losses[-1] < losses[0]  # the policy moves toward the preferred completions


def test_bad_input_is_one_line_naming_the_argument():
    dpo = DPO(lm(), pad_id=PAD)
    w, l, prompt = pairs()
    with pytest.raises(ValueError, match="preferred_seq and unpreferred_seq must have the same batch, got 3 and 2"):
        dpo(w, l[:2], prompt_mask=prompt)
    with pytest.raises(ValueError, match="same shape"):
        dpo(w, l[:, :-1], prompt_mask=prompt)
    with pytest.raises(ValueError, match="prompt_mask must be a bool tensor of shape"):
        dpo(w, l, prompt_mask=prompt[:, :-1])
    with pytest.raises(ValueError, match="preferred_seq_mask must be a bool tensor"):
        dpo(w, l, prompt_mask=prompt, preferred_seq_mask=w)
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        DPO(lm(), beta=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        DPO(lm(), reduction="avg")
    with pytest.raises(TypeError, match="model must be a TransformerWrapper"):
        DPO(Decoder(dim=16, depth=1))


UPSTREAM_DPO = r"""
import json, os, torch
from x_transformers import TransformerWrapper, Decoder
from x_transformers.dpo import DPO
p = json.loads(os.environ["PAYLOAD"])
torch.manual_seed(0)
model = TransformerWrapper(num_tokens=20, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4))
dpo = DPO(model, beta=0.3)
g = torch.Generator().manual_seed(7)
with torch.no_grad():
    for t in dpo.policy_model.parameters():
        t.add_(torch.randn(t.shape, generator=g) * 0.05)
dpo.eval()
t = {k: torch.tensor(v) for k, v in p["t"].items()}
with torch.no_grad():
    loss = dpo(t["w"], t["l"], prompt_mask=t["prompt"], preferred_seq_mask=t["mw"], unpreferred_seq_mask=t["ml"])
torch.save(dict(policy=dpo.policy_model.state_dict(), ref=dpo.ref_model.state_dict(), loss=loss), p["path"])
print(json.dumps("ok"))
"""


def test_mean_reduction_matches_upstream_on_the_same_weights(tmp_path):
    """Upstream averages per token and keys its masks on the token *before* each predicted one
    (mask[:, :-1]); ours on the predicted token (mask[:, 1:]). Given masks shifted by one column,
    upstream computes exactly our reduction="mean"."""
    w, l, prompt = pairs()
    mw, ml = w != PAD, l != PAD

    def shift(m, fill):  # upstream's column t - 1 holds our column t
        return torch.cat((m[:, 1:], torch.full_like(m[:, :1], fill)), 1)

    payload = dict(w=w, l=l, prompt=shift(prompt, True), mw=shift(mw, False), ml=shift(ml, False))
    path = str(tmp_path / "up.pt")
    up.run(UPSTREAM_DPO, dict(t={k: v.tolist() for k, v in payload.items()}, path=path))
    saved = torch.load(path)

    dpo = DPO(lm(), beta=0.3, pad_id=PAD, reduction="mean").eval()
    load_state_dict(dpo.policy_model, saved["policy"])
    load_state_dict(dpo.ref_model, saved["ref"])
    with torch.no_grad():
        got = dpo(w, l, prompt_mask=prompt)
    torch.testing.assert_close(got, saved["loss"], atol=1e-6, rtol=1e-5)
    assert abs(got.item() - math.log(2)) > 1e-3
