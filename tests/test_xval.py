"""xVal (2310.02989): the number token's embedding is scaled by its value, a second head regresses
the value; the loss is next-token cross-entropy plus the weighted squared error of next numbers.
Checked against the definition, against upstream's XValTransformerWrapper / XValAutoregressiveWrapper
on the same weights, and for cached generation."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, XValAutoregressiveWrapper, XValTransformerWrapper
from x_transformers.upstream import convert_state_dict

import upstream as up

V, NUM = 12, 3  # vocabulary, the number token


def make(stack_kw=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("max_seq_len", 32)
    return XValTransformerWrapper(num_tokens=V, numerical_token_id=NUM,
                                  attn_layers=Decoder(dim=32, depth=2, heads=4, **(stack_kw or {})), **kw)


def data(b=2, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, n), generator=g)
    x[:, 1::3] = NUM  # numbers at every third column
    nums = torch.randn(b, n, generator=g)
    return x, torch.where(x == NUM, nums, float("nan"))  # NaN where there is no number


def test_the_number_token_embedding_is_scaled_by_its_value():
    net = make().eval()
    x, nums = data()
    seen = {}
    handle = net.attn_layers.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    net(x, nums)
    handle.remove()
    scale = torch.where(x == NUM, nums, 1.0)[..., None]
    want = net.token_emb(x) * scale + net.pos_emb(torch.arange(x.shape[1])[None])
    torch.testing.assert_close(seen["h"], want, atol=1e-6, rtol=1e-6)
    # values at other positions are ignored (NaN there is fine); the number's value matters
    out = net(x, torch.where(x == NUM, nums, 123.0))
    torch.testing.assert_close(out.logits, net(x, nums).logits)
    assert (net(x, nums * 2).numbers - out.numbers).abs().max() > 1e-4


def test_outputs_and_every_parameter_learns():
    net = make(tie_embedding=False)
    model = XValAutoregressiveWrapper(net)
    x, nums = data()
    out = net(x, nums)
    assert out.logits.shape == (2, 10, V) and out.numbers.shape == (2, 10)
    model(x, nums).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_loss_is_cross_entropy_plus_weighted_mse_at_next_number_positions():
    net = make().eval()
    model = XValAutoregressiveWrapper(net, numerical_loss_weight=0.25)
    x, nums = data()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, -3:] = False
    loss, parts = model(x, nums, mask, return_loss_breakdown=True)

    logits, pred = net(x[:, :-1], nums[:, :-1], mask[:, :-1])
    target, target_num = x[:, 1:], nums[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    is_num = target == NUM
    mse = torch.where(is_num, (pred - target_num.nan_to_num()) ** 2, 0.0)
    keep = mask[:, 1:]
    want = (ce + 0.25 * mse)[keep].mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts.cross_entropy_loss, ce)
    assert torch.isfinite(loss) and parts.numerical_mse_loss[~is_num].eq(0).all()
    # a mask over the n - 1 targets only (upstream's second convention) weighs the same targets
    only_targets = model(x, nums, keep)
    assert torch.isfinite(only_targets)
    # weight 0: plain cross-entropy
    torch.testing.assert_close(XValAutoregressiveWrapper(net, numerical_loss_weight=0)(x, nums, mask), ce[keep].mean())


@pytest.mark.parametrize("stack_kw", [{}, {"rotary_pos_emb": True}])
def test_cached_generation_equals_the_uncached_loop(stack_kw):
    model = XValAutoregressiveWrapper(make(stack_kw)).eval()
    x, nums = data(n=4)
    a = model.generate(x, nums, 6, temperature=0)
    b = model.generate(x, nums, 6, temperature=0, cache_kv=False)
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
    torch.testing.assert_close(a.sampled_numbers, b.sampled_numbers, equal_nan=True)
    assert a.sampled_token_ids.shape == (2, 6)
    assert torch.equal(a.is_number_mask, a.sampled_token_ids == NUM)
    assert torch.isnan(a.sampled_numbers[~a.is_number_mask]).all()
    assert torch.isfinite(a.sampled_numbers[a.is_number_mask]).all()
    # sampled generation with a seeded generator is reproducible
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(x, nums, 5, generator=g1, filter_kwargs=dict(k=4))
    s2 = model.generate(x, nums, 5, generator=g2, filter_kwargs=dict(k=4))
    assert torch.equal(s1.sampled_token_ids, s2.sampled_token_ids)


def test_a_tiny_model_learns_to_copy_a_number():
    # sequences "NUM 1 NUM": the second number copies the first; only the number head can say it
    torch.manual_seed(0)
    net = XValTransformerWrapper(num_tokens=4, max_seq_len=8, numerical_token_id=NUM,
                                 attn_layers=Decoder(dim=32, depth=1, heads=2))
    model = XValAutoregressiveWrapper(net)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.full((64, 3), NUM)
    x[:, 1] = 1

    def batch():
        v = torch.rand(64, 1) * 2 - 1
        return x, v.expand(-1, 3).clone()

    first = None
    for _ in range(150):
        loss, parts = model(*batch(), return_loss_breakdown=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mse = parts.numerical_mse_loss[:, -1].mean().item()
        first = mse if first is None else first
    assert mse < 0.1 * first, (first, mse)


def test_bad_input_is_one_line_naming_the_argument():
    with pytest.raises(ValueError, match=r"numerical_token_id must be a token id in \[0, 12\)"):
        XValTransformerWrapper(num_tokens=V, max_seq_len=8, numerical_token_id=V,
                               attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="max_mem_len"):
        XValTransformerWrapper(num_tokens=V, max_seq_len=8, numerical_token_id=0, max_mem_len=4,
                               attn_layers=Decoder(dim=16, depth=1, heads=2))
    net = make()
    x, nums = data()
    with pytest.raises(ValueError, match=r"x_num must have the shape of x, \(2, 10\), got \(2, 9\)"):
        net(x, nums[:, :-1])
    with pytest.raises(ValueError, match="x_num must be a float tensor"):
        net(x, x)
    with pytest.raises(ValueError, match="x_num holds NaN or inf at a numerical_token_id position"):
        net(x, torch.full(x.shape, float("nan")))
    with pytest.raises(ValueError, match="token id 12 is outside"):
        net(torch.full_like(x, V), nums)
    model = XValAutoregressiveWrapper(net)
    with pytest.raises(ValueError, match="x_num must have the shape of x"):
        model(x, nums[:1])
    with pytest.raises(ValueError, match="start_numbers must have the shape of start_tokens"):
        model.generate(x, nums[:, :3], 2)
    with pytest.raises(ValueError, match="needs a causal stack"):
        XValAutoregressiveWrapper(XValTransformerWrapper(num_tokens=V, max_seq_len=8, numerical_token_id=0,
                                                         attn_layers=Encoder(dim=16, depth=1, heads=2)))


UPSTREAM_XVAL = r"""
import json, os, torch
from x_transformers import Decoder, XValTransformerWrapper, XValAutoregressiveWrapper
p = json.loads(os.environ["PAYLOAD"])
torch.manual_seed(0)
net = XValTransformerWrapper(num_tokens=12, max_seq_len=32, numerical_token_id=3,
                             attn_layers=Decoder(dim=32, depth=2, heads=4), **p["kw"]).eval()
for t in net.parameters():
    t.data.add_(torch.randn(t.shape) * 0.05)
model = XValAutoregressiveWrapper(net, numerical_loss_weight=0.5)
x = torch.tensor(p["x"]); nums = torch.tensor(p["nums"]); mask = torch.tensor(p["mask"])
with torch.no_grad():
    logits, numbers = net(x, nums)
    loss = model(x, nums, mask=mask)
torch.save(dict(state=net.state_dict(), logits=logits, numbers=numbers, loss=loss), p["path"])
print(json.dumps("ok"))
"""


@pytest.mark.parametrize("kw", [{}, {"tie_embedding": True}, {"num_memory_tokens": 2}])
def test_matches_upstream_on_the_same_weights(kw, tmp_path):
    x, nums = data()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, -3:] = False
    path = str(tmp_path / "up.pt")
    up.run(UPSTREAM_XVAL, dict(kw=kw, x=x.tolist(), nums=nums.nan_to_num(0.0).tolist(), mask=mask.tolist(), path=path))
    saved = torch.load(path)
    state = saved["state"]

    net = make(**kw).eval()
    own = {"to_numerical_output.weight": state.pop("to_numerical_output.0.weight"),
           "to_numerical_output.bias": state.pop("to_numerical_output.0.bias")}
    if "to_logits.bias" in state:
        own["logits_bias"] = state.pop("to_logits.bias")
    converted, _, _ = convert_state_dict(net.transformer, state)
    net.load_state_dict({**own, **{"transformer." + k: v for k, v in converted.items()}})

    with torch.no_grad():
        logits, numbers = net(x, nums.nan_to_num(0.0))
        loss = XValAutoregressiveWrapper(net, numerical_loss_weight=0.5)(x, nums.nan_to_num(0.0), mask)
    torch.testing.assert_close(logits, saved["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(numbers, saved["numbers"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, saved["loss"], atol=1e-5, rtol=1e-4)
