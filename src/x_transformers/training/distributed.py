"""Processes, devices, and the one place where parallelism, precision and compile are applied.

Launch several processes with PyTorch's own launcher::

    torchrun --nproc_per_node=N -m x_transformers train --strategy ddp|fsdp ...

The model is always built the same way on every rank (same seed, on CPU), then :func:`parallelize`
applies, in this fixed order: move to the device; FSDP2 ``fully_shard`` on every layer (its blocks as one
unit, :func:`shard_units`) and on the root, which holds the rest (mixed precision bf16 params / fp32
reductions on GPU), or DDP; then ``torch.compile`` when asked. The model modules know none of this.
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import CLIError, TrainConfig


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(cfg: TrainConfig) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.strategy == "none":
        raise CLIError(f"{world} processes were launched but strategy is none: pass --strategy ddp or fsdp")
    if cfg.device == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = cfg.device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise CLIError(f"device {cfg.device} was asked for but CUDA is not available")
    if cfg.strategy == "none":
        device = torch.device(cfg.device) if cfg.device != "auto" else torch.device("cuda" if use_cuda else "cpu")
        return Env(device=device)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise CLIError(f"batch_size ({cfg.batch_size}) must be divisible by processes x grad_accum "
                       f"({world} x {cfg.grad_accum})")
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # one process without torchrun: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Env(rank=rank, world=world, local_rank=local, device=device, distributed=True)


def teardown(env: Env):
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def uses_bf16(cfg: TrainConfig, env: Env) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")


def layer_stacks(model: nn.Module):
    from ..layers import AttentionLayers

    return [m for m in model.modules() if isinstance(m, AttentionLayers)]


def shard_units(stack) -> list[list[nn.Module]]:
    """The stack's blocks grouped as FSDP2 units: one layer each (the default layout's repeated unit,
    attention + feed-forward), each module once. One unit per layer rather than per block halves the
    hooks and collectives of a step: an eager FSDP2 step of gpt2-small is bound by host time
    (benchmarks/results/fsdp_probe_*.json). A reversible stack runs its blocks' parts itself, inside
    its own autograd function, never through a block's forward (where FSDP2's hooks gather the
    parameters): it is one unit, whole."""
    from ..layout import unit_length

    if stack.reversible is not None:
        return [[stack]]
    per, seen, units = unit_length(stack.cfg), set(), []
    for i in range(0, len(stack.blocks), per):
        group = [b for b in stack.blocks[i:i + per] if id(b) not in seen and not seen.add(id(b))]
        if group:
            units.append(group)
    return units


SCALARS = "_xt_fsdp_scalars"  # attribute of a model sharded by parallelize: its 0-d parameters' names


def vectorize_scalars(model: nn.Module) -> list[str]:
    """FSDP2 shards along dimension 0 and refuses 0-d parameters (ScaleNorm's gain, ReZero's gate,
    DyT's alpha, hyper-connections' scales): each becomes a 1-element vector, which broadcasts as the
    scalar did, in place (a parameter shared by several modules stays one). Returns their names, which
    :func:`full_state_dict` turns back into scalars for checkpoints."""
    # id of a scalar, or of its vector -> the vector; `old` keeps the replaced scalars alive, so no id is reused
    vector, old, names = {}, [], []
    for prefix, module in model.named_modules(remove_duplicate=False):  # every path to a shared module
        for name, p in list(module._parameters.items()):
            if p is None or (p.ndim != 0 and id(p) not in vector):
                continue
            if id(p) not in vector:
                new = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                vector[id(p)] = vector[id(new)] = new
                old.append(p)
            module._parameters[name] = vector[id(p)]
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


def full_state_dict(model: nn.Module, cfg: TrainConfig) -> dict:
    """The model's whole weights on every process: gathered from the shards under FSDP (on CPU), with
    the 0-d parameters that :func:`vectorize_scalars` widened saved as the scalars the model declares."""
    if cfg.strategy != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in getattr(model, SCALARS, ()):
        if name in weights:
            weights[name] = weights[name].reshape(())
    return weights


def parallelize(model: nn.Module, cfg: TrainConfig, env: Env) -> nn.Module:
    model.to(env.device)
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if uses_bf16(cfg, env) else None
        kw = {"mp_policy": mp} if mp is not None else {}
        setattr(model, SCALARS, vectorize_scalars(model))
        for stack in layer_stacks(model):
            for unit in shard_units(stack):
                fully_shard(unit, **kw)
        fully_shard(model, **kw)
    elif cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.compile and cfg.strategy != "none":
        model = torch.compile(model)  # with DDP / FSDP the documented form: compile the wrapped module
    return model


def compile_step(fn, cfg: TrainConfig):
    """One process: ``fn`` (forward + loss) compiled as one graph, so the loss is fused with the
    model's last ops, and with ``compile_mode`` reduce-overhead replayed as CUDA graphs (measured
    on H200: 2.2x the steps/s of the model-only compile for the seed's encoder-decoder, whose step
    is bound by kernel launches). Under DDP / FSDP the module itself is compiled (parallelize)."""
    if not cfg.compile or cfg.strategy != "none":
        return fn
    return torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def autocast(cfg: TrainConfig, env: Env):
    """bf16 autocast on GPU; FSDP casts parameters itself through its mixed-precision policy."""
    if uses_bf16(cfg, env) and cfg.strategy != "fsdp":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return nullcontext()


def no_sync(model: nn.Module, cfg: TrainConfig, last: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    inner = getattr(model, "_orig_mod", model)
    if cfg.strategy == "ddp" and not last:
        return inner.no_sync()
    if cfg.strategy == "fsdp":
        inner.set_requires_gradient_sync(last)
    return nullcontext()
