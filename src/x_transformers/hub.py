"""Saving and loading our own models: ``model.save_pretrained(folder)`` and
``Class.from_pretrained(folder)``, for every public model class of the package.

A folder holds ``config.json`` (the class and the keywords it was built with; a keyword that is
itself one of our models, such as ``attn_layers=Decoder(...)`` or ``AutoregressiveWrapper(net)``,
is stored as a nested class and keywords) and ``model.safetensors`` (the weights; no pickle, no
code). ``x_transformers.from_pretrained(folder)`` loads either one of these or a Hugging Face
folder: its ``config.json`` says which. ``push_to_hub`` uploads a saved folder with
``huggingface_hub`` (the ``[hub]`` extra), never a core dependency.

Keywords are recorded as given at construction (:class:`Pretrained` wraps each subclass's
``__init__``). A keyword whose value cannot be written as JSON (a custom module, a function) makes
``save_pretrained`` fail naming it, before anything is written.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch

LIBRARY = "x-transformers"
CONFIG_VERSION = 1
REGISTRY: dict[str, type] = {}


class Pretrained:
    """Mixin: records the keywords an instance was built with; adds save/load."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            init(self, *args, **kw)
            # the outermost __init__ (the user's call) finishes last, so its keywords are what stay
            bound = signature.bind(self, *args, **kw)
            given = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    given.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        given["*args"] = list(value)
                else:
                    given[name] = value
            object.__setattr__(self, "_pretrained_keywords", given)

        cls.__init__ = __init__

    # -- saving ----------------------------------------------------------------------------------
    def pretrained_config(self) -> dict:
        """The JSON this model's ``config.json`` holds."""
        return {"library": LIBRARY, "config_version": CONFIG_VERSION, **_encode_model(self, "model")}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (made if needed)."""
        save_file = _safetensors_save()
        config = self.pretrained_config()  # fails naming a keyword that cannot be saved, first
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_file(untied(self.state_dict()), str(folder / "model.safetensors"))
        return folder

    def push_to_hub(self, repo_id: str, *, folder: str | Path | None = None, private: bool = True, **kwargs):
        """Save (into ``folder``, else a temporary one) and upload to the Hugging Face Hub."""
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise ImportError("push_to_hub needs huggingface_hub: pip install 'x-transformers[hub]'") from None
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_pretrained(folder or tmp)
            api = HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=str(path), **kwargs)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, *, map_location="cpu", strict: bool = True):
        """Rebuild from ``folder``'s keywords and load its weights; eval mode. ``cls`` must be the
        saved class or one of its bases (``AttentionLayers.from_pretrained`` loads a Decoder)."""
        config = read_config(folder)
        model = _decode_model(config, "model")
        if not isinstance(model, cls):
            raise TypeError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}; "
                            f"use {type(model).__name__}.from_pretrained or x_transformers.from_pretrained")
        load_weights(model, folder, map_location=map_location, strict=strict)
        return model.eval()


def read_config(folder: str | Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ValueError(f"{folder} has no config.json: save a model there with model.save_pretrained({str(folder)!r})")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if config.get("library") != LIBRARY:
        raise ValueError(f"{file} was not written by x-transformers' save_pretrained (no \"library\": \"{LIBRARY}\")")
    if config.get("config_version", 0) > CONFIG_VERSION:
        raise ValueError(f"{file} has config_version {config['config_version']}, newer than this package reads "
                         f"({CONFIG_VERSION}): upgrade x-transformers")
    return config


def load_weights(model: torch.nn.Module, folder: str | Path, *, map_location="cpu", strict: bool = True):
    from safetensors.torch import load_file

    file = Path(folder) / "model.safetensors"
    try:
        state = load_file(str(file), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type, without the file's name
        raise ValueError(f"{file} could not be read as safetensors ({str(e).splitlines()[0]})") from None
    result = model.load_state_dict(state, strict=strict)
    return result


def is_ours(folder: str | Path) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("library") == LIBRARY
    except (OSError, ValueError, AttributeError):
        return False


def load(folder: str | Path, **kwargs):
    """Whatever model of ours ``folder`` holds."""
    return Pretrained.from_pretrained.__func__(Pretrained, folder, **kwargs)


def from_pretrained(path, **kwargs):
    """A folder written by ``model.save_pretrained`` (any model of ours), or a Hugging Face folder
    of a GPT-2, Llama or T5 (``hf.from_pretrained``, which takes ``dtype`` and keyword overrides):
    its ``config.json`` says which."""
    if is_ours(path):
        if kwargs:
            raise TypeError(f"{path} is a saved x-transformers model: it is rebuilt from its own keywords, so "
                            f"{sorted(kwargs)} cannot be given; build the model and call load_weights instead")
        return load(path)
    from .hf import from_pretrained as hf_from_pretrained

    return hf_from_pretrained(path, **kwargs)


# ----------------------------------------------------------------------------------------------
# keywords <-> JSON


def _encode_model(model, where: str) -> dict:
    keywords = getattr(model, "_pretrained_keywords", None)
    if keywords is None:
        raise TypeError(f"{where}: a {type(model).__name__} cannot be saved by save_pretrained "
                        f"(only the package's model classes record their keywords)")
    return {"class": type(model).__name__,
            "keywords": {k: _encode(v, f"{where}.{k}") for k, v in keywords.items()}}


def _encode(value: Any, where: str):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"float": repr(value)}
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"save_pretrained: keyword {where} is a dict with non-string keys")
        return {"dict": {k: _encode(v, f"{where}.{k}") for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, Pretrained):
        return {"module": _encode_model(value, where)}
    raise TypeError(f"save_pretrained: keyword {where} is a {type(value).__name__}, which config.json cannot hold "
                    f"(custom modules and functions are not saved); build the model from keywords to save it")


def _decode(value: Any):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        (tag, body), = value.items()
        if tag == "tuple":
            return tuple(_decode(v) for v in body)
        if tag == "dict":
            return {k: _decode(v) for k, v in body.items()}
        if tag == "float":
            return float(body)
        if tag == "dtype":
            return getattr(torch, body)
        if tag == "module":
            return _decode_model(body, "")
        raise ValueError(f"config.json: unknown value tag {tag!r}")
    return value


def _decode_model(config: dict, where: str):
    name = config.get("class")
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"config.json names class {name!r}, which this version of x-transformers does not have")
    keywords = {k: _decode(v) for k, v in config.get("keywords", {}).items()}
    args = keywords.pop("*args", [])
    return cls(*args, **keywords)


def untied(state: dict) -> dict:
    """safetensors refuses tensors sharing storage (tied embeddings): store copies, on CPU."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _safetensors_save():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("save_pretrained writes safetensors: pip install safetensors") from None
    return save_file


__all__ = ["Pretrained", "from_pretrained", "load", "load_weights", "is_ours", "read_config"]
