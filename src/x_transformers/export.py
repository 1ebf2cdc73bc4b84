"""ONNX export of a trained model, for serving without PyTorch.

:func:`export_onnx` writes a ``TransformerWrapper`` (encoder or decoder: token ids, and optionally
a padding mask, to logits) or an ``XTransformer`` (source and target ids, optionally the source
mask, to the decoder's logits) through ``torch.onnx.export`` (the dynamo exporter) with the batch
size and the sequence lengths dynamic. It then runs the file in ``onnxruntime`` at two shapes
other than the example's, and compares the result with the PyTorch model (refusing a file off by
more than ``atol``). ``pip install 'x-transformers[onnx]'`` brings onnx, onnxscript and onnxruntime.

Not exported: the KV cache (a decode step as a graph of its own). The exported decoder computes
the full forward for the sequence it is given, so generation with it recomputes the prefix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _requires():
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'x-transformers[onnx]' "
                          f"({e.name} is missing)") from None


class _Logits(nn.Module):
    """The model's forward as positional tensors in, one tensor out (what an ONNX graph has)."""

    def __init__(self, model: nn.Module, seq2seq: bool, with_mask: bool):
        super().__init__()
        self.model, self.seq2seq, self.with_mask = model, seq2seq, with_mask

    def forward(self, first, second=None, third=None):
        if self.seq2seq:  # source, target, source mask
            return self.model(first, second, mask=third)
        return self.model(first, mask=second)  # ids, mask


def _limits(model) -> tuple[int, int]:
    """(vocabulary, the longest sequence the model takes: its absolute-position table, or a large bound)."""
    from .wrappers import XTransformer

    nets = (model.encoder, model.decoder) if isinstance(model, XTransformer) else (model,)
    longest = min((n.max_seq_len for n in nets if getattr(n, "pos_emb", None) is not None and n.max_seq_len),
                  default=4096)
    return min(n.num_tokens for n in nets), longest


def _example(model, seq2seq: bool, with_mask: bool, batch: int, length: int, generator) -> tuple:
    vocab, _ = _limits(model)
    ids = lambda n: torch.randint(0, vocab, (batch, n), generator=generator)  # noqa: E731
    inputs = (ids(length), ids(length + 1)) if seq2seq else (ids(length),)
    if with_mask:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length // 2:] = False  # a padded row, so the mask is a real input of the graph
        inputs = inputs + (mask,)
    return inputs


def export_onnx(model: nn.Module, path: str | Path, *, with_mask: bool = False, atol: float = 1e-4,
                verify: bool = True) -> dict:
    """Write ``model`` (a ``TransformerWrapper`` or ``XTransformer``, in eval mode on CPU, float32)
    to ``path`` as ONNX with dynamic batch and lengths; with ``with_mask`` the padding mask (of the
    source, for an encoder-decoder) is an input too. Returns the inputs' names and, when
    ``verify``, the largest absolute difference from PyTorch at each checked shape (an error above
    ``atol``)."""
    from .wrappers import TransformerWrapper, XTransformer

    _requires()
    if not isinstance(model, (TransformerWrapper, XTransformer)):
        raise TypeError(f"export_onnx takes a TransformerWrapper or an XTransformer, got {type(model).__name__}")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export_onnx exports a float32 model on CPU: call model.float().cpu() first")
    seq2seq = isinstance(model, XTransformer)
    model.eval()
    wrapped = _Logits(model, seq2seq, with_mask).eval()
    _, longest = _limits(model)
    if longest < 4:
        raise ValueError(f"the model takes at most {longest} positions; export needs at least 4")
    g = torch.Generator().manual_seed(0)
    example = _example(model, seq2seq, with_mask, 2, min(8, longest - 1), g)
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=2, max=longest)
    names = ["src", "tgt"] if seq2seq else ["ids"]
    shapes = [{0: batch, 1: length}]
    if seq2seq:  # the target has a length of its own
        shapes.append({0: batch, 1: torch.export.Dim("tgt_length", min=2, max=longest)})
    if with_mask:
        names.append("mask")
        shapes.append({0: batch, 1: length})
    dynamic = dict(zip(("first", "second", "third"), shapes))
    program = torch.onnx.export(wrapped, example, input_names=names, output_names=["logits"],
                                dynamic_shapes=dynamic, dynamo=True, verbose=False)
    program.save(str(path))
    report = {"path": str(path), "inputs": names}
    if verify:
        report["max_abs_diff"] = check_onnx(wrapped, path, seq2seq, with_mask, atol, longest)
    return report


@torch.no_grad()
def check_onnx(wrapped: nn.Module, path, seq2seq: bool, with_mask: bool, atol: float, longest: int) -> dict:
    """onnxruntime against PyTorch at two shapes the export did not see."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(1)
    diffs = {}
    for batch, length in ((1, min(5, longest - 1)), (3, min(longest - 1, 21))):
        inputs = _example(wrapped.model, seq2seq, with_mask, batch, length, g)
        want = wrapped(*inputs).numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        diffs[f"{batch}x{length}"] = diff = float(abs(got - want).max())
        if not diff <= atol:
            raise RuntimeError(f"the ONNX file {path} differs from the model by {diff:.3g} at batch {batch}, "
                               f"length {length} (atol {atol})")
    return diffs


__all__ = ["export_onnx", "check_onnx"]
