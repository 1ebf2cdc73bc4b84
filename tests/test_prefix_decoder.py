"""PrefixDecoder: the first prefix_attn_len positions attend to each other in both directions,
later positions causally. Causality outside the prefix, the prefix seeing all of itself, equality
with an explicit mask and with upstream's PrefixDecoder, errors naming the argument."""

from __future__ import annotations

import pytest
import torch

from x_transformers import Decoder, Encoder, PrefixDecoder, TransformerWrapper
from x_transformers.attend import attend_backend

import upstream as up

N, P, D = 9, 4, 32


def make(**kw):
    torch.manual_seed(0)
    return PrefixDecoder(dim=D, depth=2, heads=4, **kw).eval()


def explicit_mask(n, p):
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]) | ((i[:, None] < p) & (i[None, :] < p))


@pytest.mark.parametrize("kw", [{}, {"rotary_pos_emb": True}, {"rel_pos_bias": True}, {"alibi_pos_bias": True}])
def test_a_later_token_never_changes_an_earlier_output_outside_the_prefix(kw):
    model = make(**kw)
    x = torch.randn(2, N, D)
    base = model(x, prefix_attn_len=P)
    for j in range(P, N):
        y = x.clone()
        y[:, j] += torch.randn(2, D)
        out = model(y, prefix_attn_len=P)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=0, rtol=0)  # nothing before j moves
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4


def test_every_prefix_output_depends_on_the_whole_prefix():
    model = make()
    x = torch.randn(2, N, D)
    base = model(x, prefix_attn_len=P)
    y = x.clone()
    y[:, P - 1] += torch.randn(2, D)  # the last prefix token reaches the first prefix output
    out = model(y, prefix_attn_len=P)
    assert (out[:, :P] - base[:, :P]).abs().amax(dim=-1).min() > 1e-4
    # a plain decoder with the same weights would not: position 0 sees only itself
    torch.testing.assert_close(model(y, prefix_attn_len=0)[:, :P - 1], model(x, prefix_attn_len=0)[:, :P - 1])


@pytest.mark.parametrize("backend", ["explicit", "sdpa"])
def test_equals_a_bidirectional_stack_under_the_explicit_prefix_mask(backend):
    model = make()
    enc = Encoder(dim=D, depth=2, heads=4).eval()
    enc.load_state_dict(model.state_dict())
    x = torch.randn(2, N, D)
    mask = torch.tensor([[True] * N, [True] * (N - 2) + [False] * 2])
    with attend_backend(backend):
        got = model(x, mask, prefix_attn_len=P)
        want = enc(x, mask, attn_mask=explicit_mask(N, P)[None, None])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # and the explicit (score-matrix) path agrees with the fused one
    with attend_backend("explicit"):
        ref = model(x, mask, prefix_attn_len=P)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_per_row_lengths_equal_each_row_alone_and_no_prefix_is_a_decoder():
    model = make()
    x = torch.randn(3, N, D)
    lens = torch.tensor([0, 3, N])
    out = model(x, prefix_attn_len=lens)
    for r, n in enumerate(lens.tolist()):
        torch.testing.assert_close(out[r:r + 1], model(x[r:r + 1], prefix_attn_len=n), atol=1e-6, rtol=1e-6)
    dec = Decoder(dim=D, depth=2, heads=4).eval()
    dec.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), dec(x), atol=1e-6, rtol=1e-6)


def test_the_constructor_default_reaches_it_through_a_token_wrapper(tmp_path):
    torch.manual_seed(0)
    lm = TransformerWrapper(num_tokens=20, max_seq_len=16,
                            attn_layers=PrefixDecoder(dim=D, depth=1, heads=2, prefix_attn_len=P)).eval()
    x = torch.randint(0, 20, (2, N))
    y = x.clone()
    y[:, P - 1] = (y[:, P - 1] + 1) % 20
    assert (lm(y)[:, 0] - lm(x)[:, 0]).abs().max() > 1e-5  # the first token sees the whole prefix
    z = x.clone()
    z[:, -1] = (z[:, -1] + 1) % 20
    torch.testing.assert_close(lm(z)[:, :-1], lm(x)[:, :-1], atol=0, rtol=0)
    lm.save_pretrained(tmp_path / "p")
    again = TransformerWrapper.from_pretrained(tmp_path / "p")
    assert again.attn_layers.prefix_attn_len == P
    assert torch.equal(again(x), lm(x))


def test_bad_input_is_one_line_naming_the_argument():
    model = make()
    x = torch.randn(2, N, D)
    with pytest.raises(ValueError, match=r"prefix_attn_len \(10\) is longer than the sequence \(9"):
        model(x, prefix_attn_len=N + 1)
    with pytest.raises(ValueError, match="prefix_attn_len must be"):
        model(x, prefix_attn_len=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prefix_attn_len must be"):
        model(x, prefix_attn_len=-1)
    with pytest.raises(ValueError, match="drop causal="):
        PrefixDecoder(dim=D, depth=1, causal=True)
    with pytest.raises(ValueError, match="prefix_attn_len must be"):
        PrefixDecoder(dim=D, depth=1, prefix_attn_len=1.5)
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        model(x, attn_mask=torch.ones(N, N, dtype=torch.bool))


UPSTREAM_PREFIX = r"""
import json, os, torch
from x_transformers.x_transformers import PrefixDecoder
p = json.loads(os.environ["PAYLOAD"])
torch.manual_seed(0)
model = PrefixDecoder(dim=32, depth=2, heads=4, **p["kw"]).eval()
for t in model.parameters():
    t.data.add_(torch.randn(t.shape) * 0.05)
x = torch.randn(3, 9, 32)
with torch.no_grad():
    outs = [model(x, prefix_attn_len=4), model(x, prefix_attn_len=torch.tensor([0, 2, 9]))]
torch.save(dict(state=model.state_dict(), x=x, outs=outs), p["path"])
print(json.dumps("ok"))
"""


@pytest.mark.parametrize("kw", [{}, {"rotary_pos_emb": True}])
def test_matches_upstream_prefix_decoder(kw, tmp_path):
    from x_transformers.upstream import load_state_dict

    path = str(tmp_path / "up.pt")
    up.run(UPSTREAM_PREFIX, dict(kw=kw, path=path))
    saved = torch.load(path)
    ours = PrefixDecoder(dim=32, depth=2, heads=4, **kw).eval()
    load_state_dict(ours, saved["state"])
    x = saved["x"]
    with torch.no_grad():
        got = [ours(x, prefix_attn_len=4), ours(x, prefix_attn_len=torch.tensor([0, 2, 9]))]
    for g, w in zip(got, saved["outs"]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
