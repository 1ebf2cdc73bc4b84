"""Data: tokenizers, corpora, and deterministic batches.

Corpora (``data`` in the config):
  "stdlib"       the embedded default: the running Python's standard-library sources, found on every
                 machine with no download. Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``,
                 sorted by their POSIX path relative to that folder, skipping any file with a path
                 component in ``STDLIB_SKIP`` (site-packages, dist-packages, test suites, caches). Each
                 file's bytes are followed by one ``\\n``; the concatenation is cut at ``stdlib_bytes``.
                 The corpus depends on the Python version, so its SHA-256 is recorded in the run folder.
  a text file    its bytes
  a folder       every regular, non-hidden file under it, sorted by relative POSIX path, each followed
                 by ``\\n``
  a .bin file    a flat array of token ids (``token_dtype``), memory-mapped, so it may exceed RAM;
                 write one with :func:`write_tokens` or ``xtransformers prepare``

Tokens are bytes (256 ids) unless ``tokenizer`` names a Hugging Face ``tokenizers`` JSON file, or
is ``bpe:N``: a byte-level BPE of N entries trained on the corpus and cached by its digest.
The last ``val_fraction`` of the tokens is the validation split.

Batches are a pure function of (seed, split, batch index): a resumed run, or N processes that each
take their rows of the global batch, see exactly the data an uninterrupted single process sees.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import CLIError, TrainConfig

STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


# ----------------------------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (optional dependency)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CLIError("tokenizer files need the 'tokenizers' package: pip install tokenizers")
        if not Path(path).is_file():
            raise CLIError(f"tokenizer file {path} does not exist")
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:
            raise CLIError(f"tokenizer file {path} could not be read: {str(e).splitlines()[0]}")
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, data: bytes) -> np.ndarray:
        ids = self.tok.encode(data.decode("utf-8", errors="replace")).ids
        return np.asarray(ids, dtype=np.uint32 if self.vocab_size > 65535 else np.uint16)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


BPE_PREFIX = "bpe:"


def load_tokenizer(spec: str | None, corpus: bytes | None = None):
    """Bytes (``None``), a ``tokenizers`` JSON file, or ``bpe:N``: a byte-level BPE of N entries
    trained on ``corpus`` (see :func:`bpe_tokenizer`)."""
    if spec is None:
        return ByteTokenizer()
    if spec.startswith(BPE_PREFIX):
        if corpus is None:
            raise CLIError(f"tokenizer {spec} is trained on a text corpus; a .bin token file is already "
                           f"tokenized: give the tokenizer JSON that `xtransformers prepare` wrote beside it")
        return HFTokenizer(str(bpe_tokenizer(corpus, bpe_size(spec))))
    return HFTokenizer(spec)


def bpe_size(spec: str) -> int:
    try:
        size = int(spec[len(BPE_PREFIX):])
    except ValueError:
        size = 0
    if size < 257:
        raise CLIError(f"tokenizer {spec!r}: bpe:N needs a whole number of entries N > 256 (the 256 bytes come first)")
    return size


def tokenizer_cache() -> Path:
    base = os.environ.get("XT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "x-transformers"
    return Path(base) / "tokenizers"


def bpe_tokenizer(corpus: bytes, vocab_size: int, out: Path | None = None) -> Path:
    """A byte-level BPE (GPT-2's scheme: every byte is a token, merges learned on top) of
    ``vocab_size`` entries trained on ``corpus`` with Hugging Face ``tokenizers``; written to ``out``,
    or cached by the corpus's SHA-256 so a run, its resume, ``eval`` and ``generate`` share it. A
    corpus too small for that many merges gives fewer entries."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise CLIError("a BPE tokenizer needs the 'tokenizers' package: pip install tokenizers")
    digest = hashlib.sha256(corpus).hexdigest()[:16]
    path = out or tokenizer_cache() / f"bpe-{vocab_size}-{digest}.json"
    if out is None and path.is_file():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    text = corpus.decode("utf-8", errors="replace")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: processes training the same tokenizer at once agree
    return path


# ----------------------------------------------------------------------------------------------
# corpora


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]  # prune: site-packages can be huge
        files += [Path(folder, n) for n in names if n.endswith(".py") and Path(folder, n).is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _concat(files, budget: int | None = None) -> bytes:
    parts, size = [], 0
    for f in files:
        chunk = f.read_bytes() + b"\n"
        parts.append(chunk)
        size += len(chunk)
        if budget is not None and size >= budget:
            break
    data = b"".join(parts)
    return data[:budget] if budget is not None else data


def read_corpus(source: str, budget: int) -> bytes:
    if source == "stdlib":
        return _concat(stdlib_files(), budget)
    p = Path(source)
    if p.is_file():
        raw = p.read_bytes()
        if b"\x00" in raw[: 1 << 16]:
            raise CLIError(f"data {source} looks binary (it has NUL bytes), not text: give a text file, or a .bin "
                           f"token file written by `xtransformers prepare` (its name must end in .bin)")
        return raw
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        return _concat(files)
    raise CLIError(f"data {source} does not exist: give a text file, a folder of text files, a .bin token file "
                   f"or 'stdlib'")


def write_tokens(path: str | Path, tokens, dtype: str = "uint16") -> None:
    """Write a flat token file for memory-mapped training (``data: path.bin``)."""
    arr = np.asarray(tokens)
    if arr.size and int(arr.max()) > np.iinfo(dtype).max:
        raise CLIError(f"token id {int(arr.max())} does not fit {dtype}; use token_dtype uint32")
    arr.astype(dtype).tofile(path)


# ----------------------------------------------------------------------------------------------
# batches


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index * 2 + (split == "val"))


@dataclass
class Batch:
    inputs: tuple  # model inputs
    target: torch.Tensor  # (b, n) next-token labels
    tokens: int  # target tokens in this batch


class TextData:
    """A token stream split into train / val; ``batch`` draws random windows of seq_len + 1."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int, tokenizer,
                 bytes_per_token: float, digest: str, source: str):
        n_val = max(int(len(tokens) * val_fraction), seq_len + 2)
        if len(tokens) - n_val < seq_len + 2:
            raise CLIError(f"corpus {source} has {len(tokens)} tokens: too short for seq_len {seq_len} with a "
                           f"validation split; add text or lower seq_len")
        self.train, self.val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
        self.seq_len, self.seed, self.tokenizer = seq_len, seed, tokenizer
        self.bytes_per_token, self.digest, self.source = bytes_per_token, digest, source
        self.vocab_size = tokenizer.vocab_size

    def describe(self) -> dict:
        return dict(source=self.source, sha256=self.digest, train_tokens=len(self.train), val_tokens=len(self.val),
                    bytes_per_token=self.bytes_per_token, vocab_size=self.vocab_size)

    def batch(self, index: int, split: str, size: int, rows: slice = slice(None)) -> Batch:
        """The global batch ``index`` of ``size`` windows; ``rows`` picks this process's part."""
        arr = self.train if split == "train" else self.val
        offsets = torch.randint(0, len(arr) - self.seq_len - 1, (size,), generator=_generator(self.seed, split, index))
        windows = np.stack([np.asarray(arr[o: o + self.seq_len + 1]) for o in offsets[rows].tolist()])
        x = torch.from_numpy(windows.astype(np.int64))
        return Batch((x[:, :-1],), x[:, 1:], x[:, 1:].numel())


TASKS = ("copy", "reverse", "sort", "addition")
BOS = 2  # the decoder's start token (byte STX); task symbols are printable ASCII


class TaskData:
    """Synthetic sequence-to-sequence tasks of fixed length ``seq_len`` for the encoder-decoder.

    copy / reverse / sort: ``seq_len`` random lower-case letters -> the same, reversed, sorted.
    addition: two numbers of ``(seq_len - 1) // 2`` digits as ``"a+b"`` -> their sum, zero-padded
    to one more digit. Metric: exact match of the greedily decoded target.
    """

    def __init__(self, task: str, seq_len: int, seed: int):
        if task not in TASKS:
            raise CLIError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        if task == "addition" and seq_len < 3:
            raise CLIError("the addition task needs seq_len >= 3")
        self.task, self.seq_len, self.seed = task, seq_len, seed
        self.tokenizer, self.vocab_size, self.bytes_per_token = ByteTokenizer(), 256, 1.0
        self.digest, self.source = task, f"task:{task}"

    def describe(self) -> dict:
        return dict(source=self.source, task=self.task, seq_len=self.seq_len, vocab_size=self.vocab_size)

    def examples(self, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "addition":
            n = (self.seq_len - 1) // 2
            a = torch.randint(0, 10 ** n, (size,), generator=g, dtype=torch.int64)
            b = torch.randint(0, 10 ** n, (size,), generator=g, dtype=torch.int64)
            src = [f"{x:0{n}d}+{y:0{n}d}" for x, y in zip(a.tolist(), b.tolist())]
            tgt = [f"{x + y:0{n + 1}d}" for x, y in zip(a.tolist(), b.tolist())]
            enc = lambda strs: torch.tensor([list(s.encode()) for s in strs], dtype=torch.int64)  # noqa: E731
            return enc(src), enc(tgt)
        src = torch.randint(ord("a"), ord("z") + 1, (size, self.seq_len), generator=g)
        tgt = {"copy": src, "reverse": src.flip(-1), "sort": src.sort(-1).values}[self.task]
        return src, tgt

    def batch(self, index: int, split: str, size: int, rows: slice = slice(None)) -> Batch:
        src, tgt = self.examples(_generator(self.seed, split, index), size)
        src, tgt = src[rows], tgt[rows]
        tgt_in = torch.cat((torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]), dim=-1)  # teacher forcing
        return Batch((src, tgt_in), tgt, tgt.numel())


def load_data(cfg: TrainConfig):
    if cfg.task is not None:
        return TaskData(cfg.task, cfg.seq_len, cfg.seed)
    if cfg.data.endswith(".bin"):
        tokenizer = load_tokenizer(cfg.tokenizer)
        if not Path(cfg.data).is_file():
            raise CLIError(f"token file {cfg.data} does not exist")
        try:
            dtype = np.dtype(cfg.token_dtype)
        except TypeError:
            raise CLIError(f"token_dtype {cfg.token_dtype!r} is not a numpy integer type (uint8, uint16, uint32)")
        if Path(cfg.data).stat().st_size == 0:
            raise CLIError(f"token file {cfg.data} is empty")
        size = Path(cfg.data).stat().st_size
        if size % dtype.itemsize:
            raise CLIError(f"token file {cfg.data} has {size} bytes, not a whole number of {cfg.token_dtype} "
                           f"tokens: it was written with another token_dtype")
        tokens = np.memmap(cfg.data, dtype=dtype, mode="r")
        head = np.asarray(tokens[: 1 << 20])
        if head.size and int(head.max()) >= tokenizer.vocab_size:
            raise CLIError(f"token file {cfg.data} holds token id {int(head.max())}, beyond the tokenizer's "
                           f"{tokenizer.vocab_size}: it was written with another token_dtype or tokenizer "
                           f"(set token_dtype / tokenizer as `xtransformers prepare` had them)")
        digest = hashlib.sha256(head.tobytes()).hexdigest()  # of the first MiB of tokens: cheap for huge files
        sample = head[: 1 << 16]
        bpt = len(tokenizer.decode(sample).encode()) / max(len(sample), 1)
        return TextData(tokens, cfg.seq_len, cfg.val_fraction, cfg.seed, tokenizer, bpt, digest, cfg.data)
    raw = read_corpus(cfg.data, cfg.stdlib_bytes)
    if not raw.strip():
        raise CLIError(f"corpus {cfg.data} is empty: give a file or folder with text in it")
    tokenizer = load_tokenizer(cfg.tokenizer, raw)
    tokens = tokenizer.encode(raw)
    bpt = len(raw) / max(len(tokens), 1)  # bits per byte = nats per token / ln 2 / bytes per token
    return TextData(tokens, cfg.seq_len, cfg.val_fraction, cfg.seed, tokenizer, bpt,
                    hashlib.sha256(raw).hexdigest(), cfg.data)


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token
