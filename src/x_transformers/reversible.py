"""Reversible layers (Reformer, 2001.04451; RevNet, 1707.04585): activations recomputed in backward.

The input x is copied into two streams (x1, x2). The layout is cut into runs of one family,
attention (``a``, ``c``) or feed-forward (``f``); each run is one coupling function that adds to
one stream a function of the other, the streams taking turns:

    y1 = x1 + F(x2),   y2 = x2 + G(y1),   then the next pair ...

For the plain layout ``a f a f ...`` the runs are exactly Reformer's (attention, feed-forward)
pairs; macaron, sandwich and custom layouts cut into runs the same way. A run's function is its
blocks' residual branches applied in sequence (``h + branch(h)``), minus the input: for
``a c f`` it is F(x) = a(x) + c(x + a(x)). Each branch is run by the shared block runner
(``blocks.run_block``) under the forward's context, so the coupling honours what the plain stack does.

Each step inverts exactly: x2 = y2 - G(y1), then x1 = y1 - F(x2). So the forward pass keeps no
activations (only the two final streams); the backward pass walks the steps in reverse,
recomputes each function from the outputs, rebuilds its inputs and takes its gradients: the
activation memory is that of one step, whatever the depth. Random draws (dropout, layer
dropout) are replayed: the RNG state before each step is saved, and restored for its
recomputation; the autocast state is restored too.

The stack's output is the mean of the streams, (x1 + x2) / 2: it keeps the residual stream's
scale of a one-stream model, so a ReZero stack (every branch zero at init) is still the identity.

Without gradients, with a KV cache (decoding) or with ``return_attn``, the same coupling runs
under ordinary autograd: the cache and attention maps work, and the outputs are identical.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.autograd.function import once_differentiable

from .blocks import ForwardContext, run_block

FAMILY = {"a": "attention", "c": "attention", "f": "feedforward"}


def coupling_steps(layout) -> tuple[tuple[int, ...], ...]:
    """Cut the layout into runs of one family; each run (block indices) is one coupling function."""
    steps: list[list[int]] = []
    for i, spec in enumerate(layout):
        if steps and FAMILY[layout[steps[-1][-1]].kind] == FAMILY[spec.kind]:
            steps[-1].append(i)
        else:
            steps.append([i])
    return tuple(tuple(s) for s in steps)


def run_step(blocks, layout, step, h, ctx: ForwardContext, attns=None):
    """One coupling function of h: the sum of the step's residual branches applied in sequence,
    each run by the block runner (blocks.py) under the forward's context.

    Returns None when layer dropout dropped every branch (the function is zero).
    """
    total = None
    for i in step:
        out, w = run_block(layout[i].kind, i, blocks[i], h, ctx, branch_only=True)
        if w is not None and attns is not None:
            attns.append(w)
        if out is None:
            continue
        h = h + out
        total = out if total is None else total + out
    return total


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replay(state, device):
    """Run with the random state saved before the step, leaving the caller's state untouched."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class _ReversibleFunction(torch.autograd.Function):
    """Inputs: x, the stack, the blocks, the forward context without its differentiable tensors,
    their names, each step's parameter indices, then those tensors (the context, position biases
    as dense tensors, the funnel's key/value sequence) and every trainable parameter."""

    @staticmethod
    def forward(ctx, x, stack, blocks, fctx, names, step_params, *rest):
        tensors, params = rest[:len(names)], rest[len(names):]
        steps, layout = stack.steps, stack.layout
        training = any(m.training for m in blocks.modules())
        device = x.device
        fctx = fctx.with_tensors(dict(zip(names, tensors)))
        streams, states = [x, x], []
        for k, step in enumerate(steps):
            states.append(_rng_state(device) if training else None)
            out = run_step(blocks, layout, step, streams[1 - k % 2], fctx)  # grad is off in forward
            if out is not None:
                streams[k % 2] = streams[k % 2] + out
        ctx.stack, ctx.blocks, ctx.fctx, ctx.names, ctx.states = stack, blocks, fctx, names, states
        ctx.params, ctx.step_params = params, step_params  # the Parameters themselves: grads are taken w.r.t. them
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(streams[0], streams[1], *tensors)
        return (streams[0] + streams[1]) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y1, y2, *tensors = ctx.saved_tensors
        names, stack, blocks, params = ctx.names, ctx.stack, ctx.blocks, ctx.params
        offset = 6  # x, stack, blocks, fctx, names, step_params
        need = [ctx.needs_input_grad[offset + j] for j in range(len(names))]
        ys, gs = [y1, y2], [grad / 2, grad / 2]  # the output is the mean of the two streams
        g_tensors = [None] * len(tensors)
        g_params = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        for k in reversed(range(len(stack.steps))):
            t, s = k % 2, 1 - k % 2  # step k added a function of stream s to stream t
            with torch.enable_grad(), _replay(ctx.states[k], y1.device), \
                    torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h = ys[s].detach().requires_grad_()
                leaves = [v.detach().requires_grad_() if n else v for v, n in zip(tensors, need)]
                out = run_step(blocks, stack.layout, stack.steps[k], h, ctx.fctx.with_tensors(dict(zip(names, leaves))))
            if out is None:
                continue  # every branch of the step was dropped: y_t = x_t
            idx = ctx.step_params[k]
            wanted = [v for v, n in zip(leaves, need) if n]
            inputs = [h] + wanted + [params[j] for j in idx]
            grads = list(torch.autograd.grad(out, inputs, gs[t].to(out.dtype), allow_unused=True))
            ys[t] = ys[t] - out.detach()  # the step's input, rebuilt
            g_h = grads.pop(0)
            if g_h is not None:
                gs[s] = gs[s] + g_h
            for j in [j for j, n in enumerate(need) if n]:
                g_tensors[j] = _add(g_tensors[j], grads.pop(0))
            for j, g in zip(idx, grads):
                g_params[j] = _add(g_params[j], g)
        return (gs[0] + gs[1], None, None, None, None, None, *g_tensors, *g_params)


def _add(acc, g):
    if g is None:
        return acc
    return g if acc is None else acc + g


class ReversibleStack:
    """Runs ``AttentionLayers``' blocks as a reversible two-stream coupling.

    Holds no parameters (the blocks stay in ``AttentionLayers.blocks``, so state dicts do not
    change with ``reversible``); built once from the layout.
    """

    def __init__(self, layout):
        self.layout = layout
        self.steps = coupling_steps(layout)

    def _index_params(self, blocks):
        # Every trainable parameter is an input of the Function, so its gradient is returned, not
        # accumulated behind autograd's back: torch.autograd.grad and gradient hooks see it.
        params = [p for p in blocks.parameters() if p.requires_grad]
        pos = {id(p): j for j, p in enumerate(params)}
        step_params = [sorted({pos[id(p)] for i in step for p in blocks[i].parameters() if id(p) in pos})
                       for step in self.steps]
        return params, step_params

    def __call__(self, blocks, x, ctx: ForwardContext, attns: list | None = None):
        """x (b, n, dim) -> (b, n, dim) under the forward context; attention maps go to ``attns``."""
        if ctx.cache is not None or ctx.need_weights or not torch.is_grad_enabled():
            return self.coupled(blocks, x, ctx, attns)
        params, step_params = self._index_params(blocks)
        tensors = ctx.differentiable()
        rest = replace(ctx, **{name: None for name in tensors})
        names = tuple(tensors)
        return _ReversibleFunction.apply(x, self, blocks, rest, names, step_params, *tensors.values(), *params)

    def coupled(self, blocks, x, ctx: ForwardContext, attns: list | None = None):
        """The same coupling under ordinary autograd (it keeps every activation)."""
        streams = [x, x]
        for k, step in enumerate(self.steps):
            out = run_step(blocks, self.layout, step, streams[1 - k % 2], ctx, attns)
            if out is not None:
                streams[k % 2] = streams[k % 2] + out
        return (streams[0] + streams[1]) / 2
