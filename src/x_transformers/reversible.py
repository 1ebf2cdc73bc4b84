"""Reversible layers (Reformer, 2001.04451; RevNet, 1707.04585): activations recomputed in backward.

The input x is copied into two streams (x1, x2). The layout is cut into runs of one family,
attention (``a``, ``c``) or feed-forward (``f``); each run is one coupling function that adds to
one stream a function of the other, the streams taking turns:

    y1 = x1 + F(x2),   y2 = x2 + G(y1),   then the next pair ...

For the plain layout ``a f a f ...`` the runs are exactly Reformer's (attention, feed-forward)
pairs; macaron, sandwich and custom layouts cut into runs the same way. A run's function is its
blocks' residual branches applied in sequence (``h + branch(h)``), minus the input: for
``a c f`` it is F(x) = a(x) + c(x + a(x)).

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

import torch
from torch.autograd.function import once_differentiable

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


def run_step(blocks, layout, step, h, env, cache=None, attns=None):
    """One coupling function of h: the sum of the step's residual branches applied in sequence.

    Returns None when layer dropout dropped every branch (the function is zero).
    """
    total = None
    for i in step:
        kind, block = layout[i].kind, blocks[i]
        layer_cache = cache.layer(i) if cache is not None else None
        need = attns is not None
        if kind == "a":
            out, w = block.branch(h, mask=env["self_mask"], rotary=env["rotary"], bias=env["bias"],
                                  cache=layer_cache, need_weights=need)
        elif kind == "c":
            out, w = block.branch(h, env["context"], mask=env["ctx_mask"], cache=layer_cache, need_weights=need)
        else:
            out, w = block.branch(h)
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
    """Inputs: x, context, bias (the differentiable tensors the steps read), then the stack, the
    blocks, the other (non-differentiable) step inputs, each step's parameter indices, and every
    trainable parameter."""

    @staticmethod
    def forward(ctx, x, context, bias, stack, blocks, env, step_params, *params):
        steps, layout = stack.steps, stack.layout
        training = any(m.training for m in blocks.modules())
        device = x.device
        env = dict(env, context=context, bias=bias)
        streams, states = [x, x], []
        for k, step in enumerate(steps):
            states.append(_rng_state(device) if training else None)
            out = run_step(blocks, layout, step, streams[1 - k % 2], env)  # grad is off in forward
            if out is not None:
                streams[k % 2] = streams[k % 2] + out
        ctx.stack, ctx.blocks, ctx.env, ctx.states = stack, blocks, env, states
        ctx.params, ctx.step_params = params, step_params
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(streams[0], streams[1], context, bias)
        return (streams[0] + streams[1]) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y1, y2, context, bias = ctx.saved_tensors
        stack, blocks = ctx.stack, ctx.blocks
        params = ctx.params
        need_ctx = context is not None and ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        ys, gs = [y1, y2], [grad / 2, grad / 2]  # the output is the mean of the two streams
        g_ctx = g_bias = None
        g_params = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        for k in reversed(range(len(stack.steps))):
            t, s = k % 2, 1 - k % 2  # step k added a function of stream s to stream t
            with torch.enable_grad(), _replay(ctx.states[k], y1.device), \
                    torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h = ys[s].detach().requires_grad_()
                c = context.detach().requires_grad_() if need_ctx else context
                b = bias.detach().requires_grad_() if need_bias else bias
                out = run_step(blocks, stack.layout, stack.steps[k], h, dict(ctx.env, context=c, bias=b))
            if out is None:
                continue  # every branch of the step was dropped: y_t = x_t
            idx = ctx.step_params[k]
            inputs = [h] + ([c] if need_ctx else []) + ([b] if need_bias else []) + [params[j] for j in idx]
            grads = list(torch.autograd.grad(out, inputs, gs[t].to(out.dtype), allow_unused=True))
            ys[t] = ys[t] - out.detach()  # the step's input, rebuilt
            g_h = grads.pop(0)
            if g_h is not None:
                gs[s] = gs[s] + g_h
            if need_ctx:
                g_ctx = _add(g_ctx, grads.pop(0))
            if need_bias:
                g_bias = _add(g_bias, grads.pop(0))
            for j, g in zip(idx, grads):
                g_params[j] = _add(g_params[j], g)
        return (gs[0] + gs[1], g_ctx, g_bias, None, None, None, None, *g_params)


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

    def __call__(self, blocks, x, env, *, cache=None, need_weights=False):
        """x (b, n, dim) -> ((b, n, dim), attention maps). env: self_mask, rotary, bias, context, ctx_mask."""
        if cache is not None or need_weights or not torch.is_grad_enabled():
            return self.coupled(blocks, x, env, cache=cache, need_weights=need_weights)
        params, step_params = self._index_params(blocks)
        rest = {k: v for k, v in env.items() if k not in ("context", "bias")}
        out = _ReversibleFunction.apply(x, env["context"], env["bias"], self, blocks, rest, step_params, *params)
        return out, []

    def coupled(self, blocks, x, env, *, cache=None, need_weights=False):
        """The same coupling under ordinary autograd (it keeps every activation)."""
        streams, attns = [x, x], [] if need_weights else None
        for k, step in enumerate(self.steps):
            out = run_step(blocks, self.layout, step, streams[1 - k % 2], env, cache, attns)
            if out is not None:
                streams[k % 2] = streams[k % 2] + out
        return (streams[0] + streams[1]) / 2, attns or []
