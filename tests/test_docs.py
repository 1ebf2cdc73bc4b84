"""Every Python code block of README.md and docs/*.md runs as written (issue 23): the blocks of one
file run in order in one namespace, in a scratch folder, so a snippet a user copies works."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in BLOCK.finditer(text)]


WITH_CODE = [p for p in DOCS if blocks(p)]


def test_the_docs_have_code_to_run():
    assert {p.name for p in WITH_CODE} >= {"README.md", "features.md", "training.md"}


def tiny_llama(folder: Path):
    """What the Hugging Face snippet loads: a small Llama folder written by transformers."""
    import transformers  # in the test extra
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)


@pytest.mark.parametrize("path", WITH_CODE, ids=lambda p: p.name)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    from x_transformers import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))  # a snippet may register a subcommand
    code = "".join(code for _, code in blocks(path))
    if "path/to/llama" in code:
        tiny_llama(tmp_path / "path" / "to" / "llama")
    torch.manual_seed(0)
    namespace = {"__name__": f"doc_{path.stem}"}
    for line, code in blocks(path):
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102
