"""Run-time input checks (checks.py): one line naming the argument and the fix, raised before work.

The ``wired`` tests run the checks through the models' own forwards (``layers.check_stack_inputs``,
``TransformerWrapper.check_inputs``).
"""

import warnings

import pytest
import torch

from x_transformers import CrossAttender, Decoder, Encoder, TransformerWrapper
from x_transformers.checks import (check_context, check_dtype, check_finite, check_not_empty, check_stack_inputs,
                                   check_token_inputs, nonfinite_tensors, warn_nonfinite)

V = 17


def one_line(info):
    return "\n" not in str(info.value)


@pytest.mark.parametrize("shape, message", [
    ((0, 4), r"x has an empty batch \(shape \(0, 4\)\); pass at least one row"),
    ((2, 0), r"x has zero-length sequences \(shape \(2, 0\)\); pass at least one token per row"),
    ((0, 4, 8), "x has an empty batch"),
    ((2, 0, 8), "x has zero-length sequences"),
])
def test_empty_batch_or_sequence_raises(shape, message):
    with pytest.raises(ValueError, match=message) as info:
        check_not_empty(torch.zeros(shape))
    assert one_line(info)
    check_not_empty(torch.zeros(1, 1))


def test_token_inputs_empty_raises():
    with pytest.raises(ValueError, match="x has an empty batch"):
        check_token_inputs(torch.zeros(0, 3, dtype=torch.long))
    check_token_inputs(torch.zeros(1, 3, dtype=torch.long))


def test_embeddings_of_another_dtype_than_the_parameters_raise_naming_the_fix():
    enc = Encoder(dim=16, depth=1, heads=2).double()
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the model's parameters are torch.float64; "
                                        r"pass x.to\(torch.float64\) or convert the model") as info:
        check_dtype(torch.randn(2, 3, 16), enc)
    assert one_line(info)
    check_dtype(torch.randn(2, 3, 16, dtype=torch.float64), enc)
    with pytest.raises(TypeError, match="model.to\\(torch.bfloat16\\)"):
        check_dtype(torch.randn(2, 3, 16, dtype=torch.bfloat16), Encoder(dim=16, depth=1, heads=2))


def test_autocast_keeps_working_float32_model_takes_float32_or_the_autocast_dtype():
    enc = Encoder(dim=16, depth=1, heads=2).eval()
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_stack_inputs(enc, x)  # autocast casts per op
        check_stack_inputs(enc, x.bfloat16())
        outs = [enc(x), enc(x.bfloat16())]  # both run under autocast
        with pytest.raises(TypeError, match="float16"):
            check_stack_inputs(enc, x.half())  # neither the parameters' dtype nor the autocast dtype
    assert all(torch.isfinite(out.float()).all() for out in outs)


def test_context_of_wrong_batch_or_width_raises():
    with pytest.raises(ValueError, match="context has batch 3 but the input has 2; pass one context row per input row"):
        check_context(torch.randn(3, 5, 8), 2, 8)
    with pytest.raises(ValueError, match=r"context has width 6 but cross-attention expects 8 .*set dim_context=6"):
        check_context(torch.randn(2, 5, 6), 2, 8)
    with pytest.raises(ValueError, match=r"context must have shape \(batch, ctx_len, 8\)"):
        check_context(torch.randn(2, 8), 2, 8)
    with pytest.raises(ValueError, match="context has zero length"):
        check_context(torch.randn(2, 0, 8), 2, 8)
    check_context(torch.randn(2, 5, 8), 2, 8)
    check_context(None, 2, 8)


def test_stack_context_width_honours_dim_context():
    stack = CrossAttender(dim=16, depth=1, heads=2, dim_context=12)
    x = torch.randn(2, 3, 16)
    check_stack_inputs(stack, x, torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="context has width 16 but cross-attention expects 12"):
        check_stack_inputs(stack, x, torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="context has batch 1"):
        check_stack_inputs(stack, x, torch.randn(1, 4, 12))


@pytest.mark.parametrize("bad, what", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_nonfinite_continuous_input_raises(bad, what):
    x = torch.randn(2, 3, 8)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match=f"x contains {what}; check the upstream computation") as info:
        check_finite(x)
    assert one_line(info)
    with pytest.raises(ValueError, match=f"context contains {what}"):
        check_stack_inputs(Decoder(dim=8, depth=1, heads=2, cross_attend=True), torch.randn(2, 3, 8), x)
    check_finite(torch.randn(2, 3, 8))
    check_finite(torch.zeros(2, 3, dtype=torch.long))  # token ids: nothing to check


def test_finite_check_is_skipped_under_compile():
    def f(x):
        check_finite(x)
        return x * 2

    x = torch.full((2, 3), float("nan"))
    out = torch.compile(f, fullgraph=True, backend="eager")(x)  # no graph break, no host sync
    assert out.isnan().all()


def test_nonfinite_weights_warn_naming_the_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_nonfinite(model, "load") == []
    with torch.no_grad():
        model[0].bias[1] = float("nan")
        model[1].weight[0] = float("inf")
    assert nonfinite_tensors(model.state_dict()) == ["0.bias", "1.weight"]
    with pytest.warns(UserWarning, match=r"load: weights with NaN/inf: 0.bias, 1.weight; the checkpoint is corrupt"):
        warn_nonfinite(model, "load")
    many = {f"w{i}": torch.full((2,), float("nan")) for i in range(10)}
    with pytest.warns(UserWarning, match="w7 and 2 more"):
        warn_nonfinite(many, "load")


# ------------------------------------------------------------------------------------------------
# through the models' forwards

def test_wired_wrapper_rejects_an_empty_batch():
    net = TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="x has an empty batch"):
        net(torch.zeros(0, 4, dtype=torch.long))


def test_wired_encoder_rejects_embeddings_of_another_dtype():
    enc = Encoder(dim=16, depth=1, heads=2).double()
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the model's parameters are torch.float64"):
        enc(torch.randn(2, 3, 16))


def test_wired_encoder_rejects_nan_embeddings():
    x = torch.randn(2, 3, 16)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        Encoder(dim=16, depth=1, heads=2)(x)


def test_wired_cross_attention_rejects_a_context_of_the_wrong_width():
    stack = Decoder(dim=16, depth=1, heads=2, cross_attend=True)
    with pytest.raises(ValueError, match="context has width 8 but cross-attention expects 16"):
        stack(torch.randn(2, 3, 16), context=torch.randn(2, 4, 8))
