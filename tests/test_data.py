"""Data: the embedded corpus is reproducible, batches are a pure function of their index, process
rows partition the global batch, memory-mapped token files equal the text they came from, the
synthetic tasks are correct, and a Hugging Face tokenizer changes bits per byte consistently."""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import TINY, cli, records

from x_transformers.training.config import CLIError, load_config
from x_transformers.training.data import (STDLIB_SKIP, TaskData, TextData, bits_per_byte, load_data, read_corpus,
                                          stdlib_files)


def test_stdlib_corpus_is_sorted_filtered_and_budgeted():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")) & STDLIB_SKIP for r in rel)
    a, b = read_corpus("stdlib", 50_000), read_corpus("stdlib", 50_000)
    assert a == b and len(a) == 50_000
    assert a.startswith(files[0].read_bytes())  # the first file in sorted order opens the corpus


def test_folder_order_and_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden").write_text("never")
    assert read_corpus(str(tmp_path), 0) == b"first\nsecond\n"


def test_batches_are_pure_and_rows_partition_the_global_batch():
    cfg = load_config("tiny", sets={"seq_len": 16, "stdlib_bytes": 20_000})
    data = load_data(cfg)
    full = data.batch(7, "train", 8)
    again = data.batch(7, "train", 8)
    assert torch.equal(full.inputs[0], again.inputs[0])
    parts = [data.batch(7, "train", 8, slice(r * 4, (r + 1) * 4)) for r in range(2)]
    assert torch.equal(torch.cat([p.inputs[0] for p in parts]), full.inputs[0])
    assert torch.equal(full.target[:, :-1], full.inputs[0][:, 1:])  # next-token labels
    assert not torch.equal(data.batch(8, "train", 8).inputs[0], full.inputs[0])
    # validation windows come from the held-out tail only
    val = data.batch(0, "val", 8)
    tail = bytes(data.val.tolist())
    assert all(bytes(row.tolist()) in tail for row in val.inputs[0])


def test_memmapped_token_file_equals_its_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(read_corpus("stdlib", 30_000))
    assert cli("prepare", text, tmp_path / "t.bin") == 0
    a = load_data(load_config("tiny", sets={"data": str(text), "seq_len": 16}))
    b = load_data(load_config("tiny", sets={"data": str(tmp_path / "t.bin"), "seq_len": 16}))
    assert isinstance(b.train, np.memmap)
    assert torch.equal(a.batch(3, "train", 4).inputs[0], b.batch(3, "train", 4).inputs[0])
    assert b.bytes_per_token == 1.0


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "addition"])
def test_tasks_are_correct(task):
    data = TaskData(task, 7, seed=0)
    b = data.batch(0, "train", 32)
    src, tgt_in, tgt = b.inputs[0], b.inputs[1], b.target
    assert torch.equal(tgt_in[:, 1:], tgt[:, :-1]) and (tgt_in[:, 0] == 2).all()  # teacher forcing after BOS
    for s, t in zip(src.tolist(), tgt.tolist()):
        s, t = bytes(s).decode(), bytes(t).decode()
        expected = {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}.get(task)
        if task == "addition":
            x, y = s.split("+")
            expected = f"{int(x) + int(y):04d}"
        assert t == expected


def test_bits_per_byte():
    assert bits_per_byte(math.log(256), 1.0) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2) * 6, 3.0) == pytest.approx(2.0)


def test_corpus_shorter_than_a_window():
    with pytest.raises(CLIError, match="too short"):
        TextData(np.zeros(20, np.uint8), 16, 0.1, 0, None, 1.0, "", "x")


def test_hugging_face_tokenizer(tmp_path):
    import tokenizers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = read_corpus("stdlib", 60_000).decode("utf-8", errors="replace")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    (tmp_path / "c.txt").write_text(text)
    data = load_data(load_config("tiny", sets={"data": str(tmp_path / "c.txt"), "tokenizer": str(path)}))
    assert data.vocab_size == tokenizers.Tokenizer.from_file(str(path)).get_vocab_size()
    assert data.bytes_per_token > 1.2  # merges: a token covers more than one byte
    run = tmp_path / "run"
    assert cli("train", *TINY, "--data", tmp_path / "c.txt", "--tokenizer", path, "--max-steps", 2,
               "--eval-every", 2, "--out", run) == 0
    val = [r for r in records(run) if r["kind"] == "val"][-1]
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / data.bytes_per_token)


# ----------------------------------------------------------------------------------------------
# a byte-level BPE trained on the corpus (issue 23)


def test_bpe_trained_on_the_corpus_round_trips_and_is_cached(tmp_path, monkeypatch):
    from x_transformers.training import data

    monkeypatch.setenv("XT_CACHE", str(tmp_path / "cache"))
    corpus = data.read_corpus("stdlib", 200_000)
    tok = data.load_tokenizer("bpe:600", corpus)
    assert tok.vocab_size == 600
    text = corpus[:5000].decode("utf-8", errors="replace")
    ids = tok.encode(text.encode())
    assert tok.decode(ids) == text  # byte-level: nothing is lost, not even whitespace
    assert len(ids) < 0.6 * len(text.encode())  # merges compress Python source
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-600-*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert data.load_tokenizer("bpe:600", corpus).vocab_size == 600 and cached[0].stat().st_mtime_ns == stamp
    for bad in ("bpe:100", "bpe:lots"):
        with pytest.raises(data.CLIError, match="N > 256"):
            data.load_tokenizer(bad, corpus)
    with pytest.raises(data.CLIError, match="already tokenized"):
        data.load_tokenizer("bpe:600")


def test_prepare_trains_a_tokenizer_and_training_reads_its_tokens(tmp_path, monkeypatch, capsys):
    import numpy as np

    from train_helpers import TINY, cli, records
    from x_transformers.training import data

    out = tmp_path / "tokens.bin"
    assert cli("prepare", "stdlib", out, "--stdlib-bytes", 100_000, "--train-tokenizer", 500) == 0
    tok_file = tmp_path / "tokens.tokenizer.json"
    assert str(tok_file) in capsys.readouterr().out
    tok = data.load_tokenizer(str(tok_file))
    ids = np.fromfile(out, dtype=np.uint16)
    assert tok.vocab_size == 500 and ids.max() < 500
    assert tok.decode(ids[:2000]) == tok.decode(tok.encode(data.read_corpus("stdlib", 100_000))[:2000])
    run = tmp_path / "r"
    assert cli("train", *TINY, "--data", out, "--tokenizer", tok_file, "--max-steps", 2, "--eval-every", 2,
               "--logger", "none", "--out", run) == 0
    assert [r["step"] for r in records(run) if r["kind"] == "val"] == [0, 2]


def test_the_gpt2_small_preset_uses_a_bpe_of_gpt2s_size():
    from x_transformers.training.config import load_config

    cfg = load_config("gpt2-small")
    assert cfg.tokenizer == "bpe:50304" and cfg.model["num_tokens"] == 50304
