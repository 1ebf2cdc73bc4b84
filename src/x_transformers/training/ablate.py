"""``xtransformers ablate``: every paper feature, one keyword change each, trained with the same budget
on the same data order and compared with the plain model.

    xtransformers ablate --out runs/ablation                      every default setting, 3 seeds, both tables
    xtransformers ablate --settings baseline,rotary,llama --seeds 2 --tokens 1e6
    xtransformers ablate --list                                   the settings, their keywords and papers

Two experiments, each a base preset and a list of :class:`Setting`:

- ``lm``: a byte-level ``Decoder`` language model (preset ``ablate``) on a corpus (default the
  embedded stdlib corpus); metric: validation loss and bits per byte.
- ``seq2seq``: an ``XTransformer`` (preset ``ablate-seq2seq``) on a built-in task (default
  ``reverse``) for the encoder-decoder features (Funnel, positional schemes on both sides); metric:
  exact match of the greedy decode, and validation loss.

Fairness: run (setting, seed) draws training batches from the data seed ``seed``, so every setting
sees the same data order as the baseline with that seed, and every run is validated on the same
fixed batches (those of the base seed). The model initialisation is seeded with ``seed`` too.
Each run uses the training loop's own optimizer step (:class:`~.loop.Trainer`), in this process.

Robustness (one long GPU run): runs go seed by seed (every setting with seed 0, then seed 1, ...),
so a time limit (``--time-limit``) leaves every setting measured with the same seeds; a setting that
fails records its error and the sweep continues; ``runs.jsonl`` gains a line and the tables are
rewritten after every run. Output (``--out``, at most 6 files): ``table.md``, ``seq2seq.md``,
``runs.jsonl``, ``loss_curves.png``, ``bars.png``, ``meta.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cli import add_config_arguments, command, config_overrides
from .ablate_settings import ATTENTION_SETTINGS, Setting
from .config import CLIError, TrainConfig, load_config

# ----------------------------------------------------------------------------------------------
# the settings


def _half_heads(c):
    return max(1, c["heads"] // 2)


def _same_len(c):
    return c["seq_len"] + 1  # the encoder-decoder's decoder reads a start token too


MATCHED = "matched by construction"
LLAMA = {"rotary_pos_emb": True, "ff_glu": True, "ff_activation": "swish", "ff_mult": 8 / 3, "use_rmsnorm": True,
         "ff_no_bias": True, "attn_kv_heads": _half_heads}

LM_SETTINGS: tuple[Setting, ...] = (
    Setting("baseline", {}, "", "", "the plain model: learned absolute positions, pre-LayerNorm, GELU FF x4, MHA"),
    # attention
    Setting("mem_kv", {"attn_num_mem_kv": 16}, "1907.01470", "Persistent memory key/values", "16 memory key/values"),
    Setting("memory_tokens", {"num_memory_tokens": 16}, "2006.11527", "Memory tokens", "16 memory tokens"),
    Setting("talking_heads", {"attn_talking_heads": True}, "2003.02436", "Talking heads", "pre + post mixing"),
    Setting("entmax15", {"attn_use_entmax15": True}, "1909.00015", "Adaptively sparse attention", MATCHED),
    Setting("entmax_learned_alpha", {"attn_learned_entmax_alpha": True}, "1909.00015", "Adaptively sparse attention",
            "one alpha per head"),
    Setting("topk", {"attn_sparse_topk": 8}, "1912.11637", "Explicit sparse attention", "k = 8"),
    Setting("topk_32", {"attn_sparse_topk": 32}, "1912.11637", "Explicit sparse attention",
            "k = 32: about a quarter of the 128 keys a causal query sees on average at seq 256, the share k = 8 "
            "keeps of the paper's ~30-token MT sentences"),
    Setting("dim_head_x2", {"attn_dim_head": lambda c: 2 * c["dim_head"]}, "2002.07028", "Free head dimension",
            "head dim 2 x dim/heads: more attention weights"),
    Setting("shared_qk", {"attn_shared_qk": True}, "2001.04451", "Shared query-key attention", "no key projection"),
    Setting("gqa", {"attn_kv_heads": _half_heads}, "2305.13245", "Grouped and multi-query", "kv_heads = heads/2"),
    Setting("mqa", {"attn_kv_heads": 1}, "1911.02150", "Grouped and multi-query", "kv_heads = 1"),
    Setting("qk_norm", {"attn_qk_norm": True}, "2010.04245", "Query-key normalisation", MATCHED),
    *ATTENTION_SETTINGS,  # issue 20's attention variants (ablate_settings.py)
    # layer structure
    Setting("scalenorm", {"use_scalenorm": True}, "1910.05895", "ScaleNorm", ""),
    Setting("rmsnorm", {"use_rmsnorm": True}, "1910.07467", "RMSNorm", ""),
    Setting("post_norm", {"pre_norm": False}, "1706.03762", "Norm placement", "original post-LN"),
    Setting("sandwich_norm", {"sandwich_norm": True}, "2105.13290", "Norm placement", ""),
    Setting("sandwich_norm_unit_emb", {"sandwich_norm": True, "post_emb_norm": True}, "2105.13290", "Norm placement",
            "each branch's output is LayerNorm-ed to unit scale: the embeddings too, so the first branch does not "
            "drown the std-0.02 token embeddings"),
    Setting("rezero", {"use_rezero": True}, "2003.04887", "ReZero", "no norms"),
    Setting("rezero_unit_emb", {"use_rezero": True, "post_emb_norm": True}, "2003.04887", "ReZero",
            "no norms in the stack; the summed embeddings LayerNorm-ed to unit scale, as the paper's "
            "sqrt(d)-scaled embeddings (ours start at std 0.02)"),
    Setting("geglu", {"ff_glu": True, "ff_activation": "gelu", "ff_mult": 8 / 3}, "2002.05202", "GLU feed-forwards",
            "ff_mult=8/3 to match the FF weights, as the paper"),
    Setting("swiglu", {"ff_glu": True, "ff_activation": "swish", "ff_mult": 8 / 3}, "2002.05202",
            "GLU feed-forwards", "ff_mult=8/3 to match the FF weights, as the paper"),
    Setting("macaron", {"macaron": True, "ff_mult": 2}, "1906.02762", "Macaron",
            "ff_mult=2: two half-size FFs per layer, matched"),
    Setting("macaron_post_norm", {"macaron": True, "ff_mult": 2, "pre_norm": False}, "1906.02762", "Macaron",
            "the paper's post-LN base; ff_mult=2, matched (compare with post_norm)"),
    Setting("macaron_full_ff", {"macaron": True}, "1906.02762", "Macaron",
            "two full-width FFs (ff_mult 4) per layer: not matched, the upper bound of the half-step idea"),
    Setting("sandwich_coef", {"sandwich_coef": lambda c: max(1, c["depth"] // 2)}, "1911.03864",
            "Sandwich transformer", "k = depth/2; " + MATCHED),
    Setting("sandwich_coef_quarter", {"sandwich_coef": lambda c: max(1, c["depth"] // 4)}, "1911.03864",
            "Sandwich transformer", "k = depth/4 (the paper's best k is 6 of 16 on WikiText-103); " + MATCHED),
    Setting("top_attn_to_ff", {"top_attn_to_ff": 1}, "2005.13895", "Feed-forwards in place of the top",
            "top layer's attention -> FF"),
    Setting("reversible", {"reversible": True}, "2001.04451", "Reversible layers", MATCHED),
    # positions (each replaces the base's scheme)
    Setting("rotary", {"rotary_pos_emb": True}, "2104.09864", "Rotary", "replaces the learned absolute table"),
    Setting("alibi", {"alibi_pos_bias": True, "disable_abs_pos_emb": True}, "2108.12409", "ALiBi",
            "replaces the learned absolute table"),
    Setting("t5_bias", {"rel_pos_bias": True}, "1910.10683", "T5 relative bias", "replaces the learned absolute table"),
    Setting("tupe", {"tupe": True, "tupe_max_seq_len": lambda c: c["seq_len"]}, "2006.15595", "TUPE",
            "replaces the learned absolute table"),
    Setting("no_positions", {"use_abs_pos_emb": False}, "1706.03762", "Absolute positions", "causal mask only"),
    Setting("sinusoidal", {"sinusoidal_pos_emb": True}, "1706.03762", "Absolute positions", "fixed table"),
    Setting("scaled_sinusoidal", {"scaled_sinu_pos_emb": True}, "1706.03762", "Absolute positions",
            "fixed table x learned scalar"),
    # residual, norm and position variants (issue 21's evidence; no features.md section of their own to
    # fill: most are bullets of larger sections, and docs/evidence/ablation.md holds their table)
    Setting("dynamic_tanh", {"use_dynamic_tanh": True}, "2503.10622", "", "tanh(alpha x) in place of every norm"),
    Setting("hyper_connections", {"num_residual_streams": 4}, "2409.19606", "", "4 residual streams"),
    Setting("value_residual", {"add_value_residual": True}, "2410.17897", "", "the first layer's values mixed in"),
    Setting("realformer", {"residual_attn": True}, "2012.11747", "", "residual attention scores"),
    Setting("lime", {"integrate_layers": True}, "2502.09245", "", "each block reads a mix of the earlier blocks' inputs"),
    Setting("layerscale", {"use_layerscale": True}, "2103.17239", "", "per-channel branch gains"),
    Setting("gate_residual", {"gate_residual": True}, "1910.06764", "", ""),
    Setting("unet_skips", {"unet_skips": True}, "2209.12152", "", "the lower half's outputs into the upper half"),
    Setting("rotary_xpos", {"rotary_pos_emb": True, "rotary_xpos": True}, "2212.10554", "",
            "rotary with xPos decay; compare with rotary"),
    Setting("dynamic_pos_bias", {"dynamic_pos_bias": True}, "2111.09883", "",
            "an MLP of the distance per head; replaces the learned absolute table", ),
    Setting("shift_tokens", {"shift_tokens": 1}, "2305.13048", "", "part of the channels from the previous token"),
    # combinations worth knowing
    Setting("llama", dict(LLAMA), "2302.13971", "", "rotary + SwiGLU(8/3) + RMSNorm + no FF bias + GQA(heads/2)"),
    Setting("llama_qk_norm", {**LLAMA, "attn_qk_norm": True}, "2010.04245", "", "llama + QK-norm"),
)

SEQ2SEQ_SETTINGS: tuple[Setting, ...] = (
    Setting("baseline", {}, "", "", "learned absolute positions on both sides"),
    Setting("funnel", {"enc_funnel": True, "enc_depths": lambda c: (max(1, c["depth"] // 2),) * 2}, "2006.03236",
            "Funnel Transformer", "encoder depths (d/2, d/2), pooled once: same layer count"),
    Setting("rotary", {"rotary_pos_emb": True}, "2104.09864", "Rotary", "both sides"),
    Setting("alibi", {"alibi_pos_bias": True, "disable_abs_pos_emb": True}, "2108.12409", "ALiBi", "both sides"),
    Setting("t5_bias", {"rel_pos_bias": True}, "1910.10683", "T5 relative bias", "both sides"),
    Setting("tupe_encoder", {"enc_tupe": True, "enc_tupe_max_seq_len": _same_len}, "2006.15595", "TUPE",
            "encoder TUPE, decoder keeps the learned table"),
    Setting("no_positions", {"use_abs_pos_emb": False}, "1706.03762", "Absolute positions", "both sides"),
    Setting("memory_tokens", {"enc_num_memory_tokens": 10}, "2006.11527", "Memory tokens",
            "10 memory tokens in the encoder, the paper's MemTransformer placement"),
)

EXPERIMENTS = {"lm": ("ablate", LM_SETTINGS), "seq2seq": ("ablate-seq2seq", SEQ2SEQ_SETTINGS)}
NOT_RUN = {"Chunked feed-forward": "not ablated: `ff_chunks` gives identical outputs and gradients (tested), "
                                   "so its loss equals the baseline's; it changes memory only"}

# a setting that names a key of one of these groups first removes the base's keys of that group, so a
# positional setting replaces the base's scheme (e.g. the tiny preset's rotary) instead of conflicting
EXCLUSIVE = (
    frozenset({"rotary_pos_emb", "alibi_pos_bias", "rel_pos_bias", "tupe", "tupe_max_seq_len", "tupe_untie_cls",
               "sinusoidal_pos_emb", "scaled_sinu_pos_emb", "use_abs_pos_emb", "disable_abs_pos_emb"}),
    frozenset({"use_scalenorm", "use_rmsnorm", "use_rezero"}),
    frozenset({"attn_use_entmax15", "attn_entmax_alpha", "attn_learned_entmax_alpha", "attn_sparse_topk"}),
)


def _bare(key: str) -> str:
    return key[4:] if key.startswith(("enc_", "dec_")) else key


def setting_model(setting: Setting, cfg: TrainConfig) -> dict:
    """The base's model keywords with the setting's changes applied (callables resolved)."""
    base = dict(cfg.model)
    heads = base.get("heads", 8)
    shape = dict(dim=base["dim"], heads=heads, depth=base.get("depth", 1), seq_len=cfg.seq_len,
                 dim_head=base.get("attn_dim_head", 64))  # AttentionConfig's default
    changes = {k: (v(shape) if callable(v) else v) for k, v in setting.model.items()}
    for group in EXCLUSIVE:
        if any(_bare(k) in group for k in changes):
            base = {k: v for k, v in base.items() if _bare(k) not in group}
    return {**base, **changes}


def select(names: str | None, kinds: list[str]) -> dict[str, list[Setting]]:
    chosen = {kind: list(EXPERIMENTS[kind][1]) for kind in kinds}
    if not names:
        return chosen
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name for kind in kinds for s in chosen[kind]}
    for n in wanted:
        if n not in known:
            from .config import closest

            raise CLIError(f"unknown setting {n!r}{closest(n, known)}; see xtransformers ablate --list")
    # the baseline always runs: every row is compared with it
    return {kind: [s for s in chosen[kind] if s.name in wanted or s.name == "baseline"] for kind in kinds}


# ----------------------------------------------------------------------------------------------
# one run


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_trainer(cfg: TrainConfig, train_data, val_data, env):
    """The training loop's :class:`Trainer` (its optimizer step and evaluation), without a run folder:
    no checkpoints, metrics files or TensorBoard, and data loaded once for every run."""
    import torch

    from .loop import Trainer, evaluate, lr_factor, make_optimizer
    from .model import build_model, count_params

    class AblationTrainer(Trainer):
        def __init__(self):  # Trainer.__init__ would load the data and write a run folder
            self.cfg, self.env, self.data, self.run, self.log = cfg, env, train_data, None, print
            torch.manual_seed(cfg.seed)
            self.inner = build_model(cfg, val_data.vocab_size)
            self.n_params = count_params(self.inner)
            self.attach()
            self.opt = make_optimizer(self.inner, cfg, env)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))
            self.step = 0
            torch.manual_seed(cfg.seed + 1)  # the dropout stream, as a fresh run of the loop

        def evaluate(self):
            return evaluate(self.inner, val_data, self.cfg, self.env, self.step)

    return AblationTrainer()


def run_one(kind: str, setting: Setting, base: TrainConfig, data, env, seed: int, lr: float | None = None) -> dict:
    """Train one (setting, seed) at learning rate ``lr`` (default the base's) for ``base.max_steps``
    steps; a failure is recorded, not raised."""
    import torch

    lr = base.lr if lr is None else lr
    cfg = dataclasses.replace(base, seed=seed, sample_tokens=1, lr=lr)
    rec: dict[str, Any] = dict(kind=kind, setting=setting.name, seed=seed, lr=lr, paper=setting.paper,
                               section=setting.section, notes=setting.notes, status="ok")
    train_data = copy.copy(data)
    train_data.seed = seed  # this seed's data order; validation stays on the base seed's batches
    cuda = env.device.type == "cuda"
    trainer = None
    started = time.perf_counter()
    try:
        cfg.model = setting_model(setting, base)
        rec["model"] = {k: v for k, v in cfg.model.items()}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        peak_rss = _rss_bytes()
        trainer = _make_trainer(cfg, train_data, data, env)
        rec["params"] = trainer.n_params
        warm = min(5, cfg.max_steps // 5)  # steps left out of the speed (CUDA start-up, allocator)
        losses, timed, tokens = [], 0.0, 0
        for step in range(cfg.max_steps):
            t = time.perf_counter()
            out = trainer.train_step()  # its loss.item() synchronises, so the time is the step's
            if step >= warm:
                timed += time.perf_counter() - t
                tokens += out["tokens"]
            losses.append(out["loss"])
            if not cuda and step % 10 == 0:
                peak_rss = max(peak_rss, _rss_bytes())
            if not math.isfinite(out["loss"]):
                rec.update(status="diverged", error=f"non-finite training loss at step {step + 1}")
                break
        rec["train_loss"] = losses
        rec["steps"] = len(losses)
        rec["tokens_per_s"] = tokens / timed if timed > 0 else None
        if rec["status"] == "ok":
            ev = trainer.evaluate()
            ev.pop("sample", None)
            rec.update({k: v for k, v in ev.items()})
            if not math.isfinite(ev["val_loss"]):
                rec.update(status="diverged", error="non-finite validation loss")
        rec["peak_mem_mib"] = (torch.cuda.max_memory_allocated() if cuda else max(peak_rss, _rss_bytes())) / 2**20
        rec["mem_kind"] = "cuda_max_allocated" if cuda else "process_rss"
    except Exception as e:  # noqa: BLE001: one setting's failure must not end a long sweep
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        rec.update(status="error", error=f"{type(e).__name__}: {msg}"[:300])
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    rec["seconds"] = time.perf_counter() - started
    return rec


# ----------------------------------------------------------------------------------------------
# the sweep


def _commit() -> str:
    if os.environ.get("XT_COMMIT"):
        return os.environ["XT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _card(env) -> str:
    import torch

    if env.device.type == "cuda":
        return torch.cuda.get_device_name(env.device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class Sweep:
    out: Path
    bases: dict[str, TrainConfig]
    settings: dict[str, list[Setting]]
    seeds: list[int]
    time_limit: float | None = None
    meta: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    lrs: list[float] | None = None  # the learning-rate sweep (default: the base's lr alone)
    setting_lrs: dict[str, list[float]] = field(default_factory=dict)  # --lr-for NAME=LR,...: one setting's own

    def lrs_of(self, kind: str, setting: Setting) -> list[float]:
        """A setting's learning rates: --lr-for, else its own, else the sweep's, else the base's."""
        if setting.name in self.setting_lrs:
            return list(self.setting_lrs[setting.name])
        return list(setting.lrs or self.lrs or [self.bases[kind].lr])

    def plan(self) -> list[tuple[int, str, Setting, float]]:
        # seed-major: a time limit leaves every setting (at every learning rate) with the same seeds
        return [(seed, kind, s, lr) for seed in self.seeds for kind in self.settings for s in self.settings[kind]
                for lr in self.lrs_of(kind, s)]

    def run(self, log=print) -> list[dict]:
        import torch

        from . import ablate_report as report
        from .data import load_data
        from .distributed import setup

        env = setup(next(iter(self.bases.values())))
        data = {kind: load_data(cfg) for kind, cfg in self.bases.items()}
        torch.set_float32_matmul_precision("high")
        self.meta.update(
            card=_card(env), device=env.device.type, commit=_commit(), torch=torch.__version__,
            python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            seeds=self.seeds, status="running", time_limit_s=self.time_limit, skipped=[],
            experiments={kind: dict(base=cfg.to_dict(), data=data[kind].describe(),
                                    tokens_per_run=cfg.max_steps * cfg.batch_size * cfg.seq_len,
                                    settings=[s.name for s in self.settings[kind]],
                                    lrs={s.name: self.lrs_of(kind, s) for s in self.settings[kind]})
                         for kind, cfg in self.bases.items()})
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        plan = self.plan()
        started = time.perf_counter()
        last: dict[tuple[str, str, float], float] = {}
        with open(self.out / "runs.jsonl", "a") as jsonl:
            for i, (seed, kind, setting, lr) in enumerate(plan):
                elapsed = time.perf_counter() - started
                guess = last.get((kind, setting.name, lr), 0.0)
                if self.time_limit and elapsed + guess > self.time_limit:
                    self.meta["skipped"].append(f"{kind}/{setting.name}/seed{seed}/lr{lr:g}")
                    continue
                rec = run_one(kind, setting, self.bases[kind], data[kind], env, seed, lr)
                last[(kind, setting.name, lr)] = rec["seconds"]
                self.records.append(rec)
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
                log(f"[{i + 1}/{len(plan)} {time.perf_counter() - started:5.0f}s] {_describe(rec)}")
                report.write_tables(self.records, self.meta, self.out)
                round_done = i + 1 == len(plan) or plan[i + 1][0] != seed
                if round_done:
                    self._figures(report, log)
        self.meta["status"] = "complete" if not self.meta["skipped"] else "time limit reached"
        self.meta["seconds"] = time.perf_counter() - started
        report.write_tables(self.records, self.meta, self.out)
        self._figures(report, log)
        self._write_meta()
        return self.records

    def _figures(self, report, log):
        try:
            report.plot_curves(self.records, self.out / "loss_curves.png")
            report.plot_bars(self.records, self.out / "bars.png")
        except Exception as e:  # noqa: BLE001: the numbers matter more than the pictures
            log(f"note: figures not written: {type(e).__name__}: {e}")
        self._write_meta()

    def _write_meta(self):
        tmp = self.out / ".meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1, default=str))
        tmp.replace(self.out / "meta.json")


def _describe(rec: dict) -> str:
    head = f"{rec['kind']} {rec['setting']} seed {rec['seed']} lr {rec.get('lr', 0):g}: "
    if rec["status"] == "error":
        return head + f"ERROR {rec['error']}"
    if rec["status"] == "diverged":
        return head + f"DIVERGED ({rec['error']})"
    em = f", exact match {rec['val_exact_match']:.3f}" if "val_exact_match" in rec else ""
    speed = f"{rec['tokens_per_s']:,.0f} tok/s, " if rec.get("tokens_per_s") else ""
    return (head + f"val loss {rec['val_loss']:.4f} (bpb {rec['val_bpb']:.3f}){em}, {speed}"
            f"{rec['peak_mem_mib']:.0f} MiB, {rec['params'] / 1e6:.2f}M params, {rec['seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------
# the command


def _arguments(p):
    add_config_arguments(p)  # --preset, --config and --set KEY=VALUE (the LM base), every config flag
    p.add_argument("--experiments", default="lm,seq2seq", help="lm, seq2seq, or both (default lm,seq2seq)")
    p.add_argument("--settings", help="comma-separated setting names (default: all; the baseline always runs)")
    p.add_argument("--without-baseline", action="store_true",
                   help="do not run the baseline (parallel sweeps where another process runs it; --merge joins them)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="index of the first seed (to finish a sweep a time limit cut: --first-seed 2 --seeds 1)")
    p.add_argument("--tokens", type=float, help="training tokens per LM run (sets max_steps; default the preset's)")
    p.add_argument("--lrs", help="learning-rate sweep, e.g. 1e-3,2e-3,4e-3: every setting runs at each; the tables "
                                 "report each setting at its best (default: the base's lr alone)")
    p.add_argument("--lr-for", dest="lr_for", action="append", default=[], metavar="NAME=LR[,LR...]",
                   help="one setting's own learning rate(s), in place of the sweep (repeatable)")
    p.add_argument("--depth", type=int, help="the LM base's depth (e.g. 12 for ReZero's deep comparison)")
    p.add_argument("--merge", help="comma-separated output folders of parallel ablate runs (e.g. one a seed): "
                                   "write their records together into --out, tables and figures, and exit")
    p.add_argument("--task-preset", default="ablate-seq2seq", help="base of the seq2seq experiment")
    p.add_argument("--task-set", dest="task_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key of the seq2seq base, e.g. --task-set task=sort --task-set max_steps=100")
    p.add_argument("--time-limit", type=float, help="seconds: start no run that would end after it")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.epilog = "every config key is also a flag for the LM base: --max-steps 100 --batch-size 16 --data FILE"


@command("ablate", "train every paper feature against the plain model; tables, curves and JSONL", _arguments)
def run_ablate(args) -> int:
    kinds = [k.strip() for k in args.experiments.split(",") if k.strip()]
    for k in kinds:
        if k not in EXPERIMENTS:
            raise CLIError(f"unknown experiment {k!r}; choose from {', '.join(EXPERIMENTS)}")
    if args.merge:
        return merge_outputs([Path(d) for d in args.merge.split(",") if d.strip()], _fresh_out(args))
    settings = select(args.settings, kinds)
    if args.without_baseline:
        settings = {kind: [s for s in rows if s.name != "baseline"] for kind, rows in settings.items()}
        if not any(settings.values()):
            raise CLIError("--without-baseline leaves no setting to run; name one with --settings")
    if args.list:
        for kind in kinds:
            for s in settings[kind]:
                kw = ", ".join(f"{k}={'<from shape>' if callable(v) else v}" for k, v in s.model.items())
                print(f"{kind:8s} {s.name:22s} {s.paper:11s} {kw or '(base)'}")
        return 0
    if args.seeds < 1:
        raise CLIError(f"--seeds must be at least 1, got {args.seeds}")
    lrs = _floats(args.lrs, "--lrs") if args.lrs else None
    setting_lrs = {}
    for item in args.lr_for:
        name, _, values = item.partition("=")
        if name.strip() not in {s.name for k in kinds for s in settings[k]}:
            raise CLIError(f"--lr-for {item!r}: no setting {name.strip()!r} in this sweep")
        setting_lrs[name.strip()] = _floats(values, f"--lr-for {name.strip()}")
    out = _fresh_out(args)
    sets = config_overrides(args)
    sets.pop("out", None)
    sets.setdefault("progress", False)
    bases = {}
    if "lm" in kinds:
        bases["lm"] = load_config(args.preset or EXPERIMENTS["lm"][0], args.config, sets)
        if args.depth is not None:
            if args.depth < 1:
                raise CLIError(f"--depth must be at least 1, got {args.depth}")
            bases["lm"].model = {**bases["lm"].model, "depth": args.depth}
        if args.tokens is not None:
            cfg = bases["lm"]
            cfg.max_steps = max(1, math.ceil(args.tokens / (cfg.batch_size * cfg.seq_len)))
            cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps // 2)
    if "seq2seq" in kinds:
        task_sets = config_overrides(argparse_namespace(args.task_sets))
        bases["seq2seq"] = load_config(args.task_preset, None, {"progress": False, **task_sets})
    for kind, cfg in bases.items():
        if cfg.strategy != "none" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CLIError("ablate runs in one process (strategy none); it trains many small models one by one")
        if (cfg.arch == "xtransformer") != (kind == "seq2seq"):
            raise CLIError(f"the {kind} experiment needs arch {'xtransformer' if kind == 'seq2seq' else 'decoder'}, "
                           f"its base has arch {cfg.arch}")
    base_seed = next(iter(bases.values())).seed
    sweep = Sweep(out, bases, settings, [base_seed + args.first_seed + i for i in range(args.seeds)], args.time_limit,
                  lrs=lrs, setting_lrs=setting_lrs)
    n = len(sweep.plan())
    print(f"ablate: {n} runs ({', '.join(f'{len(settings[k])} {k} settings' for k in kinds)}, {args.seeds} seeds"
          f"{', lrs ' + ','.join(f'{x:g}' for x in lrs) if lrs else ''}) -> {out}")
    records = sweep.run()
    bad = [r for r in records if r["status"] != "ok"]
    print(f"done in {sweep.meta['seconds']:.0f} s: {len(records) - len(bad)} runs ok, {len(bad)} failed or diverged, "
          f"{len(sweep.meta['skipped'])} skipped (time limit); table: {out / 'table.md'}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise CLIError(f"{flag} takes positive learning rates, got {text!r}")
    return values


def _fresh_out(args) -> Path:
    out = config_overrides(args).get("out")  # --out, or --set out=DIR
    if out is None:
        raise CLIError("give the output folder: --out DIR")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"output folder {out} already exists and is not empty; choose another --out")
    return out


def merge_outputs(dirs: list[Path], out: Path, log=print) -> int:
    """Write the records of several ablate output folders (parallel processes, e.g. one a seed) into
    ``out``: runs.jsonl, meta.json (seeds and skipped runs joined), the tables and figures."""
    from . import ablate_report as report

    records, metas = [], []
    for d in dirs:
        if not (d / "runs.jsonl").exists() or not (d / "meta.json").exists():
            log(f"note: {d} has no runs.jsonl and meta.json of an ablate run (a process that failed to start?); "
                f"left out")
            continue
        records += report.read_records(d / "runs.jsonl")
        metas.append(json.loads((d / "meta.json").read_text()))
    if not metas:
        raise CLIError(f"--merge: none of {', '.join(map(str, dirs))} holds an ablate run")
    meta = dict(metas[0])
    meta["seeds"] = sorted({s for m in metas for s in m.get("seeds", [])})
    meta["skipped"] = [s for m in metas for s in m.get("skipped", [])]
    meta["status"] = "complete" if all(m.get("status") == "complete" for m in metas) else "; ".join(
        sorted({str(m.get("status")) for m in metas}))
    meta["merged_from"] = [str(d) for d in dirs]
    meta["seconds"] = max((m.get("seconds") or 0) for m in metas)
    experiments: dict = {}
    for m in metas:  # the first folder's base; every folder's settings and learning rates
        for kind, exp in m.get("experiments", {}).items():
            merged = experiments.setdefault(kind, {**exp, "settings": [], "lrs": {}})
            merged["settings"] += [s for s in exp.get("settings", []) if s not in merged["settings"]]
            for name, lrs in (exp.get("lrs") or {}).items():
                merged["lrs"][name] = sorted(set(merged["lrs"].get(name, [])) | set(lrs))
    meta["experiments"] = experiments
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    report.write_tables(records, meta, out)
    try:
        report.plot_curves(records, out / "loss_curves.png")
        report.plot_bars(records, out / "bars.png")
    except Exception as e:  # noqa: BLE001: the numbers matter more than the pictures
        log(f"note: figures not written: {type(e).__name__}: {e}")
    log(f"merged {len(records)} runs from {len(dirs)} folders -> {out / 'table.md'}")
    return 0


def argparse_namespace(sets: list[str]):
    import argparse

    return argparse.Namespace(sets=sets)
