"""Non-autoregressive training and generation around a ``TransformerWrapper``: masked-token
training (Mask-Predict, 1904.09324; MaskGIT, 2202.04200; the MDLM loss weight, 2406.07524) and
iterative demasking: start from all mask tokens and, over ``steps`` rounds, fill every masked
position, keep the most confident and mask the rest again, fewer each round, none after the last.

The mask token is reserved: ``mask_id`` is an id of the net's vocabulary (the embedding must embed
it) that never appears in the data. Training refuses data containing it; random replacements and
generation never produce it.

Legend: b batch, n sequence, v vocabulary, d model dim, e embedding width.
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hub import Pretrained
from .config import _positive_int, _probability
from .wrappers import TransformerWrapper

Losses = namedtuple("Losses", ["loss", "generator_loss", "critic_loss"])


# Masking schedules: t in [0, 1] -> the fraction of tokens masked (1 at t = 0, 0 at t = 1).
SCHEDULES: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda t: 1 - t,
    "cosine": lambda t: torch.cos(t * math.pi / 2),  # MaskGIT, 2202.04200
}


def get_schedule(schedule) -> Callable[[Tensor], Tensor]:
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)} or a callable t -> fraction masked")
    return SCHEDULES[schedule]


def random_subset(keep: Tensor, frac: Tensor, generator=None, min_count: float = 0.0) -> Tensor:
    """(b, n) bool, (b, 1) fractions -> a uniformly random subset of each row's True positions,
    of size ``ceil(max(frac * count, min_count))`` (never more than the count)."""
    b, n = keep.shape
    noise = torch.rand(b, n, generator=generator, device=keep.device).masked_fill(~keep, 2.0)  # excluded last
    ranks = noise.argsort(dim=-1).argsort(dim=-1)  # (b, n) rank of each position
    count = (keep.sum(dim=-1, keepdim=True) * frac).clamp(min=min_count)
    return (ranks < count) & keep


def gumbel_noise(shape, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log((-torch.log(u.clamp(min=1e-10))).clamp(min=1e-10))


def keep_top_fraction(logits: Tensor, thres: float) -> Tensor:
    """Keep the ceil((1 - thres) * v) largest logits of each position, -inf elsewhere (upstream's top_k)."""
    k = max(1, math.ceil((1 - thres) * logits.shape[-1]))
    val, ind = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, ind, val)


def logits_from_embeddings(net: TransformerWrapper, embeds: Tensor) -> Tensor:
    """The token wrapper's output head applied to its hidden states (b, n, d) -> (b, n, v)."""
    return net.logits_from(embeds)


@contextmanager
def added_to_token_embedding(net: TransformerWrapper, extra: Tensor | None):
    """Add ``extra`` (b, n, e) or (e,) to the token embeddings of every forward of ``net`` inside the
    block: where upstream's ``sum_embeds`` enters (with the positions, before dropout and projection)."""
    if extra is None:
        yield
        return
    handle = net.token_emb.register_forward_hook(lambda module, args, out: out + extra.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


class SelfCritic(nn.Module):
    """A token critic sharing the generator's body: one logit per position from its hidden states
    (Nijkamp et al., NAACL 2021; Token-Critic, 2209.04439)."""

    def __init__(self, net: TransformerWrapper):
        super().__init__()
        self.net = net
        self.to_logits = nn.Linear(net.attn_layers.dim, 1)

    def forward(self, x, **kwargs):
        return self.to_logits(self.net(x, return_embeddings=True, **kwargs))  # (b, n, 1)


class NonAutoregressiveWrapper(Pretrained, nn.Module):
    """Masked-token training and iterative demasking (MaskGIT) for a bidirectional token model."""

    def __init__(self, net: TransformerWrapper, *, mask_id: int, steps: int = 18, self_cond: bool = False,
                 self_cond_train_prob: float = 0.75, no_replace_prob: float = 0.15, random_token_prob: float = 0.1,
                 schedule: str | Callable = "linear", can_mask_prev_unmasked: bool = False,
                 token_critic: nn.Module | None = None, self_token_critic: bool = False, critic_loss_weight: float = 1.0,
                 use_simple_mdlm_loss_weight: bool = True):
        """``mask_id``: the reserved mask token, an id in [0, net.num_tokens). ``steps``: demasking
        rounds of generate. ``no_replace_prob`` / ``random_token_prob``: of the positions trained on,
        the fraction left as they are / replaced by a random token (BERT's 80/10/10, 1810.04805).
        ``self_cond``: feed the previous pass's hidden states back (2208.04202). ``token_critic`` (a
        module returning (b, n, 1) logits) or ``self_token_critic``: score sampled tokens, and
        remask those the critic thinks wrong. ``use_simple_mdlm_loss_weight``: weight each
        sequence's loss by the MDLM ELBO weight of its masking rate (2406.07524)."""
        super().__init__()
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"net must be a TransformerWrapper, got {type(net).__name__}")
        if net.cfg.return_only_embed or (net.cfg.logits_dim or net.num_tokens) != net.num_tokens:
            raise ValueError("net must output one logit per token of its vocabulary (no return_only_embed, "
                             "logits_dim unset or equal to num_tokens)")
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < net.num_tokens:
            raise ValueError(f"mask_id must be a token id in [0, {net.num_tokens}) (num_tokens={net.num_tokens}) "
                             f"reserved for the mask token, got {mask_id!r}; make num_tokens one larger than the "
                             f"data's vocabulary and use the last id")
        _positive_int("steps", steps)
        for name, value in (("self_cond", self_cond), ("can_mask_prev_unmasked", can_mask_prev_unmasked),
                            ("self_token_critic", self_token_critic),
                            ("use_simple_mdlm_loss_weight", use_simple_mdlm_loss_weight)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name, value in (("no_replace_prob", no_replace_prob), ("random_token_prob", random_token_prob)):
            _probability(name, value)
        if not 0 <= self_cond_train_prob <= 1:
            raise ValueError(f"self_cond_train_prob must be in [0, 1], got {self_cond_train_prob!r}")
        if self_token_critic and token_critic is not None:
            raise ValueError("pass token_critic or self_token_critic=True, not both")
        if not (isinstance(critic_loss_weight, (int, float)) and critic_loss_weight >= 0):
            raise ValueError(f"critic_loss_weight must be a number >= 0, got {critic_loss_weight!r}")

        self.net = net
        self.mask_id = mask_id
        self.num_tokens = net.num_tokens
        self.max_seq_len = net.max_seq_len
        self.steps = steps
        self.schedule_fn = get_schedule(schedule)
        self.no_replace_prob = no_replace_prob
        self.random_token_prob = random_token_prob
        self.can_mask_prev_unmasked = can_mask_prev_unmasked
        self.use_simple_mdlm_loss_weight = use_simple_mdlm_loss_weight
        self.self_cond = self_cond
        self.self_cond_train_prob = self_cond_train_prob
        dim, emb_dim = net.attn_layers.dim, net.emb_dim  # a custom token_emb module has no .weight
        # self-conditioning (2208.04202): the last hidden states, projected, join the token embeddings
        self.null_embed = nn.Parameter(torch.randn(dim) * 0.02) if self_cond else None
        self.to_self_cond = nn.Linear(dim, emb_dim, bias=False) if self_cond else None
        self.token_critic = SelfCritic(net) if self_token_critic else token_critic
        self.critic_loss_weight = critic_loss_weight

    # -- training --------------------------------------------------------------------------------

    def loss_weight(self, t: Tensor, n_kept: Tensor) -> Tensor:
        """The MDLM weight |d frac / dt| / frac at each row's time t (b,). The fraction masked is at
        least one token of the row, as the masking is, so the weight stays finite near t = 1.
        (Upstream 2.31.10 divides the derivative by 1 - frac and keeps its sign, which gives
        negative weights for the linear and cosine schedules: its loss falls as accuracy falls.)"""
        t = t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            frac = self.schedule_fn(t)
            (dfrac,) = torch.autograd.grad(frac.sum(), t)
        frac = torch.maximum(frac.detach(), 1.0 / n_kept.clamp(min=1))
        return dfrac.abs() / frac

    def check_tokens(self, x: Tensor):
        if x.ndim != 2 or x.dtype in (torch.bool,) or x.is_floating_point():
            raise ValueError(f"x must be integer token ids of shape (batch, seq), got {x.dtype} {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and bool((x == self.mask_id).any()):
            raise ValueError(f"x contains mask_id {self.mask_id}; the mask token must be reserved (not a data token)")

    def random_tokens(self, shape, device, generator=None) -> Tensor:
        """Uniform over the vocabulary without the mask token."""
        r = torch.randint(0, self.num_tokens - 1, shape, generator=generator, device=device)
        return r + (r >= self.mask_id).long()

    def corrupt(self, x: Tensor, mask: Tensor | None = None, generator=None):
        """Draw a masking time per row and corrupt x: returns (t (b,), noised (b, n) the positions
        trained on, the model's input (b, n))."""
        b, n = x.shape
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        t = torch.rand(b, generator=generator, device=x.device)
        noised = random_subset(keep, self.schedule_fn(t)[:, None], generator, min_count=1.0)
        to_mask = noised.clone()
        left = 1.0
        # BERT's recipe, applied (as upstream) to half of the batches each: some trained positions keep
        # their token, some get a random one, the rest the mask token
        coins = torch.rand(2, generator=generator, device=x.device).tolist()
        if self.no_replace_prob > 0 and coins[0] < 0.5:
            left -= self.no_replace_prob
            to_mask &= ~random_subset(noised, torch.tensor(self.no_replace_prob, device=x.device), generator)
        inp = x
        if self.random_token_prob > 0 and coins[1] < 0.5:
            rand = random_subset(to_mask, torch.tensor(self.random_token_prob * left, device=x.device), generator)
            inp = torch.where(rand, self.random_tokens((b, n), x.device, generator), inp)
            to_mask &= ~rand
        return t, noised, inp.masked_fill(to_mask, self.mask_id)

    def forward(self, x: Tensor, only_train_generator: bool = False, only_train_critic: bool = False,
                generator_sample_temperature: float | None = None, *, mask: Tensor | None = None,
                generator: torch.Generator | None = None, **kwargs) -> Losses:
        """x (b, n) token ids (never ``mask_id``) -> Losses(loss, generator_loss, critic_loss): the
        cross-entropy on the corrupted positions only, plus the critic's loss when there is one.
        ``mask`` (b, n) bool: padding is never corrupted, trained on or attended to."""
        self.check_tokens(x)
        if only_train_generator and only_train_critic:
            raise ValueError("pass at most one of only_train_generator and only_train_critic")
        if only_train_critic and self.token_critic is None:
            raise ValueError("only_train_critic needs a token critic (token_critic or self_token_critic=True)")
        t, noised, inp = self.corrupt(x, mask, generator)
        if mask is not None:
            kwargs["mask"] = mask

        extra = None
        if self.self_cond:
            prev = self.null_embed
            if torch.rand((), generator=generator, device=x.device).item() < self.self_cond_train_prob:
                with torch.no_grad():
                    prev = self.net(inp, return_embeddings=True, **kwargs).detach()
            extra = self.to_self_cond(prev)

        with torch.set_grad_enabled(torch.is_grad_enabled() and not only_train_critic), \
                added_to_token_embedding(self.net, extra):
            logits = self.net(inp, **kwargs)  # (b, n, v)

        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (b, n)
        if self.use_simple_mdlm_loss_weight:
            kept = mask.sum(-1) if mask is not None else torch.full_like(t, x.shape[1])
            ce = ce * self.loss_weight(t, kept)[:, None]
        loss = ce[noised].mean()
        if self.token_critic is None or only_train_generator:
            return Losses(loss, loss, None)

        temperature = generator_sample_temperature
        if temperature is None:
            temperature = torch.rand((), generator=generator).item()
        sampled = self.sample(logits.detach(), temperature, generator)
        generated = torch.where(noised, sampled, x)
        critic_logits = self.token_critic(generated, **kwargs)[..., 0]  # (b, n)
        labels = (generated != x).float()  # 1 = the critic should call this token wrong
        keep = mask if mask is not None else torch.ones_like(noised)
        critic_loss = F.binary_cross_entropy_with_logits(critic_logits[keep], labels[keep])
        if only_train_critic:
            return Losses(critic_loss, None, critic_loss)
        return Losses(loss + critic_loss * self.critic_loss_weight, loss, critic_loss)

    # -- generation ------------------------------------------------------------------------------

    def sample(self, logits: Tensor, temperature: float, generator=None) -> Tensor:
        """Gumbel-max sampling at ``temperature`` (the argmax at 0), never the mask token."""
        logits = logits.masked_fill(self._mask_column(logits), float("-inf"))
        if temperature <= 0:  # greedy: no noise at all (a clamped tiny temperature still flips near-ties)
            return logits.argmax(dim=-1)
        noise = gumbel_noise(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        return (logits / temperature + noise).argmax(dim=-1)

    def _mask_column(self, logits: Tensor) -> Tensor:
        col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        col[self.mask_id] = True
        return col

    def masked_counts(self, seq_len: int | Tensor) -> list[int] | Tensor:
        """How many positions stay masked after each of the ``steps`` rounds: the schedule at
        t = 1/steps .. 1 times the positions to fill, never increasing, and 0 after the last round
        whatever the schedule. An int gives a list; a (b,) tensor of per-row counts a (steps, b) tensor."""
        total = torch.as_tensor(seq_len)
        times = torch.linspace(0.0, 1.0, self.steps + 1, device=total.device)[1:]
        frac = self.schedule_fn(times).to(torch.float64)  # (steps,)
        counts = (frac[:, None] * total.reshape(1, -1)).long().clamp(min=0)
        counts = torch.minimum(counts, total.reshape(1, -1)).cummin(dim=0).values
        counts[-1] = 0
        return counts[:, 0].tolist() if total.ndim == 0 else counts

    @torch.no_grad()
    def generate(self, batch_size: int | None = None, start_temperature: float = 1.0, filter_thres: float | None = 0.7,
                 noise_level_scale: float = 1.0, *, seq_len: int | None = None, start: Tensor | None = None,
                 generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """Demask ``steps`` rounds -> (batch_size, seq_len) token ids ((seq_len,) when batch_size is
        None). From all mask tokens (``seq_len`` defaults to the net's max_seq_len), or from ``start``
        (b, n): its ``mask_id`` positions are filled, its other tokens are given and never changed
        (inpainting; each row fills its own count). Each round samples every masked position
        (temperature annealed from ``start_temperature`` to 0, after keeping the top
        (1 - filter_thres) of the vocabulary), then masks again the least confident (highest critic
        score, with Gumbel noise scaled by ``noise_level_scale``); none after the last round.
        ``kwargs`` go to the net (e.g. mask, context)."""
        if filter_thres is not None and not 0 <= filter_thres < 1:
            raise ValueError(f"filter_thres must be in [0, 1) or None, got {filter_thres!r}")
        device = next(self.net.parameters()).device
        sample_one = batch_size is None and start is None
        if start is not None:
            if start.ndim != 2 or start.is_floating_point() or start.dtype == torch.bool:
                raise ValueError(f"start must be (batch, seq) token ids, got {start.dtype} {tuple(start.shape)}")
            if batch_size is not None and batch_size != start.shape[0] or seq_len is not None and seq_len != start.shape[1]:
                raise ValueError("start fixes the batch size and length; drop batch_size / seq_len")
            seq = start.to(device=device, dtype=torch.long).clone()
        else:
            b = 1 if batch_size is None else batch_size
            _positive_int("batch_size", b)
            n = seq_len if seq_len is not None else self.max_seq_len
            if n is None:
                raise ValueError("the net has no max_seq_len; pass seq_len")
            _positive_int("seq_len", n)
            seq = torch.full((b, n), self.mask_id, dtype=torch.long, device=device)
        masked = seq == self.mask_id
        given = ~masked  # never resampled, never masked again
        counts = self.masked_counts(masked.sum(-1))  # (steps, b)

        was_training = self.training
        self.eval()
        try:
            last_embed = self.null_embed
            for step in range(self.steps):
                extra = self.to_self_cond(last_embed) if self.self_cond else None
                with added_to_token_embedding(self.net, extra):
                    if self.self_cond:
                        last_embed = self.net(seq, return_embeddings=True, **kwargs)
                        logits = logits_from_embeddings(self.net, last_embed)
                    else:
                        logits = self.net(seq, **kwargs)
                logits = logits.masked_fill(self._mask_column(logits), float("-inf"))
                if filter_thres is not None:
                    logits = keep_top_fraction(logits, filter_thres)
                anneal = (self.steps - 1 - step) / self.steps  # 1 - 1/steps .. 0
                sampled = self.sample(logits, start_temperature * anneal, generator)
                seq = torch.where(masked, sampled, seq)
                if step == self.steps - 1:
                    break
                if self.token_critic is not None:
                    scores = self.token_critic(seq, **kwargs)[..., 0]
                    scores = scores + noise_level_scale * anneal * gumbel_noise(
                        scores.shape, generator=generator, device=device, dtype=scores.dtype)
                else:  # 1 - the probability of the sampled token: high = unsure
                    scores = 1 - logits.softmax(dim=-1).gather(-1, sampled[..., None])[..., 0]
                lowest = -torch.finfo(scores.dtype).max
                scores = scores.masked_fill(given if self.can_mask_prev_unmasked else ~masked, lowest)
                # each row masks again its counts[step] least confident positions
                ranks = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
                masked = ranks < counts[step][:, None]
                seq = seq.masked_fill(masked, self.mask_id)
                if not bool(masked.any()):  # the schedule reached 0 early
                    break
        finally:
            self.train(was_training)
        return seq[0] if sample_one else seq
