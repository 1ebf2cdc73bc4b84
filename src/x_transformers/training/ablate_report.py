"""Tables, figures and the committed evidence of ``xtransformers ablate``, from its per-run records
(``runs.jsonl``: one JSON object per (setting, seed)).

Statistics: per setting, the mean and the sample standard deviation over seeds. The difference to
the baseline counts as beyond noise when |mean - baseline mean| > 2 x its standard error,
sqrt(sd^2 / n + sd_base^2 / n_base) (unpaired, so conservative: seeds share the data order with the
baseline but not the initialisation); with fewer than 2 seeds on either side it is not judged.

Learning-rate sweep (``--lrs``): a setting run at several learning rates is reported at its best one:
the lowest mean validation loss (seq2seq: the highest mean exact match, then the lowest loss), among
the learning rates with the most successful seeds (a time limit that cut one lr's seeds leaves it out
of the choice, so every compared mean has the same seeds). The baseline is chosen the same way, and
every Δ compares best with best. The table shows the chosen lr and each lr's mean.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

PARAM_TOLERANCE = 0.01  # a row within 1% of the baseline's parameter count counts as matched


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _score(recs: list[dict], kind: str) -> tuple:
    """What the best learning rate minimises: (-mean exact match, mean loss) for seq2seq, mean loss for LM."""
    loss = sum(r["val_loss"] for r in recs) / len(recs)
    if kind == "seq2seq":
        return (-sum(r.get("val_exact_match", 0.0) for r in recs) / len(recs), loss)
    return (loss,)


def best_lr(recs: list[dict], kind: str) -> tuple[float | None, dict]:
    """One setting's records -> (its best learning rate, {lr: (mean metric, ok seeds, runs)}).

    Candidates are the lrs with the most successful seeds; None when no run succeeded or no run
    names its lr (a sweep without --lrs)."""
    groups: dict = {}
    for r in recs:
        groups.setdefault(r.get("lr"), []).append(r)
    info = {}
    for lr, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok" and r.get("val_loss") is not None
              and math.isfinite(r["val_loss"])]
        metric = None
        if ok:
            metric = _score(ok, kind)[0]
            metric = -metric if kind == "seq2seq" else metric
        info[lr] = (metric, len(ok), len(rs))
    most = max((n for _, n, _ in info.values()), default=0)
    if most == 0:
        return None, info
    candidates = [lr for lr, (_, n, _) in info.items() if n == most]
    best = min(candidates, key=lambda lr: _score([r for r in groups[lr] if r["status"] == "ok"
                                                  and r.get("val_loss") is not None
                                                  and math.isfinite(r["val_loss"])], kind))
    return best, info


def at_best_lr(records: list[dict]) -> list[dict]:
    """The records of each (experiment, setting) at its best learning rate (every record where a
    setting ran at one lr, or none succeeded)."""
    by: dict[tuple, list[dict]] = {}
    for r in records:
        by.setdefault((r["kind"], r["setting"]), []).append(r)
    out = []
    for (kind, _), recs in by.items():
        best, info = best_lr(recs, kind)
        out += recs if best is None or len(info) < 2 else [r for r in recs if r.get("lr") == best]
    return out


def summarize(records: list[dict], kind: str) -> list[dict]:
    """One row per setting of ``kind`` at its best learning rate: sorted by validation loss (exact
    match first for seq2seq), failed settings last."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == kind:
            by.setdefault(r["setting"], []).append(r)
    rows = []
    for name, all_recs in by.items():
        best, lr_info = best_lr(all_recs, kind)
        recs = all_recs if best is None or len(lr_info) < 2 else [r for r in all_recs if r.get("lr") == best]
        ok = [r for r in recs if r["status"] == "ok"]
        row = dict(setting=name, lr=best if best is not None else all_recs[0].get("lr"), lr_info=lr_info, paper=recs[0].get("paper", ""), section=recs[0].get("section", ""),
                   notes=recs[0].get("notes", ""), seeds=len(ok), runs=len(recs),
                   failures=[f"seed {r['seed']}: {r.get('error', r['status'])}" for r in recs if r["status"] != "ok"],
                   params=next((r["params"] for r in recs if "params" in r), None), model=recs[0].get("model"))
        if ok:
            for key in ("val_loss", "val_bpb", "val_exact_match", "tokens_per_s", "peak_mem_mib"):
                vals = [r[key] for r in ok if r.get(key) is not None]
                if vals:
                    row[key], row[key + "_sd"] = _mean_sd(vals)
            row["val_loss_values"] = [r["val_loss"] for r in ok]
        rows.append(row)
    base = next((r for r in rows if r["setting"] == "baseline" and "val_loss" in r), None)
    for row in rows:
        row["params_vs_base"] = (row["params"] / base["params"] - 1) if base and row["params"] and base["params"] else None
        for key in ("val_loss", "val_exact_match"):
            if base is None or key not in row or key not in base or row is base:
                continue
            diff = row[key] - base[key]
            row[key + "_diff"] = diff
            if row[key + "_sd"] is not None and base[key + "_sd"] is not None:
                se = math.sqrt(row[key + "_sd"] ** 2 / row["seeds"] + base[key + "_sd"] ** 2 / base["seeds"])
                row[key + "_se"] = se
                row[key + "_beyond"] = abs(diff) > 2 * se
    if kind == "seq2seq":
        key = lambda r: ("val_loss" not in r, -r.get("val_exact_match", 0), r.get("val_loss", 0))  # noqa: E731
    else:
        key = lambda r: ("val_loss" not in r, r.get("val_loss", 0))  # noqa: E731
    return sorted(rows, key=key)


# ----------------------------------------------------------------------------------------------
# markdown


def _f(x, fmt=".4f", none="–"):
    return none if x is None else format(x, fmt)


def _verdict(row: dict, key: str, lower_is_better: bool) -> str:
    if row["setting"] == "baseline":
        return "(baseline)"
    if key + "_diff" not in row:
        return "–"
    if key + "_beyond" not in row:
        return "n/a (1 seed)"
    if not row[key + "_beyond"]:
        return "no"
    better = (row[key + "_diff"] < 0) == lower_is_better
    return "**yes, better**" if better else "**yes, worse**"


def _params(row: dict) -> str:
    if row["params"] is None:
        return "–"
    rel = row["params_vs_base"]
    if rel is None or row["setting"] == "baseline":
        return f"{row['params'] / 1e6:.3f}M"
    tag = "" if abs(rel) <= PARAM_TOLERANCE else " (not matched)"
    return f"{row['params'] / 1e6:.3f}M ({rel:+.1%}){tag}"


def _header(meta: dict, kind: str) -> list[str]:
    exp = meta.get("experiments", {}).get(kind, {})
    base, data = exp.get("base", {}), exp.get("data", {})
    lines = [f"- card: {meta.get('card', '?')}; commit {meta.get('commit', '?')}; torch {meta.get('torch', '?')}; "
             f"{meta.get('date', '?')} UTC; status: {meta.get('status', '?')}"]
    if kind == "lm":
        lines.append(f"- corpus: `{data.get('source', '?')}` sha256 `{data.get('sha256', '?')}` "
                     f"({data.get('train_tokens', '?')} train / {data.get('val_tokens', '?')} validation tokens)")
    else:
        lines.append(f"- task: `{base.get('task', '?')}`, source length {base.get('seq_len', '?')}; exact match of "
                     f"the greedy decode over {base.get('eval_batches', '?')} x {base.get('batch_size', '?')} "
                     f"validation examples")
    lrs = sorted({x for v in (exp.get("lrs") or {}).values() for x in v})
    lr_text = (f"lr sweep {', '.join(f'{x:g}' for x in lrs)} (each row at its best lr)" if len(lrs) > 1
               else f"lr {base.get('lr')}")
    lines.append(f"- budget per run: {exp.get('tokens_per_run', 0):,} training tokens ({base.get('max_steps')} steps "
                 f"x {base.get('batch_size')} x {base.get('seq_len')}), {lr_text}, warmup "
                 f"{base.get('warmup_steps')}, precision {base.get('precision')}; base model `{base.get('model')}` "
                 f"(preset `{base.get('preset')}`); seeds {meta.get('seeds')}")
    lines.append("- Δ: difference of the means to the baseline; beyond 2 SE: |Δ| > 2 x sqrt(sd²/n + sd_base²/n_base). "
                 "Every run sees the baseline's data order for its seed and the same validation batches. "
                 "Parameter counts within 1% of the baseline count as matched; other rows say `not matched`.")
    return lines


def _lr_cell(row: dict, kind: str, default) -> str:
    """The chosen lr; with a sweep, each lr's mean (its ok seeds / runs where some failed)."""
    lr = row.get("lr", default)
    if lr is None:
        lr = default
    head = _f(lr, "g")
    info = row.get("lr_info") or {}
    if len(info) < 2:
        return head
    fmt = ".3f"
    parts = []
    most = max(n for _, n, _ in info.values())
    for x, (metric, n, runs) in sorted(info.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        seeds = "" if n == runs else f" ({n}/{runs} ok)"
        seeds += f" ({n} seeds: not compared)" if 0 < n < most else ""
        parts.append(f"{_f(x, 'g')}: {_f(metric, fmt, 'failed')}{seeds}")
    what = "exact match" if kind == "seq2seq" else "loss"
    return f"**{head}** ({what} by lr: {'; '.join(parts)})"


def markdown(records: list[dict], meta: dict, kind: str) -> str:
    rows = summarize(records, kind)
    base_lr = meta.get("experiments", {}).get(kind, {}).get("base", {}).get("lr")
    title = "Language-model ablation" if kind == "lm" else "Encoder-decoder ablation"
    out = [f"# {title}", "", *_header(meta, kind), ""]
    if kind == "lm":
        out += ["| setting | val loss (mean ± sd) | Δ vs baseline | beyond 2 SE | lr | bits/byte | tokens/s "
                "| peak MiB | params | seeds | paper | notes |",
                "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    else:
        out += ["| setting | exact match (mean ± sd) | Δ vs baseline | beyond 2 SE | lr | val loss | Δ loss "
                "| tokens/s | peak MiB | params | seeds | paper | notes |",
                "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    failed = []
    for r in rows:
        if "val_loss" not in r:
            failed.append(r)
            continue
        common = (f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_mem_mib'), ',.0f')} | {_params(r)} | "
                  f"{r['seeds']} | {r['paper']} | {r['notes']}{'; ' + '; '.join(r['failures']) if r['failures'] else ''} |")
        loss = f"{r['val_loss']:.4f} ± {_f(r.get('val_loss_sd'))}"
        lr = _lr_cell(r, kind, base_lr)
        if kind == "lm":
            out.append(f"| {r['setting']} | {loss} | {_f(r.get('val_loss_diff'), '+.4f')} | "
                       f"{_verdict(r, 'val_loss', True)} | {lr} | {_f(r.get('val_bpb'), '.3f')} | {common}")
        else:
            em = f"{r.get('val_exact_match', 0):.3f} ± {_f(r.get('val_exact_match_sd'), '.3f')}"
            out.append(f"| {r['setting']} | {em} | {_f(r.get('val_exact_match_diff'), '+.3f')} | "
                       f"{_verdict(r, 'val_exact_match', False)} | {lr} | {r['val_loss']:.4f} | "
                       f"{_f(r.get('val_loss_diff'), '+.4f')} | {common}")
    if failed:
        out += ["", "Failed or diverged (no validation loss):", ""]
        out += [f"- `{r['setting']}` ({r['paper']}): {'; '.join(r['failures'])}" for r in failed]
    if kind == "lm":
        from .ablate import NOT_RUN

        out += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in NOT_RUN.items()) + "."]
    skipped = [s for s in meta.get("skipped", []) if s.startswith(kind + "/")]
    if skipped:
        out += ["", f"Skipped by the time limit ({len(skipped)} runs): {', '.join(skipped)}."]
    return "\n".join(out) + "\n"


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_tables(records: list[dict], meta: dict, out: Path):
    kinds = list(meta.get("experiments", {})) or sorted({r["kind"] for r in records})
    for kind in kinds:
        _atomic_text(out / ("table.md" if kind == "lm" else "seq2seq.md"), markdown(records, meta, kind))


# ----------------------------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt):
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_curves(records: list[dict], path: Path):
    """Training loss against step, mean over seeds (a moving average), one line per setting."""
    plt = _plt()
    kinds = [k for k in ("lm", "seq2seq") if any(r["kind"] == k and r.get("train_loss") for r in records)]
    if not kinds:
        return
    records = at_best_lr(records)  # each setting's curve at its best learning rate
    fig, axes = plt.subplots(1, len(kinds), figsize=(9 * len(kinds), 6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, kind in zip(axes[0], kinds):
        curves: dict[str, list[list[float]]] = {}
        for r in records:
            if r["kind"] == kind and r["status"] == "ok" and r.get("train_loss"):
                curves.setdefault(r["setting"], []).append(r["train_loss"])
        lows, highs = [], []
        for i, (name, cs) in enumerate(sorted(curves.items())):
            n = min(len(c) for c in cs)
            mean = [sum(c[j] for c in cs) / len(cs) for j in range(n)]
            w = max(1, n // 30)
            smooth = [sum(mean[max(0, j - w + 1): j + 1]) / len(mean[max(0, j - w + 1): j + 1]) for j in range(n)]
            is_base = name == "baseline"
            ax.plot(range(1, n + 1), smooth, styles[i // 10 % 4] if not is_base else "-",
                    color="black" if is_base else plt.cm.tab10(i % 10), lw=2.5 if is_base else 1.1,
                    label=f"{name} ({len(cs)})")
            tail = smooth[n // 3:] or smooth
            lows.append(min(tail))
            highs.append(tail[0])
        if lows:
            hi = sorted(highs)[len(highs) // 2]  # the median curve's level at a third of the run
            lo = min(lows)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.set_title(f"{kind}: training loss, mean over seeds (moving average)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(curves) <= 18 else 2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    _save(fig, path, plt)


def plot_bars(records: list[dict], path: Path):
    """Δ validation loss to the baseline (LM) and exact match (seq2seq), with 2-SE error bars."""
    plt = _plt()
    panels = []
    for kind, key, label in (("lm", "val_loss", "Δ validation loss vs baseline (nats; lower is better)"),
                             ("seq2seq", "val_exact_match", "exact match (higher is better)")):
        rows = [r for r in summarize(records, kind) if key in r]
        if rows:
            panels.append((kind, key, label, rows))
    if not panels:
        return
    height = max(4.0, 0.28 * max(len(p[3]) for p in panels) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), height), squeeze=False)
    for ax, (kind, key, label, rows) in zip(axes[0], panels):
        rows = rows[::-1]  # best at the top
        names = [r["setting"] for r in rows]
        if kind == "lm":
            vals = [r.get(key + "_diff", 0.0) for r in rows]
            errs = [2 * r.get(key + "_se", 0.0) for r in rows]
            colors = ["grey" if r["setting"] == "baseline" else
                      ("tab:green" if r.get(key + "_beyond") and v < 0 else
                       "tab:red" if r.get(key + "_beyond") else "tab:blue") for r, v in zip(rows, vals)]
            ax.axvline(0, color="black", lw=0.8)
        else:
            vals = [r[key] for r in rows]
            errs = [(r.get(key + "_sd") or 0.0) for r in rows]
            colors = ["grey" if r["setting"] == "baseline" else "tab:blue" for r in rows]
        ax.barh(names, vals, xerr=errs, color=colors, capsize=2)
        ax.set_xlabel(label)
        ax.set_title(f"{kind}: {'bars 2 SE of the difference; green/red beyond it' if kind == 'lm' else 'bars 1 sd'}")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    _save(fig, path, plt)


# ----------------------------------------------------------------------------------------------
# evidence for docs/


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def feature_lines(records: list[dict], meta: dict) -> dict[str, str]:
    """For each section of docs/features.md with ablation rows: one line saying what we measured."""
    exps = meta.get("experiments", {})
    lines: dict[str, list[str]] = {}
    seeds: dict[str, set] = {}
    for kind in ("lm", "seq2seq"):
        rows = summarize(records, kind)
        base = next((r for r in rows if r["setting"] == "baseline"), {})
        task = exps.get(kind, {}).get("base", {}).get("task", "?")
        for r in rows:
            if not r["section"]:
                continue
            seeds.setdefault(r["section"], set()).add(r["seeds"])
            if "val_loss" not in r:
                text = f"`{r['setting']}` failed ({'; '.join(r['failures'])[:120]})"
            elif kind == "lm":
                d, se, beyond = r.get("val_loss_diff"), r.get("val_loss_se"), r.get("val_loss_beyond")
                verdict = ("not judged (one seed)" if beyond is None else "no measurable effect at this budget"
                           if not beyond else "better than the baseline" if d < 0 else "worse than the baseline")
                speed = (f", {r['tokens_per_s'] / base['tokens_per_s']:.2f}x its tokens/s"
                         if r.get("tokens_per_s") and base.get("tokens_per_s") else "")
                text = (f"`{r['setting']}` {_f(d, '+.3f')} nats of validation loss vs the baseline "
                        f"({r['val_loss']:.3f}{f', 2 SE {2 * se:.3f}' if se is not None else ''}): {verdict}{speed}")
            else:
                d, beyond = r.get("val_exact_match_diff"), r.get("val_exact_match_beyond")
                verdict = ("not judged (one seed)" if beyond is None else "no measurable effect" if not beyond
                           else "better" if d > 0 else "worse")
                text = (f"`{r['setting']}` on `{task}` exact match {r.get('val_exact_match', 0):.3f} vs "
                        f"{_f(base.get('val_exact_match'), '.3f')} (baseline): {verdict}")
            lines.setdefault(r["section"], []).append(text)
    from .ablate import NOT_RUN

    tokens = exps.get("lm", {}).get("tokens_per_run")
    budget = f"{tokens / 1e6:.2f}M training tokens a run, " if tokens else ""
    out = {}
    for sec, ls in lines.items():
        n = min(seeds[sec])
        out[sec] = (f"Measured ([ablation](evidence/ablation.md); {budget}{n} seed{'s' if n != 1 else ''}): "
                    + "; ".join(ls) + ".")
    out.update({sec: f"Measured: {text}." for sec, text in NOT_RUN.items()})
    return out


def update_features(features_md: Path, lines: dict[str, str]) -> list[str]:
    """Replace the ``Measured:`` line of each section named in ``lines`` (added before the next heading
    when missing). Returns the sections not found."""
    text = features_md.read_text().splitlines()
    missing = []
    for section, line in lines.items():
        start = next((i for i, t in enumerate(text) if re.match(r"#{2,4} ", t) and
                      t.lstrip("#").strip().startswith(section)), None)
        if start is None:
            missing.append(section)
            continue
        end = next((i for i in range(start + 1, len(text)) if re.match(r"#{1,4} ", text[i])), len(text))
        at = next((i for i in range(start + 1, end) if text[i].startswith("Measured")), None)
        if at is not None:
            text[at] = line
        else:
            while end - 1 > start and not text[end - 1].strip():
                end -= 1
            text[end:end] = ["", line]
    features_md.write_text("\n".join(text) + "\n")
    return missing


def write_evidence(out_dir: Path, docs: Path) -> dict[str, str]:
    """docs/evidence/ablation.md (both tables, figures, raw JSONL and meta copied beside it)."""
    records = read_records(out_dir / "runs.jsonl")
    meta = json.loads((out_dir / "meta.json").read_text())
    evidence = docs / "evidence"
    evidence.mkdir(parents=True, exist_ok=True)
    parts = ["# Ablation: every paper feature against the plain model", "",
             "Produced by `xtransformers ablate` (src/x_transformers/training/ablate.py); raw runs in "
             "`ablation_runs.jsonl`, configuration in `ablation_meta.json`.", ""]
    for name, target in (("loss_curves.png", "ablation_loss_curves.png"), ("bars.png", "ablation_bars.png"),
                         ("runs.jsonl", "ablation_runs.jsonl"), ("meta.json", "ablation_meta.json")):
        if (out_dir / name).exists():
            shutil.copyfile(out_dir / name, evidence / target)
    for kind in meta.get("experiments", {}):
        parts.append(markdown(records, meta, kind).replace("# ", "## ", 1))
    parts += ["![loss curves](ablation_loss_curves.png)", "", "![bars](ablation_bars.png)", ""]
    (evidence / "ablation.md").write_text("\n".join(parts))
    return feature_lines(records, meta)
