"""Checkpoints: resume is bit-identical on CPU, a kill at any moment leaves a loadable checkpoint,
corruption is detected, and loading runs no pickled code."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import TINY, cli, python_env, records, train_losses

from x_transformers.training import checkpoint as ck
from x_transformers.training.config import CLIError

# dropout and gradient accumulation on, so the RNG and the accumulation state must be restored too
RESUMABLE = [*TINY, "--set", "model.ff_dropout=0.1", "--grad-accum", 2, "--max-steps", 6, "--eval-every", 3,
             "--save-every", 2]


def test_resume_is_bit_identical(tmp_path):
    assert cli("train", *RESUMABLE, "--out", tmp_path / "full") == 0
    assert cli("train", *RESUMABLE, "--stop-after", 3, "--out", tmp_path / "part") == 0
    assert ck.find(tmp_path / "part").name == "step-000003"
    assert cli("train", "--resume", tmp_path / "part") == 0
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert len(full) == 6 and full == part  # exact float equality, not a tolerance
    val = lambda run: [(r["step"], r["val_loss"]) for r in records(run) if r["kind"] == "val"]  # noqa: E731
    assert val(tmp_path / "full") == val(tmp_path / "part")
    a = ck.load_weights(ck.find(tmp_path / "full"))
    b = ck.load_weights(ck.find(tmp_path / "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# Kill points inside the second checkpoint write (step 4; step 2 was written whole):
#   weights        while model.safetensors is half written
#   latest         after the new folder is renamed into place, while LATEST's temporary file is half written
#   cleanup        after LATEST points at step 4, before the old checkpoint is removed
CHILD = r"""
import os, signal, sys
from pathlib import Path
from x_transformers.training import checkpoint as ck
from x_transformers.cli import main

point, calls = sys.argv[1], {"n": 0}
def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "weights":
    orig = ck.save_weights
    def save_weights(state, path):
        calls["n"] += 1
        orig(state, path)
        if calls["n"] == 2:
            data = path.read_bytes(); path.write_bytes(data[: len(data) // 2]); die()
    ck.save_weights = save_weights
elif point == "latest":
    orig = ck.atomic_write_text
    def atomic_write_text(path, text):
        if path.name == "LATEST" and "step-000004" in text:
            path.with_name(".LATEST.tmp").write_text(text[:3]); die()
        orig(path, text)
    ck.atomic_write_text = atomic_write_text
elif point == "cleanup":
    def rmtree(path, ignore_errors=False):
        die()
    ck.shutil.rmtree = rmtree
sys.exit(main(["train", *sys.argv[2:]]))
"""


KILLED = [*TINY, "--max-steps", 6, "--save-every", 2, "--eval-every", 6]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    assert cli("train", *KILLED, "--out", run) == 0
    return train_losses(run)


@pytest.mark.parametrize("point,survivor", [("weights", 2), ("latest", 2), ("cleanup", 4)])
def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path, point, survivor, uninterrupted):
    run = tmp_path / "run"
    args = [*KILLED, "--out", run]
    proc = subprocess.run([sys.executable, "-c", CHILD, point, *map(str, args)], env=python_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = ck.find(run)  # verifies every file's SHA-256
    assert ckpt.name == f"step-{survivor:06d}"
    assert ck.load_state(ckpt)["step"] == survivor and ck.load_weights(ckpt)
    # and the run continues from there to the same losses as an uninterrupted run
    assert cli("train", "--resume", run) == 0
    assert train_losses(run) == uninterrupted


def test_sigkill_at_a_random_moment(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--max-steps", 400, "--save-every", 1, "--eval-every", 1000, "--out", run]
    proc = subprocess.Popen([sys.executable, "-m", "x_transformers", "train", *map(str, args)], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "LATEST").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # checkpoints are written every step
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = ck.find(run)
    assert ck.load_state(ckpt)["step"] >= 1 and ck.load_weights(ckpt)


def test_truncated_or_flipped_files_are_detected(tmp_path):
    run = tmp_path / "run"
    assert cli("train", *TINY, "--max-steps", 2, "--save-every", 2, "--eval-every", 2, "--out", run) == 0
    ckpt = ck.find(run)
    state = ckpt / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CLIError, match="corrupt or truncated: state.pt"):
        ck.find(run)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CLIError, match="meta.json missing"):
        ck.find(run)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_runs_no_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 1, "x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(CLIError, match="state.pt could not be read"):
        ck.load_state(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        import io

        ck._RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert not (tmp_path / "pwned").exists()


def test_atomic_write_text_replaces_whole(tmp_path):
    p = tmp_path / "LATEST"
    ck.atomic_write_text(p, "step-000001\n")
    ck.atomic_write_text(p, "step-000002\n")
    assert p.read_text() == "step-000002\n" and [f.name for f in tmp_path.iterdir()] == ["LATEST"]
