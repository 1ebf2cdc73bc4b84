"""Key/value caches for incremental decoding.

A cache is an object that owns its buffers: per attention layer the keys (stored after rotary)
and values, plus, for the whole stack, the key padding mask and the positions of every token
seen so far. ``AttentionLayers.forward(..., cache=cache)`` reads and extends it.

Two kinds share one interface (``layer``, ``next_positions``, ``keys_and_mask``, ``extend``,
``reorder``; per layer ``append``, ``store``, ``filled``, ``query_offset``):

- :class:`KVCache` grows by concatenation: simple, any length, shapes change every step.
- :class:`StaticKVCache` preallocates ``max_len`` slots and writes at a slot index held in a
  tensor, so the one-token decode step has fixed shapes and no Python-int state: it compiles once
  with ``torch.compile(fullgraph=True)`` and can be replayed as a CUDA graph. Unfilled slots are
  masked out; causality is by slot.

Legend: b batch, g kv heads, n new tokens, m keys so far (dynamic) or L slots (static), d key head
dim, e value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class LayerKV:
    """Keys and values of one attention layer: (b, g, m, d) each."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.cross = False  # set by store(): the context's keys/values, not a growing sequence
        # what a block keeps beside its keys: per-key tensors (..., m, c) that grow with them (the
        # forgetting transformer's running sums), and states that replace each other (a recurrent
        # module's hidden state), each with the dimension its batch rows are on
        self.extras: dict[str, Tensor] = {}
        self.states: dict[str, tuple] = {}

    def append_extra(self, name: str, t: Tensor) -> Tensor:
        """Add the new tokens' per-key tensor t (..., n, c); return every key's (..., m, c)."""
        old = self.extras.get(name)
        self.extras[name] = t if old is None else torch.cat((old, t), dim=-2)
        return self.extras[name]

    def get_state(self, name: str):
        entry = self.states.get(name)
        return None if entry is None else entry[0]

    def set_state(self, name: str, value, batch_dim: int = 0):
        self.states[name] = (value, batch_dim)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Self-attention: add the new keys/values, return all of them."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
        return self.k, self.v

    @property
    def filled(self) -> bool:
        """Cross-attention: keys/values of the context are computed once, then reused."""
        return self.k is not None

    def store(self, k: Tensor, v: Tensor):
        self.k, self.v, self.cross = k, v, True

    def query_offset(self, n: int, m: int):
        """Index of the first new query among the m keys (shared-QK finds each query's own key)."""
        return m - n

    def reorder(self, index: Tensor):
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]
        self.extras = {name: t[index] for name, t in self.extras.items()}
        self.states = {name: (_select_rows(v, index, dim), dim) for name, (v, dim) in self.states.items()}

    def copy(self) -> "LayerKV":
        new = LayerKV()
        new.k, new.v, new.cross = self.k, self.v, self.cross
        new.extras, new.states = dict(self.extras), dict(self.states)
        return new


def _select_rows(value, index: Tensor, dim: int):
    """A state (a tensor or a tuple / list of them) with its batch rows (on ``dim``) selected."""
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, index, dim) for v in value)
    return value.index_select(dim, index) if isinstance(value, Tensor) else value


class KVCache:
    """A dynamic cache: grows by concatenation; one LayerKV per attention block."""

    def __init__(self):
        self.layers: dict[int, LayerKV] = {}
        # (b, m) bool, True = a real (unpadded) token; None while unpadded (all True: built when read)
        self._key_mask: Tensor | None = None
        self.positions: Tensor | None = None  # (b, m) long
        # every key so far came without a mask (its key_mask is all True, known without reading it):
        # attention then takes no mask, and a decode step none of the mask's per-layer work
        self.unpadded = True
        # (the new tokens' positions as keys_and_mask got them, every key's): extend reuses the concatenation
        self._pending: tuple[Tensor, Tensor] | None = None
        # columns of prepended embeddings (TransformerWrapper's prepend_embeds) at the front, after any
        # memory tokens: set by the call that fills the empty cache; token positions do not count them
        self.prefix_len = 0
        # of those, the kept ones (an int, or (b, 1) per row under a prepend_mask): the tokens' layer
        # positions start after them, the masked ones stay as keys nobody attends to
        self.prefix_kept = 0

    @property
    def key_mask(self) -> Tensor | None:
        if self._key_mask is None and self.unpadded and self.positions is not None:
            return torch.ones(self.positions.shape, dtype=torch.bool, device=self.positions.device)
        return self._key_mask

    @key_mask.setter
    def key_mask(self, value: Tensor | None):  # set from outside (an exported graph's input): entries unknown
        self._key_mask, self.unpadded = value, False

    def layer(self, index: int) -> LayerKV:
        if index not in self.layers:
            self.layers[index] = LayerKV()
        return self.layers[index]

    @property
    def seq_len(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def empty(self) -> bool:
        return self.seq_len == 0

    def next_positions(self) -> Tensor | None:
        """(b, 1): one past the last kept position of each row (the count of kept tokens, unless
        :meth:`keep_last` dropped the oldest: positions go on from where they were)."""
        if self.positions is None:
            return None
        if self.unpadded:
            return self.positions.amax(dim=-1, keepdim=True) + 1
        return self.positions.masked_fill(~self.key_mask, -1).amax(dim=-1, keepdim=True) + 1

    def keys_and_mask(self, mask: Tensor | None, positions: Tensor):
        """Positions of every key (cached + new) and the self-attention mask (b, 1, 1, m) or None.

        mask: (b, n) bool or None for the new tokens; positions: (b|1, n).
        """
        if self.empty:
            return positions, None if mask is None else mask[:, None, None, :]
        b, n = self.positions.shape[0], positions.shape[-1]
        every = torch.cat((self.positions, positions.expand(b, -1)), dim=-1)
        self._pending = (positions, every)  # extend's concatenation, unless other positions come
        if mask is None and self.unpadded:
            return every, None
        new = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=positions.device)
        key_mask = torch.cat((self.key_mask, new), dim=-1)
        return every, key_mask[:, None, None, :]

    def extend(self, key_mask: Tensor, positions: Tensor, padded: bool = True):
        """Record the mask and positions of the tokens just processed; ``padded=False`` says the
        mask is all True (the tokens came without one)."""
        pending, self._pending = self._pending, None
        b = key_mask.shape[0]
        if padded or not self.unpadded:  # a mask to keep (the earlier keys' all True, if unpadded so far)
            old = self.key_mask
            self._key_mask = key_mask if old is None else torch.cat((old, key_mask), dim=-1)
        self.unpadded = self.unpadded and not padded
        if self.positions is None:
            self.positions = positions.expand(b, -1)
        elif pending is not None and pending[0] is positions and pending[1].shape[0] == b:
            self.positions = pending[1]  # what keys_and_mask concatenated for this step's attention
        else:
            self.positions = torch.cat((self.positions, positions.expand(b, -1)), dim=-1)

    def reorder(self, index: Tensor):
        """Select/reorder batch rows (beam search)."""
        for layer in self.layers.values():
            layer.reorder(index)
        if self.positions is not None:
            self._key_mask, self.positions = _rows(self._key_mask, index), self.positions[index]
        self._pending = None
        if isinstance(self.prefix_kept, Tensor):
            self.prefix_kept = self.prefix_kept[index]

    def copy(self) -> "KVCache":
        """A new cache over the same tensors: extending it (which concatenates, making new tensors)
        leaves this one as it is. What makes upstream-style ``cache=`` calls functional."""
        new = KVCache()
        for i, layer in self.layers.items():
            new.layers[i] = layer.copy()
        new._key_mask, new.positions, new.unpadded = self._key_mask, self.positions, self.unpadded
        new.prefix_len, new.prefix_kept = self.prefix_len, self.prefix_kept
        return new

    def drop_last(self, n: int):
        """Forget the newest ``n`` columns (keys, values, mask, positions): a token read again
        replaces its own entries (recirculation.py)."""
        left = self.seq_len - n
        for layer in self.layers.values():
            if layer.k is not None and not layer.cross:
                layer.k, layer.v = (layer.k[..., :left, :], layer.v[..., :left, :]) if left > 0 else (None, None)
        self._pending = None
        if left > 0:
            self._key_mask, self.positions = _rows(self._key_mask, slice(None), slice(left)), self.positions[:, :left]
        else:  # as a fresh cache (the cross-attention entries, of a fixed context, stay)
            self._key_mask, self.positions, self.unpadded = None, None, True

    def keep_last(self, n: int, keep_first: int = 0):
        """Drop the oldest self-attention keys so that ``keep_first + n`` remain: the first
        ``keep_first`` (memory tokens) and the last ``n`` (a sliding window, as upstream's
        ``restrict_to_max_seq_len`` crops its cache). Positions of the kept keys do not change."""
        m = self.seq_len
        if m <= keep_first + n:
            return
        index = torch.cat((torch.arange(keep_first), torch.arange(m - n, m))).to(self.positions.device)
        for layer in self.layers.values():
            if layer.k is not None and not layer.cross:
                layer.k, layer.v = layer.k.index_select(-2, index), layer.v.index_select(-2, index)
                layer.extras = {name: t.index_select(-2, index) for name, t in layer.extras.items()}
        self._key_mask, self.positions = _rows(self._key_mask, slice(None), index), self.positions[:, index]
        self._pending = None


def _rows(mask: Tensor | None, *index):
    """mask[index], or None for the unpadded cache's mask (all True, not stored)."""
    return None if mask is None else mask[index]


class StaticLayerKV:
    """One layer's preallocated keys/values (b, g, L, d), written at the cache's slot index."""

    def __init__(self, owner: StaticKVCache, k: Tensor | None = None, v: Tensor | None = None):
        self.owner = owner
        self.k, self.v = k, v
        self.filled = False  # cross-attention: set once the context's keys/values are stored
        self.extras: dict[str, Tensor] = {}  # as LayerKV's, preallocated at the first append
        self.states: dict[str, tuple] = {}

    def append_extra(self, name: str, t: Tensor) -> Tensor:
        """Write the new tokens' per-key tensor t (..., n, c) at their slots; return every slot's."""
        if name not in self.extras:
            shape = (*t.shape[:-2], self.owner.max_len, t.shape[-1])
            self.extras[name] = torch.zeros(shape, dtype=t.dtype, device=t.device)
            _mark_static(self.extras[name])
        buf = self.extras[name]
        buf.index_copy_(-2, self.owner.slots(t.shape[-2]), t.to(buf.dtype))
        return buf  # the unfilled tail is masked by keys_and_mask

    def get_state(self, name: str):
        entry = self.states.get(name) if self.owner.started else None
        return None if entry is None else entry[0]

    def set_state(self, name: str, value, batch_dim: int = 0):
        old = self.states.get(name)
        if isinstance(value, Tensor) and old is not None and isinstance(old[0], Tensor) and old[0].shape == value.shape:
            old[0].copy_(value)  # in place: a compiled step keeps reading the same tensor
        else:
            self.states[name] = (value, batch_dim)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slots = self.owner.slots(k.shape[-2])
        self.k.index_copy_(-2, slots, k.to(self.k.dtype))
        self.v.index_copy_(-2, slots, v.to(self.v.dtype))
        return self.k, self.v  # every slot; the unfilled tail is masked by keys_and_mask

    def store(self, k: Tensor, v: Tensor):
        # the context is fixed for a whole generation: stored once, at a fixed address
        self.k, self.v, self.filled = k, v, True
        _mark_static(self.k, self.v)

    def query_offset(self, n: int, m: int):
        return self.owner.index  # the new queries sit at slots index .. index + n - 1

    def reorder(self, index: Tensor):
        for t in self.extras.values():
            t.copy_(t[index])
        self.states = {name: (_select_rows(v, index, dim), dim) for name, (v, dim) in self.states.items()}
        if self.k is not None and not self.filled:
            self.k.copy_(self.k[index])
            self.v.copy_(self.v[index])
        elif self.k is not None:
            self.k, self.v = self.k[index], self.v[index]
            _mark_static(self.k, self.v)


def _mark_static(*tensors):
    # Graph inputs at fixed addresses: CUDA graphs replay in place instead of copying them in.
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class StaticKVCache:
    """A preallocated cache of ``max_len`` slots for a batch of ``batch`` rows.

    Every piece of state is a tensor updated in place (the slot index too), so a compiled decode
    step sees the same shapes and the same tensors at every step and never recompiles. Build it
    for a model with :meth:`for_model`.
    """

    def __init__(self, batch: int, max_len: int, layer_shapes: dict, *, dtype=torch.float32, device=None):
        """layer_shapes: {block index: (kv heads, head dim[, key dim[, value dim]])} for self-attention
        (keys and values as wide as the head unless given: PoPE's keys are 2 d wide, attn_value_dim_head
        sizes the values), or None for a cross-attention block (its context keys/values are stored when
        first computed)."""
        self.batch, self.max_len = batch, max_len
        self.index = torch.zeros((), dtype=torch.long, device=device)  # next free slot
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(max_len, device=device)
        self.started = False
        # Slots used, counted on the host: the overflow check reads it, not ``index``, so it needs no
        # device sync on any device. Eager forwards count here; a compiled step is counted by its caller
        # (:meth:`count_compiled`), since inside a graph the host cannot count.
        self.length = 0
        self.prefix_len = self.prefix_kept = 0  # prepended embedding columns, as KVCache's
        self.layers: dict[int, StaticLayerKV] = {}
        for i, shape in layer_shapes.items():
            if shape is None:
                self.layers[i] = StaticLayerKV(self)
            else:
                g, d, *rest = shape
                dk, e = (rest + [d, d])[:2] if len(rest) != 1 else (rest[0], d)
                k = torch.zeros(batch, g, max_len, dk, dtype=dtype, device=device)
                self.layers[i] = StaticLayerKV(self, k, torch.zeros(batch, g, max_len, e, dtype=dtype, device=device))
                _mark_static(k, self.layers[i].v)
        _mark_static(self.index, self.key_mask, self.positions, self.slot_ids)

    @classmethod
    def for_model(cls, net, batch: int, max_len: int, *, dtype=None, device=None):
        """A cache for ``net`` (a TransformerWrapper or AttentionLayers); ``max_len`` counts memory
        tokens, prompt and generated tokens."""
        layers = getattr(net, "attn_layers", net)
        if not layers.causal:
            raise ValueError("only a causal stack (Decoder) can be decoded with a cache; this one is bidirectional")
        param = next(layers.parameters())
        shapes = {}
        for i, (spec, block) in enumerate(zip(layers.layout, layers.blocks)):
            if spec.kind == "a":
                fn = block.fn
                shapes[i] = (fn.heads if fn.shared_qk else fn.kv_heads, fn.dim_head, fn.key_dim, fn.value_dim_head)
            elif spec.kind == "c":
                shapes[i] = None
        # a looped wrapper (looped.py): every loop step keeps its own keys, block i's at (step, i)
        steps = net.cfg.max_looped_steps if getattr(net, "looped", False) else 1
        shapes.update({(t, i): shape for t in range(1, steps) for i, shape in list(shapes.items())})
        return cls(batch, max_len, shapes, dtype=dtype or param.dtype, device=device or param.device)

    def reset(self):
        """Empty the cache in place (same tensors, so a compiled step and its CUDA graph reuse it)."""
        self.index.zero_()
        self.key_mask.zero_()
        self.positions.zero_()
        self.started = False
        self.length = 0
        self.prefix_len = self.prefix_kept = 0
        for layer in self.layers.values():
            layer.states = {}
            if layer.filled:
                layer.k = layer.v = None
                layer.filled = False

    def layer(self, index: int) -> StaticLayerKV | None:
        return self.layers.get(index)  # None for feed-forward blocks

    @property
    def empty(self) -> bool:
        return not self.started

    def check_room(self, n: int):
        """Raise unless ``n`` more tokens fit. Host-side only (no sync), so callers can check the whole
        generation once before decoding."""
        if self.length + n > self.max_len:
            raise ValueError(f"the static cache is full: {self.length} of {self.max_len} slots used, {n} more "
                             f"needed; build it with a larger max_len (at least {self.length + n})")

    def count_compiled(self, n: int, step):
        """Run ``step()``, a compiled forward of ``n`` new tokens through this cache, checking room first
        and counting the slots after (inside the graph, keys_and_mask / extend cannot)."""
        self.check_room(n)
        out = step()
        self.length += n
        return out

    def slots(self, n: int) -> Tensor:
        return self.index + self.slot_ids[:n]

    def next_positions(self) -> Tensor | None:
        return self.key_mask.sum(dim=-1, keepdim=True) if self.started else None

    def keys_and_mask(self, mask: Tensor | None, positions: Tensor):
        """Write the new tokens' mask and positions at their slots; return every slot's positions
        and the mask (b, 1, n, L): a key is visible if filled, kept, and at or before the query's slot."""
        b, n = self.batch, positions.shape[-1]
        slots = self.slots(n)
        if not torch.compiler.is_compiling():  # the same host-side check on every device: no sync
            self.check_room(n)
        else:  # in a graph the host cannot count: a device-side assert, also asynchronous (no sync)
            # (a constant message: under dynamic shapes max_len may be symbolic)
            torch._assert_async(self.index + n <= self.max_len, "the static cache is full; build it with a larger max_len")
        new = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=positions.device)
        self.key_mask.index_copy_(1, slots, new)
        self.positions.index_copy_(1, slots, positions.expand(b, -1))
        causal = self.slot_ids[None, :] <= slots[:, None]  # (n, L); also hides the unfilled tail
        return self.positions, self.key_mask[:, None, None, :] & causal

    def extend(self, key_mask: Tensor, positions: Tensor, padded: bool = True):
        """The new tokens were written by keys_and_mask; advance the slot index past them."""
        self.index.add_(key_mask.shape[-1])
        self.started = True
        if not torch.compiler.is_compiling():
            self.length += key_mask.shape[-1]

    def reorder(self, index: Tensor):
        """Select/reorder batch rows (beam search); the batch size stays ``batch``."""
        for layer in self.layers.values():
            layer.reorder(index)
        self.key_mask.copy_(self.key_mask[index])
        self.positions.copy_(self.positions[index])
        if isinstance(self.prefix_kept, Tensor):
            self.prefix_kept = self.prefix_kept[index]


@dataclass
class Intermediates:
    """What ``TransformerWrapper.forward(..., return_intermediates=True)`` returns next to the
    logits, in the place of upstream x-transformers' ``LayerIntermediates``: pass it back as
    ``cache=`` to decode incrementally, upstream's way (the input then holds the whole sequence so
    far, of which the first ``cache_length`` tokens are already in the cache, unless
    ``input_not_include_cache=True``). Calls are functional: the cache given is not extended, the
    returned object holds the extended one.

    cache: our :class:`KVCache` (None where the stack cannot cache: a bidirectional one).
    cache_length: how many token columns of the input the cache holds (memory tokens not counted).
    last_hidden: (b, n, dim) the final hidden states (after the final norm), the new tokens'.
    attn_maps: with ``return_attn``, each attention layer's post-softmax maps.
    logit_entropies: with ``return_logit_entropies``, (b, n) entropy of each position's softmax.
    attn_logit_maxes: in a training forward (module in training mode, gradients on), each attention
    block's (h,) largest pre-softmax logit, in call order: what ``attn_qk_clip_`` reads.
    """

    cache: KVCache | None = None
    cache_length: int = 0
    last_hidden: Tensor | None = None
    attn_maps: list | None = None
    logit_entropies: Tensor | None = None
    attn_logit_maxes: list | None = None

    @property
    def last_layer_hiddens(self):
        """Upstream's name for ``last_hidden`` (its test-time-training losses read it)."""
        return self.last_hidden

    def resume(self, given: int, input_not_include_cache: bool, unit: str = "tokens") -> tuple[KVCache, int, int]:
        """This object passed back as ``cache=`` with an input of ``given`` columns: (a copy of the
        key/value cache, the columns it holds, the input's first new column: the cached length when the
        input holds the whole sequence so far (upstream's convention), else 0). ``unit`` names the
        columns in the errors (tokens, frames)."""
        if self.cache is None:
            raise ValueError("cache=: this Intermediates holds no key/value cache (it came from a bidirectional "
                             "stack, or a call that cannot cache, such as one with self_attn_kv_mask)")
        offset = self.cache_length
        if not input_not_include_cache and given <= offset:
            raise ValueError(f"cache= holds {offset} {unit} and x holds the whole sequence so far "
                             f"(input_not_include_cache=False): give more than {offset} {unit}, or only the new "
                             f"ones with input_not_include_cache=True")
        return self.cache.copy(), offset, 0 if input_not_include_cache else offset
