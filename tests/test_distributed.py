"""Multi-process training on CPU (gloo): 2-process DDP and FSDP2 runs match one process with the same
global batch, and an FSDP sharded checkpoint written by 2 processes resumes on 1."""

import subprocess
import sys

import pytest
import torch
from train_helpers import TINY, cli, python_env, torchrun, train_losses

from x_transformers.training import checkpoint as ck

# global batch 4 = 2 processes x 2 micro-steps x 1 row: exercises no_sync / gradient-sync skipping
DIST = [*TINY, "--batch-size", 4, "--grad-accum", 2, "--max-steps", 4, "--eval-every", 4, "--save-every", 2]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    assert cli("train", *DIST, "--out", run) == 0
    return run


def assert_same_training(run, reference):
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=1e-5, abs=1e-6)
    a, b = ck.load_weights(ck.find(run)), ck.load_weights(ck.find(reference))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_two_processes_match_one(single, tmp_path):
    proc = torchrun(2, "train", *DIST, "--strategy", "ddp", "--out", tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(tmp_path / "ddp", single)


def test_fsdp_two_processes_match_one_and_reshard_on_resume(single, tmp_path):
    run = tmp_path / "fsdp"
    proc = torchrun(2, "train", *DIST, "--strategy", "fsdp", "--stop-after", 2, "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = ck.find(run)
    assert ck.verify(ckpt)["world_size"] == 2 and (ckpt / "optim" / ".metadata").is_file()
    assert "optimizer" not in ck.load_state(ckpt)  # the optimizer lives in the sharded folder
    assert train_losses(run) == pytest.approx(train_losses(single)[:2], rel=1e-5, abs=1e-6)
    # the 2-process sharded optimizer state, loaded by 1 process (FSDP, a group of one)
    proc = subprocess.run([sys.executable, "-m", "x_transformers", "train", "--resume", str(run)],
                          env=python_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(run, single)


def test_fsdp_bf16_mixed_precision_trains_like_autocast(tmp_path):
    """FSDP2's bf16 policy (parameters gathered in bf16, no autocast) trains: the stack's input check
    reads the compute dtype, not the sharded float32 parameters' (it refused every bf16 FSDP run
    before). Its losses follow a single process under bf16 autocast to bf16's precision."""
    args = [*DIST, "--precision", "bf16", "--max-steps", 3]
    assert cli("train", *args, "--out", tmp_path / "autocast") == 0
    proc = subprocess.run([sys.executable, "-m", "x_transformers", "train", *map(str, args), "--strategy", "fsdp",
                           "--out", str(tmp_path / "fsdp")], env=python_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp, autocast = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "autocast")
    assert len(fsdp) == len(autocast) == 3
    assert fsdp == pytest.approx(autocast, rel=2e-2)


def test_fsdp_units_are_layers():
    """FSDP2 shards one layer (attention + feed-forward, or + cross-attention) per unit, every block once."""
    from x_transformers import Decoder, Encoder
    from x_transformers.training.distributed import shard_units

    for stack, per in ((Decoder(dim=16, depth=3, heads=2), 2), (Decoder(dim=16, depth=2, heads=2, cross_attend=True), 3),
                       (Encoder(dim=16, depth=2, heads=2, macaron=True), 3),
                       (Decoder(dim=16, depth=2, heads=2, custom_layers=("a", "f", "f")), 1)):
        units = shard_units(stack)
        assert [len(u) for u in units] == [per] * (len(stack.blocks) // per)
        flat = [id(b) for u in units for b in u]
        assert flat == [id(b) for b in stack.blocks] and len(set(flat)) == len(flat)


def test_fsdp_shards_every_model_kind(tmp_path):
    """FSDP2 refused 0-d parameters (its own error; here ScaleNorm's gains) and never gathered a reversible
    stack's parameters (its blocks' parts run inside the stack's autograd function). Both now train under
    2-process FSDP as one process does, and the checkpoint keeps the model's own shapes (scalars stay
    scalars). Hyper-connections' and ReZero's 0-d scales take the same path (vectorize_scalars)."""
    extra = ["--set", "model.reversible=true", "--set", "model.use_scalenorm=true"]
    assert cli("train", *DIST, *extra, "--out", tmp_path / "single") == 0
    proc = torchrun(2, "train", *DIST, *extra, "--strategy", "fsdp", "--out", tmp_path / "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(tmp_path / "fsdp", tmp_path / "single")
    weights = ck.load_weights(ck.find(tmp_path / "fsdp"))
    assert any(w.ndim == 0 for w in weights.values())


def test_scalars_widen_for_fsdp():
    """Every 0-d parameter (a shared one once) becomes a 1-element vector with the same value, and the
    forward is unchanged (the 2-process test above checks that checkpoints keep the scalars)."""
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.training.distributed import vectorize_scalars

    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=32, max_seq_len=8, attn_layers=Decoder(
        dim=16, depth=2, heads=2, use_rezero=True, num_residual_streams=2, use_scalenorm=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scalars = sorted(k for k, v in before.items() if v.ndim == 0)
    x = torch.randint(0, 32, (2, 8))
    out = model(x)
    names = vectorize_scalars(model)
    assert sorted(names) == scalars and len(scalars) >= 3
    assert all(p.ndim >= 1 for p in model.parameters())
    after = model.state_dict()
    for k in scalars:
        assert after[k].shape == (1,) and after[k][0] == before[k]
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)

    # a module shared by several layers: its scalars are widened once and named under every path
    tied = TransformerWrapper(num_tokens=32, max_seq_len=8, attn_layers=Decoder(
        dim=16, depth=3, heads=2, use_rezero=True, weight_tie_layers=True))
    scalars = {k for k, v in tied.state_dict().items() if v.ndim == 0}
    ids = {id(p) for p in tied.parameters() if p.ndim == 0}
    out = tied(x)
    names = vectorize_scalars(tied)
    assert set(names) == scalars and len(scalars) > len(ids)
    assert len({id(p) for p in tied.parameters() if p.shape == (1,)}) == len(ids)
    torch.testing.assert_close(tied(x), out, rtol=0, atol=0)
