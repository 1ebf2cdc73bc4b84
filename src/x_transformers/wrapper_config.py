"""``TransformerWrapper``'s own keywords as a frozen, validated dataclass (:class:`WrapperConfig`),
apart from the layer stack's (config.py), and the tuple of their names (``WRAPPER_KEYS``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import _positive_int, _positive_number, _probability, _values, check_types


@dataclass(frozen=True, kw_only=True)
class WrapperConfig:
    """``TransformerWrapper``'s own keywords (the layer stack is passed built, as ``attn_layers``)."""

    num_tokens: int
    max_seq_len: int | None = None  # needed by learned absolute positions; 0: none (as upstream)
    emb_dim: int | None = None  # token embedding width, projected to dim when different
    emb_dropout: float = 0.0
    tie_embedding: bool = False  # logits through the token embedding, 1608.05859
    use_abs_pos_emb: bool = True  # learned absolute positions, unless the stack carries positions
    scaled_sinu_pos_emb: bool = False  # sinusoidal table with a learned scale
    sinusoidal_pos_emb: bool = False  # fixed sinusoidal table, 1706.03762
    num_memory_tokens: int | None = 0  # Memory Transformer, 2006.11527 (None: 0, upstream's spelling)
    memory_tokens_interspersed_every: int | None = None  # the memory tokens again before every n-th token (decoders)
    logits_dim: int | None = None  # output width, default num_tokens
    # multiplies the hidden states before the head (T5's dim ** -0.5); default dim ** -0.5 when the
    # head is tied to the embedding (upstream's tie_embedding_scale), else 1
    logits_scale: float | None = None
    return_only_embed: bool = False  # no output head: forward returns hidden states (an encoder's side)
    # inputs (upstream's names)
    post_emb_norm: bool = False  # LayerNorm on the summed embeddings, before the stack
    l2norm_embed: bool = False  # unit-norm token (and learned position) embeddings, initialised at std 1e-5 (upstream)
    emb_frac_gradient: float = 1.0  # fraction of the gradient reaching the embeddings (CogView 2105.13290, GLM-130B)
    embed_num_tokens: dict | None = None  # {name: vocabulary} extra tables summed in, ids given as forward(embed_ids=)
    # pooling and heads
    use_cls_token: bool = False  # learned [CLS] token(s) prepended; forward returns their outputs (BERT, 1810.04805)
    num_cls_tokens: int = 1
    average_pool_embed: bool = False  # forward returns the mean of the final hidden states over kept tokens
    attn_pool: bool = False  # learned queries cross-attend to the final hidden states (1810.00825)
    num_pooled_tokens: int = 1
    attn_pool_depth: int = 1
    dim_pooled_tokens: int | None = None  # the pooled vectors' width, default dim
    num_output_heads: int = 1  # several independent output heads; logits become a tuple
    squeeze_out_last_dim: bool = False  # logits (..., 1) -> (...)
    mixture_of_softmax: bool = False  # mixture of softmaxes, 1711.03953; logits are log-probabilities
    mixture_of_softmax_k: int = 4
    sigsoftmax_logits: bool = False  # sigsoftmax, 1805.10829: logits + log sigmoid(logits)
    attn_z_loss_weight: float = 1e-4  # forward(return_attn_z_loss=True)'s default weight
    # Transformer-XL recurrence, 1901.02860 (recurrence.py): columns of memory forward(return_mems=True)
    # keeps per self-attention block; shift_mem_down: block i reads block i + shift's memory
    max_mem_len: int = 0
    shift_mem_down: int = 0
    # a head predicting the next token's input embedding from the final hidden states (upstream's
    # continuous next-embedding prediction): forward(return_next_embed_pred=True)
    add_continuous_pred_head: bool = False
    # per token, per layer unit, a learned (init 1) scale of each feed-forward block's output (RWKV-8's deep embedding)
    ff_deep_embed: bool = False
    # with cache=, x holds only the new tokens (forward's input_not_include_cache default)
    input_not_include_cache: bool = False
    # AlphaFold2's recycling (2107.03850 supplement 1.10): the stack runs again on the embeddings plus a
    # projection of its last (detached) output; train_max_recycle_steps: a training forward draws 1..this
    recycling: bool = False
    train_max_recycle_steps: int = 4
    # the looped LM (2510.25741, looped.py): the stack runs max_looped_steps times on its own output, an
    # exit gate after each step; needs the stack's pre_and_post_norm (upstream's requirement)
    looped: bool = False
    max_looped_steps: int = 4

    def __post_init__(self):
        check_types(WrapperConfig, _values(self))
        for name in ("num_cls_tokens", "num_pooled_tokens", "attn_pool_depth", "num_output_heads",
                     "mixture_of_softmax_k"):
            _positive_int(name, getattr(self, name))
        _positive_int("dim_pooled_tokens", self.dim_pooled_tokens, allow_none=True)
        _positive_int("max_mem_len", self.max_mem_len, allow_zero=True)
        _positive_int("shift_mem_down", self.shift_mem_down, allow_zero=True)
        _positive_int("train_max_recycle_steps", self.train_max_recycle_steps)
        _positive_int("max_looped_steps", self.max_looped_steps)
        _positive_int("memory_tokens_interspersed_every", self.memory_tokens_interspersed_every, allow_none=True)
        if not (isinstance(self.emb_frac_gradient, (int, float)) and 0.0 < self.emb_frac_gradient <= 1.0):
            raise ValueError(f"emb_frac_gradient must lie in (0, 1], got {self.emb_frac_gradient!r}")
        if not (isinstance(self.attn_z_loss_weight, (int, float)) and self.attn_z_loss_weight >= 0):
            raise ValueError(f"attn_z_loss_weight must be a number >= 0, got {self.attn_z_loss_weight!r}")
        if self.embed_num_tokens is not None:
            if not isinstance(self.embed_num_tokens, dict):
                raise ValueError(f"embed_num_tokens must be a dict {{name: vocabulary size}}, got "
                                 f"{self.embed_num_tokens!r}")
            for name, n in self.embed_num_tokens.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(f"embed_num_tokens: names must be identifiers, got {name!r}")
                _positive_int(f"embed_num_tokens[{name!r}]", n)
        for sub, feature, default in (("num_cls_tokens", "use_cls_token", 1), ("num_pooled_tokens", "attn_pool", 1),
                                      ("attn_pool_depth", "attn_pool", 1), ("dim_pooled_tokens", "attn_pool", None),
                                      ("mixture_of_softmax_k", "mixture_of_softmax", 4),
                                      ("max_looped_steps", "looped", 4)):
            if getattr(self, sub) != default and not getattr(self, feature):
                raise ValueError(f"{sub} configures {feature}, which is off; set {feature}=True as well, or drop {sub}")
        _positive_int("num_tokens", self.num_tokens)
        _positive_int("max_seq_len", self.max_seq_len, allow_none=True, allow_zero=True)
        _positive_int("emb_dim", self.emb_dim, allow_none=True)
        _probability("emb_dropout", self.emb_dropout)
        _positive_int("num_memory_tokens", self.num_memory_tokens, allow_none=True, allow_zero=True)
        _positive_int("logits_dim", self.logits_dim, allow_none=True)
        if self.logits_scale is not None:
            _positive_number("logits_scale", self.logits_scale)


WRAPPER_KEYS = tuple(f.name for f in fields(WrapperConfig))
