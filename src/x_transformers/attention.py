"""Multi-head attention: projections and the features that live around ``attend()``.

Legend: b batch, n queries, m keys, h query heads, g kv heads, d head dim, e value head dim,
M memory key/values.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attend import attend, softclamp
from .config import ENTMAX_MIN_GAP, AttentionConfig
from .data_positions import CoPE, build_forget_bias
from .gating import HeadScale, OutputGates, ValueHeadGate, depth_scaled_
from .hybrid import HybridBranch
from . import qk_clip
from .positional import apply_polar, apply_rotary, key_rotary
from .rel_proj import RelProjPositionBias
from .value_residual import ValueResidualMix

# AttentionConfig fields that change sizes or constants, not the computation's steps (Attention.plain);
# a field added for a new feature is not here, so the feature, when on, takes forward's full path
_PLAIN_FREE = frozenset({"dim_head", "kv_heads", "dropout", "bias", "scale", "backend", "zero_init_output",
                         "output_proj_depth", "value_dim_head", "dim_out"})
LASER_EPS = 1e-20  # the smallest attention output LASER takes the log of (a row seeing nothing: log(eps))
SELF_PENALTY = 5e4  # shared-QK: a token sees itself only when nothing else is visible (Reformer)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels, t (b, h, n, d) / rms * g, g (h, 1, d) learned, init 1."""

    def __init__(self, heads: int, dim_head: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(heads, 1, dim_head))

    def forward(self, t):
        return F.normalize(t, dim=-1) * t.shape[-1] ** 0.5 * self.g.to(t.dtype)


def _heads(t, heads):
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)  # (b, n, h*d) -> (b, h, n, d)


class Attention(nn.Module):
    """Self- or cross-attention with the options of :class:`AttentionConfig`."""

    def __init__(self, dim: int, heads: int, cfg: AttentionConfig, *, causal: bool = False, cross: bool = False,
                 dim_context: int | None = None, polar: bool = False, value_mix: bool = False):
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        self.kv_heads = cfg.kv_heads or heads
        self.dim_head = d = cfg.dim_head
        self.value_dim_head = e = cfg.v_dim_head  # values sized apart from keys (upstream's value_dim_head)
        self.key_dim = 2 * d if polar else d  # PoPE's queries and keys are twice as wide (positional.py)
        self.causal = causal and not cross
        self.cross = cross
        self.shared_qk = cfg.shared_qk and not cross  # a self-attention idea: keys are the queries
        self._qkv_memo = None  # (key, (weight, bias)): the fused q/k/v weight while decoding (_qkv_weight)
        # only cross-attention reads the context: self-attention keys/values come from x (dim)
        dim_kv = (dim_context or dim) if cross else dim

        # multi-latent attention (DeepSeek-V2, 2405.04434): q from a latent of x, k and v from a shared
        # latent; with latent_rope_subheads r the last r key heads come from x itself and alone are rotated
        self.to_latent_q = nn.Linear(dim, cfg.dim_latent_q, bias=False) if cfg.use_latent_q else None
        self.to_latent_kv = nn.Linear(dim_kv, cfg.dim_latent_kv, bias=False) if cfg.use_latent_kv else None
        self.rope_heads = r = cfg.latent_rope_subheads or 0
        self.to_rope_k = nn.Linear(dim_kv, r * d, bias=False) if r else None
        dim_q_in = cfg.dim_latent_q if cfg.use_latent_q else dim
        dim_kv_in = cfg.dim_latent_kv if cfg.use_latent_kv else dim_kv
        self.fused = not (self.cross or self.shared_qk or cfg.use_latent_q or cfg.use_latent_kv or r)

        self.to_q = nn.Linear(dim_q_in, heads * d, bias=cfg.bias)
        # (no content keys when every key head is a rope head: upstream's latent_rope_subheads = kv_heads)
        self.to_k = None if self.shared_qk or self.kv_heads == r else \
            nn.Linear(dim_kv_in, (self.kv_heads - r) * d, bias=cfg.bias)
        self.to_v = nn.Linear(dim_kv_in, self.kv_heads * e, bias=cfg.bias)
        self.dim_out = dim_out = cfg.dim_out or dim
        # belief attention: the output's parts orthogonal to the query's own value, one per option
        self.orthog = tuple(name for name, on in (("all", cfg.orthog_projected_values),
                                                  ("head", cfg.orthog_projected_values_per_head)) if on and not cross)
        inner = heads * e * max(1, len(self.orthog))
        if cfg.project_out is False:  # the heads' concatenation is the output
            if inner != dim_out:
                raise ValueError(f"attn_project_out=False leaves the heads' output ({heads} heads x {e} = {inner}) "
                                 f"as the block's output, which must be {dim_out} wide; set attn_value_dim_head "
                                 f"(or attn_dim_head) to {dim_out / heads:g} or drop attn_project_out")
            self.to_out = None
        elif cfg.on_attn:  # attention on attention (1908.06954): a GLU of the heads' output, gated by itself
            self.to_out = nn.Sequential(nn.Linear(inner, dim_out * 2, bias=cfg.bias), nn.GLU())
        else:
            self.to_out = nn.Linear(inner, dim_out, bias=cfg.bias)
        self.head_scale = HeadScale(heads) if cfg.head_scale else None
        self.value_head_gate = ValueHeadGate(dim, heads) if cfg.gate_value_heads else None
        self.gates = OutputGates(
            dim, heads, e, input_gate=cfg.gate_values, input_rank=cfg.gate_values_rank,
            input_headwise=cfg.gate_values_headwise, output_gate=cfg.output_gate, output_rank=cfg.output_gate_rank,
            output_headwise=cfg.output_gate_headwise, silu_low_rank=cfg.low_rank_silu_gates,
            swiglu=cfg.swiglu_values) if cfg.gate_values or cfg.output_gate else None
        self.sublayer_dropout = nn.Dropout(cfg.sublayer_dropout) if cfg.sublayer_dropout > 0 else None

        # persistent memory (1907.01470): learned key/value pairs every query can attend to
        self.mem_k = self.mem_v = None
        if cfg.num_mem_kv:
            self.mem_k = nn.Parameter(torch.randn(self.kv_heads, cfg.num_mem_kv, d) * 0.02)
            self.mem_v = nn.Parameter(torch.randn(self.kv_heads, cfg.num_mem_kv, e) * 0.02)

        # query-key normalisation (2010.04245): unit-norm q and k (per group of channels with
        # attn_qk_norm_groups), the logits times a learned per-head scale (initial value qk_norm_scale), or
        # times a given attn_scale, fixed (as upstream's scale); or, with attn_qk_norm_dim_scale, learned
        # per-channel gains on q and k (init dim_head ** 0.25, so q.k starts at sqrt(d) cos) and the
        # fixed scale dim_head ** -0.5, as upstream
        self.qk_norm = cfg.qk_norm
        self.qk_scale = nn.Parameter(torch.full((heads, 1, 1), cfg.qk_norm_scale)) \
            if cfg.qk_norm and not cfg.qk_norm_dim_scale and cfg.scale is None else None
        self.q_gain = self.k_gain = None
        if cfg.qk_norm and cfg.qk_norm_dim_scale:
            self.q_gain = nn.Parameter(torch.full((heads, 1, d), d ** 0.25))
            self.k_gain = None if self.shared_qk else nn.Parameter(torch.full((self.kv_heads, 1, d), d ** 0.25))

        # talking heads (2003.02436): learned head mixing, identity at init
        self.pre_mix = nn.Parameter(torch.eye(heads)) if cfg.pre_mix else None
        self.post_mix = nn.Parameter(torch.eye(heads)) if cfg.post_mix else None

        # adaptively sparse attention (1909.00015): alpha = 1 + sigmoid(w), init 1.5, floored at
        # 1 + ENTMAX_MIN_GAP: in float32 sigmoid(w) underflows and entmax_bisect at alpha = 1 is uniform
        # RMSNorm of queries / keys / values per head (2302.05442): bounded logits at a learned gain
        # (named as parts of the projections: what rules out gradients to to_q / to_k rules out theirs)
        self.to_q_norm = HeadRMSNorm(heads, d) if cfg.qk_rmsnorm else None
        self.to_k_norm = HeadRMSNorm(self.kv_heads, d) if (cfg.qk_rmsnorm or cfg.k_rmsnorm) and not self.shared_qk \
            else None
        self.to_v_norm = HeadRMSNorm(self.kv_heads, e) if cfg.value_rmsnorm else None
        # attention sink (gpt-oss; 2309.17453): a learned per-head logit in every softmax, with a zero value
        self.sink = nn.Parameter(torch.zeros(heads)) if cfg.head_learned_sink else None
        self.softclamp = cfg.logit_softclamp_value if cfg.softclamp_logits else None  # Gemma 2 (2408.00118)
        self.max_attend_past = None if cross else cfg.max_attend_past  # a window over the sequence's own keys
        # value residual (value_residual.py): this block's learned mix with the first block's values
        self.value_mix = ValueResidualMix(dim, self.kv_heads) if value_mix else None
        # rotary on the last n heads only (upstream's rotate_num_heads; MLA's decoupled rope). MLA's r rope
        # heads are key heads: under grouped-query attention key head j serves the query heads
        # j * h/g .. (j + 1) * h/g - 1 (attend's repeat_interleave), so the last r key heads turn with the
        # last r * h/g query heads, and every query head meets a key rotated as it is
        self.rotate_key_heads = cfg.latent_rope_subheads or cfg.rotate_num_heads
        self.rotate_num_heads = r * (heads // self.kv_heads) if r else cfg.rotate_num_heads
        # pre-scale-post talking heads: a head mix of the logits multiplies the weights, identity at init
        self.scale_mix = nn.Parameter(torch.eye(heads)) if cfg.pre_scale_post_talking_heads else None
        self.rel_proj = RelProjPositionBias(dim, heads, cfg.rel_proj_num_distance_basis, cfg.rel_proj_max_dist) \
            if cfg.use_rel_proj_pos_bias and not cross else None  # a self-attention position bias
        self.selective = cfg.selective and self.causal  # 2410.02703, a causal self-attention idea
        self.inverted = cfg.inverted_attention and cross  # softmax over the queries (cross-attention)
        # positions from the content (data_positions.py): CoPE in causal self-attention, the forgetting
        # transformer's bias in self-attention
        self.cope = CoPE(heads, self.key_dim, cfg.cope_max_pos, soft_onehot=cfg.cope_soft_onehot_pos,
                         talking_heads=cfg.cope_talking_heads) if cfg.use_cope and self.causal else None
        self.forget_bias = None if cross else build_forget_bias(cfg, dim, heads, causal)
        # a user's sequence module beside self-attention (hybrid.py; its Linear maps get the stack's init)
        self.hybrid = HybridBranch(cfg.hybrid_module, dim, heads, e, HeadRMSNorm, causal=self.causal,
                                   fold=cfg.hybrid_fold_axial_dim, mask_kwarg=cfg.hybrid_mask_kwarg,
                                   learned_mix=cfg.hybrid_learned_mix) if cfg.hybrid_module is not None and not cross \
            else None

        self.entmax_alpha_logit = nn.Parameter(torch.zeros(heads)) if cfg.learned_entmax_alpha else None
        if cfg.custom_attn_fn is not None:
            if not callable(cfg.custom_attn_fn):
                raise ValueError(f"attn_custom_attn_fn must be callable (scores -> weights), got {cfg.custom_attn_fn!r}")
            self.normalizer = "custom"
        elif cfg.use_entmax15:
            self.normalizer = "entmax15"
        elif cfg.entmax_alpha is not None or cfg.learned_entmax_alpha:
            self.normalizer = "entmax_bisect"
        elif cfg.sigmoid:
            self.normalizer = "sigmoid"
        elif cfg.hard:
            self.normalizer = "hard"
        elif cfg.gumbel_softmax:
            self.normalizer = "gumbel"
        else:
            self.normalizer = "softmax"

        self.reset_variant_parameters()
        # no option beyond sizes, bias, dropout, scale and backend: forward runs _plain_forward
        self.plain = self.fused and not polar and self.value_mix is None and all(
            getattr(cfg, f.name) == (f.default_factory() if f.default is MISSING else f.default)
            for f in fields(cfg) if f.name not in _PLAIN_FREE)

    def reset_variant_parameters(self):
        """The initialisations the variants ask for; the layer stack calls this again after its own
        (GPT-2) initialisation of every linear map, which would otherwise overwrite them."""
        for part in (self.value_head_gate, self.gates, self.forget_bias, self.cope):
            if part is not None and hasattr(part, "reset_parameters"):
                part.reset_parameters()
        out = self.to_out[0] if isinstance(self.to_out, nn.Sequential) else self.to_out
        if out is not None and self.cfg.zero_init_output:
            nn.init.zeros_(out.weight)
        elif out is not None and self.cfg.output_proj_depth is not None:
            depth_scaled_(out, self.cfg.output_proj_depth)

    @property
    def entmax_alpha(self):
        if self.entmax_alpha_logit is not None:
            return (1 + torch.sigmoid(self.entmax_alpha_logit).clamp(min=ENTMAX_MIN_GAP)).view(1, -1, 1, 1)
        return self.cfg.entmax_alpha

    def _unit(self, t):
        """QK-norm's unit length, over each group of attn_qk_norm_groups channels of a head."""
        groups = self.cfg.qk_norm_groups
        if groups == 1:
            return F.normalize(t, dim=-1)
        return F.normalize(t.unflatten(-1, (groups, -1)), dim=-1).flatten(-2)  # (..., d) -> (..., G, d/G) -> back

    def _rotate(self, t, rotary):
        """Rotary on t (b, h, n, d) (queries: h = heads; keys: kv_heads); with attn_rotate_num_heads or
        MLA's rope heads only its last heads turn."""
        r = self.rotate_num_heads if t.shape[1] == self.heads else self.rotate_key_heads
        if r is None or r >= t.shape[1]:
            return apply_rotary(t, *rotary)
        return torch.cat((t[:, :-r], apply_rotary(t[:, -r:], *rotary)), dim=1)

    def _query(self, x):
        return self.to_q(x if self.to_latent_q is None else self.to_latent_q(x))  # (b, n, h*d)

    def _keys(self, src):
        """(b, g, m, d) keys of src: through the latent, the decoupled rope heads last."""
        rope = _heads(self.to_rope_k(src), self.rope_heads) if self.to_rope_k is not None else None
        if self.to_k is None:  # every key head a rope head
            return rope
        lat = src if self.to_latent_kv is None else self.to_latent_kv(src)
        k = _heads(self.to_k(lat), self.kv_heads - self.rope_heads)
        return k if rope is None else torch.cat((k, rope), dim=1)

    def _values(self, src):
        return self.to_v(src if self.to_latent_kv is None else self.to_latent_kv(src))  # (b, m, g*e)

    def _qkv_weight(self):
        """The concatenated q/k/v weight and bias. Without autograd (decoding) the concatenation is
        kept and reused while the three weights are the same tensors at the same version, so a decode
        step does not copy every layer's weights; any change to them (optimizer step, .to()) rebuilds it."""
        # (read through the modules' dicts: nn.Module's attribute fallback costs a decode step microseconds)
        q, k, v = (self._modules[name]._parameters for name in ("to_q", "to_k", "to_v"))
        parts = (q["weight"], k["weight"], v["weight"])
        biases = (q["bias"], k["bias"], v["bias"]) if q["bias"] is not None else ()
        memo = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
        if not memo:
            self._qkv_memo = None
        else:
            key = [(t.data_ptr(), t._version, t.dtype) for t in parts + biases]
            if self._qkv_memo is not None and self._qkv_memo[0] == key:
                return self._qkv_memo[1]
        w = torch.cat(parts)
        b = torch.cat(biases) if biases else None
        if memo:
            self._qkv_memo = (key, (w, b))
        return w, b

    def _fused_qkv(self, x):
        """Self-attention q, k, v from one matrix product over the concatenated weights: x is read
        (and, under autocast, cast) once instead of three times, and backward sums one gradient."""
        w, b = self._qkv_weight()
        sizes = [self._modules[name].out_features for name in ("to_q", "to_k", "to_v")]
        return F.linear(x, w, b).split_with_sizes(sizes, dim=-1)

    def muon_parameters(self) -> list:
        """Upstream's choice of matrices for the Muon optimizer here: the value and output projections'
        parameters (the query/key ones are left to AdamW)."""
        return [p for m in (self.to_v, self.to_out) if m is not None for p in m.parameters()]

    def qk_clip_(self, pre_softmax_attn, tau: float = 100.0):
        """QK-clip (MuonClip, Kimi K2, 2507.20534): where a head's largest logit exceeds ``tau``, scale
        its query and key projections so that it becomes ``tau`` (each by the square root; with grouped
        key/values, whose keys several heads share, the query alone by the whole factor).
        ``pre_softmax_attn``: logits (b, h, n, m), each head's largest logit (h,), or intermediates
        holding ``pre_softmax_attn``."""
        qk_clip.clip_attention_(self, pre_softmax_attn, tau)

    def forward(self, x, context=None, *, mask=None, rotary=None, score_mod=None, cache=None, need_weights=False,
                kv=None, kv_rotary=None, positions=None, value_residual=None, query_mask=None, residual_scores=None,
                polar=None, mem=None, mem_rotary=None, kv_residual=None, causal=None, additional_kv=None):
        """x (b, n, dim); context (b, m, dim_context) for cross-attention.

        mask: bool (b, 1, 1, m) over the keys (cached ones included); rotary: (cos, sin) at the
        new tokens' positions; score_mod: the position bias (b|1, h, n, m) as a ScoreMod, a
        description materialised only if the chosen kernel needs the tensor; cache: a LayerKV.
        kv (b, m, dim): self-attention whose keys/values come from this sequence instead of x, with
        kv_rotary their (cos, sin) (query-only pooling, Funnel Transformer 2006.03236).
        positions: (queries (b|1, n), keys (b|1, m)) long, what the sliding window counts (None:
        indices, the queries the last n keys).
        value_residual: the forward's ValueResidual (value_residual.py), or None. query_mask: (b, n)
        bool, the queries kept (inverted cross-attention normalises over them).
        residual_scores: a :class:`~x_transformers.blocks.ScoreCarry` (residual attention,
        2012.11747): its scores are added to this layer's before the softmax, and replaced by this
        layer's pre-softmax scores.
        polar: PoPE's (angles, key phase) at the new positions (2509.10534), in place of rotary.
        mem (b, m_mem, dim): Transformer-XL memory (1901.02860), normed hidden states of the previous
        segment whose keys/values go ahead of all others (cached ones included), rotated by
        ``mem_rotary``; ``mask`` and ``positions`` cover them already.
        kv_residual (b, n|1, dim): added to the new tokens' key/value input, not to the queries'
        (upstream's self_attn_kv_residuals; the Free Transformer's latent, 2510.17558).
        Returns (out (b, n, dim), weights (b, h, n, m) or None).
        """
        if self.plain and context is None and kv is None and value_residual is None and residual_scores is None \
                and polar is None and mem is None and kv_residual is None and additional_kv is None and x.ndim == 3 \
                and type(self.to_q) is type(self.to_k) is type(self.to_v) is type(self.to_out) is nn.Linear:
            return self._plain_forward(x, mask, rotary, score_mod, cache, need_weights, causal)
        if kv is not None and (self.cross or cache is not None):
            raise ValueError("kv= is for self-attention without a cache: not with cross-attention or a cache")
        if kv is not None and self.max_attend_past is not None:
            raise ValueError("attn_max_attend_past counts places back along one sequence; kv= (a funnel's "
                             "pooled queries) reads keys from another")
        if self.selective and cache is not None:
            raise ValueError("attn_selective: a token's gate on a key sums the earlier queries' scores for it, "
                             "which a key/value cache does not keep; decode without a cache (cache_kv=False)")
        if kv_residual is not None and (self.cross or kv is not None or self.shared_qk):
            raise ValueError("a key/value input residual is for plain self-attention: not with cross-attention, a "
                             "funnel's pooled queries or attn_shared_qk (whose keys are the queries)")
        h, g = self.heads, self.kv_heads
        views = None  # x (3, b, n, dim): q, k, v read different inputs (qkv_receive_diff_residuals, hyper.py)
        if x.ndim == 4:
            if kv is not None or self.cross or self.shared_qk or kv_residual is not None:
                raise ValueError("q, k, v from different inputs (qkv_receive_diff_residuals) is for self-attention "
                                 "over its own sequence, with keys of their own (not kv=, cross- or shared-QK attention, "
                                 "or a key/value input residual)")
            x, views = x[0], (x[1], x[2])
        seq_mask = mask  # (before memory key/values widen it)
        bias = None  # a dense additive bias of this layer's own (shared-QK's self penalty)
        # one product over the three weights, unless a projection is not a plain Linear (FP8's Float8Linear,
        # an adapter): then each runs its own forward
        fuse = self.fused and kv is None and kv_residual is None and views is None \
            and type(self.to_q) is type(self.to_k) is type(self.to_v) is nn.Linear
        qkv = self._fused_qkv(x) if fuse else None
        q = _heads(qkv[0] if qkv else self._query(x), h)  # (b, h, n, d)
        if self.to_q_norm is not None:
            q = self.to_q_norm(q)
        if self.qk_norm:
            q = self._unit(q) if self.q_gain is None else self._unit(q) * self.q_gain.to(q.dtype)

        kind = "cross" if self.cross else "self"
        if self.cross and cache is not None and cache.filled:
            k, v = cache.k, cache.v
            if value_residual is not None and not value_residual.seen(kind):
                value_residual.store(kind, v)  # the first cross-attention's cached values are its own
        else:
            src = context if self.cross else kv if kv is not None else x if kv_residual is None else x + kv_residual
            # shared-QK (Reformer): the keys are the queries scaled to unit length; queries keep their norm
            # (over kv=, a funnel's pooled queries: the keys are the unpooled sequence's queries)
            if self.shared_qk:
                k = F.normalize(q if kv is None else _heads(self._query(kv), h), dim=-1)  # (b, h, m, d)
            else:
                k = _heads(qkv[1], g) if qkv else self._keys(src if views is None else views[0])  # (b, g, m, d)
            v = _heads(qkv[2] if qkv else self._values(src if views is None else views[1]), g)  # (b, g, m, e)
            if self.to_k_norm is not None:
                k = self.to_k_norm(k)
            if self.to_v_norm is not None:
                v = self.to_v_norm(v)
            if value_residual is not None:  # (after the value norm: what a cross-attention caches)
                v = value_residual.mix(kind, v, x, self.value_mix)
            own_v = v if self.orthog and kv is None else None  # (b, g, n, e) the new tokens' own values
            if self.qk_norm and not self.shared_qk:
                k = self._unit(k) if self.k_gain is None else self._unit(k) * self.k_gain.to(k.dtype)
            if rotary is not None:  # cross-attention gets rotary only with the context's own (kv_rotary)
                k = self._rotate(k, key_rotary(rotary if kv is None and not self.cross else kv_rotary))
            if polar is not None:
                k = apply_polar(k, polar[0] + polar[1])  # (b, h, m, 2d)
            if cache is not None and self.cross:
                cache.store(k, v)
            elif cache is not None:
                k, v = cache.append(k, v)
            if mem is not None:  # the memory's keys/values, made as the sequence's, go first
                mk, mv = self._memory_kv(mem, mem_rotary)
                if value_residual is not None:  # mixed as the sequence's: the memory is earlier columns of it
                    mv = value_residual.mix("self_memory", mv, mem, self.value_mix)
                k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
        if rotary is not None:
            q = self._rotate(q, rotary)
        if polar is not None:
            q = apply_polar(q, polar[0])

        scale = self.cfg.scale  # None: dim_head ** -0.5
        if scale is None and polar is not None:
            scale = self.dim_head ** -0.5  # of the head, not of PoPE's doubled width (as upstream)
        if self.qk_scale is not None and self.cfg.l2_distance:
            # L2 distance between unit q and k, then the per-head scale (as upstream): folded into
            # q, the scale would enter the distance squared
            scale = self.qk_scale.to(q.dtype).unsqueeze(0)  # (1, h, 1, 1)
        elif self.qk_scale is not None:
            q, scale = q * self.qk_scale.to(q.dtype), 1.0
        if self.shared_qk and kv is None:
            # keys are the unit-normalised queries; a query's own key is penalised, not removed
            n, m = q.shape[-2], k.shape[-2]
            offset = cache.query_offset(n, m) if cache is not None else m - n  # where the new queries sit
            own = torch.arange(m, device=x.device)[None, :] == torch.arange(n, device=x.device)[:, None] + offset
            penalty = own.to(q.dtype) * -SELF_PENALTY
            bias = penalty
        if self.rel_proj is not None:
            if kv is not None or positions is None or positions[0] is None:
                raise ValueError("attn_use_rel_proj_pos_bias needs the stack's query and key positions (self-attention "
                                 "over its own sequence)")
            rel = self.rel_proj(x, *positions).to(q.dtype)  # (b, h, n, m)
            bias = rel if bias is None else bias + rel
        if self.forget_bias is not None:
            if kv is not None or mem is not None:
                raise ValueError("attn_data_dependent_alibi sums forget gates along the sequence's own tokens: "
                                 "not over a funnel's pooled keys or Transformer-XL memory")
            forget = self.forget_bias(x, cache, seq_mask).to(q.dtype)  # (b, h, n, m)
            bias = forget if bias is None else bias + forget

        prefix = 0  # always-visible keys prepended: memory key/values, the zero key/value
        if self.mem_k is not None:
            b, prefix = q.shape[0], self.mem_k.shape[1]
            mem_k, mem_v = self.mem_k.to(k.dtype), self.mem_v.to(v.dtype)
            if self.qk_norm and not self.shared_qk:
                mem_k = self._unit(mem_k) if self.k_gain is None else self._unit(mem_k) * self.k_gain.to(k.dtype)
            elif self.qk_norm or self.shared_qk:
                mem_k = F.normalize(mem_k, dim=-1)
            k = torch.cat((mem_k.expand(b, -1, -1, -1), k), dim=-2)
            v = torch.cat((mem_v.expand(b, -1, -1, -1), v), dim=-2)
        kv_heads = h if self.shared_qk else g
        extra, extra_mask = 0, None
        if additional_kv is not None:  # upstream's self_attn_additional_kv: another model's keys/values first
            k, v, kv_heads, extra, extra_mask = self._additional_kv(k, v, kv_heads, *additional_kv)
            prefix += extra
        if self.cfg.laser:
            # LASER (2411.03493): attend over exp(v) (softcapped first, so exp stays finite), log after
            v = softclamp(v, self.cfg.laser_softclamp_value).exp()
        if self.cfg.add_zero_kv:
            # a key and value of zeros (logit 0): attention can put its mass on nothing
            k, v, prefix = F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0)), prefix + 1
        if prefix:
            if mask is not None:
                mask = F.pad(mask, (prefix, 0), value=True)
            if bias is not None:
                bias = F.pad(bias, (prefix, 0), value=0.0)
            if score_mod is not None:
                score_mod = score_mod.with_memory(prefix)
            if extra_mask is not None:  # its columns follow the zero key/value, if any
                at = int(self.cfg.add_zero_kv)
                base = mask if mask is not None else torch.ones(q.shape[0], 1, 1, k.shape[-2], dtype=torch.bool,
                                                                 device=k.device)
                cols = extra_mask[:, None, None, :].expand(-1, 1, base.shape[2], -1)
                mask = torch.cat((base[..., :at], cols, base[..., at + extra:]), dim=-1)

        carried = {}
        if residual_scores is not None:
            carried = dict(prev_scores=residual_scores.scores, scores_out=[])
        out, weights = attend(
            q, k, v, mask=mask, causal=self.causal if causal is None else causal, bias=bias, score_mod=score_mod, scale=scale,
            dropout=self.cfg.dropout if self.training else 0.0,
            normalizer=self.normalizer, entmax_alpha=self.entmax_alpha, sparse_topk=self.cfg.sparse_topk,
            pre_mix=self.pre_mix, post_mix=self.post_mix, need_weights=need_weights,
            kv_heads=kv_heads, force_backend=self.cfg.backend,
            softclamp=self.softclamp, max_attend_past=self.max_attend_past,
            window_positions=positions if self.max_attend_past is not None else None,
            window_exempt=prefix, sink=self.sink, l2_distance=self.cfg.l2_distance, signed=self.cfg.cog_signed,
            cope=self.cope,
            **self._variant_options(query_mask), **carried,
        )
        if residual_scores is not None:
            residual_scores.scores = carried["scores_out"][0]
        if self.cfg.laser:
            out = out.clamp(min=LASER_EPS).log()
        if self.head_scale is not None:
            out = self.head_scale(out)
        if self.value_head_gate is not None:
            out = self.value_head_gate(x, out)
        if self.hybrid is not None:
            out = self.hybrid(x, out, mask=seq_mask, cache=cache)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, h, n, d) -> (b, n, h*d)
        if self.gates is not None:
            out = self.gates(x, out)
        if self.orthog:
            if kv is not None:  # a funnel's pooled queries: their own values from x itself
                own_v = _heads(self._values(x), g)
                own_v = self.to_v_norm(own_v) if self.to_v_norm is not None else own_v
            out = self._orthogonal(out, own_v)
        if self.to_out is not None:
            out = self.to_out(out)
        if self.sublayer_dropout is not None:
            out = self.sublayer_dropout(out)
        return out, weights

    def _plain_forward(self, x, mask, rotary, score_mod, cache, need_weights, causal):
        """The default attention, what forward computes for it without reading past its feature
        branches (a decode step's Python per layer): fused q/k/v, rotary, the cache, attend(), out."""
        h, g = self.heads, self.kv_heads
        if self.dim_head == self.value_dim_head:  # one view of the product as heads, then the three groups
            w, bias = self._qkv_weight()
            b, n, _ = x.shape
            qkv = F.linear(x, w, bias).view(b, n, h + 2 * g, -1).transpose(1, 2)  # (b, h + 2g, n, d)
            q, k, v = qkv.split_with_sizes((h, g, g), dim=1)  # (the strides and offsets of _heads' views)
        else:
            q, k, v = self._fused_qkv(x)
            q, k, v = _heads(q, h), _heads(k, g), _heads(v, g)  # (b, h, n, d), (b, g, n, d), (b, g, n, e)
        if rotary is not None:
            q, k = self._rotate(q, rotary), self._rotate(k, key_rotary(rotary))
        if cache is not None:
            k, v = cache.append(k, v)
        out, weights = attend(q, k, v, mask=mask, causal=self.causal if causal is None else causal,
                              score_mod=score_mod, scale=self.cfg.scale,
                              dropout=self.cfg.dropout if self.training else 0.0, need_weights=need_weights,
                              kv_heads=g, force_backend=self.cfg.backend)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1)), weights  # (b, h, n, e) -> (b, n, h*e) -> out

    def _orthogonal(self, out, own_v):
        """out (b, n, h*e) -> (b, n, len(orthog)*h*e): out minus its projection on each query's own
        value (b, g, n, e), over all heads' channels ("all") and per head ("head"), in float32 at least."""
        h, b, n = self.heads, out.shape[0], out.shape[1]
        dtype = torch.promote_types(out.dtype, torch.float32)
        v = own_v.repeat_interleave(h // own_v.shape[1], dim=1).transpose(1, 2).to(dtype)  # (b, n, h, e)
        o = out.view(b, n, h, -1).to(dtype)
        parts = []
        for over in self.orthog:
            flat = (-2, -1) if over == "all" else (-1,)
            unit = v / v.pow(2).sum(dim=flat, keepdim=True).sqrt().clamp(min=1e-12)
            parts.append((o - (o * unit).sum(dim=flat, keepdim=True) * unit).reshape(b, n, -1))
        return torch.cat(parts, dim=-1).to(out.dtype)

    def _additional_kv(self, k, v, kv_heads, ak, av, amask):
        """Prepend keys/values (b, g', m, d) / (b, g', m, e) taken as they are (another model's, rotated in
        its frame); both sides repeated to the query heads when g' differs from this layer's key heads."""
        if ak.shape[1] != kv_heads:
            h = self.heads
            k, v, ak, av = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v, ak, av))
            kv_heads = h
        return (torch.cat((ak.to(k.dtype), k), dim=-2), torch.cat((av.to(v.dtype), v), dim=-2), kv_heads,
                ak.shape[-2], amask)

    def _memory_kv(self, mem, rotary):
        """Keys and values (b, g, m_mem, d) of Transformer-XL memory, through the same projections,
        norms and rotation as the sequence's (shared-QK: the unit-normalised query projection)."""
        if self.shared_qk:
            k = _heads(self._query(mem), self.heads)
            k = F.normalize(self.to_q_norm(k) if self.to_q_norm is not None else k, dim=-1)
        else:
            k = self._keys(mem)
            if self.to_k_norm is not None:
                k = self.to_k_norm(k)
            if self.qk_norm:
                k = self._unit(k) if self.k_gain is None else self._unit(k) * self.k_gain.to(k.dtype)
        v = _heads(self._values(mem), self.kv_heads)
        if self.to_v_norm is not None:
            v = self.to_v_norm(v)
        if rotary is not None:
            k = self._rotate(k, key_rotary(rotary))
        return k, v

    def _variant_options(self, query_mask) -> dict:
        """The score variants of score_variants.py this block asks attend() for (only those on)."""
        cfg, out = self.cfg, {}
        if self.normalizer == "custom":
            out["custom_fn"] = cfg.custom_attn_fn
        if self.normalizer == "gumbel":
            out.update(gumbel_temp=cfg.gumbel_softmax_temp, gumbel_hard=cfg.gumbel_softmax_hard,
                       sample=self.training)
        if cfg.sparse_topk_straight_through:
            out["topk_straight_through"] = True
        if self.selective:
            out["selective"] = True
        if self.inverted:
            out.update(inverted=True, query_mask=query_mask)
        if self.scale_mix is not None:
            out["scale_mix"] = self.scale_mix
        return out

    def extra_repr(self):
        parts = [f"heads={self.heads}", f"dim_head={self.dim_head}"]
        if self.kv_heads != self.heads:
            parts.append(f"kv_heads={self.kv_heads}")
        if self.causal:
            parts.append("causal")
        if self.cross:
            parts.append("cross")
        return ", ".join(parts)
