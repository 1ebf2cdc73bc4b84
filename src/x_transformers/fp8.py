"""FP8 training through torchao's float8 linear layers (the optional extra ``x-transformers[fp8]``).

    from x_transformers import fp8
    model = fp8.convert(model.cuda())          # before torch.compile, FSDP and the optimizer
    loss = torch.compile(AutoregressiveWrapper(model))(x)   # under bf16 autocast, as usual

:func:`convert` swaps the ``nn.Linear`` layers of the attention stack for torchao's ``Float8Linear``:
their matrix products run in float8 (e4m3 forward, e5m2 gradients) with per-tensor or per-row
scales (``recipe``); weights, optimizer state and everything else keep their dtype. Left out by
default (:func:`default_filter`): the output head and the token embedding (the logits are the most
precision-sensitive product, and the fused loss reads the head's weight directly), and any layer whose
widths are not multiples of 16 (the float8 kernels' tile). FP8 needs an NVIDIA GPU of compute
capability 8.9 or newer (Ada, Hopper, Blackwell); :func:`convert` refuses anything else at once,
naming the device. It pays only where the matrix products dominate: the issue-22 measurements are in
``benchmarks/results/fp8_*.json`` (``benchmarks/bench_fp8.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
HEAD_NAMES = ("to_logits", "token_emb")  # module names kept in the autocast dtype by default
MIN_CAPABILITY = (8, 9)


def default_filter(module: nn.Module, fqn: str) -> bool:
    """A layer :func:`convert` turns into float8: an ``nn.Linear`` (not already converted) outside the
    output head and the embedding, whose input and output widths are multiples of 16."""
    if type(module) is not nn.Linear:
        return False
    if any(part in HEAD_NAMES for part in fqn.split(".")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def check_device(device: torch.device | str) -> None:
    """Raise unless ``device`` is a CUDA device with float8 matrix units (capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"FP8 training needs an NVIDIA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                         f"the model is on {device.type}. Move it to the GPU first, or train in bf16")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ValueError(f"FP8 training needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has "
                         f"{cap[0]}.{cap[1]}: train in bf16 instead")


def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("FP8 training needs torchao: pip install 'x-transformers[fp8]' "
                          "(or a downloaded torchao wheel: pip install --no-index torchao-*.whl)") from e
    return Float8LinearConfig, convert_to_float8_training


def convert(model: nn.Module, *, recipe: str = "tensorwise",
            module_filter: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap ``model``'s eligible linear layers (``module_filter``, default :func:`default_filter`) for
    torchao float8 layers with the scaling ``recipe`` (one of :data:`RECIPES`), in place; returns the
    model. Call it on the model on its GPU, before ``torch.compile``, FSDP and building the optimizer."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("the model has no parameters to convert")
    check_device(param.device)
    config_cls, convert_fn = _torchao()
    chosen = module_filter or default_filter
    if not any(chosen(m, name) for name, m in model.named_modules()):
        raise ValueError("no layer of the model passes the FP8 filter (nn.Linear with widths that are multiples "
                         "of 16, outside the head and embedding): nothing would run in float8")
    convert_fn(model, config=config_cls.from_recipe_name(recipe), module_filter_fn=chosen)
    return model


def converted(model: nn.Module) -> list[str]:
    """The names of ``model``'s layers that run in float8 (after :func:`convert`)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
