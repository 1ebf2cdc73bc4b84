"""Positional schemes.

Positions are integer tensors of shape (b or 1, n). Absolute schemes map positions to vectors
added to the token embeddings; rotary maps them to (cos, sin) applied to queries and keys; bias
schemes map (query positions, key positions) to an additive score bias of shape (b or 1, h, n, m),
computed once per forward and shared by every self-attention layer.

Legend: b batch, h heads, n queries, m keys, d head dimension, r rotary dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions (the Transformer / GPT-2 default)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, positions):
        return self.emb(positions)


def sinusoids(positions, dim: int, base: float = 10000.0):
    """The fixed sin/cos table of Attention Is All You Need, evaluated at ``positions``."""
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def check_cache_reach(pos_emb, max_seq_len: int | None, total: int, what: str = "tokens"):
    """Refuse a cached generation that would run past learned absolute positions: a key/value
    cache cannot slide them (the uncached loop re-embeds a sliding window instead)."""
    if isinstance(pos_emb, AbsolutePositionalEmbedding) and max_seq_len is not None and total > max_seq_len:
        raise ValueError(f"the prompt and the generated {what} ({total}) exceed max_seq_len ({max_seq_len}) of the "
                         f"learned positions, which a cache cannot slide; pass cache_kv=False (a sliding window) "
                         f"or generate fewer {what}")


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions; ``scaled=True`` multiplies by one learned scalar (init dim**-0.5)."""

    def __init__(self, dim: int, scaled: bool = False):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal position embeddings need an even dim, got {dim}")
        self.dim = dim
        self.scale = nn.Parameter(torch.tensor(dim ** -0.5)) if scaled else None

    def forward(self, positions):
        emb = sinusoids(positions, self.dim)
        return emb * self.scale if self.scale is not None else emb


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, 2104.09864), half-split (GPT-NeoX / Llama) layout.

    Rotates the first ``rot_dim`` channels of each head; ``q_i . k_j`` then depends on i - j only.

    Context extension: ``interpolation_factor`` s divides every position (position interpolation,
    2306.15595: angles t * theta_k / s); ``base_rescale_factor`` a multiplies the base by
    a ** (r / (r - 2)) ("NTK-aware" scaling, bloc97 2023, as in YaRN 2309.00071): the lowest
    frequency is divided by a while the highest stays.

    xPos (2212.10554, ``xpos_scale_base`` B): channel pair k of a query at position p is also scaled
    by zeta_k ** (p / B), of a key by zeta_k ** (-p / B), zeta_k = (2k + 0.4 r) / (1.4 r) < 1, so
    ``q_i . k_j`` decays as zeta ** ((i - j) / B) with the distance (causal stacks only: a key ahead
    would grow). The exponents are not centred (upstream centres them at each call's middle
    position, which cancels in q . k but not across a KV cache's calls); in float32 they stay in
    range up to about 70 * B positions.
    """

    def __init__(self, rot_dim: int, base: float = 10000.0, interpolation_factor: float = 1.0,
                 base_rescale_factor: float = 1.0, xpos_scale_base: float | None = None):
        super().__init__()
        self.rot_dim = rot_dim
        self.xpos_scale_base = xpos_scale_base
        self.base = base * base_rescale_factor ** (rot_dim / (rot_dim - 2)) if base_rescale_factor != 1.0 else base
        self.interpolation_factor = interpolation_factor

    @property
    def inv_freq(self):
        # computed in float32 on each call, not stored: a buffer would follow model.to(bfloat16)
        # and lose the angles' precision at long positions (r/2 values: negligible work)
        r = self.rot_dim
        return 1.0 / self.base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)

    @property
    def xpos_zeta(self):
        """xPos's per-pair decay bases (r/2,), (2k + 0.4 r) / (1.4 r)."""
        r = self.rot_dim
        return (torch.arange(0, r, 2, dtype=torch.float32) + 0.4 * r) / (1.4 * r)

    def forward(self, positions):
        """(b|1, n) positions -> cos, sin of shape (b|1, 1, n, r), float32 (with xPos, its query
        scale of that shape as a third; :func:`key_rotary` turns the triple into the keys')."""
        pos = positions.float()
        if self.interpolation_factor != 1.0:
            pos = pos / self.interpolation_factor
        freqs = pos[..., None] * self.inv_freq.to(positions.device)  # (b, n, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        if self.xpos_scale_base is None:
            return emb.cos(), emb.sin()
        zeta = self.xpos_zeta.to(positions.device)
        scale = zeta ** (positions.float()[..., None] / self.xpos_scale_base)  # (b, n, r/2), raw positions
        return emb.cos(), emb.sin(), torch.cat((scale, scale), dim=-1)[:, None]

    def extra_repr(self):
        return f"rot_dim={self.rot_dim}" + (f", xpos_scale_base={self.xpos_scale_base:g}"
                                            if self.xpos_scale_base is not None else "")


def key_rotary(rotary):
    """The keys' rotation from the queries' (cos, sin[, xpos scale]): the same angles, the inverse scale."""
    return rotary if len(rotary) == 2 else (rotary[0], rotary[1], 1.0 / rotary[2])


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin, scale=None):
    """Rotate the first r channels of x (b, h, n, d) by the angles behind cos/sin (b|1, 1, n, r),
    then scale them by ``scale`` (same shape; xPos) if given."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    # The angles are float32 math; the rotation itself runs in x's dtype (as Llama does) rather
    # than copying q and k to float32 and back in every layer: cos/sin are cast, (n, r) only.
    if scale is not None:
        cos, sin = cos * scale, sin * scale
    rot = rot * cos.to(x.dtype) + rotate_half(rot) * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class PolarEmbedding(nn.Module):
    """PoPE, polar position embedding (2509.10534): channel c of a query at position p becomes the
    pair softplus(q_c) * (cos, sin)(p * theta_c), of a key softplus(k_c) * (cos, sin)(p * theta_c + delta_hc),
    theta_c = base ** (-c / d) for every channel c < d (heads twice as wide), so
    ``q'_i . k'_j = sum_c softplus(q_c) softplus(k_c) cos((i - j) theta_c - delta_hc)``: magnitudes
    carry content, angles position only. delta (h, 1, d), learned, clamped to [-2 pi, 0], from 0
    (``polar_bias_uniform_init``: uniform in that range)."""

    def __init__(self, dim_head: int, heads: int, bias_uniform_init: bool = False, base: float = 10000.0):
        super().__init__()
        self.dim_head, self.base = dim_head, base
        self.learned_bias = nn.Parameter(torch.zeros(heads, 1, dim_head))
        if bias_uniform_init:
            with torch.no_grad():
                self.learned_bias.uniform_(-2 * math.pi, 0.0)

    @property
    def inv_freq(self):
        d = self.dim_head  # (computed, not a buffer: float32 whatever the model's dtype, as rotary's)
        return 1.0 / self.base ** (torch.arange(d, dtype=torch.float32) / d)

    def forward(self, positions):
        """(b|1, n) positions -> angles (b|1, 1, n, d) float32, key phase (1, h, 1, d)."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (b, n, d)
        return angles[:, None], self.learned_bias.float().clamp(-2 * math.pi, 0.0)[None]


def apply_polar(t, angles):
    """t (b, h, n, d) -> (b, h, n, 2 d): softplus(t) times cos and sin of the angles (float32 math)."""
    mag = F.softplus(t.float())
    return torch.cat((mag * angles.cos(), mag * angles.sin()), dim=-1).to(t.dtype)


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi paper's geometric slopes 2^(-8i/n); for a non-power-of-two count, the slopes of
    the nearest lower power of two followed by every other slope of the next power of two."""

    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]


class AlibiPositionalBias(nn.Module):
    """ALiBi (2108.12409): score bias -slope_h * |i - j|; heads beyond ``alibi_heads`` get none.
    ``slopes``: the ALiBi heads' own slopes instead of the paper's geometric ones."""

    def __init__(self, heads: int, alibi_heads: int | None = None, slopes=None):
        super().__init__()
        alibi_heads = alibi_heads or heads
        self.heads, self.alibi_heads = heads, alibi_heads
        own = alibi_slopes(alibi_heads) if slopes is None else [float(v) for v in slopes]
        slopes = torch.tensor(own + [0.0] * (heads - alibi_heads))
        self.register_buffer("slopes", slopes.view(1, heads, 1, 1), persistent=False)

    def forward(self, q_pos, k_pos):
        """q_pos (b|1, n), k_pos (b|1, m), or per head (b|1, heads, n) / (b|1, heads, m) -> (b|1, heads, n, m)."""
        if q_pos.ndim == 3:
            dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().float()  # (b, h, n, m)
        else:
            dist = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs().float()  # (b, 1, n, m)
        return -self.slopes * dist

    def score_mod(self, q_pos, k_pos) -> "AlibiScoreMod":
        """The bias as a lazily materialised description (dense or FlexAttention score_mod). Per-head
        positions (b|1, alibi_heads, n) are padded with zeros for the heads without ALiBi (slope 0)."""
        if q_pos.ndim == 3 and q_pos.shape[1] < self.heads:
            q_pos = nn.functional.pad(q_pos, (0, 0, 0, self.heads - q_pos.shape[1]))
            k_pos = nn.functional.pad(k_pos, (0, 0, 0, self.heads - k_pos.shape[1]))
        return AlibiScoreMod(self, q_pos, k_pos)


def t5_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of key_pos - query_pos: exact for small offsets, log-spaced up to
    ``max_distance``, and (bidirectional) separate halves for keys after and before the query."""
    ret = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


class T5RelativePositionBias(nn.Module):
    """T5 relative bias (1910.10683): one learned scalar per (bucket, head), shared by all layers;
    causal (one-sided) buckets in decoders, bidirectional in encoders."""

    def __init__(self, heads: int, *, causal: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        # t5_bucket gives half the buckets to exact offsets and spreads the rest log-spaced up to
        # max_distance: that needs 2 buckets per direction and max_distance past the exact ones
        per_side = num_buckets if causal else num_buckets // 2
        if per_side < 2:
            raise ValueError(f"rel_pos_num_buckets must be at least {2 if causal else 4} "
                             f"({'a causal stack' if causal else 'a bidirectional stack: half per direction'}), "
                             f"got {num_buckets}")
        if max_distance <= per_side // 2:
            raise ValueError(f"rel_pos_max_distance ({max_distance}) must exceed the {per_side // 2} exact offsets "
                             f"of rel_pos_num_buckets={num_buckets}; raise it or lower rel_pos_num_buckets")
        self.causal = causal
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, q_pos, k_pos):
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (b, n, m)
        buckets = t5_bucket(rel, bidirectional=not self.causal, num_buckets=self.num_buckets,
                            max_distance=self.max_distance)
        if not torch.compiler.is_compiling():
            return self.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # (b, h, n, m)
        # Compiled, an embedding's backward becomes atomic adds of every score's gradient into
        # num_buckets rows (H200, 1024 x 1024: 16 ms a step). As a one-hot product in float32 the
        # lookup is the same numbers and its backward a matrix product with no atomics.
        weight = self.relative_attention_bias.weight
        with torch.autocast(rel.device.type, enabled=False):
            onehot = F.one_hot(buckets, self.num_buckets).to(torch.float32)
            return (onehot @ weight.float()).permute(0, 3, 1, 2)

    def score_mod(self, q_pos, k_pos) -> "T5ScoreMod":
        return T5ScoreMod(self, q_pos, k_pos)

    def extra_repr(self):
        return f"causal={self.causal}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"


class DynamicPositionBias(nn.Module):
    """Dynamic position bias (SwinV2, 2111.09883; CAPE-style continuous positions): an MLP maps
    each relative distance i - j (query minus key; ``log_distance``: sign(d) * log(|d| + 1)) to one
    bias per head, shared by every layer. ``depth`` SiLU layers of width ``dim`` (each with a
    LayerNorm before the SiLU when ``norm``), then a projection to the heads."""

    def __init__(self, dim: int, heads: int, depth: int = 2, log_distance: bool = False, norm: bool = False):
        super().__init__()
        self.log_distance = log_distance
        layers, width = [], 1
        for i in range(depth):
            layers.append(nn.Linear(width, dim))
            if norm:  # the first bias-less, as upstream's
                layers.append(nn.LayerNorm(dim, bias=i > 0))
            layers.append(nn.SiLU())
            width = dim
        layers.append(nn.Linear(dim, heads))
        self.mlp = nn.Sequential(*layers)

    def forward(self, q_pos, k_pos):
        """(b|1, n), (b|1, m) positions -> (b|1, h, n, m): the MLP runs once per distinct distance."""
        rel = q_pos[:, :, None] - k_pos[:, None, :]  # (b, n, m)
        low = rel.min()
        dist = torch.arange(int(low), int(rel.max()) + 1, device=rel.device, dtype=torch.float32)[:, None]
        if self.log_distance:
            dist = torch.sign(dist) * torch.log(dist.abs() + 1)
        table = self.mlp(dist.to(self.mlp[0].weight.dtype))  # (distances, h)
        return table[rel - low].permute(0, 3, 1, 2)

    def score_mod(self, q_pos, k_pos) -> "DynamicScoreMod":
        return DynamicScoreMod(self, q_pos, k_pos)


class TUPEPositionalBias(nn.Module):
    """TUPE (2006.15595): untied positional correlation, as a score bias shared by every layer.

    Learned absolute embeddings p_i, never added to the tokens, with their own per-head
    projections U_Q, U_K give v_ij = (p_i U_Q)(p_j U_K)^T / sqrt(2d); the word-to-word logits are
    scaled by 1/sqrt(2d) too (the layer stack sets the attention scale). A relative bias b_{j-i}
    passed in (TUPE-R, eq. 11) is added to v before the [CLS] reset. With ``untie_cls`` the first
    position (position 0) is untied (eq. 9): its row becomes a learned theta_1 and its column, for
    every other query, theta_2, one pair per head.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, max_seq_len: int, untie_cls: bool = False):
        super().__init__()
        self.heads, self.dim_head, self.max_seq_len = heads, dim_head, max_seq_len
        self.scale = (2 * dim_head) ** -0.5
        # unit-scale p_i: the word stream reaches its projections normalised, so the two terms
        # start at the same magnitude (a N(0, 0.02) table would start the positional term at ~0)
        self.emb = nn.Embedding(max_seq_len, dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, heads * dim_head, bias=False)
        self.cls_theta = nn.Parameter(torch.zeros(2, heads)) if untie_cls else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.emb.weight, std=1.0)

    def _project(self, linear, pos):
        b, n = pos.shape
        return linear(self.emb(pos)).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (b, h, n, d)

    def forward(self, q_pos, k_pos, rel_bias=None):
        """(b|1, n), (b|1, m) positions [, (b|1, h, n, m) relative bias] -> (b|1, h, n, m)."""
        if not torch.compiler.is_compiling() and k_pos.numel() and int(k_pos.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(k_pos.max())} is beyond tupe_max_seq_len ({self.max_seq_len}) of "
                             f"TUPE's learned position table; shorten the input or raise tupe_max_seq_len")
        pq, pk = self._project(self.to_q, q_pos), self._project(self.to_k, k_pos)
        v = torch.einsum("bhnd,bhmd->bhnm", pq, pk) * self.scale
        if rel_bias is not None:
            v = v + rel_bias
        if self.cls_theta is not None:
            theta = self.cls_theta.to(v.dtype)
            from_cls = (q_pos == 0)[:, None, :, None]  # (b, 1, n, 1): the [CLS] query row
            to_cls = (k_pos == 0)[:, None, None, :]  # (b, 1, 1, m): the [CLS] key column
            v = torch.where(to_cls, theta[1].view(1, -1, 1, 1), v)
            v = torch.where(from_cls, theta[0].view(1, -1, 1, 1), v)  # theta_1 wins at (0, 0)
        return v

    def score_mod(self, q_pos, k_pos, rel=None) -> "TUPEScoreMod":
        """rel: the relative scheme's ScoreMod (TUPE-R) or None."""
        return TUPEScoreMod(self, q_pos, k_pos, rel)

    def extra_repr(self):
        return f"max_seq_len={self.max_seq_len}, untie_cls={self.cls_theta is not None}"


# --------------------------------------------------------------------------------------------
# Bias schemes as score-mod descriptions: what a fused kernel needs to compute the bias itself.


def _row(t):
    """Index of batch row b into a (b|1, ...) tensor: a broadcast row is read at 0."""
    return (lambda b: b) if t.shape[0] > 1 else (lambda b: 0)


class ScoreMod:
    """A position bias described by its scheme, made once per forward and shared by every layer.

    ``dense()`` materialises the (b|1, h, n, m) float bias (memoised: one tensor, one autograd
    node for the whole stack, as before); ``flex_score_mod(batch)`` returns the equivalent
    FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` reading only small captured tensors.
    The dispatcher materialises the dense bias only when the chosen backend needs it (SDPA,
    explicit). ``memo`` is a per-forward cache shared with every derived object (the FlexAttention
    backend keeps its block masks there). ``prefer_flex``: FlexAttention measured faster than
    SDPA's float bias for this scheme (True), or only inside ``torch.compile`` ("compiled");
    otherwise flex is used only when forced.
    """

    name = "bias"
    prefer_flex = False
    kernel_options: dict | None = None  # FlexAttention Triton options for this scheme

    def __init__(self, q_pos, k_pos):
        self.q_pos, self.k_pos = q_pos, k_pos  # (b|1, n), (b|1, m) long
        self.memo: dict = {}
        self._dense = None

    def dense(self):
        if self._dense is None:
            self._dense = self._materialise()
        return self._dense

    def _materialise(self):
        raise NotImplementedError

    def flex_score_mod(self, batch: int):
        raise NotImplementedError

    def with_memory(self, num_mem: int) -> "ScoreMod":
        """The same bias over ``num_mem`` prepended memory keys, which get zero bias."""
        key = ("with_memory", num_mem)
        if key not in self.memo:
            self.memo[key] = MemoryKeysScoreMod(self, num_mem)
        return self.memo[key]


class MemoryKeysScoreMod(ScoreMod):
    """``parent`` shifted right by ``num_mem`` always-visible memory keys with zero bias."""

    def __init__(self, parent: ScoreMod, num_mem: int):
        self.parent, self.num_mem = parent, num_mem
        self.name, self.prefer_flex, self.kernel_options = parent.name, parent.prefer_flex, parent.kernel_options
        self.q_pos, self.k_pos, self.memo, self._dense = parent.q_pos, parent.k_pos, parent.memo, None

    def _materialise(self):
        return nn.functional.pad(self.parent.dense(), (self.num_mem, 0), value=0.0)

    def flex_score_mod(self, batch: int):
        inner, num_mem = self.parent.flex_score_mod(batch), self.num_mem

        def score_mod(score, b, h, q_idx, kv_idx):
            shifted = inner(score, b, h, q_idx, (kv_idx - num_mem).clamp(min=0))  # clamped: a safe read
            return torch.where(kv_idx < num_mem, score, shifted)
        return score_mod


class DenseScoreMod(ScoreMod):
    """An already materialised (b|1, h, n, m) bias as a ScoreMod: the reversible coupling's
    autograd Function takes the bias as a differentiable tensor and hands it back this way."""

    name = "dense"
    kernel_options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}

    def __init__(self, bias):
        super().__init__(None, None)
        self._dense = bias

    def flex_score_mod(self, batch: int):
        return _dense_score_mod(self.dense())


class AlibiScoreMod(ScoreMod):
    name = "alibi"
    # Flex in training (n == m): the compiled AutoregressiveWrapper step at the GPT-2-small shape takes
    # 40.2 ms on flex against 45.1 ms on SDPA's float bias (plain model 34.4 ms: cost 1.17x against
    # 1.31x; H200, benchmarks/results/bias_backend_probe_flexfix_h200.json). An earlier probe had flex
    # slower (49-70 ms): flex then broke the compiled graph in every layer without a padding mask.
    # Eager steps were equal (52 / 50-52 ms), and an eager flex call builds a kernel per new shape
    # (each prompt length of generate's prefill), so flex only inside torch.compile.
    prefer_flex = "compiled"

    def __init__(self, module: "AlibiPositionalBias", q_pos, k_pos):
        super().__init__(q_pos, k_pos)
        self.module = module

    def _materialise(self):
        return self.module(self.q_pos, self.k_pos)

    def flex_score_mod(self, batch: int):
        slopes = self.module.slopes.view(-1)  # (h,) float32
        qp, kp, qb, kb = self.q_pos, self.k_pos, _row(self.q_pos), _row(self.k_pos)

        if qp.ndim == 3:  # each head its own positions
            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (qp[qb(b), h, q_idx] - kp[kb(b), h, kv_idx]).abs()
            return score_mod

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (qp[qb(b), q_idx] - kp[kb(b), kv_idx]).abs()
        return score_mod


class T5ScoreMod(ScoreMod):
    name = "t5"
    # smaller tiles: the default config asked for 278528 bytes of shared memory on H200 (232448)
    kernel_options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}

    def __init__(self, module: "T5RelativePositionBias", q_pos, k_pos):
        super().__init__(q_pos, k_pos)
        self.module = module

    def _materialise(self):
        return self.module(self.q_pos, self.k_pos)

    def offset_table(self):
        """(h, 2D+1): the learned bias of every offset k - q in [-D, D], D = max_distance. Buckets
        saturate at D, so clamping an offset to [-D, D] keeps its bucket: the table is exact."""
        mod, dist = self.module, self.module.max_distance
        offsets = torch.arange(-dist, dist + 1, device=self.q_pos.device)
        buckets = t5_bucket(offsets, bidirectional=not mod.causal, num_buckets=mod.num_buckets, max_distance=dist)
        return mod.relative_attention_bias(buckets).t()  # gradients reach the (buckets, h) table

    def flex_score_mod(self, batch: int):
        # not preferred in auto dispatch: flex's backward adds every score's gradient atomically
        # into ~2D+1 table cells per head (H200: 139 ms a layer; over the dense bias instead, the
        # GPT-2 step took 78.8 ms against 68 ms on SDPA, benchmarks/results/explore_round4_gpu.json)
        table, dist = self.offset_table(), self.module.max_distance
        qp, kp, qb, kb = self.q_pos, self.k_pos, _row(self.q_pos), _row(self.k_pos)

        def score_mod(score, b, h, q_idx, kv_idx):
            rel = (kp[kb(b), kv_idx] - qp[qb(b), q_idx]).clamp(-dist, dist) + dist
            return score + table[h, rel]
        return score_mod


class DynamicScoreMod(ScoreMod):
    """The MLP's bias is read from its materialised tensor (a score_mod cannot run the MLP)."""

    name = "dynamic"
    kernel_options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}

    def __init__(self, module: "DynamicPositionBias", q_pos, k_pos):
        super().__init__(q_pos, k_pos)
        self.module = module

    def _materialise(self):
        return self.module(self.q_pos, self.k_pos)

    def flex_score_mod(self, batch: int):
        return _dense_score_mod(self.dense())


class TUPEScoreMod(ScoreMod):
    """TUPE's positional term (a low-rank product, [CLS] reset, optional T5 term) is read from
    its materialised tensor: a score_mod cannot take the d-dimensional dot product itself."""

    name = "tupe"
    kernel_options = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1}

    def __init__(self, module: "TUPEPositionalBias", q_pos, k_pos, rel: ScoreMod | None = None):
        super().__init__(q_pos, k_pos)
        self.module, self.rel = module, rel

    def _materialise(self):
        return self.module(self.q_pos, self.k_pos, self.rel.dense() if self.rel is not None else None)

    def flex_score_mod(self, batch: int):
        return _dense_score_mod(self.dense())


def _dense_score_mod(bias):
    """score_mod adding a materialised (b|1, h, n, m) bias."""
    row = _row(bias)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[row(b), h, q_idx, kv_idx]
    return score_mod
