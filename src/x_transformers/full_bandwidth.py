"""The Full-bandwidth Transformer (Xi Wang et al., arXiv 2608.08888; upstream's ``full_bandwidth``).

A decoder runs several *temporal parallel passes* over the same tokens. After the first (plain)
pass, pass k+1 feeds each position t the latents that pass k computed at position t - 1: the
output of block ``out`` enters block ``in`` through a learned transition (``recirc_pairs``, by
default the top block into the first). The shift by one keeps every pass causal: position t
reads nothing of positions >= t. The loss is the first pass's next-token loss plus the feedback
passes' (their mean, or weighted by ``exp(-decay * excess loss of the earlier passes)``).
Generation feeds the latent of the last token into the next one, with the key/value cache on.

It runs through the core's per-call ``transform_block_inputs`` and the intermediates'
``block_hiddens`` (block_inputs.py): depth 1 is the token embeddings (before positions), depth
d > 1 the stream entering block d.

Legend: b batch, n tokens, d dim, P passes.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block_inputs import block_count, stack_refusal
from .latent_prefix import check_number, check_prompts
from .layers import Decoder
from .norms import RMSNorm
from .sampling import check_filter_kwargs, check_temperature, sample
from .wrappers import TransformerWrapper

LossBreakdown = namedtuple("LossBreakdown", ["first_pass_loss", "feedback_pass_losses", "all_pass_losses"])


def _linear(dim_in: int, dim_out: int) -> nn.Linear:
    return nn.Linear(dim_in, dim_out, bias=False)


# fusing a pass's latents into the next pass's stream

def shift_and_fuse_latents(latents: Tensor, stream: Tensor, transition) -> Tensor:
    """Position t (>= 1) of ``stream`` (b, n, d) fused with ``latents`` (b, n, d) at t - 1; position 0 as it was."""
    if latents.shape[-2] <= 1:
        return stream
    return torch.cat((stream[:, :1], transition(latents[:, :-1], stream[:, 1:])), dim=-2)


def fuse_last_latent(latents: Tensor, stream: Tensor, transition) -> Tensor:
    """Decoding: the newest position of ``stream`` fused with the last latent of the previous call."""
    return torch.cat((stream[:, :-1], transition(latents[:, -1:], stream[:, -1:])), dim=-2)


def dynamic_rollout_loss_weights(step_losses: Tensor, decay: float = 1.0, threshold: float = 1.0) -> Tensor:
    """(P,) per-pass losses -> (P,) weights exp(-decay * sum over earlier passes of max(loss - threshold, 0)):
    a pass weighs less the more excess error the passes before it compounded (``threshold``: the
    entropy floor of language, ~1 nat, which is no modelling error)."""
    excess = (step_losses - threshold).clamp(min=0.0)
    before = excess.cumsum(dim=0) - excess  # exclusive cumulative sum
    return (-decay * before).exp()


# transitions (latents, stream) -> stream, each position on its own

class GLUCrossTransition(nn.Module):
    """The paper's Eq. 4: norm(W_s norm(latent) * sigmoid(W_g norm(stream)))."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_state, self.to_gate = _linear(dim, dim), _linear(dim, dim)
        self.latent_norm, self.stream_norm, self.norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)

    def forward(self, latents: Tensor, stream: Tensor) -> Tensor:
        gate = self.to_gate(self.stream_norm(stream)).sigmoid()
        return self.norm(self.to_state(self.latent_norm(latents)) * gate)


class ResidualTransition(nn.Module):
    """norm(stream + scale * W norm(latent)), the scale learned from ``scale_init``."""

    def __init__(self, dim: int, scale_init: float = 0.1):
        super().__init__()
        self.proj, self.latent_norm, self.norm = _linear(dim, dim), RMSNorm(dim), RMSNorm(dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, latents: Tensor, stream: Tensor) -> Tensor:
        return self.norm(stream + self.proj(self.latent_norm(latents)) * self.scale)


class GRUGatingTransition(nn.Module):
    """A GRU-style update: norm(lerp(stream, tanh(W_c [l; s]), sigmoid(W_z [l; s] + b))), b = -1 at init
    (the gate starts mostly closed: the stream passes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.latent_norm, self.stream_norm, self.norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.to_candidate = _linear(2 * dim, dim)
        nn.init.constant_(self.gate.bias, -1.0)

    def forward(self, latents: Tensor, stream: Tensor) -> Tensor:
        both = torch.cat((self.latent_norm(latents), self.stream_norm(stream)), dim=-1)  # (b, n, 2d)
        z = self.gate(both).sigmoid()
        return self.norm(stream.lerp(self.to_candidate(both).tanh(), z))


class LinearTransition(nn.Module):
    """norm(W_l norm(latent) + W_s norm(stream))."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_state, self.to_stream = _linear(dim, dim), _linear(dim, dim)
        self.latent_norm, self.stream_norm, self.norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)

    def forward(self, latents: Tensor, stream: Tensor) -> Tensor:
        return self.norm(self.to_state(self.latent_norm(latents)) + self.to_stream(self.stream_norm(stream)))


class ResidualGLUTransition(nn.Module):
    """norm(stream + scale * GLU cross transition), the scale learned from ``scale_init``."""

    def __init__(self, dim: int, scale_init: float = 1.0):
        super().__init__()
        self.glu, self.norm = GLUCrossTransition(dim), RMSNorm(dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, latents: Tensor, stream: Tensor) -> Tensor:
        return self.norm(stream + self.glu(latents, stream) * self.scale)


TRANSITIONS = dict(glu=GLUCrossTransition, residual=ResidualTransition, gru=GRUGatingTransition,
                   linear=LinearTransition, residual_glu=ResidualGLUTransition)


def resolve_transition(spec, dim: int) -> nn.Module | Callable:
    """A name of TRANSITIONS, a module, or a callable dim -> module."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        if spec not in TRANSITIONS:
            raise ValueError(f"transition: unknown name {spec!r}; valid: {sorted(TRANSITIONS)}, a module or a "
                             f"callable dim -> module")
        return TRANSITIONS[spec](dim)
    if callable(spec):
        built = spec(dim)
        if not callable(built):
            raise ValueError(f"transition: a callable must build a module (latents, stream) -> stream from dim, "
                             f"got {type(built).__name__}")
        return built
    raise ValueError(f"transition must be one of {sorted(TRANSITIONS)}, a module or a callable dim -> module, "
                     f"got {type(spec).__name__}")


# recirculation patterns: (out depth, in depth) pairs, depths 1..D

RECIRC_SHORTCUTS = dict(
    paper=lambda d: ((d, 1),),
    prev=lambda d: tuple((i, i - 1) for i in range(2, d + 1)),
    top_and_prev=lambda d: tuple(dict.fromkeys(((d, 1), *((i, i - 1) for i in range(2, d + 1))))),
    prev_with_self=lambda d: tuple((i, max(i - 1, 1)) for i in range(1, d + 1)),
    self=lambda d: tuple((i, i) for i in range(1, d + 1)),
    full=lambda d: tuple((i, 1) for i in range(1, d + 1)),
    dense=lambda d: tuple((o, i) for o in range(1, d + 1) for i in range(1, d + 1)),
)


def resolve_recirc_pairs(depth: int, recirc_pairs) -> tuple:
    """None (the paper's: top block into the first), a RECIRC_SHORTCUTS name, or (out, in[, transition]) tuples."""
    if recirc_pairs is None:
        return ((depth, 1),)
    if isinstance(recirc_pairs, str):
        if recirc_pairs not in RECIRC_SHORTCUTS:
            raise ValueError(f"recirc_pairs: unknown shortcut {recirc_pairs!r}; valid: {sorted(RECIRC_SHORTCUTS)}")
        return RECIRC_SHORTCUTS[recirc_pairs](depth)
    if not isinstance(recirc_pairs, (tuple, list)) or not recirc_pairs:
        raise ValueError(f"recirc_pairs must be a shortcut name or a non-empty tuple of (out, in) depth pairs, "
                         f"got {recirc_pairs!r}")
    for pair in recirc_pairs:
        ok = isinstance(pair, (tuple, list)) and len(pair) in (2, 3) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= depth for v in pair[:2])
        if not ok:
            raise ValueError(f"recirc_pairs: each entry is (out depth, in depth[, transition]) with depths in 1..{depth} "
                             f"(blocks of the stack), got {pair!r}")
    return tuple(tuple(p) for p in recirc_pairs)


def get_block_latent(intermediates, depth: int) -> Tensor:
    """Block ``depth``'s output (1-based) from an Intermediates; the last hidden state when it has none."""
    hiddens = getattr(intermediates, "block_hiddens", None)
    if hiddens and 0 <= depth - 1 < len(hiddens):
        return hiddens[depth - 1]
    if intermediates.last_hidden is None:
        raise ValueError(f"the intermediates hold no latent for depth {depth}")
    return intermediates.last_hidden


_REFUSED_CALL_KEYS = ("transform_block_inputs", "return_intermediates", "cache", "prepend_embeds", "return_embeddings",
                      "return_logits_and_embeddings", "return_embeddings_and_intermediates", "return_attn")


def _outputs(primary: str, value, fields: dict, requested: tuple):
    """Upstream's return convention: the primary alone, or a namedtuple of it and the fields asked for."""
    if not requested:
        return value
    return namedtuple("Output", (primary, *requested))(value, *(fields.get(k) for k in requested))


class FullBandwidth(nn.Module):
    """A ``TransformerWrapper`` over a ``Decoder`` trained and decoded with latent feedback across
    temporal parallel passes (2608.08888). Keywords and defaults are upstream's."""

    def __init__(self, net: TransformerWrapper, temporal_parallel_passes: int = 2, recirc_pairs=None,
                 transition=None, transitions: dict | None = None, feedback_pass_weight: float = 1.0,
                 ignore_index: int = -100, jitter_noise_delta: float = 0.02, dynamic_rollout_loss_weight: bool = False,
                 dynamic_loss_decay: float = 0.5, dynamic_loss_threshold: float = 1.0):
        super().__init__()
        self._check_net(net)
        _check_passes(temporal_parallel_passes, "temporal_parallel_passes")
        check_number("feedback_pass_weight", feedback_pass_weight, low=0)
        check_number("jitter_noise_delta", jitter_noise_delta, low=0)
        check_number("dynamic_loss_decay", dynamic_loss_decay, low=0)
        check_number("dynamic_loss_threshold", dynamic_loss_threshold)
        if not isinstance(dynamic_rollout_loss_weight, bool):
            raise ValueError(f"dynamic_rollout_loss_weight must be True or False, got {dynamic_rollout_loss_weight!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if transitions is not None and not isinstance(transitions, dict):
            raise ValueError(f"transitions must be a dict {{(out, in) or in depth: transition}}, got "
                             f"{type(transitions).__name__}")
        self.net = net
        self.temporal_parallel_passes = temporal_parallel_passes
        self.feedback_pass_weight = feedback_pass_weight
        self.ignore_index = ignore_index
        self.jitter_noise_delta = jitter_noise_delta
        self.dynamic_rollout_loss_weight = dynamic_rollout_loss_weight
        self.dynamic_loss_decay = dynamic_loss_decay
        self.dynamic_loss_threshold = dynamic_loss_threshold

        dim = net.attn_layers.dim
        self.depth = depth = block_count(net.attn_layers)
        pairs, built, routes = [], {}, {}
        for out_d, in_d, *own in resolve_recirc_pairs(depth, recirc_pairs):
            spec = own[0] if own else None
            if spec is None and transitions is not None:
                spec = transitions.get((out_d, in_d), transitions.get(in_d))
            spec = spec if spec is not None else (transition if transition is not None else "glu")
            if (out_d, in_d) in pairs:
                raise ValueError(f"recirc_pairs: the pair {(out_d, in_d)} is given twice")
            pairs.append((out_d, in_d))
            built[f"{out_d}->{in_d}"] = resolve_transition(spec, dim)
            routes.setdefault(in_d, []).append(out_d)
        self.transitions = nn.ModuleDict({k: v for k, v in built.items() if isinstance(v, nn.Module)})
        self._plain_transitions = {k: v for k, v in built.items() if not isinstance(v, nn.Module)}
        self.recirc_pairs = tuple(pairs)
        self.routes_by_in_depth = routes

    @staticmethod
    def _check_net(net):
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"FullBandwidth: net must be a TransformerWrapper, got {type(net).__name__}")
        stack, cfg = net.attn_layers, net.cfg
        lcfg = getattr(stack, "cfg", None)
        scaled = lcfg is not None and (lcfg.depth_scale_residual is not False or lcfg.attn_aggregated_residuals or (
            not isinstance(lcfg.scale_residual, bool) and isinstance(lcfg.scale_residual, (int, float))))
        why = ("attn_layers must be a Decoder (the feedback is causal)" if not isinstance(stack, Decoder) else
               "depth scaling must be on: build the Decoder with depth_scale_residual=True (or a number)" if not scaled
               else "weight tying must be on: build the TransformerWrapper with tie_embedding=True"
               if not cfg.tie_embedding or net.custom_to_logits else
               "the post-embedding norm must be on: build the TransformerWrapper with post_emb_norm=True"
               if not cfg.post_emb_norm else
               f"emb_dim ({cfg.emb_dim}) must equal the stack's dim ({stack.dim}): depth 1's latent enters the token "
               f"embeddings" if cfg.emb_dim not in (None, stack.dim) else
               "num_memory_tokens must be 0 (memory columns have no previous token's latent)" if net.num_memory_tokens else
               "use_cls_token must be off" if cfg.use_cls_token else
               "looped / recycling must be off (the stack runs several times per pass)"
               if cfg.looped or cfg.recycling else None)
        if why is None:
            refusal = stack_refusal(stack, None)
            why = None if refusal is None else f"the latents enter through transform_block_inputs, not with {refusal}"
        if why is not None:
            raise ValueError(f"FullBandwidth: {why}")

    def _transition(self, key: str, override):
        if override is not None:
            return override
        return self.transitions[key] if key in self.transitions else self._plain_transitions[key]

    def _transforms(self, latent_of: Callable, fuse: Callable, jitter: bool, override) -> dict:
        """{in depth: fn(stream) -> stream}, fusing each routed block's latent into the stream in turn."""
        out = {}
        for in_d, out_depths in self.routes_by_in_depth.items():
            def transform(stream, in_d=in_d, out_depths=out_depths):
                for out_d in out_depths:
                    latent = latent_of(out_d)
                    if jitter:  # the paper's sigma: uniform noise on the fed-back latent, training only
                        noise = torch.empty_like(latent).uniform_(-self.jitter_noise_delta, self.jitter_noise_delta)
                        latent = latent + noise
                    stream = fuse(latent, stream, self._transition(f"{out_d}->{in_d}", override))
                return stream
            out[in_d] = transform
        return out

    def make_transforms(self, intermediates, training: bool = False, override_transition=None, generate: bool = False):
        """The next pass's ``transform_block_inputs`` from a pass's intermediates (upstream's helper)."""
        jitter = training and self.jitter_noise_delta > 0
        return self._transforms(lambda d: get_block_latent(intermediates, d),
                                fuse_last_latent if generate else shift_and_fuse_latents, jitter, override_transition)

    def _check_call(self, token_ids, kwargs, passes, transition, name="token_ids"):
        for key in kwargs:
            if key in _REFUSED_CALL_KEYS:
                raise TypeError(f"FullBandwidth: {key} is set by the wrapper itself (or has no place here); drop it")
        _check_passes(passes, "temporal_parallel_passes")
        if transition is not None and not callable(transition):
            raise ValueError(f"transition must be a callable (latents, stream) -> stream, got {type(transition).__name__}")
        if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool \
                or token_ids.ndim != 2:
            raise ValueError(f"{name} must be integer token ids of shape (b, n), got "
                             f"{getattr(token_ids, 'dtype', type(token_ids).__name__)} "
                             f"{tuple(getattr(token_ids, 'shape', ()))}")

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross entropy over the targets that are not ``ignore_index`` (0 when there are none)."""
        flat = target.reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=self.ignore_index,
                                reduction="sum")
        return total / (flat != self.ignore_index).sum().clamp(min=1)

    def forward(self, token_ids: Tensor, return_loss: bool = True, temporal_parallel_passes: int | None = None,
                return_loss_breakdown: bool = False, return_all_pass_logits: bool = False, transition=None,
                dynamic_rollout_loss_weight: bool | None = None, dynamic_loss_decay: float | None = None,
                dynamic_loss_threshold: float | None = None, return_all: bool = False, **kwargs):
        """token_ids (b, n) -> the loss over next tokens (return_loss, the default; the model reads n - 1
        of them) or the last pass's logits (b, n, v). ``return_loss_breakdown`` / ``return_all_pass_logits``
        (or ``return_all``) add a ``LossBreakdown`` / every pass's logits: a namedtuple (loss or logits, ...)."""
        passes = self.temporal_parallel_passes if temporal_parallel_passes is None else temporal_parallel_passes
        self._check_call(token_ids, kwargs, passes, transition)
        if return_loss and token_ids.shape[1] < 2:
            raise ValueError(f"token_ids must hold at least 2 tokens for a next-token loss, got {token_ids.shape[1]}")
        dynamic = self.dynamic_rollout_loss_weight if dynamic_rollout_loss_weight is None else dynamic_rollout_loss_weight
        decay = self.dynamic_loss_decay if dynamic_loss_decay is None else dynamic_loss_decay
        threshold = self.dynamic_loss_threshold if dynamic_loss_threshold is None else dynamic_loss_threshold
        if dynamic_rollout_loss_weight is not None and not isinstance(dynamic_rollout_loss_weight, bool):
            raise ValueError(f"dynamic_rollout_loss_weight must be True or False, got {dynamic_rollout_loss_weight!r}")
        check_number("dynamic_loss_decay", decay, low=0)
        check_number("dynamic_loss_threshold", threshold)

        inp, target = (token_ids[:, :-1], token_ids[:, 1:]) if return_loss else (token_ids, None)
        logits, inter = self.net(inp, return_intermediates=True, **kwargs)
        all_logits, feedback = [logits], []
        for _ in range(passes - 1):
            transforms = self.make_transforms(inter, training=self.training, override_transition=transition)
            logits, inter = self.net(inp, transform_block_inputs=transforms, return_intermediates=True, **kwargs)
            all_logits.append(logits)
            if return_loss:  # position 0 received no latent: the feedback loss is over positions 1..
                n = logits.shape[1]
                feedback.append(self._ce(logits[:, 1:], target[:, 1:]) if n > 1 else self._ce(logits, target))

        requested = tuple(k for k, asked in (("loss_breakdown", return_loss_breakdown),
                                             ("all_pass_logits", return_all_pass_logits)) if asked or return_all)
        if not return_loss:
            return _outputs("logits", all_logits[-1], dict(all_pass_logits=all_logits), requested)
        first = self._ce(all_logits[0], target)
        losses = torch.stack([first, *feedback])  # (P,)
        feedback_loss = losses.new_zeros(())
        if feedback:
            if dynamic:
                weights = dynamic_rollout_loss_weights(losses.detach(), decay=decay, threshold=threshold)[1:]
                feedback_loss = (losses[1:] * weights).sum() / weights.sum().clamp(min=1e-8)
            else:
                feedback_loss = losses[1:].mean()
        loss = first + feedback_loss * self.feedback_pass_weight
        breakdown = LossBreakdown(first_pass_loss=first, feedback_pass_losses=feedback,
                                  all_pass_losses=[first, *feedback])
        return _outputs("loss", loss, dict(loss_breakdown=breakdown, all_pass_logits=all_logits), requested)

    @torch.no_grad()
    def generate(self, prompts, seq_len: int, temperature: float = 1.0, filter_logits_fn="top_k",
                 filter_kwargs: dict | None = None, should_fuse_latent: Callable | None = None, transition=None,
                 temporal_parallel_passes: int | None = None, process_prompt: bool = True, eos_token: int | None = None,
                 cache_kv: bool = True, **kwargs) -> Tensor:
        """prompts (b, n) or (n,) -> up to ``seq_len`` sampled tokens (b, seq_len) (fewer when every row drew
        ``eos_token``). With ``process_prompt`` the prompt runs all passes; each new token is fed the last
        token's latents when ``should_fuse_latent(step)`` (default always) and passes > 1. ``cache_kv``
        (ours; upstream always caches): False recomputes the whole sequence each step, the same latents fed."""
        if isinstance(prompts, (list, tuple)):
            prompts = torch.stack(list(prompts)) if prompts and isinstance(prompts[0], Tensor) else prompts
        prompts, unbatched = check_prompts(prompts, self.net.num_tokens)
        passes = self.temporal_parallel_passes if temporal_parallel_passes is None else temporal_parallel_passes
        self._check_call(prompts, kwargs, passes, transition, name="prompts")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        check_temperature(temperature)
        check_filter_kwargs(filter_logits_fn, filter_kwargs)
        if should_fuse_latent is not None and not callable(should_fuse_latent):
            raise ValueError(f"should_fuse_latent must be a callable step -> bool, got {type(should_fuse_latent).__name__}")
        if cache_kv and not self.net.can_cache_kv:
            raise ValueError("FullBandwidth.generate with cache_kv=True needs a net that can cache keys/values; "
                             "pass cache_kv=False")
        fuse_at = should_fuse_latent or (lambda step: True)
        was_training = self.training
        self.eval()
        try:
            run = self._decode_cached if cache_kv else self._decode_recomputed
            out = run(prompts, seq_len, passes, process_prompt, transition, fuse_at, kwargs,
                      dict(temperature=temperature, filter_logits_fn=filter_logits_fn, filter_kwargs=filter_kwargs),
                      eos_token)
        finally:
            self.train(was_training)
        out = out[:, prompts.shape[1]:]
        return out[0] if unbatched else out

    def _prefill(self, out, passes, process_prompt, transition, kwargs):
        """The prompt's passes -> (logits, intermediates of the last pass, those of the one before or None)."""
        logits, inter = self.net(out, return_intermediates=True, **kwargs)
        before = None
        for _ in range(passes - 1 if process_prompt else 0):
            before = inter
            transforms = self.make_transforms(inter, override_transition=transition)
            logits, inter = self.net(out, transform_block_inputs=transforms, return_intermediates=True, **kwargs)
        return logits, inter, before

    def _decode_cached(self, out, seq_len, passes, process_prompt, transition, fuse_at, kwargs, sampling, eos):
        logits, inter, _ = self._prefill(out, passes, process_prompt, transition, kwargs)
        for step in range(seq_len):
            token = sample(logits[:, -1], **sampling)[:, None]
            out = torch.cat((out, token), dim=-1)
            if (eos is not None and (token == eos).all()) or step == seq_len - 1:
                break
            transforms = self.make_transforms(inter, override_transition=transition, generate=True) \
                if passes > 1 and fuse_at(step) else None
            logits, inter = self.net(out, cache=inter, transform_block_inputs=transforms, return_intermediates=True,
                                     **kwargs)
        return out

    def _decode_recomputed(self, out, seq_len, passes, process_prompt, transition, fuse_at, kwargs, sampling, eos):
        """No cache: every step reruns the whole sequence, position t + 1 fed the latents that the cached
        decode feeds it (the prompt's: the next-to-last pass's; a new token's: those of its predecessor's step)."""
        logits, inter, before = self._prefill(out, passes, process_prompt, transition, kwargs)
        n = out.shape[1]
        depths = {d for outs in self.routes_by_in_depth.values() for d in outs}
        fed = {d: (get_block_latent(before, d)[:, :-1] if before is not None else
                   get_block_latent(inter, d)[:, :-1] * 0) for d in depths}  # (b, t, d): fed into positions 1..t
        used = torch.full((n - 1,), before is not None, dtype=torch.bool, device=out.device)

        def fuse(latents, stream, trans):  # the stored latents into positions 1.. where used
            fused = trans(latents, stream[:, 1:])
            return torch.cat((stream[:, :1], torch.where(used[None, :, None], fused, stream[:, 1:])), dim=-2)

        for step in range(seq_len):
            token = sample(logits[:, -1], **sampling)[:, None]
            out = torch.cat((out, token), dim=-1)
            if (eos is not None and (token == eos).all()) or step == seq_len - 1:
                break
            fed = {d: torch.cat((fed[d], get_block_latent(inter, d)[:, -1:]), dim=1) for d in depths}
            used = torch.cat((used, used.new_tensor([passes > 1 and bool(fuse_at(step))])))
            transforms = self._transforms(lambda d: fed[d], fuse, False, transition)
            logits, inter = self.net(out, transform_block_inputs=transforms, return_intermediates=True, **kwargs)
        return out


def _check_passes(value, name: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (1: the plain model), got {value!r}")


__all__ = ["FullBandwidth", "LossBreakdown", "TRANSITIONS", "RECIRC_SHORTCUTS", "GLUCrossTransition",
           "ResidualTransition", "GRUGatingTransition", "LinearTransition", "ResidualGLUTransition",
           "shift_and_fuse_latents", "fuse_last_latent", "dynamic_rollout_loss_weights", "resolve_transition",
           "resolve_recirc_pairs", "get_block_latent"]
