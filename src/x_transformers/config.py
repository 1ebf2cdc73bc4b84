"""Keyword API outside, validated frozen dataclasses inside.

The public constructors take the keywords this field knows (``Decoder(dim=512, depth=6,
heads=8, rotary_pos_emb=True, attn_kv_heads=4)``). They are parsed once here: ``attn_*``
keywords go to :class:`AttentionConfig`, ``ff_*`` to :class:`FeedForwardConfig`, the rest to
:class:`LayersConfig`. An unknown keyword raises ``TypeError`` naming the closest valid one; an
impossible value raises ``ValueError`` saying what to change; two keywords that cannot work
together raise :class:`ConfigConflictError` naming both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


from .validate import (_positive_int, _positive_number, _probability, _values, build, check_types,  # noqa: F401
                       field_names, unknown_keyword)


class ConfigConflictError(ValueError):
    """Two keywords that cannot be combined. The message names both and says why."""


ENTMAX_MIN_GAP = 1e-3  # alpha >= 1 + this: entmax_bisect is inaccurate nearer 1 and uniform at 1


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Options of one attention block; the keywords are these names with an ``attn_`` prefix."""

    dim_head: int = 64  # head dimension, free of dim / heads (2002.07028); upstream's default 64
    kv_heads: int | None = None  # grouped / multi-query key-value heads, 2305.13245, 1911.02150
    dropout: float = 0.0
    bias: bool = False  # bias on the q/k/v and output projections (GPT-2 has them)
    scale: float | None = None  # logit scale; default dim_head ** -0.5
    num_mem_kv: int = 0  # persistent memory key/values, 1907.01470
    talking_heads: bool = False  # both pre- and post-softmax head mixing, 2003.02436
    pre_talking_heads: bool = False
    post_talking_heads: bool = False
    use_entmax15: bool = False  # adaptively sparse attention, 1909.00015
    entmax_alpha: float | None = None
    learned_entmax_alpha: bool = False
    sparse_topk: int | None = None  # explicit sparse attention, 1912.11637
    shared_qk: bool = False  # Reformer, 2001.04451
    qk_norm: bool = False  # query-key normalisation, 2010.04245
    qk_norm_scale: float = 10.0
    backend: str = "auto"  # "auto", or force one of attend.BACKENDS
    # score modifications (attention_variants.py)
    softclamp_logits: bool = False  # logit softcapping c * tanh(logits / c), Gemma 2, 2408.00118
    logit_softclamp_value: float = 50.0
    max_attend_past: int | None = None  # sliding window: keys at most this many places back (Longformer 2004.05150)
    head_learned_sink: bool = False  # a learned per-head softmax sink logit (gpt-oss, 2309.17453)
    add_zero_kv: bool = False  # a zero key/value every query sees (PyTorch's add_zero_attn)
    # logits and values (attend.py, attention.py)
    sigmoid: bool = False  # sigmoid attention, weights sigmoid(logits), unnormalised (2409.04431)
    cog_signed: bool = False  # signed weights: softmax(|logits|) * sign(logits) (cog attention, 2411.07176)
    l2_distance: bool = False  # logits -|q - k|^2 * scale (L2 attention, 2006.04710)
    qk_rmsnorm: bool = False  # RMSNorm of q and k per head, a learned gain per channel (2302.05442)
    k_rmsnorm: bool = False  # RMSNorm of k only
    value_rmsnorm: bool = False  # RMSNorm of v per head
    laser: bool = False  # attention in exp(v) space, log of the output (LASER, 2411.03493)
    laser_softclamp_value: float = 15.0  # v softcapped at this before exp
    # gates and scales around the output (gating.py)
    gate_values: bool = False  # input gate on the heads' output from x (gated attention, 2505.06708)
    gate_values_rank: int | None = None  # low-rank input gate; None: a linear map
    gate_values_headwise: bool = False  # one input-gate logit per head
    output_gate: bool = False  # output gate from the heads' output itself (hybrid gated attention)
    output_gate_rank: int | None = None
    output_gate_headwise: bool = False
    low_rank_silu_gates: bool = True  # SiLU inside the low-rank gates
    swiglu_values: bool = False  # the gates' activation SiLU instead of sigmoid
    gate_value_heads: bool = False  # per-head sigmoid gate, open at init (2306.12929)
    head_scale: bool = False  # NormFormer's learned per-head scale, 2110.09456
    # "belief attention" (openreview Ard2QzPAUK): each query's attention output minus its component
    # along the query's own value (over all heads' channels / per head), both concatenated if both
    orthog_projected_values: bool = False
    orthog_projected_values_per_head: bool = False
    on_attn: bool = False  # attention on attention: a GLU output projection, 1908.06954
    project_out: bool | None = None  # False: no output projection (needs heads * dim_head == dim_out)
    dim_out: int | None = None  # output width, default dim (in a stack it must be dim)
    zero_init_output: bool = False  # output projection initialised at zero
    output_proj_depth: int | None = None  # output projection init N(0, 1 / (2 fan_in depth)), OLMo
    sublayer_dropout: float = 0.0  # dropout on the block's output
    # widths and QK-norm's parts (attention.py)
    value_dim_head: int | None = None  # value (and output) channels per head; default dim_head
    qk_norm_groups: int = 1  # QK-norm: unit length per group of channels of a head
    qk_norm_dim_scale: bool = False  # QK-norm: learned per-channel q/k gains (init dim_head ** 0.25), fixed scale
    rotate_num_heads: int | None = None  # rotary on the last n heads only (default every head)
    # a per-query curve over distances from a learned bank (rel_proj.py)
    use_rel_proj_pos_bias: bool = False
    rel_proj_num_distance_basis: int = 16
    rel_proj_max_dist: int = 1024
    # multi-latent attention (DeepSeek-V2, 2405.04434): q and / or k, v from a low-rank latent of x
    use_latent_q: bool = False
    dim_latent_q: int | None = None
    use_latent_kv: bool = False
    dim_latent_kv: int | None = None
    latent_rope_subheads: int | None = None  # the last n key heads straight from x, rotated (decoupled rope)
    # how scores become weights (score_variants.py)
    hard: bool = False  # one-hot argmax weights, softmax's gradient (straight-through)
    gumbel_softmax: bool = False  # Gumbel-softmax weights (1611.01144); noise-free in eval mode
    gumbel_softmax_temp: float = 1.0
    gumbel_softmax_hard: bool = True  # one-hot samples, straight-through gradient
    sparse_topk_straight_through: bool = False  # top-k weights forward, full softmax's gradient (2505.22074)
    selective: bool = False  # selective attention: tokens mask themselves for later queries (2410.02703)
    inverted_attention: bool = False  # cross-attention: softmax over queries, L1-normalised over keys
    pre_scale_post_talking_heads: bool = False  # a head mix of the logits scales the weights
    custom_attn_fn: Any = None  # a callable: masked scores (b, h, n, m) -> weights, in place of softmax
    # positions from the content (data_positions.py)
    use_cope: bool = False  # contextual position encoding (CoPE, 2405.18719): causal self-attention
    cope_max_pos: int = 16
    cope_soft_onehot_pos: bool = False
    cope_talking_heads: bool = False
    data_dependent_alibi: bool = False  # the forgetting transformer's bias (2503.02130)
    data_dependent_alibi_per_row: bool = False
    data_dependent_alibi_per_row_dim_head: int = 8
    data_dependent_alibi_kwargs: dict = field(default_factory=dict)  # bias_init, post_log_scale
    # beside the heads' output (hybrid.py)
    hybrid_module: Any = None  # an nn.Module run beside attention, mixed in (Hymba, 2411.13676)
    hybrid_mask_kwarg: str | None = None
    hybrid_fold_axial_dim: int | None = None
    hybrid_learned_mix: bool = False
    orthog_projected_values: bool = False  # output orthogonal to the token's own values (belief attention)
    orthog_projected_values_per_head: bool = False

    def __post_init__(self):
        check_types(AttentionConfig, _values(self), "attn_")
        _positive_int("attn_dim_head", self.dim_head)
        _positive_int("attn_kv_heads", self.kv_heads, allow_none=True)
        _positive_int("attn_num_mem_kv", self.num_mem_kv, allow_zero=True)
        _positive_int("attn_sparse_topk", self.sparse_topk, allow_none=True)
        _probability("attn_dropout", self.dropout)
        if self.entmax_alpha is not None and not (1.0 + ENTMAX_MIN_GAP <= self.entmax_alpha <= 2.0):
            raise ValueError(f"attn_entmax_alpha must lie in [1 + {ENTMAX_MIN_GAP}, 2] (closer to 1 the bisection "
                             f"loses precision: leave it unset for softmax), got {self.entmax_alpha!r}")
        _positive_number("attn_qk_norm_scale", self.qk_norm_scale)
        if self.scale is not None:
            _positive_number("attn_scale", self.scale)
        _positive_number("attn_logit_softclamp_value", self.logit_softclamp_value)
        _positive_int("attn_max_attend_past", self.max_attend_past, allow_none=True, allow_zero=True)
        for name in ("gate_values_rank", "output_gate_rank", "dim_out", "output_proj_depth"):
            _positive_int(f"attn_{name}", getattr(self, name), allow_none=True)
        _probability("attn_sublayer_dropout", self.sublayer_dropout)
        _positive_number("attn_laser_softclamp_value", self.laser_softclamp_value)
        _positive_int("attn_value_dim_head", self.value_dim_head, allow_none=True)
        _positive_int("attn_qk_norm_groups", self.qk_norm_groups)
        _positive_int("attn_rotate_num_heads", self.rotate_num_heads, allow_none=True)
        _positive_number("attn_gumbel_softmax_temp", self.gumbel_softmax_temp)
        for part in ("q", "kv"):
            _positive_int(f"attn_dim_latent_{part}", getattr(self, f"dim_latent_{part}"), allow_none=True)
            if getattr(self, f"use_latent_{part}") and getattr(self, f"dim_latent_{part}") is None:
                raise ValueError(f"attn_use_latent_{part} needs attn_dim_latent_{part}, the latent's width")
        _positive_int("attn_latent_rope_subheads", self.latent_rope_subheads, allow_none=True)
        _positive_int("attn_rel_proj_num_distance_basis", self.rel_proj_num_distance_basis)
        _positive_int("attn_rel_proj_max_dist", self.rel_proj_max_dist)
        if self.sparse_topk_straight_through and self.sparse_topk is None:
            raise ValueError("attn_sparse_topk_straight_through configures attn_sparse_topk, which is not set; set "
                             "attn_sparse_topk as well, or drop attn_sparse_topk_straight_through")
        if self.qk_norm_groups > 1 and (self.dim_head % self.qk_norm_groups or self.dim_head // self.qk_norm_groups < 3):
            raise ValueError(f"attn_qk_norm_groups ({self.qk_norm_groups}) must divide attn_dim_head ({self.dim_head}) "
                             f"into groups of at least 3 channels (a unit vector of 2 or fewer channels carries "
                             f"almost nothing; upstream refuses it too)")
        for gate in ("gate_values", "output_gate"):
            if getattr(self, f"{gate}_headwise") and getattr(self, f"{gate}_rank") is not None:
                raise ValueError(f"attn_{gate}_rank and attn_{gate}_headwise: a headwise gate projects to one "
                                 f"logit per head directly; drop attn_{gate}_rank")
        if self.swiglu_values and not (self.gate_values or self.output_gate):
            raise ValueError("attn_swiglu_values sets the activation of attn_gate_values / attn_output_gate, both "
                             "off; switch one on, or drop attn_swiglu_values")
        if not self.low_rank_silu_gates and self.gate_values_rank is None and self.output_gate_rank is None:
            raise ValueError("attn_low_rank_silu_gates=False configures the low-rank gates (attn_gate_values_rank "
                             "/ attn_output_gate_rank), none of which is set; drop it")
        from .data_positions import check_config  # the content features' checks live beside them

        check_config(self, _positive_int, _positive_number)
        # combinations of these keywords: conflicts.py

    @property
    def v_dim_head(self) -> int:
        """Value channels per head."""
        return self.value_dim_head or self.dim_head

    @property
    def pre_mix(self) -> bool:
        return self.talking_heads or self.pre_talking_heads

    @property
    def post_mix(self) -> bool:
        return self.talking_heads or self.post_talking_heads

    @property
    def needs_scores(self) -> bool:
        """Features that need the full score matrix, so only the explicit backend computes them."""
        return any(getattr(self, name) not in (None, False) for name in SCORE_FEATURES)


# AttentionConfig fields that need the full score matrix (the one list: needs_scores and the
# forced-backend conflicts in conflicts.py read it)
SCORE_FEATURES = ("talking_heads", "pre_talking_heads", "post_talking_heads", "use_entmax15", "entmax_alpha",
                  "learned_entmax_alpha", "sparse_topk", "sigmoid", "cog_signed", "l2_distance", "hard",
                  "gumbel_softmax", "selective", "inverted_attention", "pre_scale_post_talking_heads", "use_cope",
                  "custom_attn_fn")


@dataclass(frozen=True, kw_only=True)
class FeedForwardConfig:
    """Options of one feed-forward block; the keywords are these names with an ``ff_`` prefix."""

    mult: float = 4
    inner_dim: int | None = None  # overrides mult (Llama sizes it freely)
    glu: bool = False  # GLU variants, 2002.05202
    activation: str = "gelu"
    no_bias: bool = False
    dropout: float = 0.0
    chunks: int = 1  # Reformer's chunked feed-forward
    dim_out: int | None = None  # output width (a stack's residual needs dim)
    solu: bool = False  # softmax linear unit, LayerNorm(x * softmax(x)) (Anthropic 2022)
    custom_activation: Any = None  # an nn.Module (copied per block) or callable replacing the activation
    post_act_ln: bool = False  # LayerNorm after the activation (NormFormer, 2110.09456)
    glu_mult_bias: bool = False  # a learned per-channel gain on the GLU output, initialised to 1
    sublayer_dropout: float = 0.0  # dropout on the block's output
    zero_init_output: bool = False  # output projection initialised to zero
    output_proj_depth: int | None = None  # OLMo's depth-scaled output init, std (2 * inner * depth) ** -0.5
    softclamp_value: float | None = None  # soft clamp of the first projection's output, before the activation
    glu_softclamp: bool = False  # SiTU-GLU (2607.24653): soft-clamped gate and up factors
    glu_gate_softclamp_value: float = 4.0
    glu_up_softclamp_value: float = 25.0

    def __post_init__(self):
        from .feedforward import ACTIVATIONS, CLAMPED_GATES  # registries live beside their users

        check_types(FeedForwardConfig, _values(self), "ff_")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ff_activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        _positive_number("ff_mult", self.mult)
        _positive_int("ff_inner_dim", self.inner_dim, allow_none=True)
        _positive_int("ff_chunks", self.chunks)
        _probability("ff_dropout", self.dropout)
        _probability("ff_sublayer_dropout", self.sublayer_dropout)
        _positive_int("ff_dim_out", self.dim_out, allow_none=True)
        _positive_int("ff_output_proj_depth", self.output_proj_depth, allow_none=True)
        if self.softclamp_value is not None:
            _positive_number("ff_softclamp_value", self.softclamp_value)
        _positive_number("ff_glu_gate_softclamp_value", self.glu_gate_softclamp_value)
        _positive_number("ff_glu_up_softclamp_value", self.glu_up_softclamp_value)
        if self.custom_activation is not None and not callable(self.custom_activation):
            raise ValueError(f"ff_custom_activation must be an nn.Module or a callable, got {self.custom_activation!r}")
        if self.glu_mult_bias and not self.glu:
            raise ValueError("ff_glu_mult_bias scales the GLU's output; set ff_glu=True as well")
        if self.glu_softclamp_on:
            which = ("ff_glu_softclamp" if self.glu_softclamp else "ff_glu_gate_softclamp_value" if
                     self.glu_gate_softclamp_value != 4.0 else "ff_glu_up_softclamp_value")
            if not self.glu:
                raise ValueError(f"{which} soft-clamps the GLU's gate and up factors; set ff_glu=True as well")
            if self.solu or self.custom_activation is not None or self.activation not in CLAMPED_GATES:
                raise ValueError(f"{which} needs a GELU or swish gate (ff_activation one of {sorted(CLAMPED_GATES)}, "
                                 f"without ff_solu or ff_custom_activation)")

    @property
    def glu_softclamp_on(self) -> bool:
        """SiTU-GLU's clamps: ff_glu_softclamp, or either clamp value given (it asks for the clamp)."""
        return self.glu_softclamp or self.glu_gate_softclamp_value != 4.0 or self.glu_up_softclamp_value != 25.0


@dataclass(frozen=True, kw_only=True)
class LayersConfig:
    """Options of a stack of layers (``Encoder`` / ``Decoder`` / ``CrossAttender``)."""

    dim: int
    depth: int
    heads: int = 8
    causal: bool = False
    cross_attend: bool = False
    only_cross: bool = False
    dim_context: int | None = None
    # norms and residuals
    pre_norm: bool = True
    pre_norm_has_final_norm: bool = True  # a pre-norm stack ends with a norm (upstream's switch to drop it)
    sandwich_norm: bool = False  # 2105.13290
    use_scalenorm: bool = False  # 1910.05895
    use_rmsnorm: bool = False  # 1910.07467
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm's additive bias (upstream's LayerNorm has none; GPT-2's has)
    use_simple_rmsnorm: bool = False  # RMSNorm without a learned gain (x / rms(x))
    use_rezero: bool = False  # 2003.04887
    use_dynamic_tanh: bool = False  # DyT, gamma * tanh(alpha * x) + beta in place of every norm, 2503.10622
    dynamic_tanh_init_alpha: float = 1.0
    use_derf: bool = False  # Derf, gamma * erf(alpha * x + s) + beta in place of every norm, 2512.10938
    pre_and_post_norm: bool = False  # a norm before each branch and after each sum; no final norm
    # norms / branch gates conditioned on a per-sample vector (DiT's adaLN / adaLN-Zero, 2212.09748; adaptive.py)
    use_adaptive_layernorm: bool = False
    use_adaptive_rmsnorm: bool = False
    use_adaptive_layerscale: bool = False
    dim_condition: int | None = None  # the condition's width (default dim)
    adaptive_condition_mlp: bool = False  # the condition first goes through SiLU(Linear(c, c * expansion))
    adaptive_condition_mlp_expansion: int = 4
    use_layerscale: bool = False  # LayerScale, a per-channel gain on each branch, CaiT 2103.17239
    layerscale_init_value: float = 0.0
    softclamp_output: bool = False  # value * tanh(x / value) before the final norm (Gemma 2)
    softclamp_output_value: float = 30.0
    layer_dropout: float = 0.0
    cross_attn_tokens_dropout: float = 0.0  # training drops this fraction of the context's tokens
    # residual paths
    gate_residual: bool = False  # a GRU cell instead of the sum, GTrXL 1910.06764
    scale_residual: bool | float = False  # True: a learned per-channel skip gain; a number: a branch scale
    scale_residual_constant: float = 1.0  # the skip path times this constant
    depth_scale_residual: bool | float = False  # True: OLMo's depth-scaled output init; a number: a branch scale
    zero_init_branch_output: bool = False  # every branch's output projection starts at zero
    reinject_input: bool = False  # a projection of the stack's input added to every branch input, DEQ 1909.01377
    learned_reinject_input_gate: bool = False  # ... gated per token by sigmoid(w . x)
    num_residual_streams: int = 1  # hyper-connections, 2409.19606 (1: the plain residual)
    hyper_conn_sinkhorn_iters: int = 5  # Sinkhorn iterations of the stream mixing (mHC, 2512.24880)
    orthog_residual: bool = False  # only the update's part orthogonal to the stream is added, 2505.11881
    gated_multi_residual: bool = False  # s streams, gated reads and writes, no mixing (hyper.py; Qwen's gated residual)
    mv_split_residual: bool = False  # the update's sequence mean and variation get separate gains, 2605.06169
    residual_fn_kwargs: dict | None = None  # mv_split_residual's init_alpha, init_beta, learned
    integrate_layers: bool = False  # LIMe 2502.09245: each branch reads a learned mix of all earlier block inputs
    layer_integrate_use_softmax: bool = True  # LIMe's mixing weights: softmax over layers (False: ReLU)
    qkv_receive_diff_residuals: bool = False  # self-attention's q, k, v read three different mixtures (hyper.py)
    attn_aggregated_residuals: bool = False  # each branch attends over the earlier blocks' inputs (2603.15031)
    attn_aggregated_residual_kwargs: dict | None = None  # its lora_rank (64), lora_activation (None)
    residual_attn: bool = False  # each self-attention adds the previous one's pre-softmax scores, RealFormer 2012.11747
    cross_residual_attn: bool = False  # ... and each cross-attention the previous cross-attention's
    # layer layout
    macaron: bool = False  # 1906.02762
    sandwich_coef: int | None = None  # 1911.03864
    par_ratio: int | None = None  # attention in the bottom two thirds, 1 in par_ratio blocks (1911.03864's PAR)
    unet_skips: bool = False  # U-Net skips: each upper-half layer reads its mirror's input (U-ViT, 2209.12152)
    custom_layers: tuple[str, ...] | None = None
    top_attn_to_ff: int = 0  # the top n layers' self-attention becomes a feed-forward, 2005.13895
    reversible: bool = False  # two-stream reversible coupling, recomputed in backward, 2001.04451
    # value residual (ResFormer, 2410.17897): later attentions' values mixed with the first one's
    add_value_residual: bool = False
    learned_value_residual_mix: bool = True  # the mix per token and head, sigmoid(w . x); False: 1/2
    only_attn: bool = False  # no feed-forward blocks
    shift_tokens: Any = 0  # k: branch inputs get channel groups shifted by 0..k (causal) or -k..k tokens; or one k per block
    weight_tie_layers: bool = False  # one layer's parameters, run depth times (ALBERT, 1909.11942)
    layers_execute_order: tuple[int, ...] | None = None  # which built blocks run, in which order (repeats allowed)
    # positions
    rotary_pos_emb: bool = False  # 2104.09864
    rotary_emb_dim: int | None = None  # rotated channels per head; default half the head dimension, as upstream
    rotary_base: float = 10000.0
    rotary_interpolation_factor: float = 1.0  # position interpolation, positions / factor, 2306.15595
    rotary_base_rescale_factor: float = 1.0  # NTK-aware base scaling, base * factor ** (r / (r - 2))
    rotary_xpos: bool = False  # xPos, rotary with a decaying per-channel scale (causal only), 2212.10554
    rotary_xpos_scale_base: float = 512.0
    polar_pos_emb: bool = False  # PoPE: magnitudes from content, angles from position, 2509.10534
    polar_bias_uniform_init: bool = False  # PoPE's learned key phase starts uniform in [-2 pi, 0] (else 0)
    alibi_pos_bias: bool = False  # 2108.12409
    alibi_num_heads: int | None = None
    rel_pos_kwargs: dict | None = None  # upstream's extra position-bias options: ALiBi's own slopes, dict(slopes=[...])
    rel_pos_bias: bool = False  # T5, 1910.10683
    rel_pos_num_buckets: int = 32
    rel_pos_max_distance: int = 128
    dynamic_pos_bias: bool = False  # an MLP of the relative distance, per head (SwinV2, 2111.09883)
    dynamic_pos_bias_log_distance: bool = False
    dynamic_pos_bias_mlp_depth: int = 2
    dynamic_pos_bias_norm: bool = False
    tupe: bool = False  # untied positional correlation, TUPE, 2006.15595
    tupe_max_seq_len: int | None = None  # size of TUPE's learned position table (required with tupe)
    tupe_untie_cls: bool = False  # TUPE's untied [CLS]: position 0 gets learned scores, not positional ones
    # whether the wrapper's absolute positions are dropped; default: with rotary or T5 bias (or TUPE),
    # as upstream (ALiBi keeps them there, so it does here)
    disable_abs_pos_emb: bool | None = None

    def __post_init__(self):
        check_types(LayersConfig, _values(self))
        _positive_int("dim", self.dim)
        _positive_int("depth", self.depth)
        _positive_int("heads", self.heads)
        _positive_int("dim_context", self.dim_context, allow_none=True)
        _positive_int("dim_condition", self.dim_condition, allow_none=True)
        from .residual_updates import check_residual_fn_kwargs, check_rel_pos_kwargs  # beside their users
        check_residual_fn_kwargs(self)
        check_rel_pos_kwargs(self)
        _positive_int("adaptive_condition_mlp_expansion", self.adaptive_condition_mlp_expansion)
        _probability("layer_dropout", self.layer_dropout)
        _probability("cross_attn_tokens_dropout", self.cross_attn_tokens_dropout)
        _positive_number("norm_eps", self.norm_eps)
        _positive_number("rotary_base", self.rotary_base)
        _positive_number("rotary_base_rescale_factor", self.rotary_base_rescale_factor)
        _positive_number("rotary_xpos_scale_base", self.rotary_xpos_scale_base)
        _positive_number("rotary_interpolation_factor", self.rotary_interpolation_factor)
        if self.rotary_interpolation_factor < 1.0:
            raise ValueError(f"rotary_interpolation_factor must be >= 1 (it divides positions to fit a longer context), "
                             f"got {self.rotary_interpolation_factor!r}")
        _positive_int("dynamic_pos_bias_mlp_depth", self.dynamic_pos_bias_mlp_depth)
        _positive_int("num_residual_streams", self.num_residual_streams)
        _positive_int("hyper_conn_sinkhorn_iters", self.hyper_conn_sinkhorn_iters)
        _positive_number("dynamic_tanh_init_alpha", self.dynamic_tanh_init_alpha)
        _positive_number("softclamp_output_value", self.softclamp_output_value)
        _positive_number("scale_residual_constant", self.scale_residual_constant)
        for name in ("scale_residual", "depth_scale_residual"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                _positive_number(name, value)
        if not (isinstance(self.layerscale_init_value, (int, float)) and math.isfinite(self.layerscale_init_value)):
            raise ValueError(f"layerscale_init_value must be a finite number, got {self.layerscale_init_value!r}")
        if self.layers_execute_order is not None:
            order = self.layers_execute_order
            if isinstance(order, str) or not order or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in order):
                raise ValueError(f"layers_execute_order must be a non-empty sequence of block indices >= 0, got {order!r}")
        if self.custom_layers is not None:
            if isinstance(self.custom_layers, str) or not all(c in ("a", "c", "f") for c in self.custom_layers):
                raise ValueError(f"custom_layers must be a sequence of 'a', 'c', 'f', got {self.custom_layers!r}")
        if self.sandwich_coef is not None:
            _positive_int("sandwich_coef", self.sandwich_coef)
            if self.sandwich_coef > self.depth:
                raise ValueError(f"sandwich_coef ({self.sandwich_coef}) must be at most depth ({self.depth})")
        _positive_int("top_attn_to_ff", self.top_attn_to_ff, allow_zero=True)
        _positive_int("par_ratio", self.par_ratio, allow_none=True)
        amounts = self.shift_tokens if isinstance(self.shift_tokens, tuple) else (self.shift_tokens,)
        for k in amounts:
            _positive_int("shift_tokens", k, allow_zero=True)
        if self.top_attn_to_ff > self.depth:
            raise ValueError(f"top_attn_to_ff ({self.top_attn_to_ff}) must be at most depth ({self.depth})")
        if self.rotary_emb_dim is not None:
            _positive_int("rotary_emb_dim", self.rotary_emb_dim)
            if self.rotary_emb_dim % 2:
                raise ValueError(f"rotary_emb_dim must be even, got {self.rotary_emb_dim}")
        if self.alibi_num_heads is not None:
            _positive_int("alibi_num_heads", self.alibi_num_heads)
            if self.alibi_num_heads > self.heads:
                raise ValueError(f"alibi_num_heads ({self.alibi_num_heads}) must be at most heads ({self.heads})")
        _positive_int("rel_pos_num_buckets", self.rel_pos_num_buckets)
        _positive_int("rel_pos_max_distance", self.rel_pos_max_distance)
        if self.tupe:
            if self.tupe_max_seq_len is None:
                raise ValueError("tupe=True needs tupe_max_seq_len, the length of its learned position table")
            _positive_int("tupe_max_seq_len", self.tupe_max_seq_len)
        if not self.learned_value_residual_mix and not self.add_value_residual:
            raise ValueError("learned_value_residual_mix=False configures add_value_residual, which is off; set "
                             "add_value_residual=True as well, or drop learned_value_residual_mix")
        # combinations of these keywords (and sub-keywords given without their feature): conflicts.py
        # and check_given below, both run on the keywords as the user gave them

    @property
    def has_relative_positions(self) -> bool:
        return self.rotary_pos_emb or self.alibi_pos_bias or self.rel_pos_bias or self.dynamic_pos_bias \
            or self.polar_pos_emb

    @property
    def has_positions(self) -> bool:
        """The stack itself carries position (relative schemes or TUPE)."""
        return self.has_relative_positions or self.tupe

    @property
    def drops_abs_pos_emb(self) -> bool:
        """Whether a wrapper over this stack leaves out learned absolute positions: as upstream, by
        default with rotary or T5 bias (not ALiBi); with TUPE, which replaces them."""
        if self.disable_abs_pos_emb is not None:
            return self.disable_abs_pos_emb
        return self.rotary_pos_emb or self.rel_pos_bias or self.tupe or self.polar_pos_emb

    def rotary_dim(self, dim_head: int) -> int:
        """Rotated channels per head: rotary_emb_dim, else half the head dimension (upstream's
        default), rounded down to an even count."""
        if self.rotary_emb_dim is not None:
            return self.rotary_emb_dim
        return max(2, dim_head // 2 // 2 * 2)



# sub-keyword -> the feature keyword it configures; given without it (even at its default value),
# the sub-keyword would be silently ignored
REQUIRES = {
    "rotary_emb_dim": "rotary_pos_emb", "rotary_base": "rotary_pos_emb",
    "alibi_num_heads": "alibi_pos_bias",
    "rel_pos_num_buckets": "rel_pos_bias", "rel_pos_max_distance": "rel_pos_bias",
    "tupe_max_seq_len": "tupe", "tupe_untie_cls": "tupe",
    "attn_logit_softclamp_value": "attn_softclamp_logits",
    "attn_laser_softclamp_value": "attn_laser",
    "attn_dim_latent_q": "attn_use_latent_q", "attn_dim_latent_kv": "attn_use_latent_kv",
    "attn_latent_rope_subheads": "attn_use_latent_kv",
    "attn_rel_proj_num_distance_basis": "attn_use_rel_proj_pos_bias", "attn_rel_proj_max_dist": "attn_use_rel_proj_pos_bias",
    "attn_cope_max_pos": "attn_use_cope", "attn_cope_soft_onehot_pos": "attn_use_cope",
    "attn_cope_talking_heads": "attn_use_cope", "attn_data_dependent_alibi_per_row": "attn_data_dependent_alibi",
    "attn_data_dependent_alibi_per_row_dim_head": "attn_data_dependent_alibi_per_row",
    "attn_data_dependent_alibi_kwargs": "attn_data_dependent_alibi",
    "attn_qk_norm_groups": "attn_qk_norm", "attn_rotate_num_heads": "rotary_pos_emb", "attn_qk_norm_dim_scale": "attn_qk_norm",
    "attn_qk_norm_scale": "attn_qk_norm",
    "attn_gumbel_softmax_temp": "attn_gumbel_softmax", "attn_gumbel_softmax_hard": "attn_gumbel_softmax",
    "attn_gate_values_rank": "attn_gate_values", "attn_gate_values_headwise": "attn_gate_values",
    "attn_output_gate_rank": "attn_output_gate", "attn_output_gate_headwise": "attn_output_gate",
    "dynamic_tanh_init_alpha": "use_dynamic_tanh", "layerscale_init_value": "use_layerscale",
    "softclamp_output_value": "softclamp_output", "learned_reinject_input_gate": "reinject_input",
    "rotary_interpolation_factor": "rotary_pos_emb", "rotary_base_rescale_factor": "rotary_pos_emb",
    "dynamic_pos_bias_log_distance": "dynamic_pos_bias", "dynamic_pos_bias_mlp_depth": "dynamic_pos_bias",
    "dynamic_pos_bias_norm": "dynamic_pos_bias", "rotary_xpos_scale_base": "rotary_xpos",
    "adaptive_condition_mlp_expansion": "adaptive_condition_mlp", "polar_bias_uniform_init": "polar_pos_emb",
    "layer_integrate_use_softmax": "integrate_layers", "attn_aggregated_residual_kwargs": "attn_aggregated_residuals",
}
ADAPTIVE = ("use_adaptive_layernorm", "use_adaptive_rmsnorm", "use_adaptive_layerscale")


def check_given(kwargs: dict[str, Any]):
    """Refuse a sub-keyword given without its feature switched on (``rotary_base`` without ``rotary_pos_emb``)."""
    for sub, feature in REQUIRES.items():
        if sub in kwargs and kwargs.get(feature) is not True:
            raise ValueError(f"{sub} configures {feature}, which is off; set {feature}=True as well, or drop {sub}")
    for sub in ("dim_condition", "adaptive_condition_mlp"):  # they configure any of three features
        if kwargs.get(sub) not in (None, False) and not any(kwargs.get(f) is True for f in ADAPTIVE):
            raise ValueError(f"{sub} configures the condition of {' / '.join(ADAPTIVE)}, none of which is on; "
                             f"switch one on, or drop {sub}")


def _kind(where: str, kwargs: dict) -> str:
    return "cross" if where == "CrossAttender" else "decoder" if kwargs.get("causal") else "encoder"


def split_layer_kwargs(kwargs: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    """Route keywords: upstream names resolved to ours (aliases.py), then exact LayersConfig
    names, then ``attn_`` and ``ff_`` prefixes.

    Before any module is built it checks the keywords as given: their types, sub-keywords
    without their feature, and every declared conflict (conflicts.py) for this kind of stack.
    """
    from . import aliases, conflicts  # both import this module

    kwargs = aliases.resolve(kwargs, "layers", where)
    if kwargs.get("rotary_xpos") is True:  # xPos is rotary with a scale: it switches rotary on (as upstream)
        kwargs["rotary_pos_emb"] = True
    layer_names = field_names(LayersConfig)
    attn_names, ff_names = field_names(AttentionConfig), field_names(FeedForwardConfig)
    layers, attn, ff = {}, {}, {}
    for key, value in kwargs.items():
        if key in layer_names:
            layers[key] = value
        elif key.startswith("attn_") and key[5:] in attn_names:
            attn[key[5:]] = value
        elif key.startswith("ff_") and key[3:] in ff_names:
            ff[key[3:]] = value
        else:
            valid = list(layer_names) + ["attn_" + n for n in attn_names] + ["ff_" + n for n in ff_names]
            raise unknown_keyword(key, valid, where)
    check_types(LayersConfig, layers)
    check_types(AttentionConfig, attn, "attn_")
    check_types(FeedForwardConfig, ff, "ff_")
    check_given(kwargs)
    conflicts.check(_kind(where, kwargs), kwargs)
    return layers, attn, ff


# TransformerWrapper's own keywords live in wrapper_config.py; importable from here as before
from .wrapper_config import WRAPPER_KEYS, WrapperConfig  # noqa: E402,F401
