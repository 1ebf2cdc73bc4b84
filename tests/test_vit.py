"""ViTransformerWrapper: patches are the image's pixels in order, registers reach the head only
through attention, a classification head trains, and bad images fail in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from upstream import required_path

from x_transformers import Decoder, Encoder
from x_transformers.vit import ViTransformerWrapper, patchify



def make(**kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("patch_size", 4)
    return ViTransformerWrapper(attn_layers=Encoder(dim=32, depth=2, heads=4), **kw)


@pytest.mark.parametrize("channels, hw, p", [(3, (16, 16), 4), (1, (8, 12), 4), (2, (6, 6), 3)])
def test_patchify_is_the_pixels_in_order(channels, hw, p):
    img = torch.randn(2, channels, *hw)
    patches = patchify(img, p)
    # F.unfold walks patches row-major and lays each out channel-major (c, p1, p2); ours is (p1, p2, c)
    ref = F.unfold(img, kernel_size=p, stride=p).transpose(1, 2)  # (b, N, c * p * p)
    ref = ref.reshape(2, -1, channels, p, p).permute(0, 1, 3, 4, 2).reshape(2, -1, p * p * channels)
    assert torch.equal(patches, ref)
    # and by hand: patch (1, 0) of the grid starts at pixel row p, column 0, channels last
    w = hw[1] // p
    assert torch.equal(patches[0, w, :channels], img[0, :, p, 0])


def test_patch_order_matches_upstream_layout():
    import einops  # a core dependency

    img = torch.randn(2, 3, 8, 12)
    ref = einops.rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)
    assert torch.equal(patchify(img, 4), ref)


def test_registers_reach_the_logits_only_through_attention():
    torch.manual_seed(0)
    model = make(num_classes=4, num_register_tokens=3).eval()
    img = torch.randn(2, 3, 16, 16)
    logits, embed = model(img, return_logits_and_embeddings=True)
    assert embed.shape == (2, 16, 32)  # patches only: the registers are dropped before pooling
    torch.testing.assert_close(logits, model.mlp_head(embed.mean(dim=1)))
    with torch.no_grad():
        model.register_tokens.mul_(-3.0)
    assert (model(img) - logits).abs().max() > 1e-5  # they do reach through attention ...
    # ... and only through it: with attention's output projections zeroed, they cannot
    for block in model.attn_layers.blocks:
        if hasattr(block.fn, "to_out"):
            torch.nn.init.zeros_(block.fn.to_out.weight)
    before = model(img)
    with torch.no_grad():
        model.register_tokens.mul_(-3.0)
    torch.testing.assert_close(model(img), before, atol=0, rtol=0)


def test_no_head_returns_patch_embeddings():
    torch.manual_seed(0)
    model = make()
    assert model.mlp_head is None and model(torch.randn(1, 3, 16, 16)).shape == (1, 16, 32)


def test_head_trains_and_every_parameter_learns():
    torch.manual_seed(0)
    model = make(image_size=8, num_classes=2, num_register_tokens=2, post_emb_norm=True, channels=1)
    imgs = torch.randn(16, 1, 8, 8)
    labels = (imgs[:, 0, :4].mean(dim=(1, 2)) > imgs[:, 0, 4:].mean(dim=(1, 2))).long()  # top half brighter
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(60):
        loss = F.cross_entropy(model(imgs), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        opt.step()
    assert loss.item() < 0.1 * first
    assert (model(imgs).argmax(-1) == labels).all()


@pytest.mark.parametrize("build, message", [
    (lambda: make(image_size=18), "image height 18 is not divisible by patch_size 4"),
    (lambda: make(image_size=(16, 10)), "image width 10 is not divisible"),
    (lambda: make(patch_size=0), "patch_size"),
    (lambda: make(num_classes=0), "num_classes"),
    (lambda: make(channels=True), "channels"),
    (lambda: make(patchsize=4), "did you mean 'patch_size'"),
    (lambda: ViTransformerWrapper(image_size=8, patch_size=4, attn_layers=Decoder(dim=32, depth=1)), "Encoder"),
])
def test_construction_errors(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_call_errors():
    model = make(num_classes=3)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 16, 16\).*got \(1, 1, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="got \\(1, 3, 12, 16\\)"):
        model(torch.randn(1, 3, 12, 16))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


UPSTREAM_COUNT = r"""
import json, sys, torch
from x_transformers import ViTransformerWrapper, Encoder
kw = json.loads(sys.argv[1])
m = ViTransformerWrapper(attn_layers=Encoder(dim=32, depth=1, heads=4), **kw)
own = {n: p.numel() for n, p in m.named_parameters() if not n.startswith("attn_layers.")}
print(json.dumps(own))
"""


@pytest.mark.parametrize("kw", [dict(image_size=16, patch_size=4, num_classes=10),
                                dict(image_size=32, patch_size=8, channels=1, num_register_tokens=4, post_emb_norm=True)])
def test_wrapper_parameters_match_upstream(kw):
    """The wrapper's own parameters (patch embedding, positions, registers, head) have upstream's
    count for the same keywords (the Encoders differ by design: ours has LayerNorm biases)."""
    env = {**os.environ, "PYTHONPATH": str(required_path()), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", UPSTREAM_COUNT, json.dumps(kw)], cwd="/tmp", env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    ours = {n: p.numel() for n, p in make(**kw).named_parameters() if not n.startswith("attn_layers.")}
    assert sum(ours.values()) == sum(theirs.values())
