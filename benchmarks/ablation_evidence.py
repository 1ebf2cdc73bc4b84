"""Turn an ``xtransformers ablate`` output folder into the committed evidence.

    PYTHONPATH=src python benchmarks/ablation_evidence.py runs/ablation            # write + update docs
    PYTHONPATH=src python benchmarks/ablation_evidence.py runs/ablation --dry-run  # only print the lines

Writes docs/evidence/ablation.md (both tables, the figures; raw JSONL and meta copied beside it as
ablation_*), replaces the ``Measured:`` line of every docs/features.md section that has ablation
rows, and prints those lines (section: line), one per feature section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from x_transformers.training import ablate_report as report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder given to xtransformers ablate --out")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="the docs folder (default: this repository's)")
    p.add_argument("--dry-run", action="store_true", help="print the lines; write nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    for name in ("runs.jsonl", "meta.json"):
        if not (out / name).is_file():
            print(f"error: {out / name} does not exist: give the folder written by xtransformers ablate --out",
                  file=sys.stderr)
            return 2
    if args.dry_run:
        lines = report.feature_lines(report.read_records(out / "runs.jsonl"), json.loads((out / "meta.json").read_text()))
    else:
        docs = Path(args.docs)
        lines = report.write_evidence(out, docs)
        missing = report.update_features(docs / "features.md", lines)
        for section in missing:
            print(f"note: no section {section!r} in {docs / 'features.md'}", file=sys.stderr)
        print(f"wrote {docs / 'evidence' / 'ablation.md'}; updated {docs / 'features.md'}\n")
    for section, line in lines.items():
        print(f"{section}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
