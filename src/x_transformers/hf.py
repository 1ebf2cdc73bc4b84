"""Hugging Face checkpoints: load GPT-2, Llama and T5 folders into our models, and save them back.

A checkpoint folder holds ``config.json`` and one or more ``*.safetensors`` files. Each supported
``model_type`` is a :class:`Family` that knows three things:

- ``keywords``: the HF config -> our own constructor keywords (refusing options we cannot compute);
- ``rules``: which HF tensors make which of our parameters (a list of :class:`Rule`, used in both
  directions);
- ``export``: our model -> the HF config, for :func:`save_pretrained`.

Loading checks both sides: every tensor in the file is used (or is a checked duplicate, such as a
tied head), and every parameter of ours is set from the file. Saving picks the family whose
config rebuilds exactly our model and otherwise lists, per family, what does not map.

Neither direction imports ``transformers``; reading and writing need the ``safetensors`` package,
the tokenizer needs ``tokenizers`` (``pip install 'x-transformers[hf]'``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .checks import warn_nonfinite
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


# ------------------------------------------------------------------------------------------------
# reading and writing


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # an install problem, said plainly
        raise ImportError("Hugging Face checkpoints need the 'safetensors' package: "
                          "pip install 'x-transformers[hf]'") from e
    return safetensors.torch


def read_config(path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path} has no config.json (a Hugging Face checkpoint folder has config.json "
                         "and *.safetensors)")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None


def family_of(cfg: dict) -> Family:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def read_tensors(path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in Path(path).glob("*.bin"))
        extra = f" (found {bins}; we read safetensors only, never pickled .bin files)" if bins else ""
        raise ValueError(f"{path} has no *.safetensors file{extra}")
    tensors = {}
    for file in files:
        try:
            loaded = _safetensors().load_file(str(file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, without the file's name
            raise ValueError(f"{file} could not be read as safetensors ({str(e).splitlines()[0]}); "
                             f"it may be truncated: download it again") from None
        for name, t in loaded.items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one file of {path}")
            tensors[name] = t
    return tensors


def _strip_prefix(tensors: dict, prefix: str) -> dict:
    if not prefix:
        return dict(tensors)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _untied_head(family: Family, cfg: dict, tensors: dict) -> bool:
    head = tensors.get("lm_head.weight")
    if head is None:
        if not family.config_ties(cfg):
            raise ValueError(f"{family.model_type}: config.json unties the output head (tie_word_embeddings=false) "
                             "but the checkpoint has no lm_head.weight")
        return False
    emb = tensors.get(family.emb_key)
    return emb is None or not torch.equal(head, emb)


def from_pretrained(path, *, dtype: torch.dtype | None = None, **overrides):
    """Load a local Hugging Face folder (config.json + *.safetensors) of a GPT-2, Llama or T5.

    Returns a ``TransformerWrapper`` (GPT-2, Llama) or ``XTransformer`` (T5) in eval mode,
    configured with our own keywords. ``overrides`` are further constructor keywords (dropout,
    ``attn_backend``, ...); one that adds weights the checkpoint lacks is refused. Raises
    ValueError naming what is missing, unsupported, or left over.
    """
    cfg = read_config(path)
    family = family_of(cfg)
    tensors = _strip_prefix(read_tensors(path), family.prefix)
    untied = _untied_head(family, cfg, tensors)
    model = family.build(cfg, untied, overrides)
    expected = model.state_dict()

    ours, used = {}, set()
    for rule in family.rules(model):
        missing = [n for n in rule.hf if n not in tensors]
        if missing:
            raise ValueError(f"{family.model_type}: the checkpoint has no {missing[0]!r}")
        parts = [tensors[n].t() if rule.conv1d and tensors[n].ndim == 2 else tensors[n] for n in rule.hf]
        whole = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        sizes = [expected[n].shape[0] if n in expected else -1 for n in rule.ours]
        if -1 in sizes or sum(sizes) != whole.shape[0]:
            raise ValueError(f"{family.model_type}: {rule.hf} of shape {tuple(whole.shape)} does not fit our "
                             f"{rule.ours} (config.json and the tensors disagree)")
        ours.update(zip(rule.ours, whole.split(sizes, dim=0)))
        used.update(rule.hf)
    for alias, source in family.our_aliases(model).items():
        ours[alias] = ours[source]
    for name, source in family.duplicates(tensors).items():
        if name in tensors and name not in used:
            if not torch.equal(tensors[name], tensors[source]):
                raise ValueError(f"{family.model_type}: {name} differs from {source}; we cannot represent them apart")
            used.add(name)
    left = sorted(n for n in tensors if n not in used and not family.ignorable(n, tensors[n]))
    if left:
        raise ValueError(f"{family.model_type}: the checkpoint has tensors we have no place for: {left[:8]}"
                         + (f" and {len(left) - 8} more" if len(left) > 8 else ""))
    unset = sorted(set(expected) - set(ours))
    if unset:
        raise ValueError(f"{family.model_type}: these parameters of ours are not in the checkpoint: {unset[:8]} "
                         "(a keyword that adds weights cannot start from this checkpoint)")
    for name, t in ours.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{family.model_type}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                             f"{tuple(expected[name].shape)} in our model")
    warn_nonfinite(ours, f"from_pretrained({str(path)!r})")
    model.load_state_dict(ours, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# saving

_TRAINING_ONLY = {"dropout", "layer_dropout", "backend"}  # change no logits in eval mode
# sizes that several keywords can spell (ff_mult or ff_inner_dim, attn_dim_head=None or dim // heads):
# compared through the parameter shapes and the rotary width instead
_SIZES = {"mult", "inner_dim", "dim_head", "kv_heads", "rotary_emb_dim"}


def _stack_differences(ours, want, prefix: str) -> list[str]:
    out = []
    for cfg_ours, cfg_want, p in ((ours.cfg, want.cfg, ""), (ours.attn_cfg, want.attn_cfg, "attn_"),
                                  (ours.ff_cfg, want.ff_cfg, "ff_")):
        for fld in fields(cfg_ours):
            a, b = getattr(cfg_ours, fld.name), getattr(cfg_want, fld.name)
            if fld.name not in _TRAINING_ONLY | _SIZES and a != b:
                out.append(f"{prefix}{p}{fld.name}={a!r} (needs {b!r})")
    if ours.rotary is not None and want.rotary is not None and ours.rotary.rot_dim != want.rotary.rot_dim:
        out.append(f"{prefix}rotary_emb_dim={ours.rotary.rot_dim} (needs {want.rotary.rot_dim})")
    return out


def _wrapper_differences(ours: TransformerWrapper, want: TransformerWrapper, prefix: str) -> list[str]:
    out = _stack_differences(ours.attn_layers, want.attn_layers, prefix)
    if type(ours.pos_emb) is not type(want.pos_emb):
        out.append(f"{prefix}position embedding {type(ours.pos_emb).__name__} (needs {type(want.pos_emb).__name__})")
    if ours.num_memory_tokens != want.num_memory_tokens:
        out.append(f"{prefix}num_memory_tokens={ours.num_memory_tokens} (needs 0)")
    if ours.logits_scale != want.logits_scale:
        out.append(f"{prefix}logits_scale={ours.logits_scale} (needs {want.logits_scale})")
    if not isinstance(ours.project_emb, nn.Identity):
        out.append(f"{prefix}emb_dim={ours.token_emb.weight.shape[1]} (needs dim)")
    return out


def _differences(family: Family, model) -> list[str]:
    """Why ``model`` is not exactly what ``family``'s exported config rebuilds (empty: it is)."""
    try:
        cfg = family.export(model)
        want = family.build(cfg, untied_head=cfg.get("tie_word_embeddings") is False)
    except (ValueError, TypeError) as e:
        return [str(e)]
    if isinstance(model, XTransformer):
        out = (_wrapper_differences(model.encoder, want.encoder, "enc_")
               + _wrapper_differences(model.decoder, want.decoder, "dec_"))
        if model.decoder.token_emb is not model.encoder.token_emb:
            out.append("tie_token_emb=False (needs True)")
    else:
        out = _wrapper_differences(model, want, "")
    a, b = model.state_dict(), want.state_dict()
    extra, missing = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if extra or missing:
        out.append(f"parameters differ (extra {extra[:4]}, missing {missing[:4]})")
    out += [f"{n} has shape {tuple(a[n].shape)} (needs {tuple(b[n].shape)})"
            for n in sorted(set(a) & set(b)) if a[n].shape != b[n].shape][:4]
    return out


def family_for(model) -> tuple[Family, dict]:
    """The family whose config rebuilds ``model`` exactly, and that config; else ValueError with
    every family's reasons."""
    reasons = {}
    for family in FAMILIES.values():
        diff = _differences(family, model)
        if not diff:
            return family, family.export(model)
        reasons[family.model_type] = diff
    detail = "; ".join(f"{t}: {', '.join(r)}" for t, r in reasons.items())
    raise ValueError(f"this model maps to no Hugging Face family ({detail})")


def save_pretrained(model, path, *, tokenizer=None):
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors) that
    ``transformers`` loads with identical logits. ``tokenizer`` (a ``tokenizers.Tokenizer``) is
    written as tokenizer.json. Raises ValueError when the model maps to no supported family."""
    family, cfg = family_for(model)
    state = model.state_dict()
    hf, used = {}, set(family.our_aliases(model))
    for rule in family.rules(model):
        whole = torch.cat([state[n] for n in rule.ours], dim=0) if len(rule.ours) > 1 else state[rule.ours[0]]
        parts = whole.chunk(len(rule.hf), dim=0)
        for name, t in zip(rule.hf, parts):
            hf[name] = (t.t() if rule.conv1d and t.ndim == 2 else t).detach().contiguous().cpu()
        used.update(rule.ours)
    left = sorted(set(state) - used)
    if left:  # cannot happen after family_for; a guard against a rule table falling behind the model
        raise ValueError(f"{family.model_type}: parameters not written: {left[:8]}")
    if family.prefix:
        hf = {n if n == "lm_head.weight" else family.prefix + n: t for n, t in hf.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    cfg = {**cfg, "dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _safetensors().save_file(hf, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))


def load_tokenizer(path):
    """The folder's tokenizer.json as a ``tokenizers.Tokenizer``, or None when there is none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("tokenizer.json needs the 'tokenizers' package: pip install 'x-transformers[hf]'") from e
    return Tokenizer.from_file(str(file))


__all__ = ["from_pretrained", "save_pretrained", "load_tokenizer", "read_config", "read_tensors", "family_for",
           "FAMILIES", "Family", "Rule"]
