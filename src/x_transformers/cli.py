"""The ``xtransformers`` command (also ``python -m x_transformers``).

    xtransformers train --preset tiny                       train (config: preset < --config FILE < flags)
    xtransformers train --resume runs/tiny-...               continue a run from its latest checkpoint
    xtransformers eval RUN                                   validation loss / bits per byte (exact match)
    xtransformers generate RUN --prompt "def "               sample from a trained model (or a Hugging Face folder)
    xtransformers train --init-from HF_FOLDER --data FILE     start from a GPT-2 / Llama / T5 checkpoint
    xtransformers plot RUN [RUN...] -o curves.png            loss curves of one or more runs
    xtransformers prepare DATA OUT.bin                       tokenize a corpus into a memory-mappable file
    xtransformers ablate --preset ablate                     keyword variants against a baseline, seeds, one table
    xtransformers export RUN --onnx model.onnx               ONNX with dynamic batch and length
    torchrun --nproc_per_node=N -m x_transformers train --strategy ddp|fsdp ...

Subcommands live in a registry: decorate ``run(args) -> int`` with :func:`command` (giving a function
that adds the arguments) in this module or in a module listed in ``COMMAND_MODULES``. User errors
raise :class:`~x_transformers.training.config.CLIError` and print one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .training.config import FIELDS, CLIError, field_help, load_config, parse_value
from .training.presets import PRESETS


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
COMMAND_MODULES: list[str] = ["x_transformers.training.ablate"]  # further modules that register subcommands


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def register(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return register


# ----------------------------------------------------------------------------------------------
# configuration flags, shared by every command that trains


def _default_text(f) -> str:
    from dataclasses import MISSING

    default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
    return "unset" if default is None else repr(default)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a named preset: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", help="a YAML or JSON file of config keys")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, model keywords as model.KEY (e.g. --set model.rotary_pos_emb=true)")
    keys = p.add_argument_group("config keys", "each also settable in --config FILE or as --set KEY=VALUE; "
                                               "later wins: defaults < --preset < --config < flags")
    helps = field_help()
    for name, f in FIELDS.items():
        if name in ("model", "preset"):
            continue
        flag, kind = "--" + name.replace("_", "-"), str(f.type).replace("'", "")
        text = f"{helps.get(name, '')} [{kind}, default {_default_text(f)}]"
        if kind == "bool":
            keys.add_argument(flag, dest="field_" + name, type=parse_value, metavar="BOOL", nargs="?", const=True,
                              help=text + f"; {flag} alone means true, --no-{flag[2:]} false")
            keys.add_argument("--no-" + flag[2:], dest="field_" + name, action="store_const", const=False,
                              help=argparse.SUPPRESS)
        else:
            keys.add_argument(flag, dest="field_" + name, type=parse_value, metavar=name.upper(), help=text)


def config_overrides(args) -> dict:
    sets = {}
    for item in args.sets:
        if "=" not in item:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        sets[key.strip()] = parse_value(value)
    for name in FIELDS:
        value = getattr(args, "field_" + name, None)
        if value is not None:
            sets[name] = value
    return sets


# ----------------------------------------------------------------------------------------------
# train

# Keys a resumed run keeps: they fix the model, the data, its order, or the learning-rate schedule,
# so changing them would not continue the run bit for bit.
RESUME_FIXED = ("arch", "model", "init_from", "seq_len", "data", "task", "tokenizer", "token_dtype", "stdlib_bytes",
                "val_fraction", "seed", "batch_size", "grad_accum", "max_steps", "lr", "min_lr_ratio",
                "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


def check_resume_config(run: Path, stored: dict, sets: dict) -> None:
    """Refuse a resume that would not continue the run as configured: a changed fixed key, or a
    fixed key of the run's config.json edited by hand since the checkpoint (it would be silently
    overwritten by the checkpoint's)."""
    import json

    for key, value in sets.items():
        top = key.split(".", 1)[0]
        if top in RESUME_FIXED and (top != key or stored.get(key) != value):
            why = ("the learning-rate schedule spans max_steps, so a resumed run keeps the run's "
                   f"({stored.get('max_steps')}); to stop earlier this time use --stop-after STEP"
                   if key == "max_steps" else
                   "it fixes the model, the data, its order or the learning-rate schedule")
            raise CLIError(f"--resume continues the run as it was configured: {key} cannot change ({why}); "
                           f"keys such as stop_after, eval_every, save_every, progress may")
    file = run / "config.json"
    try:
        on_disk = json.loads(file.read_text())
    except (OSError, ValueError):
        return  # absent or unreadable: the checkpoint's copy is the configuration, rewritten as it was
    edited = sorted(k for k in RESUME_FIXED if on_disk.get(k) != stored.get(k))
    if edited:
        raise CLIError(f"{file} differs from the checkpoint's configuration in {', '.join(edited)}: a resumed run "
                       f"uses the checkpoint's; restore the file, or give allowed changes as flags")


def check_out(run: Path) -> None:
    """The run folder can be made and written, checked before anything is written."""
    import os

    if run.exists() and not run.is_dir():
        raise CLIError(f"--out {run} is a file, not a folder: choose a folder path")
    parent = run if run.exists() else next((a for a in run.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        raise CLIError(f"--out {run}: {parent} is not a folder; choose a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {run}: {parent} is not writable; choose a folder you can write to")



def _train_arguments(p):
    add_config_arguments(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    p.epilog = "model keywords (any of the library's, e.g. rotary_pos_emb) go in --set model.KEY=VALUE or --config"


@command("train", "train a model (presets: " + ", ".join(sorted(PRESETS)) + ")", _train_arguments)
def run_train(args) -> int:
    from .training import checkpoint as ckpt_io
    from .training.loop import Trainer

    sets = config_overrides(args)
    resume = None
    if args.resume:
        resume = ckpt_io.find(args.resume)
        run = resume.parent.parent
        stored = ckpt_io.read_config(resume)
        check_resume_config(run, stored, sets)
        base = {**stored, "stop_after": None}  # a stop belongs to one invocation
        cfg = load_config(config_file=args.config, sets=sets, base=base)
        cfg.out = str(run)
    else:
        cfg = load_config(args.preset, args.config, sets)
        if cfg.preset is None and not cfg.model and cfg.init_from is None:
            raise CLIError("no model given: use --preset NAME (tiny, gpt2-small, 1b, seed), --config FILE, "
                           "or --init-from HF_FOLDER")
        name = cfg.preset or (Path(cfg.init_from).name if cfg.init_from else "run")
        run = Path(cfg.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_out(run)
        cfg.out = str(run)
    trainer = Trainer(cfg, run, resume)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.env.main and summary["evals"]:
        from .training.metrics import read

        vals = [r for r in read(run) if r.get("kind") == "val"]  # the run's whole history, resumes included
        first, last = (vals or summary["evals"])[0], summary["evals"][-1]
        print(f"validation bits per byte: {first['val_bpb']:.3f} -> {last['val_bpb']:.3f} "
              f"({summary['steps_run']} steps in {summary['seconds']:.0f} s)")
        if "plot" in summary:
            print(f"loss plot: {summary['plot']}")
    return 0


# ----------------------------------------------------------------------------------------------
# eval / generate: a trained model from its checkpoint


def _load_trained(run: str, sets: dict):
    import torch

    from .training import checkpoint as ckpt_io
    from .training.data import load_data
    from .training.distributed import Env
    from .checks import warn_nonfinite
    from .training.model import build_model

    ckpt = ckpt_io.find(run)
    cfg = load_config(sets={**sets, "strategy": "none"}, base=ckpt_io.read_config(ckpt))
    data = load_data(cfg)
    model = build_model(cfg, data.vocab_size)
    try:
        weights = ckpt_io.load_weights(ckpt)
        warn_nonfinite(weights, f"checkpoint {ckpt}")
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CLIError(f"checkpoint {ckpt} does not fit its model: {str(e).splitlines()[0]}")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else
                          cfg.device if cfg.device != "auto" else "cpu")
    return cfg, data, model.to(device).eval(), Env(device=device), ckpt


def _eval_arguments(p):
    p.add_argument("run", help="a run folder or checkpoint folder")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set eval_batches=32, or --set data=other.txt to evaluate on other text")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@command("eval", "validation loss and bits per byte of a trained model", _eval_arguments)
def run_eval(args) -> int:
    import json

    from .training.loop import evaluate

    sets = config_overrides(argparse.Namespace(sets=args.sets))
    cfg, data, model, env, ckpt = _load_trained(args.run, sets)
    out = evaluate(model, data, cfg, env)
    out.pop("sample")
    out["checkpoint"] = str(ckpt)
    print(json.dumps(out) if args.json else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in out.items()))
    return 0


def _generate_arguments(p):
    p.add_argument("run", help="a run folder, a checkpoint folder, or a Hugging Face folder (GPT-2, Llama, T5)")
    p.add_argument("--prompt", default=None, help="text to continue (the source sequence for an encoder-decoder)")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)


def _is_hf_folder(path: str) -> bool:
    import json

    file = Path(path) / "config.json"
    if not file.is_file() or (Path(path) / "checkpoints").is_dir() or (Path(path) / "meta.json").is_file():
        return False  # not a model folder, or one of our runs / checkpoints (their config.json is ours)
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise CLIError(f"{file} is not valid JSON ({e})")
    except OSError:
        return False
    return isinstance(config, dict) and "model_type" in config


def _generate_hf(args) -> str:
    """Sample from a Hugging Face folder with its tokenizer.json (bytes when it has none)."""
    from types import SimpleNamespace

    import torch

    from . import hf
    from .training.config import TrainConfig
    from .training.data import load_tokenizer
    from .training.distributed import Env
    from .training.loop import sample_text
    from .training.model import pretrained_tokenizer
    from .wrappers import XTransformer

    try:
        model = hf.from_pretrained(args.run)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{args.run}: {str(e).splitlines()[0]}")
    seq2seq = isinstance(model, XTransformer)
    vocab = (model.decoder if seq2seq else model).num_tokens
    tokenizer = load_tokenizer(pretrained_tokenizer(Path(args.run), None, vocab))
    cfg = TrainConfig(sample_tokens=args.tokens, temperature=args.temperature, seed=args.seed)
    prompt = cfg.sample_prompt if args.prompt is None else args.prompt
    if not seq2seq:
        return sample_text(model, SimpleNamespace(tokenizer=tokenizer), cfg, Env(), 0, prompt, strict=True)
    # T5: the prompt is the source; the decoder starts from decoder_start_token_id, stops at eos
    hf_cfg = hf.read_config(args.run)
    src = torch.tensor([list(tokenizer.encode(prompt.encode()))], dtype=torch.long)
    start = torch.full((1, 1), hf_cfg.get("decoder_start_token_id") or hf_cfg.get("pad_token_id") or 0)
    g = torch.Generator().manual_seed(args.seed)
    eos = hf_cfg.get("eos_token_id")
    out = model.generate(src, start, args.tokens, temperature=args.temperature, generator=g,
                         eos_token=eos if isinstance(eos, int) else None)
    return tokenizer.decode(out[0].tolist())


def check_generate_args(args) -> None:
    import math

    if args.tokens < 1:
        raise CLIError(f"--tokens must be at least 1, got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.prompt is not None and not args.prompt:
        raise CLIError("--prompt is empty: give some text to continue, or leave --prompt out for the run's sample_prompt")


@command("generate", "sample text from a trained model or a Hugging Face folder", _generate_arguments)
def run_generate(args) -> int:
    from .training.loop import sample_text

    check_generate_args(args)
    if _is_hf_folder(args.run):
        print(_generate_hf(args))
        return 0
    cfg, data, model, env, _ = _load_trained(args.run, {})
    cfg.sample_tokens, cfg.temperature, cfg.seed = args.tokens, args.temperature, args.seed
    print(sample_text(model, data, cfg, env, 0, args.prompt, strict=True))
    return 0


def _export_arguments(p):
    p.add_argument("run", help="a run folder or checkpoint folder")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--mask", action="store_true", help="take a padding mask as an input too")
    p.add_argument("--kv-cache", action="store_true",
                   help="a decoder as two graphs with the KV cache as inputs/outputs: FILE (prefill) and "
                        "FILE's stem + .decode.onnx (one decode step)")


@command("export", "export a trained model to ONNX (dynamic batch and length), checked in onnxruntime",
         _export_arguments)
def run_export(args) -> int:
    from .export import export_onnx, export_onnx_with_cache

    if not args.onnx.endswith(".onnx"):
        raise CLIError(f"--onnx must name a .onnx file, got {args.onnx}")
    check_out(Path(args.onnx).absolute().parent)
    _, _, model, _, ckpt = _load_trained(args.run, {"device": "cpu"})
    if args.kv_cache and args.mask:
        raise CLIError("--kv-cache and --mask do not combine: the cached graphs carry the mask as their key_mask input")
    try:
        if args.kv_cache:
            report = export_onnx_with_cache(model.float().cpu(), args.onnx)
            report["inputs"] = ["ids", *report["cache"]]
        else:
            report = export_onnx(model.float().cpu(), args.onnx, with_mask=args.mask)
    except (ImportError, TypeError) as e:
        raise CLIError(str(e))
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in report["max_abs_diff"].items())
    print(f"{ckpt} -> {args.onnx} (inputs {', '.join(report['inputs'])}; onnxruntime vs PyTorch, max abs diff: {diffs})")
    return 0


# ----------------------------------------------------------------------------------------------
# plot / prepare


def _plot_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or metrics.jsonl files)")
    p.add_argument("-o", "--out", help="PNG to write (default RUN/loss.png for one run, loss_curves.png for several)")
    p.add_argument("--metric", default="loss", help="loss (default) or bpb")


@command("plot", "loss curves of one or more runs in one PNG", _plot_arguments)
def run_plot(args) -> int:
    from .training.metrics import plot

    out = args.out or (str(Path(args.runs[0]) / "loss.png") if len(args.runs) == 1 else "loss_curves.png")
    print(plot(args.runs, out, args.metric))
    return 0


def _prepare_arguments(p):
    p.add_argument("data", help="a text file, a folder of text files, or 'stdlib'")
    p.add_argument("out", help="the token file to write, ending in .bin")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON (bytes when omitted)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of VOCAB_SIZE entries on the corpus, write it beside OUT "
                        "(OUT without .bin + .tokenizer.json) and tokenize with it")
    p.add_argument("--token-dtype", default="uint16", help="uint8, uint16 (default) or uint32: the widest id must fit")
    p.add_argument("--stdlib-bytes", type=int, default=4_000_000)


@command("prepare", "tokenize a corpus into a memory-mappable .bin token file", _prepare_arguments)
def run_prepare(args) -> int:
    import os

    from .training.data import BPE_PREFIX, bpe_size, bpe_tokenizer, load_tokenizer, read_corpus, write_tokens

    from .training.config import TOKEN_DTYPES

    if not args.out.endswith(".bin"):
        raise CLIError(f"the token file must end in .bin, got {args.out}")
    if args.token_dtype not in TOKEN_DTYPES:
        raise CLIError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {args.token_dtype!r}")
    check_out(Path(args.out).parent)
    if args.train_tokenizer is not None and args.tokenizer is not None:
        raise CLIError("give --tokenizer FILE or --train-tokenizer VOCAB_SIZE, not both")
    if args.train_tokenizer is not None:
        bpe_size(f"{BPE_PREFIX}{args.train_tokenizer}")  # checked before the corpus is read
    raw = read_corpus(args.data, args.stdlib_bytes)
    if not raw.strip():
        raise CLIError(f"corpus {args.data} is empty")
    tokenizer_file = args.tokenizer
    if args.train_tokenizer is not None:
        tokenizer_file = str(bpe_tokenizer(raw, args.train_tokenizer, Path(args.out[:-len(".bin")] + ".tokenizer.json")))
    tokenizer = load_tokenizer(tokenizer_file)
    tokens = tokenizer.encode(raw)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    write_tokens(tmp, tokens, args.token_dtype)
    os.replace(tmp, args.out)
    print(f"{len(tokens)} tokens -> {args.out} ({args.token_dtype})")
    if args.train_tokenizer is not None:
        print(f"tokenizer ({tokenizer.vocab_size} entries) -> {tokenizer_file}; train with "
              f"--data {args.out} --tokenizer {tokenizer_file} --token-dtype {args.token_dtype}")
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="xtransformers", description="Train and use x-transformers models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
