"""A JEPA-style objective for a GPT: ``LatentAutoregressive`` (upstream's ``gpt_lejepa``; the issue's
``GPTLeJEPA``, an alias here). LeJEPA (Balestriero & LeCun, arXiv 2511.08544) and LLM-JEPA (Huang et
al., arXiv 2509.14252).

The decoder's hidden states are trained to be predictable rather than to emit tokens: small
predictors roll a hidden state forward ``num_rollouts`` steps, given the next token ("action") or
not, matched (MSE, on unit vectors by default) to the model's own later hidden states (detached);
SIGReg pulls the hidden states towards an isotropic Gaussian. The tokens are read by a probe, an
MLP put in front of the net's output head (``net.to_logits`` is replaced, as upstream), trained on
embeddings whose gradient is scaled by ``frac_gradient`` (0: detached, a linear-probe-like read-out).

loss = CE(probe) + (1 - lambda) * l2_loss_weight * (L_action + L_no_action) + lambda * SIGReg

Legend: b batch, n tokens, d dim, r rollout steps.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .latent_prefix import check_number
from .layers import AttentionLayers
from .next_latent_wrapper import NextLatentWrapper
from .norms import RMSNorm
from .wrappers import TransformerWrapper

LossBreakdown = namedtuple("LossBreakdown", ["ce_loss", "l2_loss", "l2_no_action_loss", "sigreg_loss"])

SIGREG_KEYS = ("num_slices", "domain", "num_knots")


def scale_grad(t: Tensor, scale: float) -> Tensor:
    """t in the forward; ``scale`` of its gradient in the backward (0: detached)."""
    if scale == 1.0:
        return t
    if scale == 0.0:
        return t.detach()
    return t * scale + t.detach() * (1.0 - scale)


def _mlp(dim_in: int, dim: int) -> list[nn.Module]:
    return [RMSNorm(dim_in), nn.Linear(dim_in, dim * 2), nn.LeakyReLU(), nn.Linear(dim * 2, dim * 2), nn.LeakyReLU(),
            nn.Linear(dim * 2, dim)]


class ProbeHead(nn.Module):
    """The net's output head behind a probe MLP (and an optional ``ce_probe_module`` ahead of it). The
    wrapper multiplies hidden states by its ``logits_scale`` before the head; the probe reads them
    unscaled and its output is scaled instead, so the head sees what it was built for."""

    def __init__(self, net: TransformerWrapper, dim: int, ce_probe_module: nn.Module | None):
        super().__init__()
        self.probe = nn.Sequential(*([ce_probe_module] if ce_probe_module is not None else []), *_mlp(dim, dim))
        self.head = net.to_logits  # None: tied to the token embedding
        self.__dict__["_net"] = net  # (not a submodule: the net owns this head)

    def forward(self, hidden: Tensor) -> Tensor:
        net = self.__dict__["_net"]
        scale = net.logits_scale
        out = self.probe(hidden / scale) * scale
        return self.head(out) if self.head is not None else out @ net.token_emb.weight.t()


class LatentAutoregressive(nn.Module):
    """``forward(x, return_loss_breakdown=False, **net_kwargs)`` -> the total loss (and a ``LossBreakdown``)."""

    sigreg_loss = staticmethod(NextLatentWrapper.sigreg_loss)  # LeJEPA's SIGReg, the one implementation

    def __init__(self, net: TransformerWrapper, *, dim: int, sigreg_loss_weight: float = 0.05,
                 l2_loss_weight: float = 1.0, num_rollouts: int = 1, rollout_loss_weights: tuple | None = None,
                 sigreg_loss_kwargs: dict | None = None, frac_gradient: float = 0.0,
                 predict_next_cosine_sim: bool = True, predictor_input_hiddens_index: int | None = -1,
                 predict_next_embed_with_action: bool = True, predict_next_embed_no_action: bool = False,
                 detach_target: bool = True, ce_probe_module: nn.Module | None = None, ignore_index: int = -100,
                 pad_value: int = 0):
        super().__init__()
        self._check(net, dim, num_rollouts, rollout_loss_weights, sigreg_loss_kwargs, predictor_input_hiddens_index,
                    ce_probe_module, ignore_index, pad_value)
        check_number("sigreg_loss_weight", sigreg_loss_weight, 0, 1)
        check_number("l2_loss_weight", l2_loss_weight, low=0)
        check_number("frac_gradient", frac_gradient, 0, 1)
        for name, value in (("predict_next_cosine_sim", predict_next_cosine_sim), ("detach_target", detach_target),
                            ("predict_next_embed_with_action", predict_next_embed_with_action),
                            ("predict_next_embed_no_action", predict_next_embed_no_action)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if not (predict_next_embed_with_action or predict_next_embed_no_action):
            raise ValueError("at least one predictor must be on: predict_next_embed_with_action or "
                             "predict_next_embed_no_action")
        self.net = net
        self.sigreg_loss_weight, self.l2_loss_weight = sigreg_loss_weight, l2_loss_weight
        self.num_rollouts, self.frac_gradient = num_rollouts, frac_gradient
        self.sigreg_loss_kwargs = dict(sigreg_loss_kwargs or {})
        self.predict_next_cosine_sim, self.detach_target = predict_next_cosine_sim, detach_target
        self.predictor_input_hiddens_index = predictor_input_hiddens_index
        self.predict_next_embed_with_action = predict_next_embed_with_action
        self.predict_next_embed_no_action = predict_next_embed_no_action
        self.ignore_index, self.pad_value = ignore_index, pad_value
        weights = torch.tensor(rollout_loss_weights if rollout_loss_weights is not None else (1.0,) * num_rollouts)
        self.register_buffer("rollout_loss_weights", weights / weights.sum(), persistent=False)

        net.to_logits = ProbeHead(net, dim, ce_probe_module)  # upstream replaces the net's head
        self.action_emb = nn.Embedding(net.num_tokens, dim) if predict_next_embed_with_action else None
        self.to_next_embed_pred = nn.Sequential(*_mlp(2 * dim, dim)) if predict_next_embed_with_action else None
        self.to_next_embed_no_action_pred = nn.Sequential(*_mlp(dim, dim)) if predict_next_embed_no_action else None

    @staticmethod
    def _check(net, dim, num_rollouts, rollout_weights, sigreg_kwargs, hiddens_index, probe, ignore_index, pad_value):
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"LatentAutoregressive: net must be a TransformerWrapper, got {type(net).__name__}")
        stack, cfg = net.attn_layers, net.cfg
        why = ("attn_layers must be a causal stack (a Decoder)" if not getattr(stack, "causal", False) else
               f"dim ({dim}) must equal the stack's dim ({stack.dim})" if dim != stack.dim else
               "the net needs its output head (return_only_embed=False)" if cfg.return_only_embed else
               "num_output_heads must be 1" if isinstance(net.to_logits, nn.ModuleList) else
               "num_memory_tokens must be 0 (their columns would shift the hidden states off the tokens)"
               if net.num_memory_tokens else "use_cls_token / average_pool_embed must be off (one state per token)"
               if cfg.use_cls_token or cfg.average_pool_embed else None)
        if why is not None:
            raise ValueError(f"LatentAutoregressive: {why}")
        if isinstance(num_rollouts, bool) or not isinstance(num_rollouts, int) or num_rollouts < 1:
            raise ValueError(f"num_rollouts must be an integer >= 1, got {num_rollouts!r}")
        if rollout_weights is not None:
            ok = isinstance(rollout_weights, (tuple, list)) and len(rollout_weights) == num_rollouts and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in rollout_weights)
            if not ok or sum(rollout_weights) <= 0:
                raise ValueError(f"rollout_loss_weights must be {num_rollouts} numbers >= 0 (num_rollouts), not all 0; "
                                 f"got {rollout_weights!r}")
        if sigreg_kwargs is not None and (not isinstance(sigreg_kwargs, dict) or set(sigreg_kwargs) - set(SIGREG_KEYS)):
            raise ValueError(f"sigreg_loss_kwargs must be a dict of {SIGREG_KEYS}, got {sigreg_kwargs!r}")
        if hiddens_index is not None:
            count = sum(s.kind == "a" for s in stack.layout) if isinstance(stack, AttentionLayers) else 0
            usable = isinstance(stack, AttentionLayers) and stack.reversible is None and not cfg.looped \
                and not cfg.recycling
            if not usable or isinstance(hiddens_index, bool) or not isinstance(hiddens_index, int) \
                    or not -count <= hiddens_index < count:
                raise ValueError(f"predictor_input_hiddens_index indexes the {count} self-attention blocks' inputs "
                                 f"(-{count}..{count - 1}; not under reversible / looped / recycling), or None for "
                                 f"the final states; got {hiddens_index!r}")
        if probe is not None and not isinstance(probe, nn.Module):
            raise TypeError(f"ce_probe_module must be an nn.Module (b, n, dim) -> (b, n, dim), got {type(probe).__name__}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if isinstance(pad_value, bool) or not isinstance(pad_value, int) or not 0 <= pad_value < net.num_tokens:
            raise ValueError(f"pad_value must be a token id in [0, {net.num_tokens}), got {pad_value!r}")

    def _check_call(self, x, kwargs):
        for key in ("return_embeddings", "return_intermediates", "cache", "return_logits_and_embeddings"):
            if key in kwargs:
                raise TypeError(f"LatentAutoregressive: {key} is set by the wrapper itself; drop it")
        if not isinstance(x, Tensor) or x.is_floating_point() or x.dtype == torch.bool or x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be integer token ids (b, n >= 2), got {getattr(x, 'dtype', type(x).__name__)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        valid = (x == self.ignore_index) | ((x >= 0) & (x < self.net.num_tokens))
        if not bool(valid.all()):
            raise ValueError(f"x holds ids outside [0, {self.net.num_tokens}) other than ignore_index "
                             f"({self.ignore_index})")

    def _rollout_loss(self, start: Tensor, targets: Tensor, mask: Tensor, actions: Tensor | None, predictor) -> Tensor:
        """start (b, n-1, d) rolled r steps; step k at position i matched to targets[:, i + 1 + k] where that
        token is kept. -> the sum over steps of weight_k * the mean squared error over kept (b, n, d) entries."""
        n, total, pred = start.shape[1], start.new_zeros(()), start
        for k in range(self.rollout_steps(n + 1)):
            pad = lambda t, v: F.pad(t, (0, 0) * (t.ndim - 2) + (0, k), value=v)  # noqa: E731  (right, along n)
            if actions is not None:  # the token that follows, as the step's action
                pred = predictor(torch.cat((pred, self.action_emb(pad(actions, self.pad_value)[:, 1 + k:1 + k + n])),
                                           dim=-1))
            else:
                pred = predictor(pred)
            out = F.normalize(pred, dim=-1, eps=1e-6) if self.predict_next_cosine_sim else pred
            target = pad(targets, 0.0)[:, 1 + k:1 + k + n]  # (b, n-1, d)
            keep = pad(mask, False)[:, k:k + n, None].to(out.dtype)  # (b, n-1, 1)
            err = F.mse_loss(out, target, reduction="none") * keep
            total = total + self.rollout_loss_weights[k] * err.sum() / (keep.sum() * out.shape[-1]).clamp(min=1e-5)
        return total

    def rollout_steps(self, seq: int) -> int:
        return min(self.num_rollouts, seq - 1)

    def forward(self, x: Tensor, return_loss_breakdown: bool = False, **kwargs):
        self._check_call(x, kwargs)
        inp = x.masked_fill(x == self.ignore_index, self.pad_value)
        mask = x[:, 1:] != self.ignore_index  # (b, n-1): the targets kept
        embed, inter = self.net(inp, return_embeddings=True, return_intermediates=True, **kwargs)  # (b, n, d)
        embed_prev = embed[:, :-1]
        idx = self.predictor_input_hiddens_index
        lower = inter.hiddens[idx][:, :-1] if idx is not None else embed_prev

        logits = self.net.logits_from(scale_grad(embed_prev, self.frac_gradient))  # through the probe
        ce = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:], ignore_index=self.ignore_index,
                             reduction="sum") / mask.sum().clamp(min=1)

        targets = embed.detach() if self.detach_target else embed
        targets = F.normalize(targets, dim=-1, eps=1e-6) if self.predict_next_cosine_sim else targets
        zero = embed.new_zeros(())
        l2 = self._rollout_loss(lower, targets, mask, inp, self.to_next_embed_pred) \
            if self.to_next_embed_pred is not None else zero
        l2_free = self._rollout_loss(lower, targets, mask, None, self.to_next_embed_no_action_pred) \
            if self.to_next_embed_no_action_pred is not None else zero

        sreg = self.sigreg_loss(embed_prev[mask], **self.sigreg_loss_kwargs)
        if idx is not None:
            sreg = (sreg + self.sigreg_loss(lower[mask], **self.sigreg_loss_kwargs)) / 2
        lam = self.sigreg_loss_weight
        total = ce + (1 - lam) * self.l2_loss_weight * (l2 + l2_free) + lam * sreg
        return (total, LossBreakdown(ce, l2, l2_free, sreg)) if return_loss_breakdown else total


GPTLeJEPA = LatentAutoregressive  # the name issue 19 uses

__all__ = ["LatentAutoregressive", "GPTLeJEPA", "LossBreakdown", "ProbeHead", "scale_grad"]
