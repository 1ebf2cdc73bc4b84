"""Next-latent prediction, at upstream's module path (upstream's ``NextLatentWrapper``): a causal
language model trained, besides next-token cross-entropy, to make its hidden states predictable.

From each position's final hidden state ``h_t`` a small dynamics model rolls forward
``num_rollouts`` steps, each step reading the next token's embedding:
``z_{r+1} = dynamics(z_r, embed(x_{t+1+r}))``, ``z_0 = h_t``. Step r's prediction is compared with
the model's own hidden state ``h_{t+1+r}`` (a stop-gradient target) by ``loss_type`` (smooth L1,
MSE, or MSE blended with cosine distance), and, through a frozen copy of the output head, by the
KL from the target's next-token distribution to the prediction's. Steps are weighted by
``rollout_weights`` (normalised to sum 1) and, with ``dynamic_rollout_loss_weight``, by
``exp(-decay * the summed losses of the earlier steps)`` (errors compound along a rollout). An
optional SIGReg term (LeJEPA's sketched isotropic Gaussian regulariser) pulls the hidden states'
random 1-D projections towards a standard normal through their characteristic function.

Legend: b batch, n tokens, r rollout steps, d dim, v vocabulary, m slices, k knots.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .wrappers import TransformerWrapper

__all__ = ["Losses", "MLP", "MSECosineSimLoss", "NextLatentWrapper", "ResidualDynamics", "RolloutGRU",
           "dynamic_rollout_loss_weights"]

Losses = namedtuple("Losses", ["ce", "next_latent", "kl", "sigreg"])
LOSS_TYPES = ("smooth_l1", "mse", "mse_and_cosine_sim")
DYNAMICS_TYPES = ("residual", "gru", "custom")


def dynamic_rollout_loss_weights(step_losses: Tensor, decay: float = 1.0) -> Tensor:
    """(r, ...) per-step losses -> weights exp(-decay * sum of the earlier steps' losses)."""
    earlier = step_losses.cumsum(dim=0) - step_losses
    return (-decay * earlier).exp()


def MLP(dim_in: int, dim_out: int, dim_hidden: int, depth: int = 3) -> nn.Sequential:  # noqa: N802 - upstream's name
    """``depth`` linear layers with GELU between them."""
    widths = [dim_in] + [dim_hidden] * (depth - 1) + [dim_out]
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < depth - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ResidualDynamics(nn.Module):
    """z_{r+1} = z_r + net([z_r ; e_r]); ``net`` maps 2 d -> d."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, next_token_embeds: Tensor, latent: Tensor) -> Tensor:
        """next_token_embeds (r, b, n, d), latent (b, n, d) -> the r predicted latents (r, b, n, d)."""
        out = []
        for embed in next_token_embeds:
            latent = latent + self.net(torch.cat((latent, embed), dim=-1))
            out.append(latent)
        return torch.stack(out)


class RolloutGRU(nn.Module):
    """A GRU over the rollout: the latent is its first hidden state, the embeddings its inputs."""

    def __init__(self, dim: int):
        super().__init__()
        self.gru = nn.GRU(input_size=dim, hidden_size=dim)

    def forward(self, next_token_embeds: Tensor, latent: Tensor) -> Tensor:
        r, b, n, d = next_token_embeds.shape
        out, _ = self.gru(next_token_embeds.reshape(r, b * n, d), latent.reshape(1, b * n, d))
        return out.view(r, b, n, d)


class MSECosineSimLoss(nn.Module):
    """Elementwise MSE blended with the cosine distance: (1 - weight) mse + weight (1 - cos)."""

    def __init__(self, weight: float = 0.9):
        super().__init__()
        self.weight = weight

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        mse = F.mse_loss(pred, target, reduction="none")
        cos = 1.0 - F.cosine_similarity(pred, target, dim=-1)[..., None]
        return mse.lerp(cos, self.weight)


class _Head(nn.Module):
    """The wrapper's output head as a module, for a call with detached (frozen) parameters."""

    def __init__(self, net: TransformerWrapper):
        super().__init__()
        self.net = net

    def forward(self, hidden):
        return self.net.logits_from(hidden)


def _number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class NextLatentWrapper(nn.Module):
    """``forward(x, return_loss_breakdown=False, **net_kwargs)`` -> the total loss (and ``Losses``)."""

    @staticmethod
    def sigreg_loss(x: Tensor, num_slices: int = 1024, domain: tuple = (-5, 5), num_knots: int = 17) -> Tensor:
        """SIGReg (LeJEPA): x (..., d) -> the mean over random unit directions of the weighted squared
        distance between the projections' empirical characteristic function and N(0, 1)'s."""
        dirs = F.normalize(torch.randn(num_slices, x.shape[-1], device=x.device), dim=-1)  # (m, d)
        t = torch.linspace(*domain, num_knots, device=x.device)  # (k,)
        gauss = (-0.5 * t.square()).exp()  # N(0, 1)'s characteristic function at t
        proj = (x.reshape(-1, x.shape[-1]).float() @ dirs.t())[..., None] * t  # (N, m, k)
        real, imag = proj.cos().mean(dim=0), proj.sin().mean(dim=0)  # (m, k)
        err = ((real - gauss).square() + imag.square()) * gauss
        return torch.trapezoid(err, t, dim=-1).mean()

    def __init__(self, net: TransformerWrapper, *, dim: int, num_rollouts: int = 1,
                 loss_type: str | nn.Module = "smooth_l1", dynamics_type: str = "residual",
                 dynamics_network: nn.Module | None = None, dynamics_hidden_dim: int | None = None,
                 dynamics_num_layers: int = 3, next_latent_loss_weight: float = 1.0, kl_loss_weight: float = 1.0,
                 ignore_index: int = -100, pad_value: int = 0, rollout_weights: tuple | None = None,
                 sigreg_loss_weight: float = 0.0, sigreg_loss_kwargs: dict | None = None,
                 dynamic_rollout_loss_weight: bool = True, dynamic_loss_decay: float = 1.0):
        super().__init__()
        if not isinstance(net, TransformerWrapper) or not net.can_cache_kv:
            raise TypeError(f"net must be a causal TransformerWrapper (over a Decoder), got {type(net).__name__}")
        widths = {net.emb_dim, net.attn_layers.dim}
        if widths != {dim}:
            raise ValueError(f"dim ({dim}) must equal the net's embedding and model width ({sorted(widths)}): the "
                             f"dynamics read hidden states and token embeddings side by side")
        if isinstance(num_rollouts, bool) or not isinstance(num_rollouts, int) or num_rollouts < 1:
            raise ValueError(f"num_rollouts must be an int >= 1, got {num_rollouts!r}")
        if isinstance(loss_type, nn.Module):
            loss_fn = loss_type
        elif loss_type in LOSS_TYPES:
            loss_fn = {"smooth_l1": lambda: nn.SmoothL1Loss(reduction="none"), "mse": lambda: nn.MSELoss(reduction="none"),
                       "mse_and_cosine_sim": MSECosineSimLoss}[loss_type]()
        else:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} or an nn.Module, got {loss_type!r}")
        if dynamics_type not in DYNAMICS_TYPES:
            raise ValueError(f"dynamics_type must be one of {DYNAMICS_TYPES}, got {dynamics_type!r}")
        if dynamics_network is not None and not isinstance(dynamics_network, nn.Module):
            raise TypeError(f"dynamics_network must be an nn.Module, got {type(dynamics_network).__name__}")
        if dynamics_type == "custom" and dynamics_network is None:
            raise ValueError("dynamics_type='custom' needs dynamics_network: (embeds (r, b, n, d), latent (b, n, d)) "
                             "-> (r, b, n, d)")
        if dynamics_type == "gru" and dynamics_network is not None:
            raise ValueError("dynamics_network is for dynamics_type='residual' (2 d -> d) or 'custom'; the GRU is built")
        rollout_weights = (1.0,) * num_rollouts if rollout_weights is None else tuple(rollout_weights)
        if len(rollout_weights) != num_rollouts or any(_number("rollout_weights", w) < 0 for w in rollout_weights) \
                or sum(rollout_weights) <= 0:
            raise ValueError(f"rollout_weights must be {num_rollouts} (num_rollouts) numbers >= 0 with a positive "
                             f"sum, got {rollout_weights!r}")
        for name, value in (("next_latent_loss_weight", next_latent_loss_weight), ("kl_loss_weight", kl_loss_weight),
                            ("sigreg_loss_weight", sigreg_loss_weight), ("dynamic_loss_decay", dynamic_loss_decay)):
            _number(name, value)
        if sigreg_loss_kwargs is not None and (not isinstance(sigreg_loss_kwargs, dict)
                                               or set(sigreg_loss_kwargs) - {"num_slices", "domain", "num_knots"}):
            raise ValueError(f"sigreg_loss_kwargs takes num_slices, domain, num_knots; got {sigreg_loss_kwargs!r}")
        if not isinstance(dynamic_rollout_loss_weight, bool):
            raise TypeError(f"dynamic_rollout_loss_weight must be True or False, got {dynamic_rollout_loss_weight!r}")

        self.net = net
        self.num_rollouts, self.ignore_index, self.pad_value = num_rollouts, ignore_index, pad_value
        self.loss_type, self.loss_fn = loss_type, loss_fn
        self.next_latent_loss_weight, self.kl_loss_weight = float(next_latent_loss_weight), float(kl_loss_weight)
        self.sigreg_loss_weight = float(sigreg_loss_weight)
        self.sigreg_loss_kwargs = dict(sigreg_loss_kwargs or {})
        self.dynamic_rollout_loss_weight, self.dynamic_loss_decay = dynamic_rollout_loss_weight, float(dynamic_loss_decay)
        weights = torch.tensor(rollout_weights, dtype=torch.float32)
        self.register_buffer("rollout_loss_weights", weights / weights.sum(), persistent=False)
        self.token_emb = net.token_emb
        if dynamics_type == "residual":
            if dynamics_network is None:  # starts as the identity: the last layer at zero
                dynamics_network = nn.Sequential(nn.LayerNorm(dim * 2), MLP(dim * 2, dim, dynamics_hidden_dim or dim,
                                                                            dynamics_num_layers))
                nn.init.zeros_(dynamics_network[-1][-1].weight)
                nn.init.zeros_(dynamics_network[-1][-1].bias)
            self.dynamics_model = ResidualDynamics(dynamics_network)
        elif dynamics_type == "gru":
            self.dynamics_model = RolloutGRU(dim)
        else:
            self.dynamics_model = dynamics_network
        self._head = _Head(net)

    def _frozen_logits(self, hidden: Tensor) -> Tensor:
        """The output head on ``hidden`` with its parameters detached (gradients reach hidden only)."""
        params = {name: p.detach() for name, p in self._head.named_parameters()}
        return torch.func.functional_call(self._head, params, (hidden,))

    def _rollouts(self, seq: Tensor, n: int) -> Tensor:
        """(b, n, ...) -> (r, b, n - 1, ...): step r of the rollout from position t reads seq[t + 1 + r]
        (zeros past the end)."""
        pad = torch.zeros_like(seq[:, :1]).expand(-1, self.num_rollouts - 1, *seq.shape[2:])
        seq = torch.cat((seq, pad), dim=1)
        return torch.stack([seq[:, 1 + r:n + r] for r in range(self.num_rollouts)])

    def forward(self, x: Tensor, return_loss_breakdown: bool = False, **kwargs):
        if not isinstance(x, Tensor) or x.ndim != 2 or x.is_floating_point():
            raise ValueError(f"x must be a (batch, n) tensor of token ids, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        n, R = x.shape[1], self.num_rollouts
        if n <= R + 1:
            raise ValueError(f"the sequence length ({n}) must be greater than num_rollouts ({R}) + 1")
        inp = x.masked_fill(x == self.ignore_index, self.pad_value)
        target = x[:, 1:]
        logits, hidden = self.net(inp, return_logits_and_embeddings=True, **kwargs)  # (b, n, v), (b, n, d)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=self.ignore_index)
        mask = target != self.ignore_index  # (b, n - 1)

        embeds = self.token_emb(inp)  # (b, n, d)
        targets = self._rollouts(hidden, n).detach()  # (r, b, n - 1, d): stop-gradient
        # (r, b, n - 1): step r from t counts where x[t + 1 + r] is a labelled token
        padded = torch.cat((mask, torch.zeros_like(mask[:, :1]).expand(-1, R)), dim=1)
        masks = torch.stack([padded[:, r:r + n - 1] for r in range(R)])
        preds = self.dynamics_model(self._rollouts(embeds, n).detach(), hidden[:, :-1])  # (r, b, n - 1, d)

        step = self.loss_fn(preds, targets)  # (r, b, n - 1, d)
        weights = self.rollout_loss_weights.view(R, 1, 1)
        if self.dynamic_rollout_loss_weight:
            weights = weights * dynamic_rollout_loss_weights(step.detach().mean(dim=-1), self.dynamic_loss_decay)
        keep = masks.float()
        per_step_count = keep.sum(dim=(1, 2)).clamp(min=1)  # (r,)
        zero = hidden.new_zeros(())
        next_latent = zero
        if self.next_latent_loss_weight > 0:
            next_latent = ((step.mean(dim=-1) * weights * keep).sum(dim=(1, 2)) / per_step_count).sum()
        kl = zero
        if self.kl_loss_weight > 0:
            with torch.no_grad():
                target_logp = self._frozen_logits(targets).float().log_softmax(dim=-1)
            pred_logp = self._frozen_logits(preds).float().log_softmax(dim=-1)
            step_kl = (target_logp.exp() * (target_logp - pred_logp)).sum(dim=-1)  # KL(target || prediction)
            kl = ((step_kl * weights * keep).sum(dim=(1, 2)) / per_step_count).sum()
        sigreg = zero
        if self.sigreg_loss_weight > 0:
            sigreg = self.sigreg_loss(hidden[:, :-1][mask], **self.sigreg_loss_kwargs)
        total = ce + self.next_latent_loss_weight * next_latent + self.kl_loss_weight * kl \
            + self.sigreg_loss_weight * sigreg
        return (total, Losses(ce, next_latent, kl, sigreg)) if return_loss_breakdown else total
