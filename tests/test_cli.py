"""The xtransformers command: configuration, each bad input's one-line error, the subcommands, and a
tiny training run whose validation loss must fall below a recorded bound."""

import json
import math
from pathlib import Path

import pytest
from train_helpers import TINY, cli, records, snapshot, train_losses

from x_transformers.cli import COMMANDS, command
from x_transformers.training.config import CLIError, load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests that need a trained model."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli("train", *TINY, "--max-steps", 40, "--eval-every", 20, "--save-every", 20, "--lr", 3e-3,
               "--out", run) == 0
    return run


def one_line_error(capsys, *args) -> str:
    code = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# training works, and the loss falls


def test_tiny_run_validation_falls_below_recorded_bound(trained):
    vals = [r for r in records(trained) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 20, 40]
    assert vals[0]["val_bpb"] > 7.5  # untrained: about log2(256) = 8 bits per byte
    # recorded bound: 40 steps of this 32-wide model reached 4.85 bits/byte (torch 2.13 CPU)
    assert vals[-1]["val_bpb"] < 5.3, vals
    assert math.isclose(vals[-1]["val_bpb"], vals[-1]["val_loss"] / math.log(2), rel_tol=1e-9)  # bytes = tokens
    losses = train_losses(trained)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((trained / "data.json").read_text())["source"] == "stdlib"


def test_eval_reproduces_the_last_validation(trained, capsys):
    assert cli("eval", trained, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    last = [r for r in records(trained) if r["kind"] == "val"][-1]
    assert out["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_generate_is_seeded(trained, capsys):
    outs = []
    for _ in range(2):
        assert cli("generate", trained, "--prompt", "import ", "--tokens", 12, "--seed", 3) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("import ")


def test_plot_several_runs(trained, tmp_path):
    out = tmp_path / "both.png"
    assert cli("plot", trained, trained, "-o", out) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_seq2seq_task_reports_exact_match(tmp_path):
    run = tmp_path / "copy"
    args = ["--preset", "seed", "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=4",
            "--task", "copy", "--seq-len", 4, "--batch-size", 16, "--max-steps", 30, "--eval-every", 30,
            "--save-every", 30, "--eval-batches", 1, "--lr", 3e-3, "--warmup-steps", 2, "--log-every", 1,
            "--no-progress", "--out", run]
    assert cli("train", *args) == 0
    vals = [r for r in records(run) if r["kind"] == "val"]
    assert all(0.0 <= r["val_exact_match"] <= 1.0 for r in vals)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5  # it learns to copy letters


# ----------------------------------------------------------------------------------------------
# configuration


def test_precedence_preset_file_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.01\nmax_steps: 7\nmodel:\n  rotary_pos_emb: false\n  attn_kv_heads: 2\n")
    cfg = load_config("tiny", str(cfg_file), {"max_steps": 9, "model.depth": 3})
    assert (cfg.lr, cfg.max_steps, cfg.seq_len) == (0.01, 9, 256)  # file over preset, flag over file
    assert cfg.model == dict(dim=256, depth=3, heads=4, rotary_pos_emb=False, attn_kv_heads=2)
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"preset": "seed", "task": "sort"}))
    assert load_config(config_file=str(json_file)).task == "sort"


def test_subcommand_registry_is_extensible(capsys):
    @command("hello-test", "a test command", lambda p: p.add_argument("--name", default="x"))
    def hello(args):
        print(f"hello {args.name}")
        return 0

    try:
        assert cli("hello-test", "--name", "ablate") == 0
        assert capsys.readouterr().out == "hello ablate\n"
    finally:
        del COMMANDS["hello-test"]


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing overwritten


def test_missing_data_file(capsys, tmp_path):
    err = one_line_error(capsys, "train", *TINY, "--data", tmp_path / "nope.txt", "--out", tmp_path / "r")
    assert "does not exist" in err and not (tmp_path / "r").exists()


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    err = one_line_error(capsys, "train", *TINY, "--data", tmp_path / "empty.txt", "--out", tmp_path / "r")
    assert "is empty" in err and not (tmp_path / "r").exists()


def test_unknown_config_key(capsys, tmp_path):
    err = one_line_error(capsys, "train", *TINY, "--set", "lrr=0.1", "--out", tmp_path / "r")
    assert "unknown config key 'lrr'" in err and "did you mean 'lr'" in err
    (tmp_path / "bad.yaml").write_text("warmup: 3\n")
    err = one_line_error(capsys, "train", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "r")
    assert "'warmup'" in err and "warmup_steps" in err


def test_unknown_model_keyword(capsys, tmp_path):
    err = one_line_error(capsys, "train", *TINY, "--set", "model.rotary_pos_emd=true", "--out", tmp_path / "r")
    assert "rotary_pos_emd" in err and "rotary_pos_emb" in err and not (tmp_path / "r").exists()


def test_unknown_preset(capsys, tmp_path):
    err = one_line_error(capsys, "train", "--preset", "tni", "--out", tmp_path / "r")
    assert "unknown preset 'tni'" in err and "did you mean 'tiny'" in err


def test_wrong_value_type(capsys, tmp_path):
    err = one_line_error(capsys, "train", *TINY, "--lr", "fast", "--out", tmp_path / "r")
    assert "'lr'" in err and "float" in err


def test_existing_run_folder_is_not_overwritten(capsys, trained):
    before = snapshot(trained)
    err = one_line_error(capsys, "train", *TINY, "--out", trained)
    assert "already exists" in err and "--resume" in err
    assert snapshot(trained) == before


def test_corrupt_checkpoint(capsys, trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    weights = next((run / "checkpoints").glob("step-*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    before = snapshot(run)
    for args in (("train", "--resume", run, "--max-steps", 50), ("eval", run), ("generate", run)):
        err = one_line_error(capsys, *args)
        assert "corrupt or truncated" in err and "model.safetensors" in err
        assert "no earlier checkpoint is kept" in err  # keep_checkpoints=1: nothing earlier to point at
    assert snapshot(run) == before


def test_resume_of_missing_run(capsys, tmp_path):
    err = one_line_error(capsys, "train", "--resume", tmp_path / "nothing")
    assert "does not exist" in err


def test_cli_error_is_raised_not_printed_by_the_library():
    with pytest.raises(CLIError, match="unknown preset"):
        load_config("gpt3")


# ----------------------------------------------------------------------------------------------
# the fused loss of the training loop


@pytest.mark.parametrize("kw", [dict(), dict(tie_embedding=True, num_memory_tokens=2), dict(logits_scale=0.5)])
def test_fused_training_loss_equals_the_logits_loss(kw):
    """lm_loss (hidden states + chunked_cross_entropy against logits_weight) is the cross-entropy of
    the logits, with memory tokens and a logits scale too: validation and bits/byte keep their values."""
    import torch
    import torch.nn.functional as F

    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.training.loop import lm_loss

    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=4), **kw)
    x = torch.randint(0, 50, (3, 13))
    old = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    new = lm_loss(model, model, [x[:, :-1]], x[:, 1:])
    assert abs(new.item() - old.item()) <= 1e-5
    grads = torch.autograd.grad(new, model.logits_weight)[0], torch.autograd.grad(old, model.logits_weight)[0]
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-6)


def test_compiled_training_matches_eager(tmp_path):
    """--compile compiles forward + loss as one graph (inductor on CPU): the same losses as the
    uncompiled run up to float reassociation."""
    args = (*TINY, "--max-steps", 3, "--eval-every", 100, "--save-every", 100, "--sample-tokens", 1)
    assert cli("train", *args, "--out", tmp_path / "eager") == 0
    assert cli("train", *args, "--compile", "--out", tmp_path / "compiled") == 0
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager, compiled)), (eager, compiled)


def test_a_compiled_step_that_disagrees_with_eager_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    """The first compiled steps are checked against the eager forward on the same batch; a
    disagreement (here a stand-in compiled step whose loss is off by 0.05, the size seen on an
    H200 in issue #24) is reported in one line and the run continues, and ends, as the eager run."""
    from x_transformers.training import loop

    def wrong_compile(fn, cfg):
        if not cfg.compile:
            return fn
        return lambda inputs, target: fn(inputs, target) + 0.05
    monkeypatch.setattr(loop, "compile_step", wrong_compile)
    args = (*TINY, "--max-steps", 3, "--eval-every", 100, "--save-every", 100, "--sample-tokens", 1)
    assert cli("train", *args, "--out", tmp_path / "eager") == 0
    assert cli("train", *args, "--compile", "--out", tmp_path / "compiled") == 0
    out = capsys.readouterr().out
    assert out.count("differs from the eager forward") == 1 and "without torch.compile" in out
    assert train_losses(tmp_path / "compiled") == train_losses(tmp_path / "eager")


def test_cudagraph_compile_mode_is_refused_with_ddp(capsys, tmp_path):
    err = one_line_error(capsys, "train", *TINY, "--compile", "--compile-mode", "reduce-overhead",
                         "--strategy", "ddp", "--out", tmp_path / "r")
    assert "compile_mode reduce-overhead" in err and "ddp" in err and not (tmp_path / "r").exists()
    err = one_line_error(capsys, "train", *TINY, "--compile-mode", "fastest", "--out", tmp_path / "r")
    assert "compile_mode must be one of" in err


# ----------------------------------------------------------------------------------------------
# the command explains itself (issue 23)


def test_train_help_lists_every_config_key_with_type_default_and_a_line(capsys):
    from x_transformers.training.config import FIELDS, field_help

    with pytest.raises(SystemExit):
        cli("train", "--help")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    helps = field_help()
    for name, f in FIELDS.items():
        if name in ("model", "preset"):
            continue
        assert helps[name], name  # every key has its line beside it in TrainConfig
        assert f"--{name.replace('_', '-')}" in out, name
        assert " ".join(helps[name].split()[:4]) in out, name
    assert "[float, default 0.001]" in out and "[bool, default False]" in out  # lr, compile
    assert "ablate" in out  # every preset is named


def test_a_run_prints_its_resolved_configuration_first(trained, tmp_path, capsys):
    assert cli("train", *TINY, "--max-steps", 1, "--eval-every", 1, "--out", tmp_path / "r") == 0
    out = capsys.readouterr().out
    block = out[out.index("config:"):].split("\nstep")[0]
    for key in ("lr=", "max_steps=1", "seq_len=16", '"dim": 32', "temperature="):
        assert key in block, key


@pytest.mark.parametrize("args, words", [
    (("--temperature", -1), "temperature must be a finite number >= 0"),
    (("--temperature", ".nan"), "temperature must be a finite number >= 0"),
    (("--token-dtype", "float32"), "token_dtype must be one of"),
])
def test_bad_training_values_fail_before_any_file_is_written(capsys, tmp_path, args, words):
    err = one_line_error(capsys, "train", *TINY, *args, "--out", tmp_path / "r")
    assert words in err and not (tmp_path / "r").exists()


def test_an_unusable_out_is_one_line_before_anything_is_written(capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, "train", *TINY, "--out", tmp_path / "file")
    assert "is a file" in err
    err = one_line_error(capsys, "train", *TINY, "--out", tmp_path / "file" / "run")
    assert "not a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    real = os.access  # root ignores the mode bits, so the test says what the OS would answer a user
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode))
    err = one_line_error(capsys, "train", *TINY, "--out", locked / "run")
    assert "not writable" in err and not (locked / "run").exists()


def test_a_run_stopped_before_its_first_checkpoint_does_not_block_the_next(capsys, tmp_path, monkeypatch):
    from x_transformers.training import loop

    run = tmp_path / "r"

    def boom(self):
        raise RuntimeError("killed")
    monkeypatch.setattr(loop.Trainer, "evaluate", boom)  # dies at the step-0 validation
    with pytest.raises(RuntimeError, match="killed"):
        cli("train", *TINY, "--max-steps", 2, "--out", run)
    assert (run / "config.json").exists() and not (run / "checkpoints").exists()
    monkeypatch.undo()
    assert cli("train", *TINY, "--max-steps", 2, "--eval-every", 2, "--out", run) == 0
    assert "starting it over" in capsys.readouterr().out
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1, 2]  # nothing of the dead run
    # a folder that is not a run of ours is still never written into
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    err = one_line_error(capsys, "train", *TINY, "--out", other)
    assert "already exists" in err and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_resume_refuses_a_changed_schedule_or_a_hand_edited_config(capsys, trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    before = snapshot(run)
    err = one_line_error(capsys, "train", "--resume", run, "--max-steps", 80)
    assert "max_steps cannot change" in err and "--stop-after" in err
    for args in (("--lr", 1.0), ("--set", "model.dim=64"), ("--seed", 5)):
        err = one_line_error(capsys, "train", "--resume", run, *args)
        assert "cannot change" in err, args
    cfg = json.loads((run / "config.json").read_text())
    cfg["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(capsys, "train", "--resume", run)
    assert "differs from the checkpoint's configuration in lr" in err
    snapshot_after = snapshot(run)
    snapshot_after.pop("config.json", None), before.pop("config.json", None)
    assert snapshot_after == before


@pytest.mark.parametrize("args, words", [
    (("--tokens", 0), "--tokens must be at least 1"),
    (("--tokens", -3), "--tokens must be at least 1"),
    (("--temperature", -1), "--temperature must be a finite number"),
    (("--temperature", "nan"), "--temperature must be a finite number"),
    (("--prompt", ""), "--prompt is empty"),
])
def test_generate_refuses_bad_arguments_in_one_line(capsys, trained, args, words):
    assert words in one_line_error(capsys, "generate", trained, *args)


def test_prepare_refuses_a_float_token_dtype(capsys, tmp_path):
    err = one_line_error(capsys, "prepare", "stdlib", tmp_path / "t.bin", "--token-dtype", "float32")
    assert "--token-dtype must be one of uint8, uint16, uint32" in err and not (tmp_path / "t.bin").exists()


def test_a_token_file_read_with_the_wrong_dtype_is_one_line(capsys, tmp_path):
    import numpy as np

    np.arange(101, dtype=np.uint8).tofile(tmp_path / "odd.bin")  # 101 bytes: not whole uint16 tokens
    err = one_line_error(capsys, "train", *TINY, "--data", tmp_path / "odd.bin", "--out", tmp_path / "r")
    assert "not a whole number of uint16 tokens" in err
    np.full(4096, 40000, dtype=np.uint16).tofile(tmp_path / "wide.bin")  # ids past the 256 bytes
    err = one_line_error(capsys, "train", *TINY, "--data", tmp_path / "wide.bin", "--out", tmp_path / "r")
    assert "token id 40000, beyond the tokenizer's 256" in err and not (tmp_path / "r").exists()


def test_a_binary_data_file_is_named_not_trained_on(capsys, tmp_path):
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 64)
    err = one_line_error(capsys, "train", *TINY, "--data", tmp_path / "blob.dat", "--out", tmp_path / "r")
    assert "looks binary" in err and "blob.dat" in err


def test_a_broken_hugging_face_folder_names_the_file(tmp_path):
    from x_transformers import hf

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        hf.read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="model.safetensors could not be read as safetensors"):
        hf.read_tensors(tmp_path)


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tensorboard"))
    acc.Reload()
    val = [(e.step, e.value) for e in acc.Scalars("val/val_loss")]
    want = [(r["step"], r["val_loss"]) for r in records(trained) if r["kind"] == "val"]
    assert [s for s, _ in val] == [s for s, _ in want]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(val, want))
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert len(lrs) == 40 and max(lrs) == pytest.approx(3e-3, rel=1e-6)  # warm-up, then the peak, then decay


def test_logger_none_writes_only_metrics_and_lr_is_on_the_console(tmp_path, capsys):
    assert cli("train", *TINY, "--max-steps", 2, "--eval-every", 2, "--logger", "none", "--out", tmp_path / "r") == 0
    assert not (tmp_path / "r" / "tensorboard").exists() and (tmp_path / "r" / "metrics.jsonl").exists()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 2: loss")]
    lr = [r["lr"] for r in records(tmp_path / "r") if r["kind"] == "train"][-1]
    assert lines and f"lr {lr:.3e}" in lines[0]


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    import sys
    import types

    calls = {"init": None, "log": [], "finish": 0}

    class FakeRun:
        def log(self, scalars, step):
            calls["log"].append((step, scalars))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # found by importlib.util.find_spec
    fake.init = lambda **kw: calls.__setitem__("init", kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cli("train", *TINY, "--max-steps", 2, "--eval-every", 2, "--logger", "wandb", "--out", tmp_path / "r") == 0
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path / "r")
    assert calls["init"]["config"]["max_steps"] == 2 and calls["finish"] == 1
    val = [(step, s["val/val_loss"]) for step, s in calls["log"] if "val/val_loss" in s]
    assert val == [(r["step"], r["val_loss"]) for r in records(tmp_path / "r") if r["kind"] == "val"]


def test_a_missing_logger_package_is_one_line_before_anything_is_written(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    err = one_line_error(capsys, "train", *TINY, "--logger", "wandb", "--out", tmp_path / "r")
    assert "logger wandb needs the wandb package" in err and not (tmp_path / "r").exists()
    err = one_line_error(capsys, "train", *TINY, "--logger", "mlflow", "--out", tmp_path / "r")
    assert "logger must be one of" in err


def test_keep_best_keeps_the_lowest_validation_and_patience_stops_early(tmp_path, capsys):
    from x_transformers.training import checkpoint as ck

    run = tmp_path / "r"
    # lr 0.3 makes the loss climb after the first steps: validations stop improving
    assert cli("train", *TINY, "--max-steps", 40, "--eval-every", 2, "--save-every", 100, "--lr", 0.3,
               "--warmup-steps", 0, "--keep-best", "--patience", 2, "--logger", "none", "--out", run) == 0
    vals = [(r["step"], r["val_loss"]) for r in records(run) if r["kind"] == "val"]
    best_step, best_loss = min(vals, key=lambda sv: sv[1])
    meta = ck.verify(run / "checkpoints" / "best")
    assert meta["step"] == best_step and meta["val_loss"] == pytest.approx(best_loss)
    # stopped after two validations in a row without a lower loss, with a checkpoint there
    after = [loss for step, loss in vals if step > best_step]
    assert len(after) == 2 and all(loss >= best_loss for loss in after) and vals[-1][0] < 40
    assert ck.find(run).name == f"step-{vals[-1][0]:06d}"
    assert "early stop" in capsys.readouterr().out
    # the best checkpoint evaluates to its recorded loss
    assert cli("eval", run / "checkpoints" / "best", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_loss"] == pytest.approx(best_loss, rel=1e-6)


def test_a_resumed_run_reports_bits_per_byte_from_the_runs_first_validation(tmp_path, capsys):
    run = tmp_path / "r"
    args = (*TINY, "--max-steps", 4, "--eval-every", 2, "--save-every", 2, "--logger", "none")
    assert cli("train", *args, "--stop-after", 2, "--out", run) == 0
    capsys.readouterr()
    assert cli("train", "--resume", run) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation bits per byte")][0]
    vals = [r["val_bpb"] for r in records(run) if r["kind"] == "val"]
    assert [r["step"] for r in records(run) if r["kind"] == "val"] == [0, 2, 4]
    assert line.startswith(f"validation bits per byte: {vals[0]:.3f} -> {vals[-1]:.3f}")


def test_generate_on_a_folder_with_a_broken_config_names_the_file(capsys, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    err = one_line_error(capsys, "generate", tmp_path / "hf")
    assert "config.json is not valid JSON" in err


def test_sample_tokens_zero_evaluates_without_a_sample(tmp_path, capsys):
    """--sample-tokens 0 (allowed by the config's check) skips the evaluation's sample: the
    validation numbers are still logged, and no 'sample:' line is printed."""
    args = (*TINY, "--max-steps", 2, "--eval-every", 1, "--save-every", 100, "--sample-tokens", 0)
    assert cli("train", *args, "--out", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "sample:" not in out
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "val"]
    assert [v["step"] for v in vals] == [0, 1, 2] and all(v["val_loss"] > 0 and "sample" not in v for v in vals)


@pytest.mark.parametrize("kw", [dict(shift_tokens=1), dict(mv_split_residual=True), dict(attn_selective=True)])
def test_training_samples_decode_uncached_where_a_cache_cannot_continue(kw):
    """The trainer's samples (evaluation, ablate) from a model whose blocks mix tokens outside
    attention rerun the sequence instead of failing on the cache: greedy equals the argmax loop."""
    import torch

    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.training.sampler import sample

    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=32, depth=2, heads=2, **kw)).eval()
    prompt = torch.randint(0, 20, (2, 3))
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(sample(model, prompt, 4, temperature=0.0), seq)
