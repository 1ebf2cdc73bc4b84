"""ONNX export of a trained model, for serving without PyTorch.

:func:`export_onnx` writes a ``TransformerWrapper`` (encoder or decoder: token ids, and optionally
a padding mask, to logits) or an ``XTransformer`` (source and target ids, optionally the source
mask, to the decoder's logits) through ``torch.onnx.export`` (the dynamo exporter) with the batch
size and the sequence lengths dynamic. It then runs the file in ``onnxruntime`` at two shapes
other than the example's, and compares the result with the PyTorch model (refusing a file off by
more than ``atol``). ``pip install 'x-transformers[onnx]'`` brings onnx, onnxscript and onnxruntime.

With ``with_cache=True`` a decoder (a causal ``TransformerWrapper``) is written as two graphs:
``path`` (prefill: ids -> logits and the cache: key mask, positions, each attention layer's keys
and values) and ``<path stem>.decode.onnx`` (ids of the new tokens and that cache -> logits and
the extended cache, named ``next_*``), the KV cache as inputs and outputs with a dynamic past length. The check then
decodes several steps in onnxruntime and compares each step's logits with the full forward.
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


class _WithCache(nn.Module):
    """Prefill (no cache inputs) or one decode step (the cache as inputs) with the cache as outputs."""

    def __init__(self, model: nn.Module, layers: list[int]):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, ids, key_mask=None, positions=None, *kv):
        from .cache import KVCache

        cache = KVCache()
        if key_mask is not None:
            cache.key_mask, cache.positions = key_mask, positions
            for j, index in enumerate(self.layers):
                layer = cache.layer(index)
                layer.k, layer.v = kv[2 * j], kv[2 * j + 1]
        logits = self.model(ids, cache=cache)
        out = [logits, cache.key_mask, cache.positions]
        for index in self.layers:
            out += [cache.layers[index].k, cache.layers[index].v]
        return tuple(out)


def _cache_names(layers) -> list[str]:
    return ["key_mask", "positions"] + [f"{kind}_{i}" for i in layers for kind in ("keys", "values")]


def export_onnx_with_cache(model: nn.Module, path: str | Path, *, atol: float = 1e-4, verify: bool = True) -> dict:
    """A causal ``TransformerWrapper`` as a prefill graph (``path``) and a decode-step graph
    (``<stem>.decode.onnx``) with the KV cache as inputs and outputs (see the module docstring)."""
    from .cache import KVCache
    from .wrappers import TransformerWrapper

    _requires()
    if not isinstance(model, TransformerWrapper) or not model.attn_layers.causal:
        raise TypeError("export with the KV cache takes a decoder: a TransformerWrapper over a Decoder")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export_onnx exports a float32 model on CPU: call model.float().cpu() first")
    model.eval()
    _, longest = _limits(model)
    if longest < 8:
        raise ValueError(f"the model takes at most {longest} positions; the cached export needs at least 8")
    probe = KVCache()
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), cache=probe)
    layers = sorted(probe.layers)
    if any(probe.layers[i].cross for i in layers):
        raise TypeError("export with the KV cache does not take cross-attention (the context would be an input too)")
    step = _WithCache(model, layers).eval()
    path = Path(path)
    decode_path = path.with_name(path.stem + ".decode.onnx")
    g = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=2, max=longest - 2)
    ids = torch.randint(0, model.num_tokens, (2, 5), generator=g)
    names = _cache_names(layers)
    out_names = ["logits"] + ["next_" + n for n in names]  # ONNX names are unique: outputs differ from inputs
    program = torch.onnx.export(step, (ids,), input_names=["ids"], output_names=out_names,
                                dynamic_shapes={"ids": {0: batch, 1: length}}, dynamo=True, verbose=False)
    program.save(str(path))
    with torch.no_grad():
        cache = step(ids)[1:]
    past = torch.export.Dim("past", min=2, max=longest - 2)
    kv_shapes = tuple({0: batch, 2: past} for _ in range(2 * len(layers)))
    program = torch.onnx.export(step, (ids[:, :1], *cache), input_names=["ids"] + names, output_names=out_names,
                                dynamic_shapes={"ids": {0: batch}, "key_mask": {0: batch, 1: past},
                                                "positions": {0: batch, 1: past}, "kv": kv_shapes},
                                dynamo=True, verbose=False)
    program.save(str(decode_path))
    report = {"path": str(path), "decode_path": str(decode_path), "cache": names}
    if verify:
        report["max_abs_diff"] = check_onnx_with_cache(model, path, decode_path, atol, longest)
    return report


@torch.no_grad()
def check_onnx_with_cache(model, path, decode_path, atol: float, longest: int) -> dict:
    """Prefill a prompt, then decode token by token in onnxruntime; each step's logits must equal
    the PyTorch model's full forward over the sequence so far."""
    import onnxruntime as ort

    prefill = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(decode_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, model.num_tokens, (3, min(7, longest // 2)), generator=g)
    outs = prefill.run(None, {"ids": seq.numpy()})
    diffs = {"prefill": float(abs(outs[0] - model(seq).numpy()).max())}
    worst = 0.0
    for _ in range(min(6, longest - seq.shape[1] - 1)):
        new = torch.randint(0, model.num_tokens, (3, 1), generator=g)
        seq = torch.cat((seq, new), dim=1)
        feeds = {"ids": new.numpy(), **{i.name: v for i, v in zip(decode.get_inputs()[1:], outs[1:])}}
        outs = decode.run(None, feeds)
        worst = max(worst, float(abs(outs[0] - model(seq)[:, -1:].numpy()).max()))
    diffs["decode_steps"] = worst
    if not max(diffs.values()) <= atol:
        raise RuntimeError(f"the cached ONNX export differs from the model by {max(diffs.values()):.3g} (atol {atol})")
    return diffs


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


__all__ = ["export_onnx", "export_onnx_with_cache", "check_onnx", "check_onnx_with_cache"]
