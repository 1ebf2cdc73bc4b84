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
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from .checks import warn_nonfinite
from .hf_families import FAMILIES, GPT2, HF_ACTIVATIONS, T5, Family, Llama, Rule  # noqa: F401 (public names)
from .wrappers import TransformerWrapper, XTransformer


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
        out.append(f"{prefix}emb_dim={ours.emb_dim} (needs dim)")
    for name in ("token_emb", "to_logits"):
        if getattr(ours, f"custom_{name}", False):
            out.append(f"{prefix}a custom {name} module (needs the built-in one)")
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
