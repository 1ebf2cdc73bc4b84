"""Issue 20's attention-variant ablation rows: each is in the ablate table, sized from the base's shape,
and the device jobs file runs every one of them (and the baseline) with the same three seeds."""

from pathlib import Path

from x_transformers.training import ablate
from x_transformers.training.ablate_settings import ATTENTION_SETTINGS
from x_transformers.training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"gate_values", "softcap", "sinks", "sliding_window", "sigmoid_attn", "l2_distance", "laser", "mla", "cope",
            "forgetting"}


def test_every_attention_variant_is_a_row_of_the_lm_table():
    names = [s.name for s in ablate.LM_SETTINGS]
    assert {s.name for s in ATTENTION_SETTINGS} == VARIANTS
    assert len(names) == len(set(names)) and VARIANTS <= set(names)
    assert {"talking_heads", "value_residual"} <= set(names)  # the rows issue 20 shares with earlier issues


def test_sized_rows_follow_the_base_shape():
    cfg = load_config("ablate")  # dim 256, seq 256
    by = {s.name: ablate.setting_model(s, cfg) for s in ATTENTION_SETTINGS}
    assert by["sliding_window"]["attn_max_attend_past"] == cfg.seq_len // 4 == 64
    assert by["mla"]["attn_dim_latent_kv"] == cfg.model["dim"] // 2 and by["mla"]["attn_use_latent_kv"] is True
    base = ablate.setting_model(next(s for s in ablate.LM_SETTINGS if s.name == "baseline"), cfg)
    for s in ATTENTION_SETTINGS:  # one change over the base, the base's positions kept
        assert {k: v for k, v in by[s.name].items() if k not in s.model} == base, s.name


def test_the_jobs_file_runs_every_row_with_the_baseline_and_three_seeds():
    lines = [line.split() for line in (ROOT / "benchmarks" / "issue20_ablate.jobs").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    known = {s.name for s in ablate.LM_SETTINGS}
    assert all(g == "i20" and lr == "2e-3" and rest == ["--experiments", "lm"] for g, _, lr, _, *rest in lines)
    assert all(name in known for _, name, *_ in lines)
    runs = {(name, int(seed)) for _, name, _, seed, *_ in lines}
    assert len(runs) == len(lines)
    assert runs == {(n, s) for n in VARIANTS | {"baseline", "talking_heads"} for s in (0, 1, 2)}
    assert load_config("ablate").lr == 2e-3  # the table's learning rate
    seeds = [int(seed) for *_, seed, _, _ in lines]
    assert seeds == sorted(seeds)  # seed-major: a time limit leaves every row with the same seeds
