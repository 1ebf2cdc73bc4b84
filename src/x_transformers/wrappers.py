"""Token-level models: ``TransformerWrapper`` (embeddings + a layer stack + logits); the
encoder-decoder ``XTransformer`` built of two of them is in encdec.py.

Legend: b batch, n tokens, M memory tokens, v vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from .attend import record_logit_maxes, record_logsumexp
from .hub import Pretrained
from . import aliases, block_inputs, checks, conflicts, looped, recurrence, wrapper_inputs
from .config import WRAPPER_KEYS, LayersConfig, WrapperConfig, build, check_types, unknown_keyword
from .funnel import FunnelEncoder
from .cache import Intermediates, KVCache, StaticKVCache
from .layers import AttentionLayers, check_mask, default_positions
from .stack_calls import STACK_CALL_KEYS
from .heads import AttentionPool, Mixture, calc_z_loss, finish_logits, masked_mean, next_embed_head, output_heads
from .norms import LayerNorm
from .positional import AbsolutePositionalEmbedding, SinusoidalPositionalEmbedding


MODULE_KEYS = ("token_emb", "to_logits")  # built modules TransformerWrapper takes besides attn_layers


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class TransformerWrapper(Pretrained, nn.Module):
    """Token embedding, positions, optional memory tokens, a layer stack and the output head."""

    def __init__(self, *, attn_layers: AttentionLayers, token_emb: nn.Module | None = None,
                 to_logits: nn.Module | None = None, **kwargs):
        """Keywords: :class:`~x_transformers.config.WrapperConfig` names, and built modules: the stack
        (``attn_layers``) and, as upstream, optionally the token embedding (``token_emb``: token ids
        (b, n) -> (b, n, emb_dim), in place of the embedding table) and the output head
        (``to_logits``: hidden states (..., dim) -> logits, in place of the linear head)."""
        super().__init__()
        for name, module in (("token_emb", token_emb), ("to_logits", to_logits)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module (or None for the built-in one), got {type(module).__name__}")
        if "tie_embedding_scale" in kwargs and kwargs.get("tie_embedding") is not True:
            raise ValueError("tie_embedding_scale scales a tied head's logits; set tie_embedding=True as well, "
                             "or use logits_scale")
        kwargs = aliases.resolve(kwargs, "wrapper", "TransformerWrapper")
        for key in kwargs:
            if key not in WRAPPER_KEYS:
                raise unknown_keyword(key, WRAPPER_KEYS + ("attn_layers",) + MODULE_KEYS, "TransformerWrapper")
        if "num_tokens" not in kwargs:
            raise TypeError("TransformerWrapper needs num_tokens, the vocabulary size")
        if not isinstance(attn_layers, (AttentionLayers, FunnelEncoder)):
            raise TypeError(f"attn_layers must be an Encoder, Decoder, AttentionLayers or FunnelEncoder, "
                            f"got {type(attn_layers).__name__}")
        check_types(WrapperConfig, kwargs)
        custom = {k: m for k, m in (("token_emb", token_emb), ("to_logits", to_logits)) if m is not None}
        settings = stack_settings(attn_layers)
        conflicts.check("wrapper", {**settings, **kwargs, **custom})
        self.cfg = cfg = build(WrapperConfig, kwargs, "TransformerWrapper")
        num_tokens, max_seq_len = cfg.num_tokens, cfg.max_seq_len
        num_memory_tokens = memory_token_count(settings, cfg.num_memory_tokens)
        lcfg = attn_layers.layer_cfg  # the LayersConfig (a funnel's: that of its blocks)
        dim = attn_layers.dim
        emb_dim = cfg.emb_dim or dim

        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.attn_layers = attn_layers
        self.num_memory_tokens = num_memory_tokens
        # multiplies the final hidden states before the output head: T5 scales its tied decoder
        # head by dim ** -0.5 (1910.10683, mesh-tensorflow), and so does upstream's tied head by
        # default (its tie_embedding_scale); 1.0 for an untied head
        default_scale = dim ** -0.5 if cfg.tie_embedding else 1.0
        self.logits_scale = cfg.logits_scale if cfg.logits_scale is not None else default_scale

        self.emb_dim = emb_dim
        if token_emb is None:
            token_emb = nn.Embedding(num_tokens, emb_dim)
            # l2norm_embed normalises the lookups, so only the direction is learned: upstream starts
            # the tables at std 1e-5
            nn.init.normal_(token_emb.weight, std=1e-5 if cfg.l2norm_embed else 0.02)
        self.token_emb = token_emb
        self.custom_token_emb = "token_emb" in custom
        # Absolute positions: learned by default, as upstream: unless the stack carries rotary or T5
        # bias (ALiBi keeps them), TUPE replaces them, the stack's disable_abs_pos_emb says so,
        # max_seq_len=0, or the user chose a sinusoidal table.
        self.pos_emb = None
        if cfg.scaled_sinu_pos_emb or cfg.sinusoidal_pos_emb:
            self.pos_emb = SinusoidalPositionalEmbedding(emb_dim, scaled=cfg.scaled_sinu_pos_emb)
        elif cfg.use_abs_pos_emb and not lcfg.drops_abs_pos_emb and max_seq_len != 0:
            if max_seq_len is None:
                raise ValueError("learned absolute positions need max_seq_len; set it, or max_seq_len=0 / "
                                 "use_abs_pos_emb=False for none")
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len)
            if cfg.l2norm_embed:
                nn.init.normal_(self.pos_emb.emb.weight, std=1e-5)
        # extra tables summed into the token embeddings (BERT's segment / type ids): forward(embed_ids=)
        self.embeds = None
        if cfg.embed_num_tokens:
            self.embeds = nn.ModuleDict({f"{name}_embed": nn.Embedding(n, emb_dim)
                                         for name, n in cfg.embed_num_tokens.items()})
            for table in self.embeds.values():
                nn.init.normal_(table.weight, std=0.02)
        self.post_emb_norm = LayerNorm(emb_dim, bias=False) if cfg.post_emb_norm else None
        self.emb_dropout = nn.Dropout(cfg.emb_dropout) if cfg.emb_dropout > 0 else nn.Identity()
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()

        # Memory Transformer (2006.11527): learned tokens prepended to every sequence, at positions
        # 0..M-1 before the tokens' own. Under TUPE's untied [CLS] (tupe_untie_cls) they are as
        # position-free as the [CLS]: all M sit at position 0 with it, the first real token is the
        # [CLS] and the tokens keep the positions they have without memory tokens.
        self.memory_tokens = nn.Parameter(torch.randn(num_memory_tokens, dim) * 0.02) if num_memory_tokens else None
        self.memory_at_cls = bool(num_memory_tokens and lcfg.tupe and lcfg.tupe_untie_cls)
        self.memory_shift = 0 if self.memory_at_cls else num_memory_tokens  # the tokens' position offset

        # pooling of the final hidden states (heads.py): [CLS] tokens, a masked mean, learned queries
        self.num_cls_tokens = cfg.num_cls_tokens if cfg.use_cls_token else 0
        if (cfg.use_cls_token or cfg.average_pool_embed) and getattr(attn_layers, "causal", False):
            which = "use_cls_token" if cfg.use_cls_token else "average_pool_embed"
            raise ValueError(f"{which} pools a sequence into one vector: a causal stack (Decoder) "
                             f"{'shows a leading [CLS] token nothing' if cfg.use_cls_token else 'cannot decode that'}; "
                             f"use an Encoder")
        self.cls_token = nn.Parameter(torch.randn(cfg.num_cls_tokens, dim) * 0.02) if cfg.use_cls_token else None
        self.attn_pool = None
        if cfg.attn_pool:
            acfg = attn_layers.blocks[0].attn_cfg if isinstance(attn_layers, FunnelEncoder) else attn_layers.attn_cfg
            self.attn_pool = AttentionPool(cfg.dim_pooled_tokens or dim, dim, num_pooled_tokens=cfg.num_pooled_tokens,
                                           depth=cfg.attn_pool_depth, heads=lcfg.heads, dim_head=acfg.dim_head)

        # no head when tied (the embedding serves) or when only hidden states are wanted (an encoder's side)
        head = not (cfg.tie_embedding or cfg.return_only_embed)
        if to_logits is None and head:
            to_logits = output_heads(dim, cfg.logits_dim or num_tokens, cfg.num_output_heads)
        self.to_logits = to_logits
        self.custom_to_logits = "to_logits" in custom
        self.mixture = Mixture(dim, cfg.mixture_of_softmax_k) if cfg.mixture_of_softmax else None
        # upstream's next-embedding head and RWKV-8's deep embedding (heads.py), upstream's parameter names
        self.to_next_embed_pred = next_embed_head(dim) if cfg.add_continuous_pred_head else None
        self.ff_deep_embed = nn.Parameter(torch.ones(num_tokens, lcfg.depth, dim)) if cfg.ff_deep_embed else None
        self.recycled_proj = nn.Linear(dim, dim, bias=False) if cfg.recycling else None  # recurrence.recycle
        self.looped = cfg.looped  # looped.py: the stack reruns, an exit gate after each step
        self.exit_gate = nn.Linear(dim, 1, bias=False) if cfg.looped else None

    def check_inputs(self, x, mask):
        """Checks the token ids and mask; returns the ids, floats holding whole numbers as long (upstream casts)."""
        if x.dtype.is_floating_point and x.numel() and not _is_compiling() and not bool((x == x.trunc()).all()):
            raise ValueError(f"token ids must be integers, got {x.dtype} with fractional values")
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise ValueError(f"token ids must be an integer tensor, got {x.dtype}")
        x = x.long() if x.dtype.is_floating_point else x
        if x.ndim != 2:
            raise ValueError(f"token ids must have shape (batch, seq), got {tuple(x.shape)}")
        check_mask(mask, x.shape[0], x.shape[1])
        checks.check_token_inputs(x)
        if not _is_compiling() and x.numel() and not checks.trusted("ids"):
            # before the embedding (no device-side assert); one reduction, so one host sync a step
            outside = (x < 0) | (x >= self.num_tokens)
            if outside.any().item():
                bad = x[outside][0].item()
                raise ValueError(f"token id {bad} is outside [0, {self.num_tokens}) (num_tokens={self.num_tokens})")
        return x

    @property
    def logits_weight(self):
        """The output head's (vocab, dim) weight: ``to_logits.weight``, or the token embedding when
        tied. With ``forward(..., return_embeddings=True)`` it feeds
        :func:`x_transformers.loss.chunked_cross_entropy`, which never builds the full logits."""
        if self.cfg.return_only_embed:
            raise ValueError("this wrapper has no output head (return_only_embed=True)")
        if self.custom_to_logits and not (isinstance(self.to_logits, nn.Linear) and self.to_logits.bias is None):
            raise ValueError("logits_weight: the custom to_logits is not one bias-free linear layer")
        other = {"num_output_heads": self.cfg.num_output_heads != 1, "mixture_of_softmax": self.cfg.mixture_of_softmax,
                 "sigsoftmax_logits": self.cfg.sigsoftmax_logits}  # (True == 1: no membership test on these)
        for key, on in other.items():
            if on:
                raise ValueError(f"logits_weight: with {key} the logits are not hidden states times one weight")
        return self.to_logits.weight if self.to_logits is not None else self.token_emb.weight

    def muon_parameters(self) -> list:
        return self.attn_layers.muon_parameters()  # upstream's: the stack's group

    def attn_qk_clip_(self, intermediates, tau: float = 100.0):
        """Upstream's QK-clip (2507.20534) of the stack's attention, from a training forward's intermediates."""
        self.attn_layers.attn_qk_clip_(intermediates, tau)

    @property
    def can_cache_kv(self) -> bool:
        """Whether this model decodes with a key/value cache (a causal stack: a Decoder)."""
        return isinstance(self.attn_layers, AttentionLayers) and self.attn_layers.causal

    def forward(self, x, mask=None, *, return_embeddings: bool = False, return_attn: bool = False, context=None,
                context_mask=None, cache=None, return_intermediates: bool = False,
                return_logits_and_embeddings: bool = False, return_embeddings_and_intermediates: bool = False,
                return_logit_entropies: bool = False, seq_start_pos=None, pos=None, self_attn_kv_mask=None,
                sum_embeds=None, prepend_embeds=None, prepend_mask=None, excise_prepend_embeds: bool = False,
                embed_ids: dict | None = None, return_attn_z_loss: bool = False, attn_z_loss_weight=None,
                input_not_include_cache: bool | None = None, causal: bool | None = None, condition=None, mems=None,
                mem_masks=None, return_mems: bool = False, detach_mems: bool = True,
                return_next_embed_pred: bool = False, recycle_steps: int | None = None, looped_steps: int | None = None,
                max_looped_steps: int | None = None, looped_pred_all_logits: bool | None = None,
                looped_inference: bool = False, looped_exit_prob_threshold: float = 0.9, **upstream):
        """x (b, n) token ids -> logits (b, n, v), or hidden states (b, n, dim) with return_embeddings.

        ``return_attn``: also every attention layer's post-softmax maps (b, h, n, m), computed on the
        explicit path. ``cache``: a :class:`~x_transformers.cache.KVCache` (x holds only the new
        tokens; extended in place) or an :class:`~x_transformers.cache.Intermediates` returned by
        an earlier call (upstream's way: x holds the whole sequence so far unless
        ``input_not_include_cache``; the one given is left as it was).

        With pooling (``use_cls_token``, ``average_pool_embed``) the hidden states and logits are
        per sequence: (b, dim) / (b, v), or (b, C, ...) for several [CLS] tokens. An Encoder with
        ``attn_pool`` returns the pooled vectors (b, q, dim_pooled) (logits in the intermediates).

        Upstream x-transformers' keywords: ``return_intermediates`` (also returns an Intermediates,
        whose cache decodes on), ``return_logits_and_embeddings``, ``return_embeddings_and_intermediates``,
        ``return_logit_entropies``, ``condition`` (b, dim_condition) for a stack's adaptive norms / scales,
        ``seq_start_pos`` (b,) (each row's count of left padding: those
        columns are masked and positions start after them), ``pos`` (custom long positions (b|1, n),
        or a float tensor (b|1, n, emb_dim) used in place of the absolute position embedding),
        ``self_attn_kv_mask`` (b, n) (keys hidden from self-attention, positions unchanged),
        ``sum_embeds`` (b, n, emb_dim) added to the token embeddings, ``prepend_embeds`` (b, P,
        emb_dim) put ahead of the tokens (PaLI's image embeddings; ``prepend_mask`` (b, P), and
        ``excise_prepend_embeds`` drops their outputs), ``embed_ids`` {name: (b, n) ids} of the
        ``embed_num_tokens`` tables, ``return_attn_z_loss`` (the intermediates' ``attn_z_loss``,
        weighted by ``attn_z_loss_weight``), ``causal`` (only the stack's own value). Upstream
        keywords of features absent here raise a TypeError naming them.

        Transformer-XL recurrence (recurrence.py): ``mems`` (one (b, m, dim) tensor per
        self-attention block, from an earlier ``return_mems=True``; ``mem_masks`` their (b, m)
        masks), ``return_mems`` (also returns the next memories, the last ``max_mem_len`` columns,
        detached unless ``detach_mems=False``: ``(out, mems)``, or ``inter.mems``).
        ``return_next_embed_pred`` (``add_continuous_pred_head``): ``(out, (predicted next input
        embeddings (b, n, dim), the input embeddings (b, n, dim)))``. ``recycle_steps`` (``recycling``):
        how many times the stack runs (needed in eval mode; training draws 1..train_max_recycle_steps).
        ``looped`` (looped.py): ``looped_steps`` (a fixed count) or ``max_looped_steps`` (default the
        wrapper's); ``looped_inference`` with one new token per row stops each row once the exit
        gate's cumulative probability reaches ``looped_exit_prob_threshold``; the intermediates hold
        ``exit_logits``, ``all_pred_logits`` (``looped_pred_all_logits``, default in training) and
        ``exit_indices``.
        """
        if return_next_embed_pred and self.to_next_embed_pred is None:
            raise ValueError("return_next_embed_pred=True needs a wrapper built with add_continuous_pred_head=True")
        to_stack = {k: upstream.pop(k) for k in STACK_CALL_KEYS if k in upstream}  # the stack's (stack_calls.py)
        emb_kw, logit_kw = checks.module_kwargs(self, upstream.pop("token_emb_kwargs", None),
                                                upstream.pop("to_logits_kwargs", None), cache)
        transforms = upstream.pop("transform_block_inputs", None)
        checks.refuse_upstream(upstream, "TransformerWrapper.forward")
        want_inter = (return_intermediates or return_embeddings_and_intermediates or return_logit_entropies
                      or return_attn_z_loss)
        first, blocks_kw = block_inputs.wrapper_split(self, transforms, want_inter, recycle_steps, to_stack.get("repeat_blocks"))
        x = self.check_inputs(x, mask)
        loop_steps = looped.check_loop_call(self, looped_steps=looped_steps, max_looped_steps=max_looped_steps,
                                            looped_inference=looped_inference,
                                            looped_exit_prob_threshold=looped_exit_prob_threshold,
                                            looped_pred_all_logits=looped_pred_all_logits)
        prev_exits = getattr(cache, "exit_indices", None)
        self._check_extra_inputs(x, prepend_embeds, prepend_mask, embed_ids, cache, return_attn_z_loss)
        build = want_inter and self_attn_kv_mask is None and prepend_embeds is None and causal is not False
        cache, offset, x, new = self._resolve_cache(cache, x, dict(mask=mask, pos=pos, sum_embeds=sum_embeds,
                                                                   self_attn_kv_mask=self_attn_kv_mask,
                                                                   embed_ids=embed_ids),
                                                    input_not_include_cache, build)
        mask, pos, sum_embeds, kv_mask = new["mask"], new["pos"], new["sum_embeds"], new["self_attn_kv_mask"]
        xl = recurrence.wrapper_inputs(self, mems, mem_masks, return_mems, cache)
        side = dict(xl or {}, init_embed=None)  # what the stack takes besides x, and what _run reports back
        if condition is not None:
            side["condition"] = condition
        if causal is not None:  # upstream's per-call override of the stack's causality (layers.py checks it)
            side["causal"] = causal
        side.update(to_stack, **blocks_kw, token_emb_kwargs=emb_kw, first_transform=first)
        if self.recycled_proj is not None or recycle_steps is not None:
            side["recycle_steps"] = recurrence.recycle_steps(self, recycle_steps, cache)
        if loop_steps is not None:
            early = looped_inference and looped_steps is None and x.shape[1] == 1 and loop_steps > 1
            side["loop"] = dict(steps=loop_steps, early_exit=early, threshold=looped_exit_prob_threshold)
        if offset is None and (seq_start_pos is not None or want_inter):
            offset = self._columns_seen(cache)  # a host-side count: a compiled decode step never reads it
        if seq_start_pos is not None:
            mask = checks.start_mask(seq_start_pos, mask, x, offset)
        if kv_mask is not None:
            check_mask(kv_mask, *x.shape, name="self_attn_kv_mask")
            if cache is not None:
                raise ValueError("self_attn_kv_mask cannot be used with a cache: the cache counts positions by its "
                                 "key mask, and hidden keys must not move positions (a training-time mask)")
        prefix = (prepend_embeds, prepend_mask)
        lse = [] if return_attn_z_loss else None
        maxes = [] if want_inter and self.training and torch.is_grad_enabled() else None  # QK-clip's input
        with record_logsumexp(lse) if lse is not None else contextlib.nullcontext(), \
                record_logit_maxes(maxes) if maxes is not None else contextlib.nullcontext():
            out, attns = self._run(x, mask, kv_mask, pos, sum_embeds, new["embed_ids"], prefix, context, context_mask,
                                   cache, return_attn, side)
        hidden, seq, seq_mask, pooled_tokens = self._pool(out, x, mask, prefix, want_inter)
        if prepend_embeds is not None and excise_prepend_embeds and hidden.ndim == 3 and hidden is seq:
            hidden = hidden[:, prepend_embeds.shape[1]:]
        logits = None
        embeddings = return_embeddings or return_embeddings_and_intermediates or self.cfg.return_only_embed
        if not embeddings or return_logits_and_embeddings or return_logit_entropies:
            logits = self.logits_from(hidden, **logit_kw)
        if return_logits_and_embeddings:
            out = (logits, hidden)
        elif embeddings:
            out = hidden
        elif pooled_tokens is not None and not self.attn_layers.causal:
            out = pooled_tokens  # an encoder's attention pool (its logits: the intermediates')
        else:
            out = logits
        if return_next_embed_pred:  # upstream: the final hidden states -> the next input embedding
            out = (out, (self.to_next_embed_pred(hidden), side["init_embed"]))
        if xl is not None and return_mems:
            new_mems = recurrence.next_memories(xl["given"], xl["hiddens"], self.cfg.max_mem_len, detach_mems)
            if not want_inter:
                return out, new_mems
        if want_inter:
            inter = Intermediates(cache=cache if isinstance(cache, KVCache) else None, cache_length=offset + x.shape[1],
                                  last_hidden=seq, attn_maps=attns)
            inter.logits, inter.attn_pooled_tokens, inter.attn_logit_maxes = logits, pooled_tokens, maxes
            block_inputs.record(self.attn_layers, inter, side)  # block_hiddens, hiddens, layer_hiddens
            if return_logit_entropies:
                logp = logits.float().log_softmax(dim=-1)
                inter.logit_entropies = -(logp.exp() * logp).nan_to_num().sum(dim=-1)
            if return_attn_z_loss:
                weight = self.cfg.attn_z_loss_weight if attn_z_loss_weight is None else attn_z_loss_weight
                inter.attn_z_loss = calc_z_loss(lse, weight)
            if xl is not None and return_mems:
                inter.mems = new_mems
            if "loops" in side:
                looped.record(self, inter, side, prev_exits, looped_pred_all_logits)
            return out, inter
        return (out, attns) if return_attn else out

    def _check_extra_inputs(self, x, prepend_embeds, prepend_mask, embed_ids, cache, z_loss):
        wrapper_inputs.check_extra_inputs(self, x, prepend_embeds, prepend_mask, embed_ids, cache, z_loss)

    def _pool(self, out, x, mask, prefix, want_inter):
        """The stack's output (b, C + P + n, dim) -> (hidden: pooled or per token, the sequence
        (b, P + n, dim) without [CLS], its mask, attention-pooled vectors or None)."""
        prepend, prepend_mask = prefix
        C = self.num_cls_tokens
        cls_out, seq = (out[:, :C], out[:, C:]) if C else (None, out)  # (no [CLS]: no slicing a step)
        seq_mask = mask
        if prepend is not None and (mask is not None or prepend_mask is not None):
            ones = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
            seq_mask = torch.cat((prepend_mask if prepend_mask is not None else ones.expand(-1, prepend.shape[1]),
                                  mask if mask is not None else ones.expand(-1, x.shape[1])), dim=-1)
        hidden = seq
        if self.cfg.average_pool_embed:
            hidden = masked_mean(seq, seq_mask)
        elif C:
            hidden = cls_out[:, 0] if C == 1 else cls_out
        pooled = None
        if self.attn_pool is not None and (want_inter or not self.attn_layers.causal):
            pooled = self.attn_pool(seq, seq_mask)
        return hidden, seq, seq_mask, pooled

    def logits_from(self, hidden, **head_kwargs):
        """Final hidden states (..., dim) -> logits (..., v) through the head (or the tied
        embedding); a tuple of them with ``num_output_heads`` > 1. ``head_kwargs``: a custom
        ``to_logits`` module's own (upstream's ``to_logits_kwargs``)."""
        if self.cfg.return_only_embed:
            raise ValueError("this wrapper has no output head (return_only_embed=True); it returns hidden states")
        weights = None
        if self.mixture is not None:
            hidden, weights = self.mixture(hidden)  # (..., k, dim), (..., k)
        hidden = hidden * self.logits_scale if self.logits_scale != 1.0 else hidden
        finish = dict(mixture_weights=weights, sigsoftmax=self.cfg.sigsoftmax_logits,
                      squeeze=self.cfg.squeeze_out_last_dim)
        if isinstance(self.to_logits, nn.ModuleList):
            return tuple(finish_logits(head(hidden), **finish) for head in self.to_logits)
        raw = self.to_logits(hidden, **head_kwargs) if self.to_logits is not None else hidden @ self.token_emb.weight.t()
        return finish_logits(raw, **finish)

    def _resolve_cache(self, cache, x, per_token: dict, input_not_include_cache, build: bool):
        """-> (the cache to run with, token columns already in it, the new tokens, their per-token
        inputs). An Intermediates is copied (functional calls, as upstream); its input may hold the
        whole sequence so far, whose first ``cache_length`` columns are dropped here. ``build``: no
        cache given but intermediates wanted, so a fresh one is filled where the stack can cache."""
        if cache is None:
            if input_not_include_cache:
                raise ValueError("input_not_include_cache=True needs cache=")
            return (KVCache() if build and self.can_cache_kv else None), 0, x, per_token
        if isinstance(cache, Intermediates):
            if input_not_include_cache is None:
                input_not_include_cache = getattr(self.cfg, "input_not_include_cache", False)
            kv, offset, start = cache.resume(x.shape[1], input_not_include_cache)
            if start:
                x = x[:, start:]
                per_token = {k: wrapper_inputs.drop_cached(v, start) for k, v in per_token.items()}
            return kv, offset, x, per_token
        if isinstance(cache, (KVCache, StaticKVCache)):
            if input_not_include_cache is False:
                raise ValueError("input_not_include_cache=False with a KVCache: x holds only the new tokens here; "
                                 "pass an Intermediates (from return_intermediates=True) for upstream's convention")
            return cache, None, x, per_token  # columns seen: counted only where needed (_columns_seen)
        raise TypeError(f"cache must be a KVCache, StaticKVCache or the Intermediates of return_intermediates=True, "
                        f"got {type(cache).__name__}")

    @property
    def _plain_memory(self) -> bool:
        """Memory tokens (if any) are the cache's first columns, positions 0..M-1."""
        return not (self.num_memory_tokens and (self.cfg.memory_tokens_interspersed_every or self.memory_at_cls))

    def _columns_seen(self, cache) -> int:
        """Token columns a KVCache / StaticKVCache holds (memory tokens not counted)."""
        seen = cache.seq_len if isinstance(cache, KVCache) else cache.length
        if cache.empty:
            return 0
        every, M = self.cfg.memory_tokens_interspersed_every, self.num_memory_tokens
        if every and M:  # seen = c + M * ceil(c / every): each group of every + M columns holds one memory group
            return seen - M * -(-seen // (every + M))
        return max(seen - M - cache.prefix_len, 0)

    def _positions(self, x, mask, pos, cache):
        """Token positions (b|1, n) and, where ``pos`` is a float tensor, the embedding it replaces."""
        if pos is not None and pos.dtype.is_floating_point:
            return default_positions(mask, x.shape[1], x.device, self._start(cache)), pos
        if pos is not None:
            if pos.dtype == torch.bool or pos.shape[-1] != x.shape[1] or pos.ndim not in (1, 2):
                raise ValueError(f"pos must be long positions of shape ({x.shape[1]},) or (b, {x.shape[1]}), "
                                 f"or a float (b, n, emb_dim) embedding; got {pos.dtype} {tuple(pos.shape)}")
            return (pos if pos.ndim == 2 else pos[None]).long(), None
        return default_positions(mask, x.shape[1], x.device, self._start(cache)), None

    def _start(self, cache):
        """(b, 1): the next token's position (memory tokens not counted), or None before any."""
        if cache is None or cache.empty:
            return None
        M = self.num_memory_tokens
        if self.cfg.memory_tokens_interspersed_every and M:  # a memory group before every every-th column
            return cache.next_positions() - M * -(-self._columns_seen(cache) // self.cfg.memory_tokens_interspersed_every)
        if self.memory_at_cls and isinstance(cache, KVCache):
            # memory tokens share position 0 with the [CLS]: one past the last kept token's position
            # (the memory columns stay first, keep_last keeps them)
            kept = cache.positions[:, M:].masked_fill(~cache.key_mask[:, M:], -1)
            return kept.amax(dim=-1, keepdim=True) + 1 if kept.shape[1] else torch.zeros_like(kept[:, :1])
        # a KVCache: the last position + 1; a static one: kept slots (kept prepended columns not counted)
        shift = M + cache.prefix_kept  # (an int 0 in the plain case: no operator)
        return cache.next_positions() - shift if isinstance(shift, torch.Tensor) or shift else cache.next_positions()

    def _embed(self, x, positions, external, pos, first, sum_embeds, embed_ids, emb_kw=None, transform=None):
        """Token ids (b, n) -> summed input embeddings (b, n, emb_dim), before dropout. ``transform``: depth 1's
        of transform_block_inputs, on the token embeddings before positions are added (upstream's place)."""
        n = x.shape[1]
        h = self.token_emb(x, **(emb_kw or {}))
        if self.custom_token_emb and not _is_compiling() and (
                not isinstance(h, torch.Tensor) or h.shape != (*x.shape, self.emb_dim) or not h.is_floating_point()):
            raise ValueError(f"token_emb must map token ids {tuple(x.shape)} to float embeddings "
                             f"{(*x.shape, self.emb_dim)} (emb_dim), got {getattr(h, 'dtype', type(h).__name__)} "
                             f"{tuple(getattr(h, 'shape', ()))}")
        if self.cfg.l2norm_embed:
            h = F.normalize(h, dim=-1)
        h = transform(h) if transform is not None else h
        if external is not None:
            h = h + external
        elif self.pos_emb is not None:
            if self.max_seq_len is not None and not _is_compiling() and not checks.trusted("positions"):
                last = n if pos is None and first else int(positions.max().item()) + 1
                if last > self.max_seq_len:
                    raise ValueError(f"sequence length {last} exceeds max_seq_len ({self.max_seq_len}) of the "
                                     f"absolute position embedding; shorten the input or raise max_seq_len")
            p = self.pos_emb(positions)
            if self.cfg.l2norm_embed and isinstance(self.pos_emb, AbsolutePositionalEmbedding):
                p = F.normalize(p, dim=-1)
            h = h + p
        for name, ids in (embed_ids or {}).items():
            h = h + self.embeds[f"{name}_embed"](ids)
        if sum_embeds is not None:
            h = h + sum_embeds
        return self.post_emb_norm(h) if self.post_emb_norm is not None else h

    def _run(self, x, mask, kv_mask, pos, sum_embeds, embed_ids, prefix, context, context_mask, cache, return_attn,
             side=None):
        """Embed, run the stack, strip memory tokens: (hidden states (b, C + P + n, dim) with the
        [CLS] and prepended columns first, attention maps)."""
        b, n = x.shape
        M = self.num_memory_tokens
        first = cache is None or cache.empty
        stack_kw = {k: side[k] for k in ("condition", "causal", *block_inputs.STACK_KEYS, *STACK_CALL_KEYS)
                    if side and side.get(k) is not None}
        positions, external = self._positions(x, mask, pos, cache)
        h = self._embed(x, positions, external, pos, first, sum_embeds, embed_ids, side and side.get("token_emb_kwargs"),
                        side and side.get("first_transform"))

        prepend, prepend_mask = prefix
        if prepend is not None:  # PaLI-style prefix (2209.06794), ahead of the tokens
            h = torch.cat((prepend.to(h.dtype), h), dim=1)
        frac = self.cfg.emb_frac_gradient
        if frac < 1:  # the forward value is unchanged; the embeddings get frac of their gradient (2105.13290)
            h = h * frac + h.detach() * (1 - frac)
        if side is not None:
            side["init_embed"] = h  # the input embeddings, the next-embedding head's targets
        h = self.project_emb(self.emb_dropout(h))
        if self.cls_token is not None:
            h = torch.cat((self.cls_token.to(h.dtype).expand(b, -1, -1), h), dim=1)

        # layer positions count the memory tokens and a cached prefix of prepended embeddings
        shift = self.memory_shift + (0 if first else cache.prefix_kept)
        layer_positions = positions + shift if isinstance(shift, torch.Tensor) or shift else positions
        layer_mask = mask if kv_mask is None else (kv_mask if mask is None else mask & kv_mask)
        P = h.shape[1] - n  # [CLS] + prepended columns
        if prepend is not None and cache is not None:
            cache.prefix_len = prepend.shape[1]
            cache.prefix_kept = prepend.shape[1] if prepend_mask is None else prepend_mask.sum(dim=-1, keepdim=True)
        if P:
            ones = torch.ones(b, P, dtype=torch.bool, device=x.device)
            pmask = ones if prepend_mask is None else torch.cat((ones[:, :self.num_cls_tokens], prepend_mask), dim=-1)
            prefix_pos = default_positions(pmask if prepend_mask is not None else None, P, x.device)
            kept = pmask.sum(dim=-1, keepdim=True) if prepend_mask is not None else P
            layer_positions = torch.cat((prefix_pos.expand(layer_positions.shape[0] if prepend_mask is None else b, -1)
                                         + self.memory_shift, layer_positions + kept), dim=-1)
            if layer_mask is not None or prepend_mask is not None:
                layer_mask = torch.cat((pmask, layer_mask if layer_mask is not None
                                        else torch.ones(b, n, dtype=torch.bool, device=x.device)), dim=-1)
        if M and self.cfg.memory_tokens_interspersed_every:
            if P:
                raise ValueError("memory_tokens_interspersed_every with prepend_embeds is not supported")
            offset = 0 if first else self._columns_seen(cache)
            h, layer_positions, layer_mask, real = wrapper_inputs.intersperse(
                h, positions, layer_mask, offset, self.memory_tokens, self.cfg.memory_tokens_interspersed_every)
            out = self.attn_layers(h, layer_mask, context, context_mask, positions=layer_positions, cache=cache,
                                   return_attn=return_attn, **stack_kw)
            out, attns = out if return_attn else (out, None)
            return out.index_select(1, real), attns
        if M and first:
            mem = self.memory_tokens.to(h.dtype).expand(b, -1, -1)
            h = torch.cat((mem, h), dim=1)
            mem_pos = torch.arange(M, device=x.device)[None].expand(layer_positions.shape[0], -1)
            mem_pos = mem_pos * 0 if self.memory_at_cls else mem_pos
            layer_positions = torch.cat((mem_pos, layer_positions), dim=-1)
            if layer_mask is not None:
                layer_mask = torch.cat((torch.ones(b, M, dtype=torch.bool, device=x.device), layer_mask), dim=-1)

        # a funnel keeps the memory tokens out of its pooling windows
        extra = dict(num_memory_tokens=M) if M and isinstance(self.attn_layers, FunnelEncoder) else {}
        if side and "hiddens" in side:  # Transformer-XL memories in, this segment's hidden states out (recurrence.py)
            extra = dict(mems=side["mems"], mem_masks=side["mem_masks"], hiddens=side["hiddens"])
        if self.ff_deep_embed is not None:
            if P:
                raise ValueError("ff_deep_embed scales each token's feed-forward outputs; prepend_embeds columns have "
                                 "no token id")
            extra["ff_deep_embeds"] = self.ff_deep_embed[x].to(h.dtype)  # (b, n, units, dim)

        def stack(inp, kv=cache):
            out = self.attn_layers(inp, layer_mask, context, context_mask, positions=layer_positions, cache=kv,
                                   return_attn=return_attn, **stack_kw, **extra)
            return out if return_attn else (out, None)

        if side and "loop" in side:
            out, attns, outs, gates, exits = looped.run_loops(stack, h, self.exit_gate, cache, **side["loop"])
            side["loops"] = ([o[:, M:] for o in outs], [g[:, M:] for g in gates], exits) if M and first else \
                (outs, gates, exits)
        elif self.recycled_proj is None:
            out, attns = stack(h)
        else:
            out, attns = recurrence.recycle(stack, h, self.recycled_proj, side["recycle_steps"])
        return (out[:, M:] if M and first else out), attns


def memory_token_count(settings: dict, asked: int | None) -> int:
    """The memory tokens a wrapper builds: those asked for, none on a layout without self-attention
    (only_cross, custom_layers without 'a', top_attn_to_ff replacing every one), where they could
    reach no other position (upstream builds them there; they never get a gradient)."""
    return (asked or 0) if settings["self_attention"] else 0


def stack_settings(attn_layers) -> dict:
    """What the wrapper's conflicts read of a built stack: its resolved LayersConfig fields and dim,
    a funnel's depths / upsample, and whether any block attends to the sequence itself
    (``self_attention``: the resolved layouts, after custom_layers / top_attn_to_ff)."""
    settings = {f.name: getattr(attn_layers.layer_cfg, f.name) for f in fields(LayersConfig)}
    settings["dim"] = attn_layers.dim
    stacks = [attn_layers]
    if isinstance(attn_layers, FunnelEncoder):
        settings.update(depths=attn_layers.cfg.depths, upsample=attn_layers.cfg.upsample)
        stacks = list(attn_layers.blocks) + ([attn_layers.upsampler] if attn_layers.upsampler is not None else [])
    settings["self_attention"] = any(spec.kind == "a" for stack in stacks for spec in stack.layout)
    # the stack's attention switches that a wrapper keyword can conflict with (Transformer-XL memory)
    attn_cfg = getattr(stacks[0], "attn_cfg", None)
    if attn_cfg is not None and attn_cfg.data_dependent_alibi:
        settings["attn_data_dependent_alibi"] = True
    return settings


def __getattr__(name):
    """``wrappers.XTransformer`` (its old home): the encoder-decoder lives in encdec.py."""
    if name == "XTransformer":
        from .encdec import XTransformer
        return XTransformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
