"""Run in a child process whose only x_transformers is upstream's (PYTHONPATH=<.upstream>):
build each configuration of a JSON spec with upstream's classes, perturb every parameter (so
norms, talking heads and gates are not at their identity init), run a fixed input and save the
state dict, the inputs, the output and the parameter count.

usage: python upstream_child.py SPEC.json OUT.pt
"""

import json
import sys

import torch

import x_transformers
from x_transformers import Decoder, Encoder, TransformerWrapper, XTransformer

LAYERS = {"Decoder": Decoder, "Encoder": Encoder}


def torch_modules(kwargs):
    """A keyword given as {"torch.nn": name, "args": [...]} (JSON cannot hold a module) -> that module."""
    return {k: getattr(torch.nn, v["torch.nn"])(*v["args"], **v.get("kwargs", {})) if isinstance(v, dict)
            and "torch.nn" in v else v for k, v in kwargs.items()}


def build(cfg):
    if cfg["kind"] == "XTransformer":
        return XTransformer(**cfg["up"])
    layers = LAYERS[cfg["kind"]](**torch_modules(cfg["up"]))
    return TransformerWrapper(attn_layers=layers, **cfg["wrap"])


def run(cfg):
    torch.manual_seed(cfg["seed"])
    model = build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    b, n = cfg["batch"], cfg["seq"]
    x = torch.randint(0, cfg["num_tokens"], (b, n), generator=gen)
    mask = None
    if cfg.get("mask"):  # right padding: the second row keeps its first n - 3 tokens
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[1, n - 3:] = False
    inputs = dict(x=x, mask=mask)
    with torch.no_grad():
        if cfg["kind"] == "XTransformer":
            tgt = torch.randint(0, cfg["num_tokens"], (b, n - 2), generator=gen)
            enc = model.encoder(x, mask=mask, return_embeddings=True)
            out = model.decoder.net(tgt, context=enc, context_mask=mask)
            inputs["tgt"] = tgt
        elif cfg.get("context"):
            context = torch.randn(b, 5, cfg["up"]["dim"], generator=gen)
            out = model(x, mask=mask, context=context)
            inputs["context"] = context
        else:
            out = model(x, mask=mask)
    return dict(state_dict=model.state_dict(), inputs=inputs, out=out,
                n_params=sum(p.numel() for p in model.parameters()))


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    results = {"x_transformers_file": x_transformers.__file__, "results": {}}
    for cfg in spec:
        try:
            results["results"][cfg["name"]] = run(cfg)
        except Exception as e:  # reported per configuration by the test
            results["results"][cfg["name"]] = dict(error=f"{type(e).__name__}: {e}")
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
