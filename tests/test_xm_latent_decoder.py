"""XMLatentDecoder (Forward Explorative Modeling, 2607.27372): the loss is the mean over rows of the
lowest candidate loss, each candidate's loss computed here by hand from the net with that
candidate's latent tokens; only the winner gets gradients; only the active slot differs between
candidates; the repulsive term is the candidates' generalised Jensen-Shannon divergence; training
on data with hidden modes makes the best of several latents beat a random one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.xm_latent_decoder import XMLatentDecoder

V = 12


def lm(seed=0, dim=32):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=dim, depth=1, heads=2))


def by_hand(net, latent_proj, seq, latents, keep=None):
    """Mean next-token loss per row with the given latent tokens (b, L, l)."""
    logits = net(seq[:, :-1], prepend_embeds=latent_proj(latents), excise_prepend_embeds=True)
    ce = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
    keep = torch.ones_like(ce) if keep is None else keep.float()
    return (ce * keep).sum(-1) / keep.sum(-1)


def test_the_loss_is_the_mean_of_each_rows_best_candidate_and_only_the_winner_learns():
    xm = XMLatentDecoder(lm(), num_latents=3, candidates=4, latent_dim=8).eval()
    seq = torch.randint(0, V, (3, 10))
    torch.manual_seed(3)
    cand_latents = torch.randn(3, 4, 3, 8)
    loss = xm(seq, latents=cand_latents)
    per = torch.stack([by_hand(xm.net, xm.latent_proj, seq, cand_latents[:, j]) for j in range(4)], dim=1)  # (b, k)
    torch.testing.assert_close(loss, per.min(dim=1).values.mean())
    # gradients: exactly those of the winners' losses
    loss.backward()
    got = [p.grad.clone() for p in xm.parameters()]
    xm.zero_grad()
    winners = per.argmin(dim=1)
    by_hand(xm.net, xm.latent_proj, seq.repeat(1, 1), cand_latents[torch.arange(3), winners]).mean().backward()
    for g, p in zip(got, xm.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_only_the_active_slot_differs_between_candidates():
    xm = XMLatentDecoder(lm(), num_latents=4, candidates=5).eval()
    base = torch.randn(2, 4, 32)
    logits, lat = xm(torch.randint(0, V, (2, 6)), latents=base, active_latent_index=2, return_loss=False)
    assert logits.shape == (2, 5, 6, V) and lat.shape == (2, 5, 4, 32)
    for slot in (0, 1, 3):
        assert torch.equal(lat[:, :, slot], base[:, None, slot].expand(-1, 5, -1))
    assert (lat[:, 1:, 2] - lat[:, :1, 2]).abs().min() > 0  # drawn afresh per candidate
    # a list with None entries draws only those slots
    given = torch.randn(2, 32)
    lat = xm.init_latents([given, None, None, given], 2)
    assert torch.equal(lat[:, 0], given) and torch.equal(lat[:, 3], given) and not torch.equal(lat[:, 1], given)


def test_the_repulsive_term_is_the_candidates_jensen_shannon_divergence():
    xm = XMLatentDecoder(lm(), num_latents=2, candidates=3, repulsive_loss_weight=0.5).eval()
    seq = torch.randint(0, V, (2, 8))
    cand = torch.randn(2, 3, 2, 32)
    loss = xm(seq, latents=cand)
    plain = xm(seq, latents=cand, repulsive_loss_weight=0.0)
    logits, _ = xm(seq[:, :-1], latents=cand, return_loss=False)
    p = logits.softmax(-1)  # (b, k, n, v)
    mix = p.mean(dim=1, keepdim=True)
    entropy = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    jsd = entropy(mix[:, 0]) - entropy(p).mean(dim=1)  # H(mixture) - mean H(p_k)
    torch.testing.assert_close(loss, plain - 0.5 * jsd.mean(), atol=1e-5, rtol=1e-5)
    assert jsd.mean() > 0


def test_masked_and_ignored_targets_do_not_count():
    xm = XMLatentDecoder(lm(), num_latents=2, candidates=1, ignore_index=-1).eval()
    seq = torch.randint(0, V, (2, 10))
    lat = torch.randn(2, 1, 2, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    ignored = seq.clone()
    ignored[1, 6:] = -1
    keep = mask[:, 1:]
    expected = by_hand(xm.net, xm.latent_proj, seq, lat[:, 0], keep).mean()
    torch.testing.assert_close(xm(seq, latents=lat, mask=mask), expected)
    torch.testing.assert_close(xm(ignored, latents=lat), expected)


def test_latent_drop_runs_the_net_without_latents():
    xm = XMLatentDecoder(lm(), num_latents=2, candidates=3).train()
    xm.net.eval()  # no dropout noise; the wrapper's own training flag decides the drop
    seq = torch.randint(0, V, (2, 9))
    logits = xm.net(seq[:, :-1])
    plain = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none").mean(-1).mean()
    torch.testing.assert_close(xm(seq, latent_drop_prob=1.0), plain)


def test_chunked_candidates_give_the_same_loss():
    xm = XMLatentDecoder(lm(), num_latents=2, candidates=4).eval()
    seq = torch.randint(0, V, (3, 7))
    lat = torch.randn(3, 4, 2, 32)
    torch.testing.assert_close(xm(seq, latents=lat), xm(seq, latents=lat, max_batch_size=5))


def modes(b, n=8):
    """Four fixed sequences that share their first token: which one follows is a hidden mode."""
    table = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 8, 9, 10, 11, 1, 2, 3],
                          [0, 4, 4, 5, 5, 6, 6, 7], [0, 11, 10, 9, 8, 7, 6, 5]])
    return table[torch.randint(0, 4, (b,))][:, :n]


def test_training_makes_the_best_latent_explain_the_hidden_mode():
    xm = XMLatentDecoder(lm(), num_latents=1, candidates=8, latent_dim=4)
    opt = torch.optim.Adam(xm.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        loss = xm(modes(16))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in xm.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    xm.eval()
    torch.manual_seed(1)
    data = modes(64)
    best = xm(data, candidates=16)
    single = xm(data, candidates=1)
    # a random latent leaves the mode a guess among 4 on the second token (log 4 / 7 per token);
    # the best of 16 latents names it
    assert best < single - 0.5 * math.log(4) / 7
    out = xm.generate_with_candidate_latents(data[:8, :3], 5, candidates=16, temperature=0.0)
    assert (out == data[:8, 3:]).float().mean() > 0.9


def test_generate_and_candidate_generation_conventions():
    xm = XMLatentDecoder(lm(), num_latents=2, candidates=2).eval()
    start = torch.randint(0, V, (2, 4))
    lat = torch.randn(2, 2, 32)
    a = xm.generate(start, 5, latents=lat, temperature=0.0)
    b = xm.generate(start, 5, latents=lat, temperature=0.0)
    assert torch.equal(a, b) and a.shape == (2, 5)
    out, (cand, winners) = xm.generate_with_candidate_latents(start, 3, candidates=3, return_best_latents=True,
                                                               temperature=0.0)
    assert out.shape == (2, 3) and cand.shape == (2, 3, 2, 32) and winners.shape == (2,)
    confident = lambda logits: logits.softmax(-1).amax(-1).mean(-1)  # noqa: E731  (b, k) scores
    out, (_, winners) = xm.generate_with_candidate_latents(start, 3, winner_fns=(confident, confident),
                                                            return_best_latents=True)
    assert winners.shape == (2, 2)  # a sweep over both slots


def test_bad_inputs_raise_one_line_errors_naming_the_argument():
    enc = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Encoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="causal"):
        XMLatentDecoder(enc)
    with pytest.raises(TypeError, match="net"):
        XMLatentDecoder(torch.nn.Linear(2, 2))
    for kw, match in ((dict(candidates=0), "candidates"), (dict(dim=16), "dim"),
                      (dict(latent_drop_prob=2.0), "latent_drop_prob"),
                      (dict(num_latents=2, winner_fns=[min]), "winner_fn")):
        with pytest.raises(ValueError, match=match):
            XMLatentDecoder(lm(), **kw)
    xm = XMLatentDecoder(lm(), num_latents=2)
    seq = torch.randint(0, V, (2, 6))
    for call, match in ((lambda: xm(seq[0]), "seq"), (lambda: xm(seq + V), "seq"), (lambda: xm(seq[:, :1]), "seq"),
                        (lambda: xm(seq, latents=torch.randn(2, 3, 32)), "latents"),
                        (lambda: xm(seq, latents=torch.randn(2, 5, 2, 32)), "candidates"),
                        (lambda: xm(seq, active_latent_index=2), "active_latent_index"),
                        (lambda: xm(seq, mask=torch.ones(2, 5, dtype=torch.bool)), "mask"),
                        (lambda: xm(seq, winner_fn=lambda losses: losses[:, :1]), "winner_fn"),
                        (lambda: xm.generate(seq.float(), 2), "start_tokens")):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
