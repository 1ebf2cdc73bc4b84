"""NonAutoregressiveWrapper: the loss reads only the corrupted positions, demasking fixes every
mask token, a seed fixes the result, and the mask token stays reserved."""

import math

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Encoder, TransformerWrapper
from x_transformers.nonautoregressive_wrapper import NonAutoregressiveWrapper, gumbel_noise

V, MASK, N = 16, 16, 12  # data tokens 0..15, the mask token 16


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V + 1, max_seq_len=N, attn_layers=Encoder(dim=32, depth=2, heads=4), **kw)


def make(**kw):
    kw.setdefault("steps", 6)
    return NonAutoregressiveWrapper(make_net(), mask_id=MASK, **kw)


def data(b=4, seed=1):
    return torch.randint(0, V, (b, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_reads_only_corrupted_positions(weighted):
    nar = make(use_simple_mdlm_loss_weight=weighted).eval()
    x = data()
    captured = {}

    def keep_logits(module, args, out):
        out.retain_grad()
        captured["logits"] = out

    handle = nar.net.to_logits.register_forward_hook(keep_logits)
    losses = nar(x, generator=torch.Generator().manual_seed(3))
    handle.remove()
    t, noised, inp = nar.corrupt(x, generator=torch.Generator().manual_seed(3))  # the same draws
    assert noised.any(dim=-1).all() and not noised.all()
    # the gradient reaches the logits of the corrupted positions and of no other
    losses.loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)
    assert (grad[~noised] == 0).all() and (grad[noised] > 0).all()
    # and the loss is the cross-entropy there (times the MDLM weight), by hand
    ce = F.cross_entropy(nar.net(inp).transpose(1, 2), x, reduction="none")
    if weighted:
        ce = ce * (1.0 / torch.clamp(1 - t, min=1 / N))[:, None]  # linear: |d frac/dt| / frac
    torch.testing.assert_close(losses.loss, ce[noised].mean())
    assert losses.loss > 0


def test_corruption_follows_the_recipe():
    nar = make(no_replace_prob=0.0, random_token_prob=0.0)
    x = data(b=64)
    t, noised, inp = nar.corrupt(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inp == MASK, noised)  # every trained position is a mask token, nothing else
    assert torch.equal(noised.sum(-1), (N * (1 - t)).clamp(min=1).ceil().long())  # linear: 1 - t masked
    nar = make(no_replace_prob=0.0, random_token_prob=0.5)
    for seed in range(4):  # random replacements are data tokens, never the mask token
        _, noised, inp = nar.corrupt(x, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(inp[~noised], x[~noised])
    assert (nar.random_tokens((10000,), "cpu") != MASK).all()
    g = gumbel_noise((100000,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all() and abs(g.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni


def test_padding_is_never_corrupted_or_trained_on():
    nar = make()
    x = data()
    mask = torch.ones(4, N, dtype=torch.bool)
    mask[:, 8:] = False
    for seed in range(5):
        _, noised, _ = nar.corrupt(x, mask, generator=torch.Generator().manual_seed(seed))
        assert not noised[:, 8:].any()
    nar(x, mask=mask).loss.backward()


@pytest.mark.parametrize("schedule", ["linear", "cosine", lambda t: (1 - t) ** 3, lambda t: 0.5 + 0 * t])
@pytest.mark.parametrize("steps", [1, 3, 18])
@pytest.mark.parametrize("critic", [None, "self"])
def test_generate_fixes_every_mask_token(schedule, steps, critic):
    nar = make(schedule=schedule, steps=steps, self_token_critic=critic == "self")
    with torch.no_grad():  # a head that prefers the mask token above all: it must still never be sampled
        nar.net.to_logits.weight[MASK] = nar.net.to_logits.weight[0] * 50
    out = nar.generate(3)
    assert out.shape == (3, N) and (out != MASK).all() and (out < V).all()
    counts = nar.masked_counts(N)
    assert counts[-1] == 0 and all(a >= b for a, b in zip(counts, counts[1:]))


def test_generate_is_deterministic_under_a_seed():
    nar = make(self_cond=True)
    a = nar.generate(2, generator=torch.Generator().manual_seed(5))
    b = nar.generate(2, generator=torch.Generator().manual_seed(5))
    c = nar.generate(2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    d = nar.generate(2)
    torch.manual_seed(11)
    assert torch.equal(d, nar.generate(2))
    assert nar.generate(seq_len=5).shape == (5,)


@pytest.mark.parametrize("can_remask", [False, True])
def test_inpainting_keeps_given_tokens(can_remask):
    nar = make(can_mask_prev_unmasked=can_remask, self_token_critic=True)
    start = data(b=3)
    holes = torch.zeros(3, N, dtype=torch.bool)
    holes[0, :4], holes[1, 5:], holes[2, ::2] = True, True, True  # a different number per row
    out = nar.generate(start=start.masked_fill(holes, MASK), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[~holes], start[~holes]) and (out != MASK).all()
    counts = nar.masked_counts(holes.sum(-1))
    assert counts.shape == (6, 3) and (counts[-1] == 0).all() and (counts[0] <= holes.sum(-1)).all()


def test_one_step_greedy_is_the_argmax():
    nar = make(steps=1).eval()
    out = nar.generate(2, start_temperature=0.0, filter_thres=None)
    logits = nar.net(torch.full((1, N), MASK))
    logits[..., MASK] = -math.inf
    assert torch.equal(out, logits.argmax(-1).expand(2, -1))


@pytest.mark.parametrize("kw", [dict(self_cond=True, self_cond_train_prob=1.0), dict(self_token_critic=True)])
def test_gradients_reach_the_extra_parts(kw):
    nar = make(**kw)
    losses = nar(data(), generator=torch.Generator().manual_seed(0))
    losses.loss.backward()
    missing = [n for n, p in nar.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the null embedding is used only when self-conditioning is skipped (probability 0 here)
    assert missing == (["null_embed"] if "self_cond" in kw else []), missing


def test_external_critic_and_only_train_critic():
    critic = TransformerWrapper(num_tokens=V + 1, max_seq_len=N, logits_dim=1,
                                attn_layers=Encoder(dim=16, depth=1, heads=2))
    nar = make(token_critic=critic)
    losses = nar(data(), only_train_critic=True, generator=torch.Generator().manual_seed(0))
    assert losses.generator_loss is None and losses.critic_loss is not None
    losses.loss.backward()
    assert all(p.grad is None for p in nar.net.parameters())  # the generator is frozen
    assert all(p.grad is not None for p in critic.parameters())
    both = nar(data(), generator_sample_temperature=1.0)
    torch.testing.assert_close(both.loss, both.generator_loss + both.critic_loss)
    assert (nar.generate(2) != MASK).all()


@pytest.mark.parametrize("build, message", [
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=V + 1), r"mask_id must be a token id in \[0, 17\)"),
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=-1), "mask_id"),
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=MASK, schedule="cubic"), "valid: linear, cosine"),
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=MASK, steps=0), "steps"),
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=MASK, no_replace_prob=1.2), "no_replace_prob"),
    (lambda: NonAutoregressiveWrapper(make_net(), mask_id=MASK, self_token_critic=True,
                                      token_critic=make_net()), "not both"),
    (lambda: NonAutoregressiveWrapper(make_net(return_only_embed=True), mask_id=MASK), "one logit per token"),
])
def test_construction_errors(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_mask_token_in_data_is_refused():
    nar = make()
    x = data()
    x[0, 3] = MASK
    with pytest.raises(ValueError, match="x contains mask_id 16; the mask token must be reserved"):
        nar(x)


def test_a_custom_token_embedding_module_trains_under_the_non_autoregressive_wrapper():
    """The wrapper once read net.token_emb.weight, which a custom embedding module need not have."""
    from torch import nn

    from x_transformers import Encoder, NonAutoregressiveWrapper, TransformerWrapper

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(20, 16)

        def forward(self, x):
            return self.table(x)

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=8, token_emb=Emb(),
                             attn_layers=Encoder(dim=16, depth=1, heads=2))
    wrapper = NonAutoregressiveWrapper(net, mask_id=19, steps=2)
    loss = wrapper(torch.randint(0, 19, (2, 8))).loss
    loss.backward()
    assert torch.isfinite(loss) and net.token_emb.table.weight.grad.abs().sum() > 0
