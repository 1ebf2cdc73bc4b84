"""The Hugging Face model families (GPT-2, Llama, T5) that :mod:`x_transformers.hf` loads and saves.

Each :class:`Family` maps one ``model_type``: its config -> our constructor keywords (refusing
options we cannot compute), the tensor rules (a list of :class:`Rule`, used in both directions)
and our model -> its config. Reading and writing the files is hf.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Decoder
from .wrappers import WRAPPER_KEYS, TransformerWrapper, XTransformer


# HF activation names (transformers' ACT2FN) -> our feedforward.ACTIVATIONS names
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "swish", "swish": "swish"}


def _need(cfg: dict, key: str, family: str):
    if key not in cfg:
        raise ValueError(f"{family} config.json has no {key!r}")
    return cfg[key]


def _activation(name: str, family: str, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{family}: {key}={name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _block_index(layers, i: int, kind: str) -> int:
    """Index in ``layers.blocks`` of the i-th block of kind 'a', 'c' or 'f'."""
    return [j for j, s in enumerate(layers.layout) if s.kind == kind][i]


def _block(layers, i: int, kind: str) -> str:
    """State-dict prefix of the i-th block of ``kind`` in a wrapper's layer stack."""
    return f"attn_layers.blocks.{_block_index(layers, i, kind)}"


def _ff_inner(layers) -> int:
    return layers.blocks[_block_index(layers, 0, "f")].fn.proj_out.in_features


@dataclass(frozen=True)
class Rule:
    """HF tensors <-> our parameters. Several names on one side are concatenated along dim 0
    of our layout (Llama's [up, gate] -> our GLU proj_in; GPT-2's c_attn -> to_q, to_k, to_v)."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear


def R(hf: str, ours: str, conv1d: bool = False) -> Rule:
    return Rule((hf,), (ours,), conv1d)


def _linear(hf: str, ours: str, bias: bool, conv1d: bool = False) -> list[Rule]:
    rules = [R(f"{hf}.weight", f"{ours}.weight", conv1d)]
    return rules + [R(f"{hf}.bias", f"{ours}.bias")] if bias else rules


def _norm(hf: str, ours: str, bias: bool) -> list[Rule]:
    return _linear(hf, ours, bias)


class Family:
    model_type: str
    prefix: str = ""  # the base model's prefix in *ForCausalLM checkpoints ("transformer.", "model.")
    emb_key: str  # the token embedding's HF name (after the prefix is removed)

    def keywords(self, cfg: dict, untied_head: bool) -> tuple[type, dict]:
        raise NotImplementedError

    def rules(self, model) -> list[Rule]:
        raise NotImplementedError

    def export(self, model) -> dict:
        raise NotImplementedError

    def duplicates(self, tensors: dict) -> dict[str, str]:
        """HF names that may repeat another tensor (dropped after an equality check) -> that tensor."""
        return {"lm_head.weight": self.emb_key}

    def ignorable(self, name: str, tensor) -> bool:
        """Non-weight buffers some checkpoints carry and we recompute (checked, then skipped)."""
        return False

    def our_aliases(self, model) -> dict[str, str]:
        """Our state-dict names that are the same tensor as another of ours (tied embeddings)."""
        return {}

    def config_ties(self, cfg: dict) -> bool:
        return cfg.get("tie_word_embeddings", True)

    def build(self, cfg: dict, untied_head: bool, overrides: dict | None = None):
        cls, kwargs = self.keywords(cfg, untied_head)
        kwargs = {**kwargs, **(overrides or {})}
        if cls is XTransformer:
            return XTransformer(**kwargs)
        wrapper = {k: kwargs.pop(k) for k in list(kwargs) if k in WRAPPER_KEYS}
        return TransformerWrapper(attn_layers=Decoder(**kwargs), **wrapper)


# ------------------------------------------------------------------------------------------------
# GPT-2


class GPT2(Family):
    model_type = "gpt2"
    prefix = "transformer."
    emb_key = "wte.weight"

    def keywords(self, cfg, untied_head):
        n = "gpt2"
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("gpt2: scale_attn_by_inverse_layer_idx=true needs a per-layer attention scale, "
                             "which we do not have")
        if cfg.get("add_cross_attention"):
            raise ValueError("gpt2: add_cross_attention=true (a GPT-2 with cross-attention) is not supported")
        dim = _need(cfg, "n_embd", n)
        return TransformerWrapper, dict(
            num_tokens=_need(cfg, "vocab_size", n), max_seq_len=_need(cfg, "n_positions", n),
            tie_embedding=not untied_head, logits_scale=1.0, emb_dropout=cfg.get("embd_pdrop", 0.0),
            dim=dim, depth=_need(cfg, "n_layer", n), heads=_need(cfg, "n_head", n),
            attn_dim_head=dim // _need(cfg, "n_head", n), norm_bias=True,
            attn_bias=True, attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
            attn_dropout=cfg.get("attn_pdrop", 0.0),
            ff_inner_dim=cfg.get("n_inner") or 4 * dim,
            ff_activation=_activation(cfg.get("activation_function", "gelu_new"), n, "activation_function"),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        )

    def rules(self, model):
        L = model.attn_layers
        rules = [R("wte.weight", "token_emb.weight"), R("wpe.weight", "pos_emb.emb.weight")]
        for i in range(L.cfg.depth):
            h, a, f = f"h.{i}", _block(L, i, "a"), _block(L, i, "f")
            rules += _norm(f"{h}.ln_1", f"{a}.pre_norm", True)
            rules += [Rule((f"{h}.attn.c_attn.weight",), tuple(f"{a}.fn.to_{x}.weight" for x in "qkv"), conv1d=True),
                      Rule((f"{h}.attn.c_attn.bias",), tuple(f"{a}.fn.to_{x}.bias" for x in "qkv"))]
            rules += _linear(f"{h}.attn.c_proj", f"{a}.fn.to_out", True, conv1d=True)
            rules += _norm(f"{h}.ln_2", f"{f}.pre_norm", True)
            rules += _linear(f"{h}.mlp.c_fc", f"{f}.fn.proj_in", True, conv1d=True)
            rules += _linear(f"{h}.mlp.c_proj", f"{f}.fn.proj_out", True, conv1d=True)
        rules += _norm("ln_f", "attn_layers.final_norm", True)
        if model.to_logits is not None:
            rules.append(R("lm_head.weight", "to_logits.weight"))
        return rules

    def ignorable(self, name, tensor):
        # old checkpoints store the causal mask ("attn.bias", a lower-triangular 0/1 matrix) and
        # the masking value ("attn.masked_bias"); causal=True recomputes both
        if name.endswith(".attn.masked_bias"):
            return tensor.numel() == 1
        if name.endswith(".attn.bias") and tensor.ndim == 4:
            m = tensor[0, 0].bool()
            return torch.equal(m, torch.ones_like(m).tril())
        return False

    def export(self, model):
        if not isinstance(model, TransformerWrapper):
            raise ValueError("gpt2 is a decoder-only TransformerWrapper")
        L, a, f = model.attn_layers, model.attn_layers.attn_cfg, model.attn_layers.ff_cfg
        if model.pos_emb is None or not hasattr(model.pos_emb, "emb"):
            raise ValueError("gpt2 needs learned absolute positions (use_abs_pos_emb=True with max_seq_len)")
        dropout = model.emb_dropout.p if isinstance(model.emb_dropout, nn.Dropout) else 0.0
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": model.num_tokens, "n_positions": model.pos_emb.max_seq_len, "n_embd": L.dim,
            "n_layer": L.cfg.depth, "n_head": L.cfg.heads, "n_inner": _ff_inner(L),
            "activation_function": _hf_activation(f.activation, "gpt2"), "layer_norm_epsilon": L.cfg.norm_eps,
            "scale_attn_weights": a.scale is None, "tie_word_embeddings": model.to_logits is None,
            "attn_pdrop": a.dropout, "embd_pdrop": dropout, "resid_pdrop": 0.0,
        }


def _hf_activation(ours: str, family: str) -> str:
    back = {"gelu": "gelu", "gelu_tanh": "gelu_new" if family == "gpt2" else "gelu_pytorch_tanh", "relu": "relu",
            "swish": "silu"}
    if ours not in back:
        raise ValueError(f"ff_activation={ours!r} has no {family} equivalent; supported: {sorted(back)}")
    return back[ours]


# ------------------------------------------------------------------------------------------------
# Llama


class Llama(Family):
    model_type = "llama"
    prefix = "model."
    emb_key = "embed_tokens.weight"

    def keywords(self, cfg, untied_head):
        n = "llama"
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"llama: rope_type {kind!r} (RoPE scaling) is not supported; only 'default'")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("llama: partial_rotary_factor != 1 is not supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        dim, heads = _need(cfg, "hidden_size", n), _need(cfg, "num_attention_heads", n)
        return TransformerWrapper, dict(
            num_tokens=_need(cfg, "vocab_size", n), max_seq_len=cfg.get("max_position_embeddings"),
            tie_embedding=not untied_head, logits_scale=1.0, use_abs_pos_emb=False,
            dim=dim, depth=_need(cfg, "num_hidden_layers", n), heads=heads,
            attn_kv_heads=cfg.get("num_key_value_heads") or heads, attn_dim_head=cfg.get("head_dim") or dim // heads,
            attn_bias=cfg.get("attention_bias", False), attn_dropout=cfg.get("attention_dropout", 0.0),
            rotary_pos_emb=True, rotary_base=float(theta), rotary_emb_dim=cfg.get("head_dim") or dim // heads,
            ff_glu=True, ff_activation=_activation(cfg.get("hidden_act", "silu"), n, "hidden_act"),
            ff_inner_dim=_need(cfg, "intermediate_size", n), ff_no_bias=not cfg.get("mlp_bias", False),
            use_rmsnorm=True, norm_eps=cfg.get("rms_norm_eps", 1e-6),
        )

    def rules(self, model):
        L = model.attn_layers
        attn_bias, ff_bias = L.attn_cfg.bias, not L.ff_cfg.no_bias
        rules = [R("embed_tokens.weight", "token_emb.weight")]
        for i in range(L.cfg.depth):
            h, a, f = f"layers.{i}", _block(L, i, "a"), _block(L, i, "f")
            rules += _norm(f"{h}.input_layernorm", f"{a}.pre_norm", False)
            for hf, ours in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("o_proj", "to_out")):
                rules += _linear(f"{h}.self_attn.{hf}", f"{a}.fn.{ours}", attn_bias)
            rules += _norm(f"{h}.post_attention_layernorm", f"{f}.pre_norm", False)
            # our GLU's proj_in is [value half, gate half]: value = up_proj, gate = gate_proj
            for p in ("weight", "bias") if ff_bias else ("weight",):
                rules.append(Rule((f"{h}.mlp.up_proj.{p}", f"{h}.mlp.gate_proj.{p}"), (f"{f}.fn.proj_in.{p}",)))
            rules += _linear(f"{h}.mlp.down_proj", f"{f}.fn.proj_out", ff_bias)
        rules += _norm("norm", "attn_layers.final_norm", False)
        if model.to_logits is not None:
            rules.append(R("lm_head.weight", "to_logits.weight"))
        return rules

    def export(self, model):
        if not isinstance(model, TransformerWrapper):
            raise ValueError("llama is a decoder-only TransformerWrapper")
        L, a, f = model.attn_layers, model.attn_layers.attn_cfg, model.attn_layers.ff_cfg
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": model.num_tokens, "hidden_size": L.dim, "intermediate_size": _ff_inner(L),
            "num_hidden_layers": L.cfg.depth, "num_attention_heads": L.cfg.heads,
            "num_key_value_heads": a.kv_heads or L.cfg.heads, "head_dim": a.dim_head or L.dim // L.cfg.heads,
            "hidden_act": _hf_activation(f.activation, "llama"), "max_position_embeddings": model.max_seq_len or 2048,
            "rms_norm_eps": L.cfg.norm_eps, "rope_theta": L.cfg.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": L.cfg.rotary_base},
            "tie_word_embeddings": model.to_logits is None, "attention_bias": a.bias, "mlp_bias": not f.no_bias,
            "attention_dropout": a.dropout,
        }


# ------------------------------------------------------------------------------------------------
# T5 (v1.0: ReLU feed-forward, tied head scaled by d_model ** -0.5; v1.1: gated-GELU, untied head)


class T5(Family):
    model_type = "t5"
    emb_key = "shared.weight"

    def config_ties(self, cfg):
        return True  # transformers >= 5 always ties a T5 head the checkpoint leaves out

    def keywords(self, cfg, untied_head):
        n = "t5"
        proj = cfg.get("feed_forward_proj", "relu")
        gated, _, act = proj.rpartition("-")
        if gated not in ("", "gated"):
            raise ValueError(f"t5: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
        # transformers reads "gated-gelu" as the tanh approximation (gelu_new)
        activation = "gelu_tanh" if proj == "gated-gelu" else _activation(act, n, "feed_forward_proj")
        # v1.0 scales the decoder output before its tied head; v1.1 (tie_word_embeddings=false) does not
        scale = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True) is not False)
        dim, dropout = _need(cfg, "d_model", n), cfg.get("dropout_rate", 0.0)
        depth = _need(cfg, "num_layers", n)
        return XTransformer, dict(
            dim=dim, num_tokens=_need(cfg, "vocab_size", n), tie_token_emb=True,
            enc_depth=depth, dec_depth=cfg.get("num_decoder_layers") or depth, heads=_need(cfg, "num_heads", n),
            attn_dim_head=_need(cfg, "d_kv", n), attn_scale=1.0, attn_dropout=dropout,
            ff_inner_dim=_need(cfg, "d_ff", n), ff_glu=gated == "gated", ff_activation=activation,
            ff_no_bias=True, ff_dropout=dropout,
            use_rmsnorm=True, norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
            rel_pos_bias=True, rel_pos_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            rel_pos_max_distance=cfg.get("relative_attention_max_distance", 128),
            use_abs_pos_emb=False, enc_tie_embedding=True, dec_tie_embedding=not untied_head,
            dec_logits_scale=dim ** -0.5 if scale else 1.0,
        )

    def rules(self, model):
        rules = [R("shared.weight", "encoder.token_emb.weight")]
        for side, units in (("encoder", ("a", "f")), ("decoder", ("a", "c", "f"))):
            L = getattr(model, side).attn_layers
            glu = L.ff_cfg.glu
            rules.append(R(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           f"{side}.attn_layers.rel_pos.relative_attention_bias.weight"))
            for i in range(L.cfg.depth):
                for j, kind in enumerate(units):
                    hf, ours = f"{side}.block.{i}.layer.{j}", f"{side}.attn_layers.blocks.{_block_index(L, i, kind)}"
                    rules += _norm(f"{hf}.layer_norm", f"{ours}.pre_norm", False)
                    if kind in "ac":
                        name = "SelfAttention" if kind == "a" else "EncDecAttention"
                        for x, y in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out")):
                            rules.append(R(f"{hf}.{name}.{x}.weight", f"{ours}.fn.{y}.weight"))
                        continue
                    ff = f"{hf}.DenseReluDense"
                    # gated: wo(act(wi_0 x) * wi_1 x); our GLU's proj_in is [value = wi_1, gate = wi_0]
                    wi = (f"{ff}.wi_1.weight", f"{ff}.wi_0.weight") if glu else (f"{ff}.wi.weight",)
                    rules.append(Rule(wi, (f"{ours}.fn.proj_in.weight",)))
                    rules.append(R(f"{ff}.wo.weight", f"{ours}.fn.proj_out.weight"))
            rules += _norm(f"{side}.final_layer_norm", f"{side}.attn_layers.final_norm", False)
        if model.decoder.to_logits is not None:
            rules.append(R("lm_head.weight", "decoder.to_logits.weight"))
        return rules

    def duplicates(self, tensors):
        return {"lm_head.weight": "shared.weight", "encoder.embed_tokens.weight": "shared.weight",
                "decoder.embed_tokens.weight": "shared.weight"}

    def our_aliases(self, model):
        return {"decoder.token_emb.weight": "encoder.token_emb.weight"}

    def export(self, model):
        if not isinstance(model, XTransformer):
            raise ValueError("t5 is an encoder-decoder (XTransformer)")
        E, D = model.encoder.attn_layers, model.decoder.attn_layers
        a, f = E.attn_cfg, E.ff_cfg
        if f.glu and f.activation == "gelu":
            raise ValueError("t5 has no exact-GELU gated feed-forward ('gated-gelu' is the tanh approximation)")
        act = {"gelu_tanh": "gelu" if f.glu else "gelu_new", "gelu": "gelu", "relu": "relu", "swish": "silu"}
        if f.activation not in act:
            raise ValueError(f"ff_activation={f.activation!r} has no t5 equivalent")
        untied = model.decoder.to_logits is not None
        scale = model.decoder.logits_scale != 1.0
        # transformers < 5 scaled exactly the tied heads; >= 5 reads scale_decoder_outputs (and
        # unties a head the file holds apart), so the mixed pairs load as meant only there
        return {
            "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
            "vocab_size": model.encoder.num_tokens, "d_model": E.dim, "d_kv": a.dim_head or E.dim // E.cfg.heads,
            "d_ff": _ff_inner(E), "num_layers": E.cfg.depth, "num_decoder_layers": D.cfg.depth,
            "num_heads": E.cfg.heads, "relative_attention_num_buckets": E.cfg.rel_pos_num_buckets,
            "relative_attention_max_distance": E.cfg.rel_pos_max_distance, "dropout_rate": a.dropout,
            "layer_norm_epsilon": E.cfg.norm_eps, "feed_forward_proj": ("gated-" if f.glu else "") + act[f.activation],
            "tie_word_embeddings": not untied, "scale_decoder_outputs": scale,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        }


FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2(), Llama(), T5())}
