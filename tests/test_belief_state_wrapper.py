"""BeliefStateWrapper (2410.23506): what each decoder's state has read, the pairwise objective,
variable lengths, generation, training, and the inputs it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.belief_state_wrapper import BeliefStateWrapper, flip
from train_helpers import assert_loss_falls

V = 24


def _decoder(seed, num_tokens=V, dim=32):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=64,
                              attn_layers=Decoder(dim=dim, depth=2, heads=2, rotary_pos_emb=True))


def _wrapper(**kwargs):
    model = BeliefStateWrapper(_decoder(0), _decoder(1), **kwargs)
    return model.eval()


def test_flip_with_lengths_reverses_each_row_in_place():
    x = torch.arange(10).view(2, 5)
    out = flip(x, lens=torch.tensor([3, 5]))
    assert out.tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]
    assert torch.equal(flip(x), x.flip(1))


def test_backward_state_reads_only_the_suffix_and_forward_only_the_prefix():
    model = _wrapper()
    torch.manual_seed(2)
    seq = torch.randint(0, V, (2, 10))
    k = 4
    fwd, bwd = model.belief_embeds(seq)
    assert bwd.shape == (2, 11, 32)
    changed_prefix = seq.clone()
    changed_prefix[:, :k] = (seq[:, :k] + 1) % V
    fwd2, bwd2 = model.belief_embeds(changed_prefix)
    torch.testing.assert_close(bwd2[:, k:], bwd[:, k:])  # states at s >= k read seq[s:] only
    assert not torch.allclose(bwd2[:, k - 1], bwd[:, k - 1])  # ... and the one at k - 1 reads seq[k - 1]
    assert not torch.allclose(fwd2[:, :k], fwd[:, :k])
    changed_suffix = seq.clone()
    changed_suffix[:, k:] = (seq[:, k:] + 1) % V
    fwd3, bwd3 = model.belief_embeds(changed_suffix)
    torch.testing.assert_close(fwd3[:, :k], fwd[:, :k])  # forward states at f < k read seq[:f + 1] only
    assert not torch.allclose(fwd3[:, k], fwd[:, k])
    # the empty suffix (s = n) is the suffix token alone, whatever the sequence
    torch.testing.assert_close(bwd3[:, -1], bwd[:, -1])


def test_padded_row_reads_as_the_same_row_unpadded():
    model = _wrapper(pred_distance=True)
    torch.manual_seed(3)
    seq = torch.randint(0, V, (1, 9))
    L = 6
    padded = seq.clone()
    padded[:, L:] = 0
    fwd, bwd = model.belief_embeds(padded, lens=torch.tensor([L]))
    fwd_alone, bwd_alone = model.belief_embeds(seq[:, :L])
    torch.testing.assert_close(fwd[:, :L], fwd_alone)
    torch.testing.assert_close(bwd[:, :L + 1], bwd_alone)
    # so the loss of the padded row is the loss of the row alone
    torch.testing.assert_close(model(padded, lens=torch.tensor([L])), model(seq[:, :L]))


def _by_hand(model, seq, backward_weight=1.0):
    fwd, bwd = model.belief_embeds(seq)
    n, total, count = seq.shape[1], 0.0, 0
    for f in range(n):
        for s in range(f + 2, n + 1):
            logits = model.text_head(torch.cat((fwd[:, f], bwd[:, s]), dim=-1)).view(-1, 2, V)
            total = total + F.cross_entropy(logits[:, 0], seq[:, f + 1], reduction="sum")
            total = total + backward_weight * F.cross_entropy(logits[:, 1], seq[:, s - 1], reduction="sum")
            count += 2 * seq.shape[0]
    return total / count


@pytest.mark.parametrize("backward_weight", [1.0, 0.25])
def test_loss_is_the_mean_cross_entropy_over_every_prefix_suffix_pair(backward_weight):
    model = _wrapper(backward_ar_loss_weight=backward_weight)
    torch.manual_seed(4)
    seq = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(model(seq), _by_hand(model, seq, backward_weight))


def test_pair_weights_function_and_subsampling():
    model = _wrapper()
    torch.manual_seed(5)
    seq = torch.randint(0, V, (2, 7))
    seen = []

    def weigh(pairs):
        seen.append(pairs)
        return torch.zeros(pairs.shape[0], 2).index_fill_(1, torch.tensor([0]), 1.0)  # forward only

    half = _by_hand(model, seq, backward_weight=0.0)
    torch.testing.assert_close(model(seq, loss_weight_by_fb_indices=weigh), half)
    pairs = seen[0]
    assert pairs.shape == (21, 2) and bool((pairs[:, 1] - pairs[:, 0] >= 2).all())  # 7 * 6 / 2 pairs
    sub = _wrapper(train_frac_forward_backward_pairs=0.3)
    sub.load_state_dict(model.state_dict())
    sub(seq, loss_weight_by_fb_indices=lambda p: seen.append(p) or torch.ones(p.shape[0]))
    assert seen[-1].shape == (6, 2) and len({tuple(p) for p in seen[-1].tolist()}) == 6


@pytest.mark.parametrize("options", [dict(), dict(pred_distance=True), dict(cond_on_distance=True,
                                                                             cond_on_distance_prob=0.999)])
def test_every_parameter_gets_a_finite_gradient(options):
    model = BeliefStateWrapper(_decoder(0), _decoder(1), **options).train()
    torch.manual_seed(6)
    model(torch.randint(0, V, (2, 8)), lens=torch.tensor([8, 5])).backward()
    for name, p in model.named_parameters():
        if name.endswith("to_logits.weight"):  # the decoders' own heads: the text head replaces them
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_one_shared_decoder_reads_both_ways():
    net = _decoder(0)
    model = BeliefStateWrapper(net)
    assert model.backward_decoder is net
    fwd, bwd = model.eval().belief_embeds(torch.randint(0, V, (1, 6)))
    assert not torch.allclose(fwd[:, -1], bwd[:, -1])


def test_generation_is_conditioned_on_the_goal_and_the_cache_changes_nothing():
    model = _wrapper()
    torch.manual_seed(7)
    prompt, goal = torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 2))
    plain = model.generate_with_suffix_cond(prompt, 6, temperature=0.0, suffix=goal)
    cached = model.generate_with_suffix_cond(prompt, 6, temperature=0.0, suffix=goal, cache_kv=True)
    assert torch.equal(plain, cached) and plain.shape == (2, 6)
    # greedy decoding by hand: text head on [forward state of the prefix ; backward state of the goal]
    _, goal_bwd = model.belief_embeds(torch.cat((prompt, goal), dim=1))
    fwd, _ = model.belief_embeds(prompt)
    first = model.text_head(torch.cat((fwd[:, -1], goal_bwd[:, 3]), dim=-1)).view(2, 2, V)[:, 0].argmax(-1)
    assert torch.equal(plain[:, 0], first)
    one = model.generate_with_suffix_cond(prompt[0], 4, temperature=0.0, suffix=goal[0])
    assert torch.equal(one, model.generate_with_suffix_cond(prompt[:1], 4, temperature=0.0, suffix=goal[:1])[0])
    torch.manual_seed(8)
    sampled = model.generate_with_suffix_cond(prompt, 5)
    backwards = model.generate_with_suffix_cond(prompt, 5, temperature=0.0, decode_backwards=True)
    assert sampled.shape == backwards.shape == (2, 5) and int(sampled.max()) < V and not model.training


def test_toy_training_loss_falls():
    torch.manual_seed(0)
    model = BeliefStateWrapper(_decoder(0, num_tokens=12, dim=32), _decoder(1, num_tokens=12, dim=32))
    data = torch.randint(0, 12, (4, 8))
    assert_loss_falls(model, data)


@pytest.mark.parametrize("build, match", [
    (lambda: BeliefStateWrapper(torch.nn.Linear(2, 2)), "forward_decoder must be a TransformerWrapper"),
    (lambda: BeliefStateWrapper(TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Encoder(dim=16, depth=1))),
     "forward_decoder must be causal"),
    (lambda: BeliefStateWrapper(_decoder(0), _decoder(1, num_tokens=V + 1)), "same num_tokens"),
    (lambda: BeliefStateWrapper(_decoder(0), _decoder(1, dim=16)), "same emb_dim"),
    (lambda: BeliefStateWrapper(_decoder(0), train_frac_forward_backward_pairs=0), "train_frac_forward_backward_pairs"),
    (lambda: BeliefStateWrapper(_decoder(0), cond_on_distance_prob=1.0), "cond_on_distance_prob"),
    (lambda: BeliefStateWrapper(_decoder(0), backward_ar_loss_weight=-1), "backward_ar_loss_weight"),
    (lambda: BeliefStateWrapper(_decoder(0), max_pred_distance=1), "max_pred_distance"),
])
def test_bad_construction_is_refused_naming_the_argument(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_bad_inputs_are_refused_naming_the_argument():
    model = _wrapper()
    seq = torch.randint(0, V, (2, 6))
    for call, match in [
        (lambda: model(seq[0]), "seq must be a \\(batch, n\\)"),
        (lambda: model(seq[:, :1]), "at least 2 tokens"),
        (lambda: model(seq, lens=torch.tensor([3])), "lens must be a \\(2,\\)"),
        (lambda: model(seq, lens=torch.tensor([3, 7])), "lens must lie in"),
        (lambda: model(seq, loss_weight_by_fb_indices=lambda p: torch.ones(3)), "loss_weight_by_fb_indices"),
        (lambda: model.generate_with_suffix_cond(seq, 0), "seq_len"),
        (lambda: model.generate_with_suffix_cond(seq, 2, suffix=torch.zeros(3, 2, dtype=torch.long)), "suffix"),
        (lambda: model.generate_with_suffix_cond(seq, 2, filter_kwargs=dict(nope=1)), "nope"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            call()
