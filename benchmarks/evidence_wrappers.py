"""Toy-task evidence for the wrappers (CPU, small, seeded).

- continuous: predict the continuation of noisy sines (random frequency / phase per sequence);
  the generated frames' MSE against the clean continuation must beat the copy-last-frame baseline.
- vit: a synthetic 4-class shape dataset (square, disc, horizontal bar, vertical bar at random
  places and sizes, pixel noise); held-out accuracy must reach 90%.
- nar: reverse a sequence by demasking: the first half is the source, the second half its reverse;
  generate with the source given (``start=``, never masked) and count exact matches.
- xl: Transformer-XL recurrence: segment 1 holds a random source, segment 2 repeats it; predicting
  segment 2's tokens needs the source, which only the memories carry (exact match with memories,
  chance without).
- pooling: sequence classification through a [CLS] token and through mean pooling: is 0 or 1 the
  majority of a random 0/1 sequence; held-out accuracy.
- xval: numbers in text: "a + b = c" with a, b, c as scaled number tokens; the MSE of the predicted c
  against predicting the mean.

Writes docs/evidence/wrappers_evidence.json (numbers, seeds, seconds, versions, commit) and prints
a table. Usage: python benchmarks/evidence_wrappers.py [--only continuous|vit|nar|xl|pooling|xval]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, git_commit  # noqa: E402

from x_transformers import Decoder, Encoder, TransformerWrapper  # noqa: E402
from x_transformers.continuous import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper  # noqa: E402
from x_transformers.nonautoregressive_wrapper import NonAutoregressiveWrapper  # noqa: E402
from x_transformers.vit import ViTransformerWrapper  # noqa: E402
from x_transformers.xl_autoregressive_wrapper import XLAutoregressiveWrapper  # noqa: E402
from x_transformers.xval import XValAutoregressiveWrapper, XValTransformerWrapper  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "evidence" / "wrappers_evidence.json"


def sines(b, n, generator, noise=0.05):
    """(b, n, 1) noisy sines and the clean ones."""
    freq = 0.15 + 0.25 * torch.rand(b, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(b, 1, generator=generator)
    t = torch.arange(n).float()[None]
    clean = torch.sin(freq * t + phase)[..., None]
    return clean + noise * torch.randn(clean.shape, generator=generator), clean


def continuous(seed=0, steps=600, prompt=24, horizon=8):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ContinuousTransformerWrapper(dim_in=1, dim_out=1, max_seq_len=64,
                                       attn_layers=Decoder(dim=64, depth=3, heads=4, rotary_pos_emb=True))
    model = ContinuousAutoregressiveWrapper(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x, _ = sines(32, prompt + horizon, g)
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_g = torch.Generator().manual_seed(seed + 1000)
    x, clean = sines(256, prompt + horizon, test_g)
    pred = model.generate(x[:, :prompt], horizon)  # cached
    target = clean[:, prompt:]
    copy_last = x[:, prompt - 1:prompt].expand(-1, horizon, -1)
    return dict(train_steps=steps, prompt=prompt, horizon=horizon, noise_std=0.05, final_train_loss=loss.item(),
                mse_generated=F.mse_loss(pred, target).item(), mse_copy_last_frame=F.mse_loss(copy_last, target).item(),
                mse_first_frame=F.mse_loss(pred[:, :1], target[:, :1]).item(),
                mse_copy_last_first_frame=F.mse_loss(copy_last[:, :1], target[:, :1]).item())


def shapes(b, generator, size=16):
    """(b, 1, size, size) images of 4 classes: square outline, filled disc, horizontal bar, vertical bar."""
    imgs = torch.zeros(b, 1, size, size)
    labels = torch.randint(0, 4, (b,), generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(b):
        r = int(torch.randint(3, 6, (1,), generator=generator))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=generator))
        k = int(labels[i])
        if k == 0:
            box = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            inner = ((yy - cy).abs() <= r - 1) & ((xx - cx).abs() <= r - 1)
            m = box & ~inner
        elif k == 1:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif k == 2:
            m = ((yy - cy).abs() <= 1) & ((xx - cx).abs() <= r + 1)
        else:
            m = ((xx - cx).abs() <= 1) & ((yy - cy).abs() <= r + 1)
        imgs[i, 0] = m.float()
    return imgs + 0.1 * torch.randn(imgs.shape, generator=generator), labels


def vit(seed=0, steps=400, train=2000, test=500):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = shapes(train, g)
    x_test, y_test = shapes(test, torch.Generator().manual_seed(seed + 1000))
    model = ViTransformerWrapper(image_size=16, patch_size=4, channels=1, num_classes=4, num_register_tokens=2,
                                 attn_layers=Encoder(dim=64, depth=3, heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, train, (64,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return dict(train_steps=steps, train_images=train, test_images=test, image_size=16, patch_size=4,
                final_train_loss=loss.item(), held_out_accuracy=acc)


def nar(seed=0, steps=1500, half=8, vocab=10):
    """Reverse by demasking: sequences [src, reverse(src)], trained with the wrapper's own loss
    (corruption anywhere); evaluated by ``generate(start=...)`` with the source given and the
    reversed half all mask tokens, greedy (start_temperature=0)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = 2 * half
    net = TransformerWrapper(num_tokens=vocab + 1, max_seq_len=n, attn_layers=Encoder(dim=64, depth=3, heads=4))
    wrapper = NonAutoregressiveWrapper(net, mask_id=vocab, steps=half)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=1e-3)

    def batch(b, gen):
        src = torch.randint(0, vocab, (b, half), generator=gen)
        return torch.cat((src, src.flip(-1)), dim=-1)

    for _ in range(steps):
        loss = wrapper(batch(64, g), generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = batch(200, torch.Generator().manual_seed(seed + 1000))
    start = x.clone()
    start[:, half:] = vocab
    out = wrapper.generate(start=start, start_temperature=0.0, generator=torch.Generator().manual_seed(seed))
    free = wrapper.generate(64, generator=torch.Generator().manual_seed(seed))  # unconditional
    return dict(train_steps=steps, half=half, vocab=vocab, demask_steps=half, final_train_loss=loss.item(),
                exact_match=(out == x).all(-1).float().mean().item(),
                token_accuracy=(out[:, half:] == x[:, half:]).float().mean().item(), test_sequences=200,
                unconditional_mask_tokens_left=int((free == vocab).sum()),
                unconditional_valid_reversals=(free[:, :half] == free[:, half:].flip(-1)).all(-1).float().mean().item())


def xl(seed=0, steps=3000, seg=12, src_len=6, vocab=16):
    """Two segments of ``seg`` tokens: a source of ``src_len`` random tokens then filler, twice. The
    loss trains over both segments with memories; the test scores segment 2's source tokens 2..n
    (each predicted inside segment 2) with the memories of segment 1, and without them."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    filler = vocab

    def batch(b):
        src = torch.randint(0, vocab, (b, src_len), generator=g)
        fill = torch.full((b, seg - src_len), filler)
        return torch.cat((src, fill, src, fill, src[:, :1]), dim=1)  # (b, 2 seg + 1)

    net = TransformerWrapper(num_tokens=vocab + 1, max_seq_len=seg, max_mem_len=seg,
                             attn_layers=Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True))
    model = XLAutoregressiveWrapper(net)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(batch(32))
        loss.backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    x = batch(500)
    with torch.no_grad():
        _, mems = net(x[:, :seg], return_mems=True)
        with_mems = net(x[:, seg:2 * seg], mems=mems)[:, :src_len - 1].argmax(-1)
        without = net(x[:, seg:2 * seg])[:, :src_len - 1].argmax(-1)
    target = x[:, seg + 1:seg + src_len]
    return dict(train_steps=steps, segment=seg, source_tokens=src_len, vocab=vocab, final_train_loss=loss.item(),
                exact_match_with_memories=(with_mems == target).all(-1).float().mean().item(),
                token_accuracy_with_memories=(with_mems == target).float().mean().item(),
                token_accuracy_without_memories=(without == target).float().mean().item(),
                chance_token_accuracy=1 / vocab, test_sequences=500)


def pooling(seed=0, steps=400, n=15):
    """Is 0 or 1 the majority of a random 0/1 sequence of odd length n: a [CLS] token and mean pooling."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def batch(b):
        x = torch.randint(0, 2, (b, n), generator=g)
        return x, (x.sum(-1) > n // 2).long()

    out = dict(train_steps=steps, length=n)
    for name, kw in (("cls_token", dict(use_cls_token=True)), ("average_pool", dict(average_pool_embed=True))):
        model = TransformerWrapper(num_tokens=2, max_seq_len=n, logits_dim=2, **kw,
                                   attn_layers=Encoder(dim=64, depth=2, heads=4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            x, y = batch(64)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        x, y = batch(1000)
        with torch.no_grad():
            out[f"{name}_held_out_accuracy"] = (model(x).argmax(-1) == y).float().mean().item()
        out[f"{name}_final_train_loss"] = loss.item()
    out["majority_class_baseline"] = 0.5
    return out


def xval(seed=0, steps=1500):
    """ "a + b = c" with a, b uniform in [-1, 1] and c = a + b, each a scaled number token: the
    predicted c against predicting its mean (0)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    NUM, PLUS, EQ = 0, 1, 2

    def batch(b):
        a, c = torch.rand(b, generator=g) * 2 - 1, torch.rand(b, generator=g) * 2 - 1
        x = torch.tensor([NUM, PLUS, NUM, EQ, NUM]).expand(b, -1)
        nums = torch.stack((a, torch.ones(b), c, torch.ones(b), a + c), dim=1)
        return x, nums

    net = XValTransformerWrapper(num_tokens=3, max_seq_len=8, numerical_token_id=NUM,
                                 attn_layers=Decoder(dim=64, depth=2, heads=4))
    model = XValAutoregressiveWrapper(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model(*batch(64))
        loss.backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    x, nums = batch(1000)
    with torch.no_grad():
        pred = net(x[:, :-1], nums[:, :-1]).numbers[:, -1]  # the number after "="
    target = nums[:, -1]
    return dict(train_steps=steps, final_train_loss=loss.item(), mse=F.mse_loss(pred, target).item(),
                mse_predicting_the_mean=target.pow(2).mean().item(), test_sequences=1000)


TASKS = {"continuous": continuous, "vit": vit, "nar": nar, "xl": xl, "pooling": pooling, "xval": xval}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=list(TASKS), action="append")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text())["tasks"] if OUT.exists() else {}
    for name, fn in TASKS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        res = fn()
        res.update(seed=0, seconds=round(time.perf_counter() - start, 1))
        results[name] = res
        print(name, json.dumps(res))
    OUT.write_text(json.dumps(dict(commit=git_commit(), environment=environment(), threads=1, tasks=results),
                              indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
