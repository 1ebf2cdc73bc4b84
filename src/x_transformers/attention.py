"""Multi-head attention: projections and the features that live around ``attend()``.

Legend: b batch, n queries, m keys, h query heads, g kv heads, d head dim, M memory key/values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attend import attend, softclamp
from .config import ENTMAX_MIN_GAP, AttentionConfig
from .gating import HeadScale, OutputGates, ValueHeadGate, depth_scaled_
from .positional import apply_rotary

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
                 dim_context: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        self.kv_heads = cfg.kv_heads or heads
        self.dim_head = d = cfg.dim_head
        self.causal = causal and not cross
        self.cross = cross
        self.shared_qk = cfg.shared_qk and not cross  # a self-attention idea: keys are the queries
        # only cross-attention reads the context: self-attention keys/values come from x (dim)
        dim_kv = (dim_context or dim) if cross else dim

        self.to_q = nn.Linear(dim, heads * d, bias=cfg.bias)
        self.to_k = None if self.shared_qk else nn.Linear(dim_kv, self.kv_heads * d, bias=cfg.bias)
        self.to_v = nn.Linear(dim_kv, self.kv_heads * d, bias=cfg.bias)
        self.dim_out = dim_out = cfg.dim_out or dim
        inner = heads * d
        if cfg.project_out is False:  # the heads' concatenation is the output
            if inner != dim_out:
                raise ValueError(f"attn_project_out=False leaves the heads' output ({heads} heads x {d} = {inner}) "
                                 f"as the block's output, which must be {dim_out} wide; set attn_dim_head to "
                                 f"{dim_out / heads:g} or drop attn_project_out")
            self.to_out = None
        elif cfg.on_attn:  # attention on attention (1908.06954): a GLU of the heads' output, gated by itself
            self.to_out = nn.Sequential(nn.Linear(inner, dim_out * 2, bias=cfg.bias), nn.GLU())
        else:
            self.to_out = nn.Linear(inner, dim_out, bias=cfg.bias)
        self.head_scale = HeadScale(heads) if cfg.head_scale else None
        self.value_head_gate = ValueHeadGate(dim, heads) if cfg.gate_value_heads else None
        self.gates = OutputGates(
            dim, heads, d, input_gate=cfg.gate_values, input_rank=cfg.gate_values_rank,
            input_headwise=cfg.gate_values_headwise, output_gate=cfg.output_gate, output_rank=cfg.output_gate_rank,
            output_headwise=cfg.output_gate_headwise, silu_low_rank=cfg.low_rank_silu_gates,
            swiglu=cfg.swiglu_values) if cfg.gate_values or cfg.output_gate else None
        self.sublayer_dropout = nn.Dropout(cfg.sublayer_dropout) if cfg.sublayer_dropout > 0 else None

        # persistent memory (1907.01470): learned key/value pairs every query can attend to
        self.mem_k = self.mem_v = None
        if cfg.num_mem_kv:
            self.mem_k = nn.Parameter(torch.randn(self.kv_heads, cfg.num_mem_kv, d) * 0.02)
            self.mem_v = nn.Parameter(torch.randn(self.kv_heads, cfg.num_mem_kv, d) * 0.02)

        # query-key normalisation (2010.04245): unit-norm q and k, the logits times a learned per-head
        # scale (initial value qk_norm_scale), or times a given attn_scale, fixed (as upstream's scale)
        self.qk_norm = cfg.qk_norm
        self.qk_scale = nn.Parameter(torch.full((heads, 1, 1), cfg.qk_norm_scale)) \
            if cfg.qk_norm and cfg.scale is None else None

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
        self.to_v_norm = HeadRMSNorm(self.kv_heads, d) if cfg.value_rmsnorm else None
        # attention sink (gpt-oss; 2309.17453): a learned per-head logit in every softmax, with a zero value
        self.sink = nn.Parameter(torch.zeros(heads)) if cfg.head_learned_sink else None
        self.softclamp = cfg.logit_softclamp_value if cfg.softclamp_logits else None  # Gemma 2 (2408.00118)
        self.max_attend_past = None if cross else cfg.max_attend_past  # a window over the sequence's own keys

        self.entmax_alpha_logit = nn.Parameter(torch.zeros(heads)) if cfg.learned_entmax_alpha else None
        if cfg.use_entmax15:
            self.normalizer = "entmax15"
        elif cfg.entmax_alpha is not None or cfg.learned_entmax_alpha:
            self.normalizer = "entmax_bisect"
        elif cfg.sigmoid:
            self.normalizer = "sigmoid"
        else:
            self.normalizer = "softmax"

        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        """The initialisations the variants ask for; the layer stack calls this again after its own
        (GPT-2) initialisation of every linear map, which would otherwise overwrite them."""
        for part in (self.value_head_gate, self.gates):
            if part is not None:
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

    def _fused_qkv(self, x):
        """Self-attention q, k, v from one matrix product over the concatenated weights: x is read
        (and, under autocast, cast) once instead of three times, and backward sums one gradient."""
        w = torch.cat((self.to_q.weight, self.to_k.weight, self.to_v.weight))
        b = torch.cat((self.to_q.bias, self.to_k.bias, self.to_v.bias)) if self.to_q.bias is not None else None
        return F.linear(x, w, b).split((self.to_q.out_features, self.to_k.out_features, self.to_v.out_features), dim=-1)

    def forward(self, x, context=None, *, mask=None, rotary=None, score_mod=None, cache=None, need_weights=False,
                kv=None, kv_rotary=None, positions=None):
        """x (b, n, dim); context (b, m, dim_context) for cross-attention.

        mask: bool (b, 1, 1, m) over the keys (cached ones included); rotary: (cos, sin) at the
        new tokens' positions; score_mod: the position bias (b|1, h, n, m) as a ScoreMod, a
        description materialised only if the chosen kernel needs the tensor; cache: a LayerKV.
        kv (b, m, dim): self-attention whose keys/values come from this sequence instead of x, with
        kv_rotary their (cos, sin) (query-only pooling, Funnel Transformer 2006.03236).
        positions: (queries (b|1, n), keys (b|1, m)) long, what the sliding window counts (None:
        indices, the queries the last n keys).
        Returns (out (b, n, dim), weights (b, h, n, m) or None).
        """
        if kv is not None and (self.cross or cache is not None):
            raise ValueError("kv= is for self-attention without a cache: not with cross-attention or a cache")
        if kv is not None and self.max_attend_past is not None:
            raise ValueError("attn_max_attend_past counts places back along one sequence; kv= (a funnel's "
                             "pooled queries) reads keys from another")
        h, g = self.heads, self.kv_heads
        bias = None  # a dense additive bias of this layer's own (shared-QK's self penalty)
        qkv = self._fused_qkv(x) if not (self.cross or self.shared_qk or kv is not None) else None
        q = _heads(qkv[0] if qkv else self.to_q(x), h)  # (b, h, n, d)
        if self.to_q_norm is not None:
            q = self.to_q_norm(q)
        if self.qk_norm:
            q = F.normalize(q, dim=-1)

        if self.cross and cache is not None and cache.filled:
            k, v = cache.k, cache.v
        else:
            src = context if self.cross else x if kv is None else kv
            # shared-QK (Reformer): the keys are the queries scaled to unit length; queries keep their norm
            # (over kv=, a funnel's pooled queries: the keys are the unpooled sequence's queries)
            if self.shared_qk:
                k = F.normalize(q if kv is None else _heads(self.to_q(kv), h), dim=-1)  # (b, h, m, d)
            else:
                k = _heads(qkv[1] if qkv else self.to_k(src), g)  # (b, g, m, d)
            v = _heads(qkv[2] if qkv else self.to_v(src), g)
            if self.to_k_norm is not None:
                k = self.to_k_norm(k)
            if self.to_v_norm is not None:
                v = self.to_v_norm(v)
            if self.qk_norm and not self.shared_qk:
                k = F.normalize(k, dim=-1)
            if rotary is not None and not self.cross:
                k = apply_rotary(k, *(rotary if kv is None else kv_rotary))
            if cache is not None and self.cross:
                cache.store(k, v)
            elif cache is not None:
                k, v = cache.append(k, v)
        if rotary is not None and not self.cross:
            q = apply_rotary(q, *rotary)

        scale = self.cfg.scale  # None: dim_head ** -0.5
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

        prefix = 0  # always-visible keys prepended: memory key/values, the zero key/value
        if self.mem_k is not None:
            b, prefix = q.shape[0], self.mem_k.shape[1]
            mem_k, mem_v = self.mem_k.to(k.dtype), self.mem_v.to(v.dtype)
            if self.qk_norm or self.shared_qk:
                mem_k = F.normalize(mem_k, dim=-1)
            k = torch.cat((mem_k.expand(b, -1, -1, -1), k), dim=-2)
            v = torch.cat((mem_v.expand(b, -1, -1, -1), v), dim=-2)
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

        out, weights = attend(
            q, k, v, mask=mask, causal=self.causal, bias=bias, score_mod=score_mod, scale=scale,
            dropout=self.cfg.dropout if self.training else 0.0,
            normalizer=self.normalizer, entmax_alpha=self.entmax_alpha, sparse_topk=self.cfg.sparse_topk,
            pre_mix=self.pre_mix, post_mix=self.post_mix, need_weights=need_weights,
            kv_heads=h if self.shared_qk else g, force_backend=self.cfg.backend,
            softclamp=self.softclamp, max_attend_past=self.max_attend_past,
            window_positions=positions if self.max_attend_past is not None else None,
            window_exempt=prefix, sink=self.sink, l2_distance=self.cfg.l2_distance, signed=self.cfg.cog_signed,
        )
        if self.cfg.laser:
            out = out.clamp(min=LASER_EPS).log()
        if self.head_scale is not None:
            out = self.head_scale(out)
        if self.value_head_gate is not None:
            out = self.value_head_gate(x, out)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, h, n, d) -> (b, n, h*d)
        if self.gates is not None:
            out = self.gates(x, out)
        if self.to_out is not None:
            out = self.to_out(out)
        if self.sublayer_dropout is not None:
            out = self.sublayer_dropout(out)
        return out, weights

    def extra_repr(self):
        parts = [f"heads={self.heads}", f"dim_head={self.dim_head}"]
        if self.kv_heads != self.heads:
            parts.append(f"kv_heads={self.kv_heads}")
        if self.causal:
            parts.append("causal")
        if self.cross:
            parts.append("cross")
        return ", ".join(parts)
