"""The training configuration: one dataclass, filled in this order (later wins):

    TrainConfig defaults  <  --preset NAME  <  --config FILE (YAML or JSON)  <  flags / --set KEY=VALUE

``model`` holds keywords for the library's constructors (``Decoder`` + ``TransformerWrapper``, or
``XTransformer``); the library validates them. Every other key is a field below; an unknown key
is an error naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .presets import PRESETS

ARCHS = ("decoder", "xtransformer")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # element types of a .bin token file
LOGGERS = ("tensorboard", "wandb", "none")
STRATEGIES = ("none", "ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


class CLIError(Exception):
    """A user error: the CLI prints the message on one line and exits non-zero."""


def closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


@dataclass(kw_only=True)
class TrainConfig:
    arch: str = "decoder"  # "decoder" (language model) or "xtransformer" (encoder-decoder)
    model: dict = field(default_factory=dict)  # any model keyword of the library
    init_from: str | None = None  # a Hugging Face folder (GPT-2, Llama, T5): its architecture, weights and
    # tokenizer.json; model keys may only add what has no weights (dropout, kernels)
    # -- data --
    data: str = "stdlib"  # a text file, a folder of text files, a .bin token file, or "stdlib"
    task: str | None = None  # synthetic seq2seq task for xtransformer: copy, reverse, sort, addition
    tokenizer: str | None = None  # a Hugging Face tokenizers JSON, or bpe:N (a byte-level BPE of N entries trained
    # on the corpus, cached by its digest); bytes (256 tokens) when unset
    token_dtype: str = "uint16"  # element type of a .bin token file
    stdlib_bytes: int = 4_000_000  # byte budget of the embedded default corpus
    val_fraction: float = 0.05  # the last fraction of the tokens is the validation split
    seq_len: int = 256  # tokens per training sequence (the model's context)
    # -- optimisation --
    batch_size: int = 16  # global: sequences per optimizer step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (batch_size is split over them)
    max_steps: int = 300  # optimizer steps of the whole run; the learning-rate schedule spans them
    stop_after: int | None = None  # end this invocation at this step (e.g. a time-limited job); the
    # schedule still spans max_steps, and --resume continues
    lr: float = 1e-3  # peak learning rate (AdamW), reached after warmup_steps
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    # -- evaluation, sampling, logging, checkpoints --
    eval_every: int = 100  # validate (loss, bits per byte, a sample) every this many steps
    eval_batches: int = 8  # validation batches per evaluation
    sample_tokens: int = 160  # tokens sampled at each evaluation
    sample_prompt: str = "def "  # the text each evaluation's sample continues
    temperature: float = 0.8  # 0 = greedy
    log_every: int = 10  # write a metrics line every this many steps
    save_every: int = 100  # checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 1  # checkpoints kept on disk, newest first
    keep_best: bool = False  # also keep the weights of the lowest validation loss in checkpoints/best
    patience: int = 0  # stop after this many validations in a row without a lower loss (0 = never stop early)
    logger: str = "tensorboard"  # where metrics also go: tensorboard (RUN/tensorboard), wandb (offline unless
    # WANDB_MODE says otherwise) or none; metrics.jsonl is always written
    progress: bool = True  # the progress bar (--no-progress for plain lines)
    # -- execution --
    seed: int = 0  # seeds the model's initialisation, the data order and the samples
    device: str = "auto"  # auto = cuda when available
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; or "fp32" / "bf16"
    compile: bool = False  # torch.compile the forward and the loss together (one graph)
    compile_mode: str = "default"  # default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs
    fp8: bool = False  # FP8 matrix products through torchao (x_transformers.fp8; the [fp8] extra); GPUs >= 8.9
    fp8_recipe: str = "tensorwise"  # torchao's float8 scaling: tensorwise, rowwise, rowwise_with_gw_hp
    strategy: str = "none"  # none, ddp, fsdp (launch with torchrun)
    out: str | None = None  # run folder; default runs/<preset>-<time>
    preset: str | None = None  # the named preset this configuration started from (set by --preset)

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise CLIError(msg)

        need(self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        need(isinstance(self.model, dict), "model must be a mapping of model keywords")
        need(self.fp8_recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
             f"fp8_recipe must be tensorwise, rowwise or rowwise_with_gw_hp, got {self.fp8_recipe!r}")
        need(not self.fp8 or self.precision != "fp32", "fp8 trains under bf16 autocast; precision fp32 contradicts it")
        need(self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        need(not (self.compile and self.compile_mode in CUDAGRAPH_MODES and self.strategy != "none"),
             f"compile_mode {self.compile_mode} captures CUDA graphs, which do not hold the collective "
             f"communication of strategy {self.strategy}; use compile_mode default or max-autotune-no-cudagraphs")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "log_every", "save_every", "keep_checkpoints", "stdlib_bytes"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        need(0 < self.val_fraction < 1, f"val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        need(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
             and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        need(isinstance(self.sample_tokens, int) and not isinstance(self.sample_tokens, bool) and self.sample_tokens >= 0,
             f"sample_tokens must be an integer >= 0, got {self.sample_tokens!r}")
        need(self.logger in LOGGERS, f"logger must be one of {LOGGERS}, got {self.logger!r}")
        need(isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 0,
             f"patience must be an integer >= 0 (0 = never stop early), got {self.patience!r}")
        need(self.token_dtype in TOKEN_DTYPES, f"token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        need(self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        need(self.warmup_steps >= 0 and self.lr > 0, "lr must be positive and warmup_steps >= 0")
        if self.init_from is not None:
            pass  # the checkpoint decides the arch; training.model.load_pretrained checks the task
        elif self.arch == "xtransformer":
            need(self.task is not None, "arch xtransformer trains on a synthetic task: set task "
                                        "(copy, reverse, sort or addition)")
        elif self.task is not None:
            raise CLIError(f"task {self.task!r} needs arch: xtransformer (an encoder-decoder)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_help() -> dict[str, str]:
    """Each TrainConfig field's one-line description: the comment beside it above (and the comment
    lines continuing it), so the class stays the one place a key is documented."""
    import inspect
    import re

    helps: dict[str, str] = {}
    last = None
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        m = re.match(r"(\w+): [^=]+=.*?#\s*(.*)$", stripped)
        if m and m.group(1) in FIELDS:
            last = m.group(1)
            helps[last] = m.group(2)
        elif stripped.startswith("#") and not stripped.startswith("# --") and last is not None:
            helps[last] += " " + stripped.lstrip("# ")
        else:
            last = None
    return helps


def parse_value(text: str) -> Any:
    """A flag value: JSON/YAML scalars and lists (``3e-4``, ``true``, ``[1, 2]``), else the string."""
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    except Exception:
        return text


def read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise CLIError("YAML config files need pyyaml: pip install 'x-transformers[train]', or use JSON")
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"config file {path} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: "
                       f"{str(e).splitlines()[0]}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of keys to values")
    return data


def apply(cfg: dict, updates: dict, source: str) -> dict:
    """Merge ``updates`` into ``cfg`` (``model`` merges key by key), rejecting unknown keys."""
    for key, value in updates.items():
        if key.startswith("model."):
            cfg["model"] = {**cfg["model"], key[6:]: value}
        elif key == "model":
            if not isinstance(value, dict):
                raise CLIError(f"{source}: model must be a mapping of model keywords")
            cfg["model"] = {**cfg["model"], **value}
        elif key in FIELDS:
            cfg[key] = value
        else:
            raise CLIError(f"{source}: unknown config key {key!r}{closest(key, FIELDS)}")
    return cfg


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise CLIError(f"unknown preset {name!r}{closest(name, PRESETS)} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def load_config(preset_name: str | None = None, config_file: str | None = None, sets: dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """Resolve a TrainConfig. ``base`` (a saved run's config) replaces defaults, preset and file."""
    file = read_file(config_file) if config_file else {}
    sets = sets or {}
    preset_name = sets.get("preset") or file.get("preset") or preset_name
    if base is not None:
        cfg = apply(TrainConfig().to_dict(), base, "checkpoint config")
    else:
        cfg = TrainConfig().to_dict()
        if preset_name:
            apply(cfg, preset(preset_name), f"preset {preset_name}")
            cfg["preset"] = preset_name
        apply(cfg, file, f"config file {config_file}")
    apply(cfg, sets, "flag")
    defaults = TrainConfig()
    for name, value in cfg.items():
        default = getattr(defaults, name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            cfg[name] = value = float(value)
        kind = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}[str(FIELDS[name].type).split()[0]]
        if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CLIError(f"config key {name!r} must be of type {kind.__name__}, got {value!r}")
    return TrainConfig(**cfg).validate()
