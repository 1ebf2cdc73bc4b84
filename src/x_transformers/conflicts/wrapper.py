"""The conflict table's entries for TransformerWrapper, XTransformer and pooling keywords."""

from __future__ import annotations

from . import *  # noqa: F401,F403 - the machinery: declare, the predicates' helpers, the kinds

# TransformerWrapper keywords (settings: its own keywords, the stack's resolved LayersConfig
# fields and dim, and a funnel's depths / upsample)
declare("scaled_sinu_pos_emb", "sinusoidal_pos_emb",
        when=lambda s: on(s, "scaled_sinu_pos_emb") and on(s, "sinusoidal_pos_emb"),
        reason="choose one absolute scheme", example=dict(scaled_sinu_pos_emb=True, sinusoidal_pos_emb=True),
        kinds=WRAPPER)
# (TUPE with sinusoidal_pos_emb / scaled_sinu_pos_emb: the user asked for positions in the tokens as
# well; they are added, and TUPE's untied position term stays: wrappers.py)
# (tupe_untie_cls with memory tokens: they share position 0 with the [CLS], the first real token: wrappers.py)
declare("tie_embedding", "emb_dim", when=lambda s: on(s, "tie_embedding") and on(s, "emb_dim")
        and s.get("emb_dim") != s.get("dim"),
        reason="tied logits need emb_dim == dim", example=dict(tie_embedding=True, emb_dim=16), kinds=WRAPPER)
# (memory tokens on a funnel are never pooled: funnel.py)
for _k in ("tie_embedding", "logits_dim", "logits_scale"):
    declare("return_only_embed", _k, when=lambda s, k=_k: on(s, "return_only_embed") and k in s,
            reason="without an output head there are no logits to tie, size or scale",
            example={"return_only_embed": True, _k: {"tie_embedding": True, "logits_dim": 8, "logits_scale": 0.5}[_k]},
            kinds=WRAPPER)

# pooling of the final hidden states and the output head's variants (heads.py)
POOLING = ("use_cls_token", "average_pool_embed", "attn_pool")
for _i, _a in enumerate(POOLING):
    for _b in POOLING[_i + 1:]:
        declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b),
                reason="choose one pooling of the final hidden states", example={_a: True, _b: True}, kinds=WRAPPER)
declare("num_output_heads", "tie_embedding", when=lambda s: s.get("num_output_heads", 1) > 1 and on(s, "tie_embedding"),
        reason="a tied head is the one token embedding; untie it for several heads",
        example=dict(num_output_heads=2, tie_embedding=True), kinds=WRAPPER)
declare("num_output_heads", "mixture_of_softmax",
        when=lambda s: s.get("num_output_heads", 1) > 1 and on(s, "mixture_of_softmax"),
        reason="the mixture of softmaxes has one head", example=dict(num_output_heads=2, mixture_of_softmax=True),
        kinds=WRAPPER)
for _k in ("num_output_heads", "mixture_of_softmax", "sigsoftmax_logits", "squeeze_out_last_dim"):
    declare("return_only_embed", _k, when=lambda s, k=_k: on(s, "return_only_embed") and on(s, k)
            and not (k == "num_output_heads" and s[k] == 1),
            reason="without an output head there are no logits to shape",
            example={"return_only_embed": True, _k: 2 if _k == "num_output_heads" else True}, kinds=WRAPPER)

# AlphaFold2's recycling (recurrence.py)
for _k, _v in (("max_mem_len", 4), ("memory_tokens_interspersed_every", 2), ("depths", (1,))):
    declare("recycling", _k, when=lambda s, k=_k: on(s, "recycling") and on(s, k),
            reason="recycling reruns the stack on its own output: one plain sequence in, the same out (no "
                   "segment memories, no interspersed memory columns, no funnel pooling)",
            example={"recycling": True, _k: _v, **({"num_memory_tokens": 1} if _k.startswith("memory") else {})},
            kinds=WRAPPER)

# the looped LM (looped.py): the stack reruns on its own output, an exit gate and a head after every step
declare("looped", "pre_and_post_norm=False", when=lambda s: on(s, "looped") and not on(s, "pre_and_post_norm"),
        reason="each loop step feeds the next its output, which upstream requires normalised: build the stack "
               "with pre_and_post_norm=True", example=dict(looped=True), kinds=WRAPPER)
declare("looped", "recycling", when=lambda s: on(s, "looped") and on(s, "recycling"),
        reason="both rerun the stack on its own output; choose one (upstream: at most one of them)",
        example=dict(looped=True, pre_and_post_norm=True, recycling=True), kinds=WRAPPER)
for _k, _v in (("max_mem_len", 4), ("memory_tokens_interspersed_every", 2), ("depths", (1,)),
               ("use_cls_token", True), ("average_pool_embed", True), ("attn_pool", True),
               ("return_only_embed", True)):
    declare("looped", _k, when=lambda s, k=_k: on(s, "looped") and on(s, k),
            reason="each loop step reads one plain sequence and predicts the next token from every position "
                   "(no segment memories, interspersed memory columns, funnel pooling or pooled outputs)",
            example={"looped": True, "pre_and_post_norm": True, _k: _v,
                     **({"num_memory_tokens": 1} if _k.startswith("memory") else {})}, kinds=WRAPPER)

# memory tokens interspersed in the sequence (upstream: decoders only)
declare("memory_tokens_interspersed_every", "num_memory_tokens=0",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and not on(s, "num_memory_tokens"),
        reason="there are no memory tokens to intersperse; set num_memory_tokens",
        example=dict(memory_tokens_interspersed_every=4), kinds=WRAPPER)
declare("memory_tokens_interspersed_every", "tupe_untie_cls",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and on(s, "tupe_untie_cls"),
        reason="memory tokens take the untied [CLS] position 0; interspersed ones would untie positions mid-sequence",
        example=dict(memory_tokens_interspersed_every=4, num_memory_tokens=1, tupe=True, tupe_max_seq_len=16,
                     tupe_untie_cls=True), kinds=WRAPPER)
declare("memory_tokens_interspersed_every", "a bidirectional stack",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and not s.get("causal", False),
        reason="interspersed memory tokens summarise the tokens before them, for a causal stack (Decoder), as "
               "upstream; an encoder reads memory tokens once, at the front",
        example=dict(memory_tokens_interspersed_every=4, num_memory_tokens=1, causal=False), kinds=WRAPPER)

# Transformer-XL memories (max_mem_len, recurrence.py): a causal, sequential stack whose self-attention
# blocks read only the sequence's own hidden states
for _k, _v, _why in (("reversible", True, "the reversible coupling recomputes its blocks without the memory"),
                     ("num_residual_streams", 2, "the memory is one stream of hidden states"),
                     ("shift_tokens", 1, "a shifted token would need the previous segment's features"),
                     ("tupe", True, "TUPE's untied positions index a table; the memory sits at negative positions"),
                     ("num_memory_tokens", 2, "memory tokens would enter every segment's memory; use one or the "
                                              "other")):
    declare("max_mem_len", _k, when=lambda s, k=_k: on(s, "max_mem_len") and on(s, k)
            and not (k == "num_residual_streams" and s[k] == 1),
            reason=_why, example={"max_mem_len": 4, _k: _v, **({"tupe_max_seq_len": 16} if _k == "tupe" else {})},
            kinds=WRAPPER)
declare("max_mem_len", "a bidirectional stack", when=lambda s: on(s, "max_mem_len") and not s.get("causal", False),
        reason="segment recurrence carries a causal stack's (Decoder's) hidden states forward; a bidirectional "
               "stack's outputs change with later tokens", example=dict(max_mem_len=4, causal=False), kinds=WRAPPER)

# per-token feed-forward output scales (ff_deep_embed): one row per token column of a plain stack
for _k, _v in (("num_memory_tokens", 2), ("use_cls_token", True), ("reversible", True), ("num_residual_streams", 2),
               ("depths", (1,)), ("only_attn", True)):
    declare("ff_deep_embed", _k, when=lambda s, k=_k: on(s, "ff_deep_embed") and on(s, k)
            and not (k == "num_residual_streams" and s[k] == 1),
            reason="the deep embedding scales a token's own feed-forward outputs: the stack's columns must be the "
                   "tokens (no memory or [CLS] columns, no funnel), in one stream, run plainly (not reversible), "
                   "with feed-forward blocks",
            example={"ff_deep_embed": True, _k: _v}, kinds=WRAPPER)
declare("add_continuous_pred_head", "emb_dim", when=lambda s: on(s, "add_continuous_pred_head") and on(s, "emb_dim")
        and s.get("emb_dim") != s.get("dim"), reason="the head predicts the input embedding (emb_dim) from hidden "
        "states (dim), upstream's head maps dim to dim", example=dict(add_continuous_pred_head=True, emb_dim=16),
        kinds=WRAPPER)

# a custom token embedding / output head (TransformerWrapper(token_emb=, to_logits=): built modules)
def _module(name):
    """An example module for the entries' examples (the tests build dim=32, num_tokens=10 models)."""
    from torch import nn

    return nn.Embedding(10, 32) if name == "token_emb" else nn.Linear(32, 10)


for _k, _why in (("tie_embedding", "a tied head is the built-in embedding table's weight"),
                 ("l2norm_embed", "the custom embedding replaces the table and its normalisation; normalise in "
                                  "the module")):
    declare("token_emb", _k, when=lambda s, k=_k: on(s, "token_emb") and on(s, k), reason=_why,
            example={"token_emb": _module("token_emb"), _k: True}, kinds=WRAPPER)
for _k, _v, _why in (("tie_embedding", True, "the head is tied to the embedding; untie it for a custom head"),
                     ("num_output_heads", 2, "a custom head is one module; build several inside it"),
                     ("logits_dim", 8, "the custom head's output sets the logits' width"),
                     ("logits_scale", 0.5, "scale inside the custom head"),
                     ("return_only_embed", True, "return_only_embed has no output head")):
    declare("to_logits", _k, when=lambda s, k=_k: on(s, "to_logits") and k in s and s[k] is not None
            and not (k == "num_output_heads" and s[k] == 1) and s[k] is not False,
            reason=_why, example={"to_logits": _module("to_logits"), _k: _v}, kinds=WRAPPER)

# XTransformer keywords (as passed: shared, enc_ and dec_ prefixed)
declare("cross_attend", when=lambda s: on(s, "cross_attend") or on(s, "enc_cross_attend") or off(s, "dec_cross_attend"),
        reason="the decoder of an XTransformer always cross-attends to the encoder, and the encoder has no "
               "context to attend to; drop cross_attend", example=dict(cross_attend=True), kinds=XT)
declare("only_cross", when=lambda s: on(s, "only_cross") or on(s, "enc_only_cross") or on(s, "dec_only_cross"),
        reason="the encoder has no context to cross-attend to, and the decoder is causal self-attention plus "
               "cross-attention; drop only_cross",
        example=dict(only_cross=True), kinds=XT)
declare("custom_layers", "XTransformer", when=lambda s: s.get("custom_layers") is not None,
        reason="one layout cannot serve both sides (the decoder needs 'c' blocks, the encoder cannot have them); "
               "give enc_custom_layers and dec_custom_layers", example=dict(custom_layers=("a", "c", "f")), kinds=XT)
declare("dec_custom_layers", "XTransformer", when=lambda s: s.get("dec_custom_layers") is not None
        and "c" not in s["dec_custom_layers"],
        reason="the decoder needs at least one 'c' (cross-attention) block to read the encoder",
        example=dict(dec_custom_layers=("a", "f")), kinds=XT)
declare("enc_custom_layers", "XTransformer", when=lambda s: s.get("enc_custom_layers") is not None
        and "c" in s["enc_custom_layers"],
        reason="the encoder has no context to cross-attend to; drop its 'c' blocks",
        example=dict(enc_custom_layers=("a", "c", "f")), kinds=XT)
for _k in ("logits_dim", "logits_scale", "return_only_embed"):
    declare(f"enc_{_k}", "XTransformer", when=lambda s, k=_k: f"enc_{k}" in s,
            reason="the encoder of an encoder-decoder has no output head (its hidden states feed the decoder)",
            example={f"enc_{_k}": {"logits_dim": 8, "logits_scale": 0.5, "return_only_embed": True}[_k]}, kinds=XT)
declare("enc_depth", "enc_funnel", when=lambda s: on(s, "enc_funnel") and "enc_depth" in s,
        reason="a funnel encoder takes enc_depths, one depth per block",
        example=dict(enc_funnel=True, enc_depth=2), kinds=XT)
declare("tie_token_emb", "enc_num_tokens / dec_num_tokens",
        when=lambda s: on(s, "tie_token_emb") and (side(s, "enc", "num_tokens") != side(s, "dec", "num_tokens")
                                                   or side(s, "enc", "emb_dim") != side(s, "dec", "emb_dim")),
        reason="both sides need the same vocabulary (and emb_dim) to share one embedding",
        example=dict(tie_token_emb=True, enc_num_tokens=12), kinds=XT)

# ----------------------------------------------------------------------------------------------
# stack and funnel entries: the stack's fire from config.split_layer_kwargs, the funnel's from
# FunnelEncoder (with its depths)

declare("attn_shared_qk", "only_cross", when=lambda s: on(s, "attn_shared_qk") and on(s, "only_cross"),
        reason="shared-QK applies to self-attention; cross-attention keys come from the context",
        example=dict(attn_shared_qk=True, only_cross=True), kinds=("encoder", "cross"))
# (TUPE with attn_scale: attn_scale scales the word-to-word logits instead of TUPE's 1/sqrt(2 * dim_head))
declare("only_cross", "cross_attend", when=lambda s: on(s, "only_cross") and on(s, "cross_attend"),
        reason="only_cross already makes every attention cross-attention",
        example=dict(only_cross=True, cross_attend=True), kinds=("encoder", "cross"))
FUNNEL = ("funnel",)
declare("upsample_depth", "upsample=False", when=lambda s: s.get("upsample_depth") is not None and not on(s, "upsample"),
        reason="the decoder exists only with upsample=True", example=dict(upsample_depth=1), kinds=FUNNEL)
for _p, _ex in (("rel_pos_bias", {}), ("dynamic_pos_bias", {}), ("tupe", {"tupe_max_seq_len": 16})):
    declare(_p, "top_attn_to_ff", "depths",
            when=lambda s, p=_p: on(s, p) and on(s, "top_attn_to_ff") and blocks(s) > 1
            and any(d <= s["top_attn_to_ff"] for d in depths(s)),
            reason="a funnel block whose every self-attention became a feed-forward has no attention scores "
                   "for its own position table to act on; keep top_attn_to_ff below every block's depth",
            example={_p: True, "top_attn_to_ff": 1, "depths": (1, 1), **_ex}, kinds=FUNNEL)
declare("unet_skips", "depth", when=lambda s: on(s, "unet_skips") and isinstance(s.get("depth", 1), int)
        and s.get("depth", 1) < 2,
        reason="U-Net skips join the first half of the layers to the second; one layer has no second half, so "
               "the keyword would do nothing (upstream asserts depth >= 2 as well)",
        example=dict(unet_skips=True, depth=1), kinds=("decoder", "encoder", "cross", "xtransformer"))
declare("unet_skips", "depths", when=lambda s: on(s, "unet_skips") and any(d < 2 for d in depths(s)),
        reason="every funnel block is a stack of its own and needs depth >= 2 for U-Net skips",
        example=dict(unet_skips=True, depths=(1, 2)), kinds=FUNNEL)
declare("layers_execute_order", "FunnelEncoder", when=lambda s: s.get("layers_execute_order") is not None,
        reason="every funnel block is a stack of its own depth, so one order of block indices cannot fit them all",
        example=dict(layers_execute_order=(0, 1)), kinds=FUNNEL)
# (a funnel block without self-attention, from only_cross, custom_layers or top_attn_to_ff, is
# mean-pooled and runs its blocks over the pooled sequence; shared-QK's pooled queries take as keys
# the unit-normalised query projections of the unpooled sequence: funnel.py)

# A cross-attention-only stack (CrossAttender) has no self-attention: the relative position
# schemes act on self-attention scores only, and memory tokens, prepended to the sequence, would
# reach no other position. Refused rather than built and silently ignored.
for _p, _ex in (("rotary_pos_emb", {}), ("alibi_pos_bias", {}), ("rel_pos_bias", {}), ("dynamic_pos_bias", {}),
                ("tupe", {"tupe_max_seq_len": 16})):
    declare(_p, "only_cross", when=lambda s, p=_p: on(s, p) and on(s, "only_cross"),
            reason="a cross-attention-only stack has no self-attention for relative positions to act on; "
                   "give the context its positions before it reaches the CrossAttender",
            example={_p: True, "only_cross": True, **_ex}, kinds=("encoder", "cross"))
# (shift_tokens with memory tokens: as upstream, the memory tokens are prepended before the stack, so
# the first token shifts in the last memory token's features; the shift runs along the kept tokens, so
# left padding between them changes nothing: residual.shift_tokens)
# (num_memory_tokens on a layout without self-attention: only_cross, custom_layers without 'a',
# top_attn_to_ff replacing every one: the tokens could reach no other position, so none are built,
# a documented no-op as upstream accepts it: wrappers.memory_token_count)

# attention score modifications (attention_variants in docs/features.md): a forced kernel must
# compute them; the sliding window counts places back along the sequence's own keys
declare("attn_backend='sdpa'", "attn_softclamp_logits",
        when=lambda s: s.get("attn_backend") == "sdpa" and on(s, "attn_softclamp_logits"),
        reason="SDPA takes only an additive bias, and softcapping is tanh of the scores; use attn_backend='auto' "
               "(flex on CUDA, else explicit), 'flex' or 'explicit'",
        example={"attn_backend": "sdpa", "attn_softclamp_logits": True})
# (attn_backend='flex' with attn_head_learned_sink: flex computes the sink from its logsumexp, flex.with_sink)
declare("attn_max_attend_past", "only_cross", when=lambda s: s.get("attn_max_attend_past") is not None
        and on(s, "only_cross"),
        reason="a sliding window counts places back along the sequence's own keys, and a cross-attention-only "
               "stack attends to a context instead; window the context's own encoder",
        example=dict(attn_max_attend_past=2, only_cross=True), kinds=("encoder", "cross"))
declare("attn_max_attend_past", "depths", when=lambda s: s.get("attn_max_attend_past") is not None
        and blocks(s) > 1,
        reason="a funnel's pooled queries read the unpooled sequence's keys, where places back along one "
               "sequence do not line up; use a single block or drop the window",
        example=dict(attn_max_attend_past=2, depths=(1, 1)), kinds=("funnel",))
# gates and output projection (gating.py)
declare("attn_dim_out", "a layer stack", when=lambda s: s.get("attn_dim_out") is not None,
        reason="a stack adds each block's output to its input, so the output is dim wide; attn_dim_out is for a "
               "standalone Attention (x_transformers.x_transformers.Attention(dim, dim_out=...))",
        example=dict(attn_dim_out=16))
def _gate_widths(s: dict, which: str) -> tuple[int, int]:
    """(input, output) widths of a low-rank gate: the output gate reads the merged heads, the value
    gate the block's input; each writes one logit per channel, or per head when headwise."""
    heads = s.get("heads", 8)
    inner = heads * (s.get("attn_dim_head") or 64)
    out = heads if on(s, f"attn_{which}_headwise") else inner
    return (inner if which == "output_gate" else s.get("dim", inner)), out


for _w, _r in (("output_gate", "attn_output_gate_rank"), ("gate_values", "attn_gate_values_rank")):
    declare(_r, "heads", "attn_dim_head",
            when=lambda s, w=_w, r=_r: on(s, "attn_" + w) and s.get(r) is not None
            and all(s[r] >= width for width in _gate_widths(s, w)),
            reason="a low-rank gate's rank must be below its input or output width (heads x attn_dim_head, or "
                   "heads when headwise), else the factorisation is not low-rank; lower the rank or leave it out "
                   "for a full gate",
            example={"attn_" + _w: True, _r: 4, "heads": 1, "attn_dim_head": 4, "dim": 4})
declare("attn_zero_init_output", "attn_output_proj_depth",
        when=lambda s: on(s, "attn_zero_init_output") and s.get("attn_output_proj_depth") is not None,
        reason="two initialisations of the output projection; choose one",
        example=dict(attn_zero_init_output=True, attn_output_proj_depth=2))
for _k in ("attn_on_attn", "attn_zero_init_output", "attn_output_proj_depth"):
    declare(_k, "attn_project_out=False", when=lambda s, k=_k: on(s, k) and s.get("attn_project_out") is False,
            reason="it configures the output projection, which attn_project_out=False removes",
            example={_k: {"attn_on_attn": True, "attn_zero_init_output": True, "attn_output_proj_depth": 2}[_k],
                     "attn_project_out": False})
# logits and values: sigmoid is a normaliser, an alternative to the entmax family. (Upstream also
# refuses sigmoid, L2 distance and top-k with one another; here they compose: L2 distance sets the
# logits, top-k keeps the k largest of them, sigmoid or softmax turns the kept ones into weights.)
for _e in ENTMAX:
    declare("attn_sigmoid", _e, when=lambda s, e=_e: on(s, "attn_sigmoid") and on(s, e),
            reason="each sets how scores become weights; choose one (as upstream)",
            example={"attn_sigmoid": True, _e: EXAMPLE_ON[_e]})
for _e in ENTMAX:
    declare("attn_head_learned_sink", "attn_l2_distance", _e,
            when=lambda s, e=_e: on(s, "attn_head_learned_sink") and on(s, "attn_l2_distance") and on(s, e),
            reason="L2-distance scores are at most 0 and the sink's logit starts at 0, so a sparse normaliser puts "
                   "every weight on the sink, whose value is zero: the attention outputs zeros and nothing in it "
                   "learns; use softmax, or drop the sink or the L2 distance",
            example={"attn_head_learned_sink": True, "attn_l2_distance": True, _e: EXAMPLE_ON[_e]})
declare("attn_qk_rmsnorm", "attn_k_rmsnorm", when=lambda s: on(s, "attn_qk_rmsnorm") and on(s, "attn_k_rmsnorm"),
        reason="attn_qk_rmsnorm already normalises the keys; choose one", example=dict(attn_qk_rmsnorm=True,
                                                                                       attn_k_rmsnorm=True))
for _r in ("attn_qk_rmsnorm", "attn_k_rmsnorm"):
    declare(_r, "attn_qk_norm", when=lambda s, r=_r: on(s, r) and on(s, "attn_qk_norm"),
            reason="QK-norm scales q and k to unit length, which undoes the RMSNorm; choose one",
            example={_r: True, "attn_qk_norm": True})
declare("attn_k_rmsnorm", "attn_shared_qk", when=lambda s: on(s, "attn_k_rmsnorm") and on(s, "attn_shared_qk"),
        reason="shared-QK's keys are the unit-normalised queries; use attn_qk_rmsnorm to normalise both",
        example=dict(attn_k_rmsnorm=True, attn_shared_qk=True), kinds=("decoder", "encoder", "funnel", "xtransformer"))
declare("attn_cog_signed", "attn_shared_qk", when=lambda s: on(s, "attn_cog_signed") and on(s, "attn_shared_qk"),
        reason="shared-QK hides a query's own key behind a large negative logit, which signed attention's "
               "|logits| would make the largest",
        example=dict(attn_cog_signed=True, attn_shared_qk=True), kinds=("decoder", "encoder", "funnel", "xtransformer"))
declare("attn_laser", "attn_cog_signed", when=lambda s: on(s, "attn_laser") and on(s, "attn_cog_signed"),
        reason="LASER takes the log of the attention output over exp(v), which signed weights can make negative",
        example=dict(attn_laser=True, attn_cog_signed=True))
declare("attn_laser", "attn_sigmoid", when=lambda s: on(s, "attn_laser") and on(s, "attn_sigmoid"),
        reason="LASER's log(weights @ exp(v)) stays within the values' range only for weights that sum to 1 "
               "(2411.03493 is over softmax); sigmoid weights do not, so the output grows with the number of "
               "keys (hidden states x10 after one optimizer step, which saturates a DyT norm: gradients exactly 0)",
        example=dict(attn_laser=True, attn_sigmoid=True))

# issue 20's second half: normalisers (score_variants.py), value residual, widths, partial rotary.
# Upstream's one-normaliser rule extends to hard and Gumbel attention
_ONE_OF = ("attn_hard", "attn_gumbel_softmax")
for _a in _ONE_OF:
    for _b in ("attn_sigmoid", "attn_l2_distance", "attn_sparse_topk") + ENTMAX + _ONE_OF[_ONE_OF.index(_a) + 1:]:
        declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b),
                reason="each sets how scores become weights; choose one (as upstream)",
                example={_a: True, _b: EXAMPLE_ON[_b]})
_NOT_CAUSAL = ("encoder", "cross", "funnel")
declare("attn_selective", "a bidirectional stack", when=lambda s: on(s, "attn_selective"), kinds=_NOT_CAUSAL,
        reason="selective attention lets a token hide itself from later queries, a causal idea (2410.02703); "
               "use it in a Decoder", example=dict(attn_selective=True))
declare("attn_selective", "XTransformer's encoder",
        when=lambda s: on(s, "attn_selective") or on(s, "enc_attn_selective"), kinds=XT,
        reason="the encoder is bidirectional and selective attention is causal; give dec_attn_selective",
        example=dict(attn_selective=True))
declare("attn_inverted_attention", "causal", when=lambda s: on(s, "attn_inverted_attention")
        or on(s, "dec_attn_inverted_attention") or on(s, "enc_attn_inverted_attention"), kinds=("decoder",) + XT,
        reason="inverted attention normalises each key's scores over the queries, so a query's output would "
               "depend on later queries (and an XTransformer's encoder has no cross-attention); use it in an "
               "Encoder(cross_attend=True) or a CrossAttender", example=dict(attn_inverted_attention=True))
declare("attn_inverted_attention", "cross_attend=False", when=lambda s: on(s, "attn_inverted_attention")
        and not on(s, "cross_attend") and not on(s, "only_cross"), kinds=("encoder", "funnel"),
        reason="inverted attention is a cross-attention variant (queries compete for the context's keys); set "
               "cross_attend=True", example=dict(attn_inverted_attention=True))
for _k in ENTMAX + ("attn_sparse_topk", "attn_hard", "attn_gumbel_softmax", "attn_head_learned_sink",
                    "attn_cog_signed", "attn_custom_attn_fn"):
    declare("attn_inverted_attention", _k, when=lambda s, k=_k: on(s, "attn_inverted_attention") and on(s, k),
            reason="inverted attention is a softmax over the queries then a sum-to-one over the keys; it takes no "
                   "other normaliser, sink or sign", kinds=("encoder", "cross", "funnel"),
            example={"attn_inverted_attention": True, _k: EXAMPLE_ON[_k], "only_cross": True})
declare("add_value_residual", "reversible", when=lambda s: on(s, "add_value_residual") and on(s, "reversible"),
        reason="the first attention's values would cross the reversible coupling's recomputation, which carries "
               "only the two streams; drop one", example=dict(add_value_residual=True, reversible=True))
declare("add_value_residual", "FunnelEncoder", when=lambda s: on(s, "add_value_residual"), kinds=FUNNEL,
        reason="the funnel's blocks attend over sequences of different lengths (pooled), so the first attention's "
               "values do not line up with a later block's", example=dict(add_value_residual=True))
declare("attn_rotate_num_heads", "heads", when=lambda s: on(s, "attn_rotate_num_heads")
        and s["attn_rotate_num_heads"] > min(head_counts(s)),
        reason="it counts the heads rotary turns, at most heads", kinds=("decoder", "encoder", "funnel") + XT,
        example=dict(rotary_pos_emb=True, attn_rotate_num_heads=9))
declare("attn_rotate_num_heads", "attn_kv_heads", when=lambda s: on(s, "attn_rotate_num_heads")
        and on(s, "attn_kv_heads") and any(s["attn_kv_heads"] != h for h in head_counts(s)),
        reason="a key head serves several query heads under grouped-query attention, so it cannot be rotated for "
               "some and not others (upstream refuses it too)", kinds=("decoder", "encoder", "funnel") + XT,
        example=dict(rotary_pos_emb=True, attn_rotate_num_heads=2, attn_kv_heads=2))
declare("attn_qk_norm_dim_scale", "attn_qk_norm_scale", when=lambda s: on(s, "attn_qk_norm_dim_scale")
        and "attn_qk_norm_scale" in s,
        reason="with per-channel gains the logit scale is dim_head ** -0.5 (as upstream), so there is no QK-norm "
               "scale to set", example=dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True, attn_qk_norm_scale=5.0))
declare("attn_qk_norm_groups", "attn_dim_head", when=lambda s: on(s, "attn_qk_norm") and s.get("attn_qk_norm_groups", 1) > 1
        and (s.get("attn_dim_head", 64) % s["attn_qk_norm_groups"] or s.get("attn_dim_head", 64) // s["attn_qk_norm_groups"] < 3),
        reason="the groups must divide the head dimension into groups of at least 3 channels (a unit vector of 2 or "
               "fewer channels carries almost nothing; upstream refuses it too)",
        example=dict(attn_qk_norm=True, attn_qk_norm_groups=4, attn_dim_head=8))
# multi-latent attention's decoupled rope heads (attention.py)
declare("attn_latent_rope_subheads", "attn_rotate_num_heads", when=lambda s: on(s, "attn_latent_rope_subheads")
        and on(s, "attn_rotate_num_heads"),
        reason="the decoupled rope heads are the heads rotary turns; give one of the two (as upstream)",
        example=dict(attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=1, rotary_pos_emb=True,
                     attn_rotate_num_heads=1), kinds=("decoder", "encoder", "funnel") + XT)
def _key_heads(s: dict) -> set:
    """The key head counts the keywords give: attn_kv_heads, else heads (per side of an XTransformer)."""
    return {side(s, p, "attn_kv_heads") or side(s, p, "heads") or 8 for p in ("enc", "dec")}


declare("attn_latent_rope_subheads", "heads", "attn_kv_heads", when=lambda s: on(s, "attn_latent_rope_subheads")
        and s["attn_latent_rope_subheads"] > min(_key_heads(s)),
        reason="the rope heads are the last of the key heads (attn_kv_heads, else heads), so there are at most as "
               "many (as upstream: at most heads)", example=dict(
            attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=9))
declare("attn_latent_rope_subheads", "attn_shared_qk", when=lambda s: on(s, "attn_latent_rope_subheads")
        and on(s, "attn_shared_qk"),
        reason="shared-QK's keys are the queries, so there are no key heads to take from x",
        example=dict(attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=1, attn_shared_qk=True),
        kinds=("decoder", "encoder", "funnel") + XT)
declare("attn_use_rel_proj_pos_bias", "only_cross", when=lambda s: on(s, "attn_use_rel_proj_pos_bias")
        and on(s, "only_cross"), kinds=("encoder", "cross"),
        reason="it biases self-attention by the distance between positions of one sequence, and a "
               "cross-attention-only stack has no self-attention", example=dict(attn_use_rel_proj_pos_bias=True,
                                                                                only_cross=True))
declare("attn_use_rel_proj_pos_bias", "depths", when=lambda s: on(s, "attn_use_rel_proj_pos_bias") and blocks(s) > 1,
        reason="a funnel's pooled queries read the unpooled sequence's keys, where distances along one sequence do "
               "not line up; use a single block", example=dict(attn_use_rel_proj_pos_bias=True, depths=(1, 1)),
        kinds=FUNNEL)
declare("attn_laser", "attn_pre_scale_post_talking_heads", when=lambda s: on(s, "attn_laser")
        and on(s, "attn_pre_scale_post_talking_heads"),
        reason="LASER takes the log of the attention output over exp(v), which weights multiplied by logits can "
               "make negative (as with signed weights)", example=dict(attn_laser=True,
                                                                    attn_pre_scale_post_talking_heads=True))
