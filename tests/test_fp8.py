"""x_transformers.fp8 (issue 22): which layers become float8, the refusals, and the q/k/v path that
lets a converted projection run its own forward. The float8 products themselves need a GPU of
capability >= 8.9: benchmarks/bench_fp8.py measures them (benchmarks/results/fp8_*.json)."""

import sys

import pytest
import torch
from torch import nn
from train_helpers import cli

from x_transformers import Decoder, TransformerWrapper, fp8


def lm(dim=32, **kw):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=64, max_seq_len=16, attn_layers=Decoder(dim=dim, depth=2, heads=2, **kw))


def test_the_filter_takes_the_stacks_linears_and_leaves_the_head_and_odd_widths():
    model = lm(attn_dim_head=8)
    chosen = {name for name, m in model.named_modules() if fp8.default_filter(m, name)}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "to_logits" in linears and "to_logits" not in chosen
    stack = {n for n in linears if n.startswith("attn_layers.")}
    assert chosen == {n for n in stack if (m := model.get_submodule(n)).in_features % 16 == 0
                      and m.out_features % 16 == 0}
    assert any(n.endswith("to_q") for n in chosen) and any("proj_in" in n for n in chosen)
    odd = lm(dim=24)  # 24 is not a multiple of 16: no layer qualifies
    with pytest.raises(ValueError, match="no layer of the model passes"), _pretend_fp8_gpu():
        fp8.convert(odd)


def test_convert_refuses_the_cpu_a_bad_recipe_and_a_missing_torchao(monkeypatch):
    model = lm()
    with pytest.raises(ValueError, match="compute capability >= 8.9.*the model is on cpu"):
        fp8.convert(model)
    with pytest.raises(ValueError, match="recipe must be one of"):
        fp8.convert(model, recipe="blockwise")
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r"x-transformers\[fp8\]"):
        fp8._torchao()


class _pretend_fp8_gpu:
    """Skip the device check so the conversion itself can be inspected on CPU."""

    def __enter__(self):
        self.saved, fp8.check_device = fp8.check_device, lambda device: None

    def __exit__(self, *exc):
        fp8.check_device = self.saved


def test_convert_swaps_exactly_the_filtered_layers_and_keeps_their_weights():
    model = lm()
    want = {name for name, m in model.named_modules() if fp8.default_filter(m, name)}
    before = {n: p.clone() for n, p in model.named_parameters()}
    with _pretend_fp8_gpu():
        fp8.convert(model, recipe="rowwise")
    assert set(fp8.converted(model)) == want
    assert type(model.to_logits) is nn.Linear
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_projection_that_is_not_a_plain_linear_runs_its_own_forward():
    """The fused q/k/v product reads the three weights directly; a converted (or adapted) projection
    must run its own forward instead, with the same result as the fused path in full precision."""
    model = lm().eval()
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        fused = model(x)
    calls = []

    class Counted(nn.Linear):
        def forward(self, t):
            calls.append(1)
            return super().forward(t)

    for attn in (m for m in model.modules() if hasattr(m, "_qkv_weight")):
        for name in ("to_q", "to_k", "to_v"):
            old = getattr(attn, name)
            new = Counted(old.in_features, old.out_features, bias=old.bias is not None)
            new.load_state_dict(old.state_dict())
            setattr(attn, name, new)
    with torch.no_grad():
        separate = model(x)
    assert len(calls) == 3 * 2  # three projections in each of the two attention layers
    torch.testing.assert_close(separate, fused, rtol=1e-5, atol=1e-5)


def test_train_fp8_on_cpu_is_refused_with_the_reason(tmp_path, capsys):
    code = cli("train", "--preset", "tiny", "--device", "cpu", "--fp8", "--max-steps", 1, "--out", tmp_path / "r",
               "--stdlib-bytes", 20000, "--no-progress")
    assert code == 2
    assert "--fp8" in capsys.readouterr().err
    assert cli("train", "--preset", "tiny", "--fp8-recipe", "blockwise", "--out", tmp_path / "s") == 2
