"""Run the real upstream x-transformers (2.31.10) in a child process, for comparisons.

The package has our import name, so it never shares a process with ours: a child with the
upstream folder first on its path and its working directory outside this repository. The folder
is ``$XT_UPSTREAM``, else ``.upstream`` at the repository root (``make test`` installs it there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = "2.31.10"


def required_path() -> Path:
    """The upstream folder, or a test failure saying how to install it."""
    path = upstream_path()
    if path is None:
        pytest.fail(f"upstream x-transformers {VERSION} is not installed: run `make .venv/.upstream` "
                    f"(make test does), or set XT_UPSTREAM to a folder holding it")
    return path


def upstream_path() -> Path | None:
    for candidate in (os.environ.get("XT_UPSTREAM"), ROOT / ".upstream"):
        if candidate and (Path(candidate) / "x_transformers" / "x_transformers.py").is_file():
            return Path(candidate)
    return None


def run(script: str, payload) -> object:
    """Run ``script`` (reads ``PAYLOAD``, prints one JSON line) under upstream; skip if it is absent."""
    path = upstream_path()
    if path is None:  # make test installs it; a skip here would hide every comparison with upstream
        pytest.fail(f"upstream x-transformers {VERSION} is not installed: run `make .venv/.upstream` "
                    f"(make test does), or set XT_UPSTREAM to a folder holding it")
    env = {**os.environ, "PYTHONPATH": str(path), "PAYLOAD": json.dumps(payload)}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    if proc.returncode:
        raise RuntimeError(f"upstream child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SIGNATURES = r"""
import inspect, json
import x_transformers
from x_transformers.x_transformers import Attention, AttentionLayers, FeedForward, TransformerWrapper
assert x_transformers.__file__, x_transformers.__file__
out = {}
for name, f in [("attn", Attention.__init__), ("layers", AttentionLayers.__init__), ("ff", FeedForward.__init__),
                ("wrapper", TransformerWrapper.__init__)]:
    out[name] = [p.name for p in inspect.signature(f).parameters.values() if p.name not in ("self", "kwargs")]
print(json.dumps(out))
"""

PARAM_COUNTS = r"""
import json, os
from x_transformers import TransformerWrapper, XTransformer, Encoder, Decoder, CrossAttender
from importlib.metadata import version
kinds = dict(Encoder=Encoder, Decoder=Decoder, CrossAttender=CrossAttender)
counts = []
for case in json.loads(os.environ["PAYLOAD"]):
    if case["kind"] == "XTransformer":
        model = XTransformer(**case["kwargs"])
    else:
        layers = kinds[case["kind"]](**case["layers"])
        model = TransformerWrapper(attn_layers=layers, **case["wrapper"])
    counts.append(sum(p.numel() for p in model.parameters()))
print(json.dumps(counts))
"""


def upstream_param_counts(cases: list[dict]) -> list[int]:
    return run(PARAM_COUNTS, cases)


def upstream_signatures() -> dict[str, list[str]]:
    return run(SIGNATURES, None)
