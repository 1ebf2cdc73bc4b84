"""``xtransformers train --init-from HF_FOLDER`` and ``generate HF_FOLDER``: tiny random GPT-2 and
Llama folders written by ``transformers`` (a test-only dependency), with a tiny BPE tokenizer.json.
The run's first validation loss is the HF model's loss on the same batch, and sampling is seeded."""

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import cli, records, train_losses

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from x_transformers.training import checkpoint as ck  # noqa: E402
from x_transformers.training.config import load_config  # noqa: E402
from x_transformers.training.data import load_data  # noqa: E402

transformers.logging.set_verbosity_error()
TEXT = "def hello(world):\n    return world + 1\n\nimport os, sys\nclass Point:\n    x: int = 0\n"


def bpe(path):
    """A byte-level BPE of a few hundred tokens, trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    return tok.get_vocab_size()


def hf_folder(path, family, vocab=None, tokenizer=True):
    path.mkdir(parents=True, exist_ok=True)
    size = bpe(path) if tokenizer else 0
    vocab = vocab or size + 3  # HF vocabularies are often padded past the tokenizer's
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None))
    model.eval().save_pretrained(path)
    return path, model


def train_args(tmp_path, folder, *extra):
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    return ["train", "--init-from", folder, "--data", tmp_path / "corpus.txt", "--seq-len", 16, "--batch-size", 4,
            "--max-steps", 2, "--eval-every", 2, "--save-every", 2, "--eval-batches", 1, "--sample-tokens", 4,
            "--log-every", 1, "--warmup-steps", 1, "--no-progress", "--out", tmp_path / "run", *extra]


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()  # drop what building the HF folders printed
    code = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_from_hf_starts_at_the_hf_loss(tmp_path, family):
    folder, hf = hf_folder(tmp_path / "hf", family)
    assert cli(*train_args(tmp_path, folder)) == 0
    run = tmp_path / "run"
    cfg = load_config(base=json.loads((run / "config.json").read_text()))
    assert cfg.tokenizer == str(folder / "tokenizer.json") and cfg.model["num_tokens"] == hf.config.vocab_size
    batch = load_data(cfg).batch(0, "val", cfg.batch_size)  # the one validation batch
    with torch.no_grad():
        logits = hf(input_ids=batch.inputs[0]).logits
    want = F.cross_entropy(logits.flatten(0, 1), batch.target.flatten()).item()
    vals = [r for r in records(run) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 2]
    assert vals[0]["val_loss"] == pytest.approx(want, abs=1e-4)
    assert len(train_losses(run)) == 2
    # the run is self-contained: eval and generate rebuild the model from the stored keywords
    assert cli("eval", run) == 0 and cli("generate", run, "--tokens", 3) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_from_hf_folder_is_seeded(tmp_path, capsys, family):
    folder, _ = hf_folder(tmp_path / "hf", family)
    outs = []
    for seed in (3, 3, 4):
        assert cli("generate", folder, "--prompt", "def ", "--tokens", 12, "--seed", seed) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def ")
    assert outs[0] != outs[2]  # the seed matters (temperature 0.8 over a random model)


def test_byte_level_needs_the_checkpoints_vocabulary(tmp_path, capsys):
    folder, _ = hf_folder(tmp_path / "hf", "gpt2", vocab=300, tokenizer=False)
    err = one_line_error(capsys, *train_args(tmp_path, folder))
    assert "no tokenizer.json" in err and "300 tokens" in err and not (tmp_path / "run").exists()
    err = one_line_error(capsys, "generate", folder)
    assert "no tokenizer.json" in err
    # a byte-level checkpoint (256 tokens) trains on bytes
    byte_folder, _ = hf_folder(tmp_path / "bytes", "llama", vocab=256, tokenizer=False)
    assert cli(*train_args(tmp_path, byte_folder)) == 0
    assert load_config(base=json.loads((tmp_path / "run" / "config.json").read_text())).tokenizer is None


def test_model_overrides_without_weights_apply_conflicts_are_errors(tmp_path, capsys):
    folder, _ = hf_folder(tmp_path / "hf", "llama")
    err = one_line_error(capsys, *train_args(tmp_path, folder, "--set", "model.dim=64"))
    assert "model.dim=64 conflicts with the checkpoint's dim=32" in err and not (tmp_path / "run").exists()
    err = one_line_error(capsys, *train_args(tmp_path, folder, "--set", "model.attn_num_mem_kv=2"))
    assert "not in the checkpoint" in err
    gpt2, _ = hf_folder(tmp_path / "gpt2", "gpt2")
    err = one_line_error(capsys, *train_args(tmp_path, gpt2, "--seq-len", 64))
    assert "32 learned positions" in err
    assert cli(*train_args(tmp_path, folder, "--set", "model.ff_dropout=0.1", "--max-steps", 3, "--stop-after", 2,
                           "--save-every", 1)) == 0
    ckpt = ck.find(tmp_path / "run")
    assert ck.read_config(ckpt)["model"]["ff_dropout"] == 0.1
    # the resumed run needs neither the folder nor the flag again
    assert cli("train", "--resume", tmp_path / "run") == 0
    assert len(train_losses(tmp_path / "run")) == 3


def test_sampling_stops_at_learned_positions(tmp_path, capsys):
    """GPT-2's 32 learned positions: generate refuses more, the validation sample is cut short."""
    folder, _ = hf_folder(tmp_path / "hf", "gpt2")
    err = one_line_error(capsys, "generate", folder, "--prompt", "def ", "--tokens", 40)
    assert "max_seq_len (32)" in err
    assert cli(*train_args(tmp_path, folder, "--sample-tokens", 100)) == 0
