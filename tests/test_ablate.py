"""xtransformers ablate: a CPU smoke run over every default setting (both experiments), the statistics
of the table, failures recorded without ending the sweep, and the evidence written for docs/."""

import json
import math
import shutil
from pathlib import Path

import pytest
from train_helpers import ROOT, cli

from x_transformers.training import ablate
from x_transformers.training import ablate_report as report
from x_transformers.training.config import load_config

# a micro base for each experiment: each run builds the model, takes 2 optimizer steps and validates
MICRO_LM = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=4", "--seq-len", "16",
            "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--eval-batches", "1",
            "--stdlib-bytes", "60000"]
MICRO_TASK = ["--task-set", "model.dim=32", "--task-set", "seq_len=6", "--task-set", "batch_size=4",
              "--task-set", "max_steps=2", "--task-set", "warmup_steps=1", "--task-set", "eval_batches=1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "ablation"
    assert cli("ablate", "--out", out, "--seeds", 1, *MICRO_LM, *MICRO_TASK) == 0
    return out


def records(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_smoke_every_default_setting_trains_with_finite_losses(smoke):
    assert sorted(p.name for p in smoke.iterdir()) == ["bars.png", "loss_curves.png", "meta.json", "runs.jsonl",
                                                       "seq2seq.md", "table.md"]  # <= 6 files
    recs = records(smoke)
    for kind, settings in (("lm", ablate.LM_SETTINGS), ("seq2seq", ablate.SEQ2SEQ_SETTINGS)):
        got = {r["setting"]: r for r in recs if r["kind"] == kind}
        assert set(got) == {s.name for s in settings}
        for name, r in got.items():
            assert r["status"] == "ok", (kind, name, r.get("error"))
            assert r["steps"] == 2 and all(math.isfinite(x) for x in r["train_loss"]), (kind, name)
            assert math.isfinite(r["val_loss"]) and r["params"] > 0 and r["peak_mem_mib"] > 0
        assert all("val_exact_match" in r for r in got.values()) == (kind == "seq2seq")
    table, seq2seq = (smoke / "table.md").read_text(), (smoke / "seq2seq.md").read_text()
    for s in ablate.LM_SETTINGS:
        assert f"| {s.name} |" in table
    for s in ablate.SEQ2SEQ_SETTINGS:
        assert f"| {s.name} |" in seq2seq
    meta = json.loads((smoke / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["commit"] and meta["card"]
    assert meta["experiments"]["lm"]["data"]["sha256"] in table  # the corpus hash of the training data module
    for png in ("bars.png", "loss_curves.png"):
        assert (smoke / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_change_the_model_they_name(smoke):
    by = {(r["kind"], r["setting"]): r for r in records(smoke)}
    base = by["lm", "baseline"]["model"]
    assert base == {"dim": 32, "depth": 2, "heads": 4}
    assert by["lm", "gqa"]["model"]["attn_kv_heads"] == 2 and by["lm", "dim_head_x2"]["model"]["attn_dim_head"] == 2 * 64
    assert by["lm", "swiglu"]["params"] == pytest.approx(by["lm", "baseline"]["params"], rel=0.01)  # matched
    assert by["lm", "macaron"]["params"] == pytest.approx(by["lm", "baseline"]["params"], rel=0.01)  # matched
    assert by["seq2seq", "funnel"]["model"]["enc_depths"] == [1, 1]
    # issue 26: the paper-setting rows
    assert by["lm", "rezero_unit_emb"]["model"] == {**base, "use_rezero": True, "post_emb_norm": True}
    assert by["lm", "sandwich_norm_unit_emb"]["model"] == {**base, "sandwich_norm": True, "post_emb_norm": True}
    assert by["lm", "sandwich_coef_quarter"]["model"]["sandwich_coef"] == 1  # depth 2 // 4, at least 1
    assert by["seq2seq", "memory_tokens"]["model"]["enc_num_memory_tokens"] == 10


def test_a_positional_setting_replaces_the_base_scheme():
    cfg = load_config("tiny")  # rotary in the base
    alibi = next(s for s in ablate.LM_SETTINGS if s.name == "alibi")
    model = ablate.setting_model(alibi, cfg)
    assert model["alibi_pos_bias"] and "rotary_pos_emb" not in model
    rms = ablate.setting_model(next(s for s in ablate.LM_SETTINGS if s.name == "rezero"),
                               load_config("tiny", sets={"model.use_rmsnorm": True}))
    assert rms["use_rezero"] and "use_rmsnorm" not in rms


def rec(setting, seed, loss, em=None):
    r = dict(kind="lm" if em is None else "seq2seq", setting=setting, seed=seed, status="ok", val_loss=loss,
             val_bpb=loss, params=100, section="", paper="", notes="")
    if em is not None:
        r["val_exact_match"] = em
    return r


def test_statistics_difference_and_two_standard_errors():
    recs = [rec("baseline", s, x) for s, x in enumerate((1.00, 1.02, 1.04))]
    recs += [rec("better", s, x) for s, x in enumerate((0.90, 0.91, 0.92))]
    recs += [rec("same", s, x) for s, x in enumerate((0.99, 1.03, 1.05))]
    recs += [dict(kind="lm", setting="broken", seed=0, status="error", error="ValueError: no", section="",
                  paper="", notes="")]
    rows = report.summarize(recs, "lm")
    assert [r["setting"] for r in rows] == ["better", "baseline", "same", "broken"]  # by loss, failures last
    better, same = rows[0], rows[2]
    assert better["val_loss_diff"] == pytest.approx(-0.11)
    assert better["val_loss_se"] == pytest.approx(math.sqrt(0.01 ** 2 / 3 + 0.02 ** 2 / 3))
    assert better["val_loss_beyond"] and not same["val_loss_beyond"]
    md = report.markdown(recs, {}, "lm")
    assert "**yes, better**" in md and "| same |" in md and "`broken`" in md and "ValueError: no" in md


def test_a_failing_setting_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    # shared-QK refuses grouped KV heads: its run fails, the baseline still trains
    out = tmp_path / "a"
    assert cli("ablate", "--out", out, "--seeds", 1, "--experiments", "lm", "--settings", "shared_qk,rotary",
               *MICRO_LM, "--set", "model.attn_kv_heads=2") == 0
    by = {r["setting"]: r for r in records(out)}
    assert by["shared_qk"]["status"] == "error" and "attn_kv_heads" in by["shared_qk"]["error"]
    assert by["baseline"]["status"] == "ok" and by["rotary"]["status"] == "ok"
    assert "Failed or diverged" in (out / "table.md").read_text()
    assert "ERROR" in capsys.readouterr().out


def test_time_limit_skips_runs_and_still_writes_the_tables(tmp_path):
    out = tmp_path / "t"
    assert cli("ablate", "--out", out, "--seeds", 2, "--experiments", "lm", "--settings", "rotary",
               *MICRO_LM, "--time-limit", 1e-9) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "time limit reached" and len(meta["skipped"]) == 4
    assert (out / "table.md").exists()


def test_user_errors(tmp_path, capsys):
    assert cli("ablate", "--out", tmp_path / "x", "--settings", "rotarry") == 2
    assert "did you mean 'rotary'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert cli("ablate", "--out", tmp_path / "full") == 2
    assert "not empty" in capsys.readouterr().err


def test_evidence_fills_every_features_section(smoke, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copyfile(ROOT / "docs" / "features.md", docs / "features.md")
    lines = report.write_evidence(smoke, docs)
    sections = {s.section for kind in ablate.EXPERIMENTS.values() for s in kind[1] if s.section}
    assert sections | set(ablate.NOT_RUN) == set(lines)
    assert report.update_features(docs / "features.md", lines) == []  # every section heading found
    text = (docs / "features.md").read_text()
    assert text.count("Measured ([ablation](evidence/ablation.md);") == len(sections)
    assert "`rotary` " in text and "`funnel` on `reverse` exact match" in text
    evidence = (docs / "evidence" / "ablation.md").read_text()
    assert "Language-model ablation" in evidence and "Encoder-decoder ablation" in evidence
    assert (docs / "evidence" / "ablation_bars.png").exists()
    # idempotent: a second update replaces the lines instead of adding more
    report.update_features(docs / "features.md", lines)
    assert (docs / "features.md").read_text() == text


# ----------------------------------------------------------------------------------------------
# learning-rate sweep (issue 26): every setting at each lr, reported at its best


def lr_rec(setting, seed, loss, lr, status="ok", kind="lm", em=None):
    r = rec(setting, seed, loss, em)
    r.update(kind=kind, lr=lr, status=status)
    if status != "ok":
        r.pop("val_loss")
        r["error"] = "non-finite training loss at step 3"
    return r


def test_each_setting_is_reported_at_its_best_lr_and_compared_best_with_best():
    sweep = {"baseline": {1e-3: (1.30, 1.32, 1.34), 2e-3: (1.20, 1.21, 1.22), 4e-3: (1.25, 1.25, 1.25)},
             "rezero": {1e-3: (1.10, 1.12, 1.14), 2e-3: (1.50, 1.50, 1.50), 4e-3: None}}  # None: diverged
    recs = []
    for name, by_lr in sweep.items():
        for lr, losses in by_lr.items():
            for seed in range(3):
                recs.append(lr_rec(name, seed, None if losses is None else losses[seed], lr,
                                   status="ok" if losses else "diverged"))
    recs.append(lr_rec("rezero", 0, 0.2, 8e-3))  # one seed only (a time limit): never chosen
    rows = {r["setting"]: r for r in report.summarize(recs, "lm")}
    base, rz = rows["baseline"], rows["rezero"]
    assert base["lr"] == 2e-3 and rz["lr"] == 1e-3
    assert base["val_loss"] == pytest.approx(1.21) and rz["val_loss"] == pytest.approx(1.12)
    assert rz["val_loss_diff"] == pytest.approx(1.12 - 1.21)  # best with best
    assert rz["val_loss_se"] == pytest.approx(math.sqrt(0.02 ** 2 / 3 + 0.01 ** 2 / 3))
    assert rz["seeds"] == 3 and rz["failures"] == []  # the diverged lr is not the row's failure
    assert rz["lr_info"][4e-3] == (None, 0, 3) and rz["lr_info"][8e-3] == (0.2, 1, 1)
    md = report.markdown(recs, {}, "lm")
    line = next(x for x in md.splitlines() if x.startswith("| rezero |"))
    assert "**0.001** (loss by lr: 0.001: 1.120; 0.002: 1.500; 0.004: failed (0/3 ok); " in line
    assert "0.008: 0.200 (1 seeds: not compared)" in line and "-0.0900" in line
    # the curves use the same choice
    kept = report.at_best_lr(recs)
    assert {(r["setting"], r["lr"]) for r in kept} == {("baseline", 2e-3), ("rezero", 1e-3)}


def test_seq2seq_best_lr_is_the_highest_exact_match_then_the_lowest_loss():
    recs = [lr_rec("baseline", s, 0.5, 1e-3, kind="seq2seq", em=0.6) for s in range(2)]
    recs += [lr_rec("baseline", s, 0.9, 2e-3, kind="seq2seq", em=0.8) for s in range(2)]
    recs += [lr_rec("baseline", s, 0.4, 4e-3, kind="seq2seq", em=0.8) for s in range(2)]
    (row,) = report.summarize(recs, "seq2seq")
    assert row["lr"] == 4e-3 and row["val_exact_match"] == pytest.approx(0.8) and row["val_loss"] == 0.4


def test_cli_lr_sweep_depth_and_a_setting_lr(tmp_path):
    out = tmp_path / "s"
    assert cli("ablate", "--out", out, "--seeds", 1, "--experiments", "lm", "--settings", "rezero,rotary",
               "--lrs", "1e-3,3e-3", "--lr-for", "rotary=5e-3", "--depth", 3, *MICRO_LM) == 0
    got = sorted((r["setting"], r["lr"]) for r in records(out))
    assert got == [("baseline", 1e-3), ("baseline", 3e-3), ("rezero", 1e-3), ("rezero", 3e-3), ("rotary", 5e-3)]
    assert all(r["model"]["depth"] == 3 and r["status"] == "ok" for r in records(out))
    table = (out / "table.md").read_text()
    assert "lr sweep 0.001, 0.003, 0.005" in table and "(loss by lr: 0.001: " in table
    meta = json.loads((out / "meta.json").read_text())
    assert meta["experiments"]["lm"]["lrs"] == {"baseline": [1e-3, 3e-3], "rezero": [1e-3, 3e-3], "rotary": [5e-3]}
    assert cli("ablate", "--out", tmp_path / "bad", "--lrs", "1e-3,x") == 2
    assert cli("ablate", "--out", tmp_path / "bad", "--experiments", "lm", "--settings", "rotary",
               "--lr-for", "alibi=1e-3") == 2


def test_parallel_seed_folders_merge_into_one_table(tmp_path):
    parts = []
    for seed in (0, 1):
        parts.append(tmp_path / f"seed{seed}")
        assert cli("ablate", "--out", parts[-1], "--seeds", 1, "--first-seed", seed, "--experiments", "lm",
                   "--settings", "rotary", "--lrs", "1e-3,2e-3", *MICRO_LM) == 0
    out = tmp_path / "all"
    assert cli("ablate", "--merge", ",".join(map(str, parts)), "--out", out) == 0
    recs = records(out)
    assert len(recs) == 8 and {r["seed"] for r in recs} == {0, 1}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["status"] == "complete"
    rows = {r["setting"]: r for r in report.summarize(recs, "lm")}
    assert rows["rotary"]["seeds"] == 2 and "val_loss_se" in rows["rotary"]  # judged over both seeds
    assert "| rotary |" in (out / "table.md").read_text()


def test_merge_leaves_out_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli("ablate", "--merge", str(tmp_path / "empty"), "--out", tmp_path / "m") == 2
    assert "holds an ablate run" in capsys.readouterr().err


def test_rezero_unit_emb_starts_the_norm_free_stream_at_unit_scale():
    """ReZero's stack is the identity at init and has no norm, so the hidden states it hands to the
    head are the embeddings: std 0.02 by default (the `rezero` row), unit scale with post_emb_norm
    (the `rezero_unit_emb` row, the paper's embedding scale)."""
    import torch

    from x_transformers import Decoder, TransformerWrapper

    x = torch.randint(0, 256, (2, 32))
    stds = {}
    for post in (False, True):
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=256, max_seq_len=32, post_emb_norm=post,
                                 attn_layers=Decoder(dim=64, depth=2, heads=4, use_rezero=True))
        stds[post] = net(x, return_embeddings=True).std(-1).mean().item()
    assert 0.02 < stds[False] < 0.04  # token (0.02) + position (0.02) tables summed
    assert abs(stds[True] - 1.0) < 0.02


def test_a_baseline_free_folder_merges_with_the_baselines_own(tmp_path, capsys):
    """--without-baseline (one process a job, benchmarks/issue26_jobs.sh): the row is compared with the
    baseline another process ran, once they are merged."""
    base, arm = tmp_path / "base", tmp_path / "arm"
    assert cli("ablate", "--out", base, "--seeds", 1, "--experiments", "lm", "--settings", "baseline", *MICRO_LM) == 0
    assert cli("ablate", "--out", arm, "--seeds", 1, "--experiments", "lm", "--settings", "macaron_post_norm",
               "--without-baseline", *MICRO_LM) == 0
    assert [r["setting"] for r in records(arm)] == ["macaron_post_norm"]
    assert cli("ablate", "--merge", f"{base},{arm}", "--out", tmp_path / "m") == 0
    alone = {r["setting"]: r for r in report.summarize(records(arm), "lm")}
    assert "val_loss_diff" not in alone["macaron_post_norm"]  # nothing to compare with before the merge
    rows = {r["setting"]: r for r in report.summarize(records(tmp_path / "m"), "lm")}
    assert rows["baseline"]["val_loss"] == records(base)[0]["val_loss"]
    assert rows["macaron_post_norm"]["val_loss_diff"] == rows["macaron_post_norm"]["val_loss"] - rows["baseline"]["val_loss"]
    capsys.readouterr()
    assert cli("ablate", "--out", tmp_path / "x", "--experiments", "lm", "--settings", "baseline",
               "--without-baseline") == 2
    assert "leaves no setting" in capsys.readouterr().err
