"""The looped language model (Zhu et al., "Scaling Latent Reasoning via Looped Language Models",
arXiv 2510.25741; upstream's ``looped=True``): one stack of weights run T times, each step on the
previous step's output, with a learned exit gate after every step.

- :func:`run_loops`: the T steps of a forward; at inference, optionally stopping early once the
  exit distribution's cumulative probability reaches a threshold (the paper's Q-exit).
- :class:`LoopView`: the key/value cache as loop step t sees it. Each step keeps its own keys and
  values for every token (block i's at ``cache.layer(i)`` for step 0, ``cache.layer((t, i))`` for
  step t), so a cached forward with a fixed number of steps equals the uncached one. A token that
  exits early at step k has no keys of its own for the later steps: it gets step k's (the
  paper's KV sharing), which is what upstream does for every generated token.
- :func:`looped_loss`: the next-token loss of every step weighted by the gate's (detached) exit
  distribution, and the gate's own loss against upstream's target
  ``sigmoid(slope * (loss_{t+1} - loss_t + threshold))`` (exit when one more step gains less than
  ``threshold``).

Legend: b batch, n tokens, T loop steps, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache, LayerKV, StaticKVCache


def check_loop_call(wrapper, *, looped_steps, max_looped_steps, looped_inference, looped_exit_prob_threshold,
                    looped_pred_all_logits) -> int | None:
    """The looped keywords of one forward, checked before any work -> the steps to run (None: not looped)."""
    given = {k: v for k, v in dict(looped_steps=looped_steps, max_looped_steps=max_looped_steps,
                                   looped_pred_all_logits=looped_pred_all_logits).items() if v is not None}
    if looped_inference:
        given["looped_inference"] = True
    if wrapper.exit_gate is None:
        if given:
            raise ValueError(f"{sorted(given)[0]}= needs a wrapper built with looped=True")
        return None
    for name, value in (("looped_steps", looped_steps), ("max_looped_steps", max_looped_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(looped_exit_prob_threshold, bool) or not isinstance(looped_exit_prob_threshold, (int, float)) \
            or not 0.0 < looped_exit_prob_threshold <= 1.0:
        raise ValueError(f"looped_exit_prob_threshold must be a probability in (0, 1], got "
                         f"{looped_exit_prob_threshold!r}")
    if looped_steps is not None:
        return looped_steps
    return max_looped_steps if max_looped_steps is not None else wrapper.cfg.max_looped_steps


def cache_steps(cache) -> int:
    """How many loop steps' keys a non-empty cache holds (0: any, for an empty dynamic cache or a
    stack without attention blocks)."""
    if isinstance(cache, KVCache) and cache.empty:
        return 0
    steps = [key[0] for key in cache.layers if isinstance(key, tuple)]
    return 1 + max(steps) if steps else 0  # none: no attention block keeps keys (top_attn_to_ff), any


class LoopView:
    """``cache`` as loop step ``step`` reads it: its own per-block keys, the shared mask and
    positions. The stack's ``extend`` is held back (every step sees the cache as it was before this
    forward); :func:`run_loops` applies it once, after the last step."""

    def __init__(self, cache, step: int):
        self.cache, self.step, self.pending = cache, step, None

    def layer(self, index: int):
        return self.cache.layer(index if self.step == 0 else (self.step, index))

    def next_positions(self):
        return self.cache.next_positions()

    def keys_and_mask(self, mask, positions):
        return self.cache.keys_and_mask(mask, positions)

    @property
    def empty(self) -> bool:
        return self.cache.empty

    def extend(self, key_mask, positions, padded: bool = True):
        self.pending = (key_mask, positions, padded)


def _new_keys(cache, layer, n: int) -> tuple[Tensor, Tensor]:
    """The keys/values (b, g, n, d) this forward wrote into one step's block."""
    if isinstance(cache, StaticKVCache):
        slots = cache.slots(n)  # the slot index moves only at extend
        return layer.k.index_select(-2, slots), layer.v.index_select(-2, slots)
    return layer.k[..., -n:, :], layer.v[..., -n:, :]


def _set_new_keys(cache, layer, k: Tensor, v: Tensor, written: bool):
    """Put (k, v) as this forward's new columns of one step's block: over what it wrote, or appended."""
    if not written:
        layer.append(k, v)
    elif isinstance(cache, StaticKVCache):
        slots = cache.slots(k.shape[-2])
        layer.k.index_copy_(-2, slots, k.to(layer.k.dtype))
        layer.v.index_copy_(-2, slots, v.to(layer.v.dtype))
    else:  # out of place: attention may have saved the tensor for backward
        n = k.shape[-2]
        layer.k, layer.v = torch.cat((layer.k[..., :-n, :], k), dim=-2), torch.cat((layer.v[..., :-n, :], v), dim=-2)


def _share_keys(cache, exits: Tensor, ran: int, held: int, n: int):
    """Row r exited at step exits[r]: its new keys at steps exits[r]+1 .. held-1 become those of
    its exit step (the paper's KV sharing). ``ran``: the steps this forward ran (for every row)."""
    rows = torch.arange(exits.shape[0], device=exits.device)
    for index, layer in list(cache.layers.items()):
        cross = layer.cross if isinstance(layer, LayerKV) else layer.filled  # a static layer: filled = cross
        if isinstance(index, tuple) or layer.k is None or cross:
            continue
        steps = [cache.layer(index if t == 0 else (t, index)) for t in range(ran)]
        new = [_new_keys(cache, step_layer, n) for step_layer in steps]
        ks, vs = torch.stack([k for k, _ in new]), torch.stack([v for _, v in new])  # (ran, b, g, n, d)
        for step in range(1, held):
            if step < ran and bool((exits >= step).all()):
                continue  # every row ran this step itself
            pick = exits.clamp(max=step)
            _set_new_keys(cache, cache.layer((step, index)), ks[pick, rows], vs[pick, rows], written=step < ran)


def _exits_now(exit_logit: Tensor, state: dict, threshold: float) -> Tensor:
    """The paper's Q-exit after one step, per row: p_t = sigmoid(g_t) * prod_{s<t} (1 - sigmoid(g_s));
    a row exits once sum_{s<=t} p_s >= threshold. ``exit_logit`` (b, n, 1), read at the last token."""
    g = exit_logit[:, -1, 0].float()
    state["cdf"] = state.get("cdf", 0.0) + (state.get("log_continue", 0.0) + F.logsigmoid(g)).exp()
    state["log_continue"] = state.get("log_continue", 0.0) + F.logsigmoid(-g)
    return state["cdf"] >= threshold


def run_loops(stack, h: Tensor, gate: nn.Module, cache, *, steps: int, early_exit: bool, threshold: float):
    """Run ``stack`` (input (b, n, dim), cache -> (output, attention maps)) ``steps`` times, each on
    the previous output. With ``early_exit`` each row stops at its own step (its output then stays;
    the batch runs until every row has stopped). -> (output, the last step's maps, every step's
    output, every step's gate logits (b, n, 1), each row's last step (b,))."""
    held = (cache_steps(cache) or steps) if cache is not None else 0
    if isinstance(cache, StaticKVCache) and steps > held:
        raise ValueError(f"looped: the static cache holds keys of {held} loop steps, this forward runs {steps}; "
                         f"build it (StaticKVCache.for_model) for a model whose max_looped_steps >= {steps}")
    if cache is not None and steps > held:
        raise ValueError(f"looped: the cache holds keys of {held} loop steps (its first forward ran {held}); "
                         f"decode with looped_steps / max_looped_steps <= {held}")
    b = h.shape[0]
    exits = torch.full((b,), steps - 1, dtype=torch.long, device=h.device)
    done = torch.zeros(b, dtype=torch.bool, device=h.device)
    outs, gates, state, view, attns = [], [], {}, None, None
    for step in range(steps):
        view = LoopView(cache, step) if cache is not None else None
        out, attns = stack(h, view)
        h = torch.where(done[:, None, None], h, out) if early_exit else out  # a stopped row keeps its output
        outs.append(h)
        gates.append(gate(h))
        if early_exit and step < steps - 1:
            now = _exits_now(gates[-1], state, threshold) & ~done
            exits = torch.where(now, step, exits)
            done = done | now
            if bool(done.all()):
                break
    if view is not None:
        key_mask, positions, padded = view.pending
        if early_exit or step < held - 1:  # steps past a row's exit read its exit step's keys
            _share_keys(cache, exits, step + 1, held, key_mask.shape[-1])
        cache.extend(key_mask, positions, padded=padded)
    return h, attns, outs, gates, exits


def record(wrapper, inter, side: dict, prev_exits, pred_all: bool | None):
    """Upstream's looped intermediates: ``exit_logits`` (each step's gate logits (b, n, 1)),
    ``all_pred_logits`` (each step's logits; by default in training mode only), ``exit_indices``
    (b, calls): each row's last step in this call, after those of the Intermediates it decoded on."""
    outs, gates, exits = side["loops"]
    pred_all = wrapper.training if pred_all is None else pred_all
    inter.exit_logits = gates
    inter.all_pred_logits = [wrapper.logits_from(o) for o in outs] if pred_all else []
    inter.exit_indices = exits[:, None] if prev_exits is None else torch.cat((prev_exits, exits[:, None]), dim=-1)


def looped_loss(step_logits: Tensor, exit_logits: Tensor, target: Tensor, *, ignore_index: int, slope: float,
                threshold: float, exit_weight: float) -> Tensor:
    """Upstream's looped training loss. step_logits (b, T, n, v): each step's logits; exit_logits
    (b, T, n): the gate after each step; target (b, n) (``ignore_index`` = not counted).

    Each step's token loss l_t is weighted by the exit distribution p_t = sigmoid(g_t) * prod_{s<t}
    (1 - sigmoid(g_s)) (the last step takes the remaining mass; detached), averaged over steps and
    counted tokens; the gate learns, by binary cross-entropy on steps 0..T-2, the target
    sigmoid(slope * (l_{t+1} - l_t + threshold)) (detached)."""
    b, T, n, v = step_logits.shape
    targets = target[:, None].expand(b, T, n)
    losses = F.cross_entropy(step_logits.reshape(-1, v), targets.reshape(-1), ignore_index=ignore_index,
                             reduction="none").view(b, T, n)
    keep = targets != ignore_index
    with torch.no_grad():
        exit_target = torch.sigmoid(slope * (losses[:, 1:] - losses[:, :-1] + threshold))  # (b, T-1, n)
        log_exit = F.logsigmoid(exit_logits.float())
        log_exit = torch.cat((log_exit[:, :-1], torch.zeros_like(log_exit[:, -1:])), dim=1)  # the last step exits
        log_continue = F.logsigmoid(-exit_logits.float())
        before = torch.cat((torch.zeros_like(log_continue[:, :1]), log_continue[:, :-1].cumsum(dim=1)), dim=1)
        exit_probs = (log_exit + before).exp()  # (b, T, n), sums to 1 over T
    loss = (losses * exit_probs)[keep].sum() / keep.sum().clamp(min=1)
    if T > 1:
        gate_loss = F.binary_cross_entropy_with_logits(exit_logits[:, :-1].float(), exit_target, reduction="none")
        loss = loss + exit_weight * gate_loss[keep[:, 1:]].mean()
    return loss


def prompt_keys(cache: KVCache, columns: int) -> tuple:
    """Upstream's ``looped_prompt_kv_cache``: per loop step, each self-attention block's (keys,
    values) of the first ``columns`` cached columns (the prompt's, memory tokens included)."""
    steps = cache_steps(cache)
    blocks = sorted(i for i, layer in cache.layers.items() if not isinstance(i, tuple) and not layer.cross)
    return tuple([(cache.layer(i if t == 0 else (t, i)).k[..., :columns, :],
                   cache.layer(i if t == 0 else (t, i)).v[..., :columns, :]) for i in blocks] for t in range(steps))


class LoopedCalls:
    """A looped net as ``AutoregressiveWrapper.generate`` calls it: each call with the looped
    keywords (``looped_inference`` on), its exit index recorded (``exits``: (b, 1) per call)."""

    def __init__(self, net, **looped_kw):
        self.net, self.looped_kw, self.exits = net, looped_kw, []

    def __getattr__(self, name):  # the wrapper's attributes (num_memory_tokens, max_seq_len, ...)
        return getattr(self.net, name)

    def __call__(self, x, mask=None, **kwargs):
        out, inter = self.net(x, mask, return_intermediates=True, looped_inference=True, **self.looped_kw, **kwargs)
        self.exits.append(inter.exit_indices)
        return out
