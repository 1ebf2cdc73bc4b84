"""DISCOVER (discover_wrapper.py; McCoy et al., arXiv 2608.29530): role schemes, the TPR encoder's
binding sum, the decoder bottleneck, surgery."""

import pytest
import torch
import torch.nn.functional as F

from train_helpers import assert_loss_falls

from x_transformers import Decoder, TransformerWrapper
from x_transformers.discover_wrapper import (ROLE_SCHEMES, DiscoverDecoder, TPREncoder, num_roles_for_scheme,
                                             role_ids_for_tokens)

FILLERS, N = 5, 6


def sequences(b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, N + 1, (b,), generator=g)
    tokens = torch.randint(0, FILLERS, (b, N), generator=g)
    mask = torch.arange(N)[None] < lengths[:, None]
    return tokens.masked_fill(~mask, 0), lengths, mask


@pytest.mark.parametrize("scheme", ROLE_SCHEMES)
def test_each_role_scheme_is_a_function_of_what_it_names_and_fits_its_role_count(scheme):
    tokens, lengths, mask = sequences()
    roles = role_ids_for_tokens(tokens, lengths, scheme, max_seq_len=N, num_fillers=FILLERS)
    count = num_roles_for_scheme(scheme, max_seq_len=N, num_fillers=FILLERS)
    assert roles[mask].min() >= 0 and roles[mask].max() < count and (roles[~mask] == 0).all()
    # what each scheme's role is made of, per kept position
    keys = {}
    for r in range(tokens.shape[0]):
        n = int(lengths[r])
        row = tokens[r, :n].tolist()
        for i in range(n):
            name = dict(left_to_right=i, right_to_left=n - 1 - i, bidirectional=(i, n - 1 - i),
                        wickel=(row[i - 1] if i else None, row[i + 1] if i < n - 1 else None),
                        bag_of_words=())[scheme]
            keys.setdefault(name, set()).add(int(roles[r, i]))
    assert all(len(ids) == 1 for ids in keys.values())  # one role per name ...
    assert len({next(iter(ids)) for ids in keys.values()}) == len(keys)  # ... and distinct names, distinct roles


def test_the_tpr_state_is_a_sum_of_filler_role_bindings():
    torch.manual_seed(0)
    tpr = TPREncoder(dim=8, num_fillers=FILLERS, num_roles=N, filler_dim=3, role_dim=4)
    torch.nn.init.normal_(tpr.binding)
    torch.nn.init.normal_(tpr.bias)
    tokens, lengths, mask = sequences(b=4)
    roles = role_ids_for_tokens(tokens, lengths, "left_to_right", max_seq_len=N, num_fillers=FILLERS)
    state = tpr.state(tokens, roles, mask)
    for r in range(4):
        expected = tpr.bias.clone()
        for i in range(int(lengths[r])):
            f, role = tpr.filler_emb.weight[tokens[r, i]], tpr.role_emb.weight[roles[r, i]]
            expected = expected + (tpr.binding * f[None, :, None] * role[None, None, :]).sum((1, 2))
        torch.testing.assert_close(state[r], expected, atol=1e-5, rtol=1e-5)
    # the bag of (filler, role) pairs is all that counts: reversing the kept positions of a row leaves its state
    flip = tokens.clone(), roles.clone()
    for r in range(4):
        n = int(lengths[r])
        flip[0][r, :n], flip[1][r, :n] = tokens[r, :n].flip(0), roles[r, :n].flip(0)
    torch.testing.assert_close(tpr.state(*flip, mask), state)


def test_fitting_recovers_encodings_that_are_a_tpr_under_the_right_scheme_only():
    tokens, lengths, mask = sequences(b=256)
    torch.manual_seed(1)
    truth = TPREncoder(dim=6, num_fillers=FILLERS, num_roles=N, filler_dim=4, role_dim=4)
    torch.nn.init.normal_(truth.binding)
    roles = {s: role_ids_for_tokens(tokens, lengths, s, max_seq_len=N, num_fillers=FILLERS)
             for s in ("left_to_right", "bag_of_words")}
    with torch.no_grad():
        targets = truth(tokens, roles["left_to_right"], mask)
    errors = {}
    for scheme, ids in roles.items():
        torch.manual_seed(2)
        fit = TPREncoder(dim=6, num_fillers=FILLERS, num_roles=N, filler_dim=4, role_dim=4)
        errors[scheme] = fit.fit(tokens, ids, targets, mask=mask, steps=400, batch_size=128, lr=2e-2)
    variance = targets.var(dim=0).mean().item()
    assert errors["left_to_right"] < 0.05 * variance < errors["bag_of_words"]


def model(seed=0):
    torch.manual_seed(seed)
    decoder = TransformerWrapper(num_tokens=FILLERS + 2, max_seq_len=16, attn_layers=Decoder(dim=32, depth=2, heads=4))
    return DiscoverDecoder(decoder=decoder, num_fillers=FILLERS, bos_id=FILLERS, pad_id=FILLERS + 1, max_seq_len=N)


def test_the_decoder_reads_the_input_only_through_its_encoding():
    disco = model().eval()
    tokens = torch.randint(0, FILLERS, (3, N))
    targets = torch.randint(0, FILLERS, (3, N))
    enc = disco(tokens)
    _, inter = disco.decoder(tokens, return_intermediates=True)
    torch.testing.assert_close(enc, inter.last_hidden[:, -1])  # the last position's final hidden state
    logits = disco(tokens, targets)
    inp = torch.cat((torch.full((3, 1), FILLERS), targets[:, :-1]), dim=1)
    manual = disco.decoder(inp, prepend_embeds=enc[:, None])[:, 1:]
    torch.testing.assert_close(logits, manual)
    # replacing the encoding changes the logits; the input tokens themselves are not read
    assert not torch.allclose(disco.decoder(inp, prepend_embeds=enc.flip(0)[:, None])[:, 1:], logits)
    # a masked row is encoded at its last kept position, whatever follows
    mask = torch.arange(N)[None] < torch.tensor([[4], [6], [2]])
    padded = tokens.masked_fill(~mask, FILLERS + 1)
    torch.testing.assert_close(disco.encode(padded, mask)[0], disco.encode(tokens[:1, :4])[0], atol=1e-5, rtol=1e-5)


def test_decode_is_greedy_from_the_encoding_and_stops_at_lengths_or_eos():
    disco = model().eval()
    enc = disco(torch.randint(0, FILLERS, (2, N)))
    out = disco.decode(enc, lengths=torch.tensor([4, 2]))
    seq = torch.full((2, 1), FILLERS)
    for _ in range(4):
        seq = torch.cat((seq, disco.decoder(seq, prepend_embeds=enc[:, None])[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out[0], seq[0, 1:5]) and torch.equal(out[1, :2], seq[1, 1:3])
    assert (out[1, 2:] == disco.pad_id).all()
    eos = int(seq[0, 2])
    stopped = disco.decode(enc[:1], eos_id=eos, max_len=4)
    first = int((seq[0, 1:5] == eos).nonzero()[0])
    assert torch.equal(stopped[0, :first + 1], seq[0, 1:first + 2]) and (stopped[0, first + 1:] == disco.pad_id).all()


def test_surgery_decodes_the_encoding_moved_by_the_tpr_difference(monkeypatch):
    disco = model().eval()
    tpr = TPREncoder(dim=32, num_fillers=FILLERS, num_roles=N)
    torch.nn.init.normal_(tpr.binding, std=0.1)
    tokens = torch.randint(0, FILLERS, (2, N))
    tokens[1, 4:] = disco.pad_id
    edited = tokens.clone()
    edited[:, 0] = (tokens[:, 0] + 1) % FILLERS
    lengths = (tokens != disco.pad_id).sum(-1)
    r_old = role_ids_for_tokens(tokens.masked_fill(tokens == disco.pad_id, 0), lengths, "left_to_right",
                                max_seq_len=N, num_fillers=FILLERS)
    seen = {}
    monkeypatch.setattr(disco, "decode", lambda enc, lengths: seen.update(enc=enc, lengths=lengths) or enc)
    disco.surgery(tokens, edited, r_old, r_old, tpr)
    mask = tokens != disco.pad_id
    expected = disco.encode(tokens, mask) + tpr(edited.masked_fill(~mask, 0), r_old, mask) - tpr(
        tokens.masked_fill(~mask, 0), r_old, mask)
    torch.testing.assert_close(seen["enc"], expected)
    assert seen["lengths"].tolist() == [N, 4]


def test_a_toy_autoencoder_learns_to_reconstruct():
    disco = model(seed=3)
    data = torch.randint(0, FILLERS, (32, 4), generator=torch.Generator().manual_seed(0))
    assert_loss_falls(disco, data, steps=200, lr=3e-3,
                      objective=lambda m, d: F.cross_entropy(m(d, d).transpose(1, 2), d))
    for name, p in disco.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("build, message", [
    (lambda: role_ids_for_tokens(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 3]), "zigzag", max_seq_len=3,
                                 num_fillers=2), "unknown role scheme 'zigzag'"),
    (lambda: TPREncoder(dim=0, num_fillers=2, num_roles=2), "dim must be an integer >= 1"),
    (lambda: TPREncoder(dim=4, num_fillers=2, num_roles=2)(torch.tensor([[0, 5]]), torch.tensor([[0, 1]])),
     r"tokens must be ids in \[0, 2\)"),
    (lambda: TPREncoder(dim=4, num_fillers=2, num_roles=2).fit(torch.zeros(3, 2, dtype=torch.long),
                                                                torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 5)),
     r"target_encodings must be \(3, 4\)"),
    (lambda: DiscoverDecoder(decoder=model().decoder, num_fillers=5, bos_id=99, pad_id=0, max_seq_len=4),
     r"bos_id must be a token id in \[0, 7\)"),
    (lambda: DiscoverDecoder(decoder=model().decoder, num_fillers=5, bos_id=5, pad_id=6, max_seq_len=4,
                             enc_pos="first"), "enc_pos must be 'last' or a position"),
    (lambda: model().decode(torch.zeros(1, 32)), "give lengths or eos_id"),
    (lambda: model().decode(torch.zeros(1, 32), lengths=torch.tensor([9])), r"exceed max_seq_len \(6\)"),
])
def test_bad_inputs_are_one_line_naming_the_argument(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()
