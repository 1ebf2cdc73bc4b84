"""Entropy patching (2412.09871): a patch ends exactly where the small model's next-token entropy
reaches the threshold (computed here independently, from the decoder's logits); a higher threshold
only merges patches; max_token_size caps them; patches tile each row; a trained model on
predictable data makes fewer, longer patches."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.entropy_based_tokenizer import EntropyBasedTokenizer

V = 16


def small_lm(seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=2))


def entropy_by_hand(model, seq):
    model.eval()
    with torch.no_grad():
        return Categorical(logits=model(seq)).entropy()


def ends_of(lengths_row):
    """Patch lengths -> the set of positions where patches end."""
    return set((lengths_row[lengths_row > 0].cumsum(0) - 1).tolist())


def test_patches_end_exactly_where_the_entropy_reaches_the_threshold():
    model = small_lm()
    seq = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    ent = entropy_by_hand(model, seq)
    threshold = ent.median().item()
    lengths = EntropyBasedTokenizer(model, entropy_threshold=threshold)(seq)
    for row in range(3):
        expected = set((ent[row] >= threshold).nonzero().squeeze(-1).tolist()) | {39}
        assert ends_of(lengths[row]) == expected
        assert 1 < len(expected) < 40  # the threshold splits the row somewhere, not everywhere


def test_a_higher_threshold_only_merges_patches():
    model = small_lm()
    seq = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(2))
    ent = entropy_by_hand(model, seq)
    lo, hi = ent.quantile(0.3).item(), ent.quantile(0.7).item()
    fine = EntropyBasedTokenizer(model, entropy_threshold=lo)(seq)
    coarse = EntropyBasedTokenizer(model, entropy_threshold=hi)(seq)
    for row in range(2):
        assert ends_of(coarse[row]) < ends_of(fine[row])  # a strict subset: fewer, merged patches
        assert (coarse[row] > 0).sum() < (fine[row] > 0).sum()


def test_patches_tile_each_row_within_its_length_and_respect_max_token_size():
    model = small_lm()
    seq = torch.randint(0, V, (3, 30), generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([30, 17, 5])
    tok = EntropyBasedTokenizer(model, entropy_threshold=100.0, max_token_size=4)  # no entropy ends: caps only
    lengths = tok(seq, lens=lens)
    assert lengths.sum(-1).tolist() == lens.tolist()
    assert lengths.max().item() == 4
    # only the cap cuts: every patch is 4 long except each row's last, the remainder
    for row, n in enumerate(lens.tolist()):
        kept = lengths[row][lengths[row] > 0].tolist()
        assert kept == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    patches = tok(seq, lens=lens, return_segmented_seq=True)
    for row, n in enumerate(lens.tolist()):
        assert torch.equal(torch.cat(patches[row]), seq[row, :n])
        assert [len(p) for p in patches[row]] == lengths[row][lengths[row] > 0].tolist()


def test_the_cap_cuts_long_entropy_patches_from_their_own_start():
    model = small_lm()
    seq = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(4))
    ent = entropy_by_hand(model, seq)
    threshold = ent.quantile(0.9).item()
    plain = EntropyBasedTokenizer(model, entropy_threshold=threshold)(seq)
    capped = EntropyBasedTokenizer(model, entropy_threshold=threshold, max_token_size=3)(seq)
    for row in range(2):
        expected = [piece for n in plain[row][plain[row] > 0].tolist() for piece in [3] * (n // 3) + [n % 3] if piece]
        assert capped[row][capped[row] > 0].tolist() == expected


def test_accumulated_entropy_ends_a_patch_once_its_sum_reaches_the_threshold():
    model = small_lm()
    seq = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    ent = entropy_by_hand(model, seq).double()
    threshold = 3.5 * ent.mean().item()
    lengths = EntropyBasedTokenizer(model, entropy_threshold=threshold, accumulate_entropy=True)(seq)
    for row in range(2):
        start = 0
        for n in lengths[row][lengths[row] > 0].tolist():
            patch = ent[row, start:start + n]
            if start + n < 40:  # the row's last patch may end short of the threshold
                assert patch.sum() >= threshold - 1e-9
            assert patch[:-1].sum() < threshold  # it ended at the first element that reached it
            start += n
    # ignoring entropies below the threshold itself is the plain rule again
    plain = EntropyBasedTokenizer(model, entropy_threshold=ent.median().item())(seq)
    same = EntropyBasedTokenizer(model, entropy_threshold=ent.median().item(), accumulate_entropy=True,
                                 ignore_entropy_below=ent.median().item())(seq)
    assert torch.equal(plain, same)


def test_unbatched_input_and_segmented_output():
    model = small_lm()
    seq = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(6))
    tok = EntropyBasedTokenizer(model, entropy_threshold=entropy_by_hand(model, seq[None]).median().item())
    lengths = tok(seq)
    assert lengths.ndim == 1 and lengths.sum().item() == 20
    torch.testing.assert_close(lengths, tok(seq[None])[0])
    patches = tok(seq, return_segmented_seq=True)
    assert isinstance(patches, tuple) and torch.equal(torch.cat(patches), seq)


def test_the_decoder_is_left_in_its_training_mode():
    model = small_lm().train()
    EntropyBasedTokenizer(model, entropy_threshold=1.0)(torch.randint(0, V, (1, 8)))
    assert model.training


def test_training_the_small_model_lengthens_patches_on_predictable_data():
    """The paper's point: where the model predicts well, patches grow. A repeating pattern with
    a random start is learned in 200 steps (loss falls by more than 30%); the patches then merge."""
    torch.manual_seed(0)
    model = small_lm()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])

    def batch(b=16, n=24):
        offsets = torch.randint(0, 8, (b, 1))
        return pattern[(torch.arange(n)[None] + offsets) % 8]

    from x_transformers import AutoregressiveWrapper
    ar = AutoregressiveWrapper(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = batch(4)
    tok = EntropyBasedTokenizer(model, entropy_threshold=1.0)
    before = (tok(probe) > 0).sum().item()
    losses = []
    for _ in range(200):
        loss = ar(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    after = (tok(probe) > 0).sum().item()
    assert after < before / 4  # from near one patch per element to a few patches per row


def test_bad_inputs_raise_one_line_errors_naming_the_argument():
    model = small_lm()
    for kwargs, match in ((dict(entropy_threshold="high"), "entropy_threshold"),
                          (dict(entropy_threshold=float("nan")), "entropy_threshold"),
                          (dict(entropy_threshold=1.0, max_token_size=0), "max_token_size"),
                          (dict(entropy_threshold=1.0, ignore_entropy_below=2.0), "ignore_entropy_below"),
                          (dict(entropy_threshold=1.0, accumulate_entropy="yes"), "accumulate_entropy")):
        with pytest.raises(ValueError, match=match):
            EntropyBasedTokenizer(model, **kwargs)
    with pytest.raises(TypeError, match="decoder"):
        EntropyBasedTokenizer(lambda x: x, entropy_threshold=1.0)
    encoder = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Encoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="causal"):
        EntropyBasedTokenizer(encoder, entropy_threshold=1.0)
    tok = EntropyBasedTokenizer(model, entropy_threshold=1.0)
    seq = torch.randint(0, V, (2, 8))
    for args, match in (((seq.float(),), "seq"), ((seq[None],), "seq"), ((seq[:, :0],), "seq"),
                        ((seq, torch.tensor([8])), "lens"), ((seq, torch.tensor([8, 9])), "lens"),
                        ((seq, torch.tensor([8.0, 2.0])), "lens")):
        with pytest.raises(ValueError, match=match) as err:
            tok(*args)
        assert "\n" not in str(err.value)
