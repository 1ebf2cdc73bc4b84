"""Metrics: one JSON object per line in ``RUN/metrics.jsonl`` (TensorBoard too when installed),
and ``plot``: loss curves of one or more runs in one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .config import CLIError


class MetricsLog:
    """Appends records ``{"step": ..., "kind": "train"|"val", ...}``; only the main process writes."""

    def __init__(self, run: Path, enabled: bool, resume_step: int | None = None, logger: str = "none",
                 config: dict | None = None):
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop what a killed run logged after its last checkpoint: the resumed run logs it again
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if logger == "tensorboard":
            self.tb = tensorboard_writer(run / "tensorboard")
        elif logger == "wandb":
            self.wandb = wandb_run(run, config or {}, resume_step is not None)
        self.file = open(self.path, "a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{record.get('kind', 'train')}/{key}": value for key, value in record.items()
                   if key not in ("step", "kind") and isinstance(value, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def check_logger(logger: str) -> None:
    """Refuse a logger whose package is missing, before anything is written."""
    import importlib.util

    need = {"tensorboard": ("tensorboard", "pip install 'x-transformers[train]'"),
            "wandb": ("wandb", "pip install wandb (it logs offline by default)")}.get(logger)
    if need and importlib.util.find_spec(need[0]) is None:
        raise CLIError(f"logger {logger} needs the {need[0]} package: {need[1]}, or set logger none")


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CLIError("logger tensorboard needs the tensorboard package: pip install 'x-transformers[train]', "
                       "or set logger none")
    return SummaryWriter(str(folder))


def wandb_run(run: Path, config: dict, resumed: bool):
    """A Weights & Biases run in RUN/wandb: offline (no account, no network) unless WANDB_MODE is set."""
    import os

    try:
        import wandb
    except ImportError:
        raise CLIError("logger wandb needs the wandb package: pip install wandb (it logs offline by default; "
                       "`wandb sync RUN/wandb/offline-run-*` uploads later), or set logger none")
    return wandb.init(project="x-transformers", name=run.name, dir=str(run), config=config,
                      mode=os.environ.get("WANDB_MODE", "offline"), resume="allow" if resumed else None)


def read(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise CLIError(f"{run} has no metrics.jsonl: give a run folder written by 'xtransformers train'")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise CLIError(f"{path} is not valid JSON lines")


def plot(runs: list[str], out: str | Path, metric: str = "loss") -> Path:
    """Train loss (solid) and validation loss (dots) per run against the step."""
    records = {str(r): read(r) for r in runs}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plot needs matplotlib: pip install 'x-transformers[train]'")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, recs) in enumerate(records.items()):
        color = f"C{i}"
        train = [(r["step"], r[metric]) for r in recs if r.get("kind") == "train" and metric in r]
        val = [(r["step"], r["val_" + metric]) for r in recs if r.get("kind") == "val" and "val_" + metric in r]
        label = Path(name).name or name
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (nats / token)" if metric == "loss" else metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
