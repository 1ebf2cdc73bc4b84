"""Recirculation (arXiv 2608.17981; after the full-bandwidth transformer, 2608.08888), at upstream's
module path: decoding one token at a time, each token's residual stream at a deep self-attention
block (the source) is leaked down into a shallow one (the destination), and the token is run
through the stack again from there, so later tokens read keys and values that saw the deeper state.

For each route (source s, destination d; indices among the self-attention blocks, d < s):
z_d' = alpha * z_s * ||z_d|| / ||z_s|| + beta * z_d (eq. 1-2), z the block's input at the new
token; beta = 1 - alpha unless given; alpha ramps up over the first ``ramp_steps`` tokens; or
both per channel from a small learned mixer (section 4.6). The token's own logits are those of its
first pass (the paper's read-out); its keys and values in the cache are those of the second.

Legend: b batch, n tokens, d model width, v vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .sampling import sample
from .wrappers import TransformerWrapper


def norm_matched(source: Tensor, dest: Tensor, eps: float = 1e-8) -> Tensor:
    """``source`` rescaled to ``dest``'s L2 norm over the last axis (zero where source is ~0)."""
    src_norm = source.norm(dim=-1, keepdim=True)
    scale = dest.norm(dim=-1, keepdim=True) / src_norm.clamp(min=eps)
    return source * scale.masked_fill(src_norm <= eps, 0.0)


class RecirculationMixer(nn.Module):
    """Per-token, per-channel (alpha, beta) from [z_source ; z_dest]: LayerNorm, a two-hidden-layer
    GELU MLP and a sigmoid, starting at (init_alpha, init_beta)."""

    def __init__(self, dim: int, hidden: int | None = None, init_alpha: float = 0.1, init_beta: float = 0.9):
        super().__init__()
        hidden = hidden or dim
        self.input_norm = nn.LayerNorm(2 * dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2 * dim))
        out = self.mlp[-1]
        nn.init.normal_(out.weight, std=0.02)
        with torch.no_grad():  # sigmoid(bias) = the initial coefficients
            out.bias.copy_(torch.cat((torch.full((dim,), math.log(init_alpha / (1 - init_alpha))),
                                      torch.full((dim,), math.log(init_beta / (1 - init_beta))))))

    def forward(self, z_source: Tensor, z_dest: Tensor) -> tuple[Tensor, Tensor]:
        coeffs = self.mlp(self.input_norm(torch.cat((z_source, z_dest), dim=-1))).sigmoid()
        return coeffs.chunk(2, dim=-1)


def _pair(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class Recirculation(nn.Module):
    """Wraps a causal ``TransformerWrapper``: ``forward`` reads a sequence token by token with
    recirculation (logits (b, n, v)); ``generate`` continues prompts. Layers are indices among the
    self-attention blocks (0 = the first); one route per (source_layer, destination_layer) pair."""

    def __init__(self, net: TransformerWrapper, source_layer, destination_layer, alpha=0.15, beta=None,
                 ramp_steps: int = 10, use_learned: bool = False, learned_hidden: int | None = None):
        super().__init__()
        if not isinstance(net, TransformerWrapper) or not net.can_cache_kv:
            raise TypeError(f"Recirculation wraps a TransformerWrapper over a Decoder (it decodes with a cache), "
                            f"got {type(net).__name__}")
        if net.looped:
            raise ValueError("Recirculation with a looped net: both rerun the stack per token; choose one")
        lcfg = net.attn_layers.layer_cfg
        if lcfg.num_residual_streams > 1 or lcfg.reversible:
            which = "num_residual_streams > 1" if lcfg.num_residual_streams > 1 else "reversible=True"
            raise ValueError(f"Recirculation mixes one residual stream per block; the net has {which}")
        sources, dests = _pair(source_layer, 1), _pair(destination_layer, 1)
        if len(sources) != len(dests):
            raise ValueError(f"source_layer and destination_layer must pair up, got {len(sources)} and {len(dests)}")
        if len(set(dests)) != len(dests):
            raise ValueError(f"destination_layer must not repeat a layer, got {dests}")
        self.attn_blocks = [i for i, spec in enumerate(net.attn_layers.layout) if spec.kind == "a"]
        count = len(self.attn_blocks)
        for s, d in zip(sources, dests):
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in (s, d)):
                raise ValueError(f"layers must be self-attention block indices in [0, {count}), got ({s}, {d})")
            if not d < s:
                raise ValueError(f"destination_layer {d} must be shallower than its source_layer {s}")
        routes = len(sources)
        self.alphas, self.betas = _pair(alpha, routes), _pair(beta, routes)
        for a, b in zip(self.alphas, self.betas):
            if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0) or (b is not None and not isinstance(b, (int, float))):
                raise ValueError(f"alpha must be a number in [0, 1] and beta a number or None, got {a!r}, {b!r}")
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 0:
            raise ValueError(f"ramp_steps must be an integer >= 0, got {ramp_steps!r}")
        self.net, self.source_layers, self.destination_layers = net, sources, dests
        dim = net.attn_layers.dim
        self.learned_mixers = nn.ModuleList(RecirculationMixer(dim, learned_hidden) for _ in range(routes)) \
            if use_learned else None
        self.ramp_steps = 0 if use_learned else ramp_steps  # a learned mixer sets its own coefficients

    def mix(self, hiddens: list[Tensor], step: int = 0) -> dict[int, Tensor]:
        """Block inputs of the new token (one (b, 1, d) per self-attention block) -> {destination: its
        mixed input} (eq. 1)."""
        mixed = {}
        for route, (s, d) in enumerate(zip(self.source_layers, self.destination_layers)):
            z_s, z_d = hiddens[s], hiddens[d]
            if self.learned_mixers is not None:
                alpha, beta = self.learned_mixers[route](z_s, z_d)
            else:
                alpha = self.alphas[route] * (min(step / self.ramp_steps, 1.0) if self.ramp_steps else 1.0)
                beta = 1.0 - alpha if self.betas[route] is None else self.betas[route]
            mixed[d] = alpha * norm_matched(z_s, z_d) + beta * z_d
        return mixed

    def _run(self, token: Tensor, cache: KVCache, replace: dict[int, Tensor] | None = None):
        """One token (b, 1) through the net on ``cache`` -> (logits (b, 1, v), each self-attention
        block's input at the token); ``replace``: {layer: input} put in at those blocks."""
        seen, handles = {}, []
        for layer, index in enumerate(self.attn_blocks):
            def hook(module, args, kwargs, layer=layer):
                x = args[0]
                if replace is not None and layer in replace:
                    x = torch.cat((x[:, :-1], replace[layer].to(x.dtype)), dim=1)  # memory columns stay
                seen[layer] = x[:, -1:]
                return (x, *args[1:]), kwargs
            handles.append(self.net.attn_layers.blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            logits = self.net(token, cache=cache)
        finally:
            for handle in handles:
                handle.remove()
        return logits, [seen[layer] for layer in range(len(self.attn_blocks))]

    def step(self, token: Tensor, cache: KVCache, step: int) -> Tensor:
        """Read one token (b, 1): its first-pass logits (b, 1, v); the cache then holds its
        recirculated keys and values (the first pass's are dropped and the token replayed)."""
        logits, hiddens = self._run(token, cache)
        mixed = self.mix(hiddens, step)
        cache.drop_last(1)
        self._run(token, cache, replace=mixed)
        return logits

    def forward(self, x: Tensor, cache: KVCache | None = None, return_intermediates: bool = False):
        """x (b, n) -> logits (b, n, v), each token read after the previous ones were recirculated
        (sequential by nature); with ``cache`` (a KVCache) x holds only the new tokens.
        ``return_intermediates``: also the cache."""
        if x.ndim != 2 or x.shape[1] == 0 or x.is_floating_point():
            raise ValueError(f"x must be token ids (b, n) with n >= 1, got {x.dtype} {tuple(x.shape)}")
        cache = KVCache() if cache is None else cache
        start = cache.seq_len - (self.net.num_memory_tokens if not cache.empty else 0)
        logits = torch.cat([self.step(x[:, t:t + 1], cache, start + t) for t in range(x.shape[1])], dim=1)
        return (logits, cache) if return_intermediates else logits

    @torch.no_grad()
    def generate(self, prompts: Tensor, seq_len: int, temperature: float = 1.0, filter_logits_fn=None,
                 filter_kwargs: dict | None = None, eos_token: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue prompts (b, n) by ``seq_len`` tokens (b, seq_len), sampling as
        ``AutoregressiveWrapper.generate`` does; rows that emitted ``eos_token`` are padded with 0."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        was_training = self.net.training
        self.net.eval()
        try:
            logits, cache = self.forward(prompts, return_intermediates=True)
            out, done = [], torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
            for i in range(seq_len):
                token = sample(logits[:, -1], temperature=temperature, filter_logits_fn=filter_logits_fn,
                               filter_kwargs=filter_kwargs, generator=generator).masked_fill(done, 0)
                out.append(token)
                if eos_token is not None:
                    done = done | (token == eos_token)
                if i == seq_len - 1 or bool(done.all()):
                    break
                logits, _ = self.forward(token[:, None], cache=cache, return_intermediates=True)
        finally:
            self.net.train(was_training)
        out = torch.stack(out, dim=1)
        return F.pad(out, (0, seq_len - out.shape[1]))

    def learn_parameters(self, x: Tensor, steps: int = 100, optimizer_cls=torch.optim.AdamW,
                         optimizer_kwargs: dict | None = None, batch_size: int = 32) -> float:
        """Train the learned mixers only (the net frozen, in eval mode), by backpropagation through
        the recirculated reading of ``x`` (b, n), on the next-token loss (section 4.6). -> the last loss."""
        if self.learned_mixers is None:
            raise ValueError("learn_parameters needs use_learned=True (the mixers it trains)")
        opt = optimizer_cls(self.learned_mixers.parameters(), **(optimizer_kwargs or dict(lr=3e-4, weight_decay=1e-4)))
        was_training = self.net.training
        self.net.eval()
        try:
            for _ in range(steps):
                rows = torch.randint(0, x.shape[0], (batch_size,), device=x.device)
                batch = x[rows]
                loss = F.cross_entropy(self.forward(batch)[:, :-1].transpose(1, 2), batch[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            self.net.train(was_training)
        return loss.item()
