"""Checkpoints that lose nothing, and loading that runs no pickled code.

Layout of a run folder::

    RUN/checkpoints/LATEST              the name of the newest complete checkpoint, e.g. "step-000300"
    RUN/checkpoints/step-000300/
        model.safetensors               full weights (safetensors: no code on load)
        config.json                     the resolved TrainConfig
        state.pt                        scheduler, step, data position, RNG states and, unless sharded,
                                        the optimizer; only tensors and plain containers, loaded with
                                        torch.load(weights_only=True)
        optim/                          FSDP only: the optimizer, sharded by torch.distributed.checkpoint,
                                        loadable on any number of processes
        meta.json                       written last: step, world size, SHA-256 of every file above

Atomic writes: everything goes to ``checkpoints/.tmp-step-N``; each file is fsynced, the folder is
renamed to ``step-N``, then ``LATEST`` is replaced by ``os.replace`` of a fsynced temporary file,
and only after that are older checkpoints removed. A kill at any moment therefore leaves ``LATEST``
pointing at a complete, hash-verified checkpoint.

torch.distributed.checkpoint pickles its metadata and non-tensor items; :class:`SafeReader` and
:class:`SafeLoadPlanner` read them with a restricted unpickler and ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from .config import CLIError

LATEST = "LATEST"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# writing


def save_weights(state: dict, path: Path) -> None:
    """safetensors refuses tensors that share storage (tied embeddings): store copies instead."""
    from safetensors.torch import save_file

    from ..hub import untied

    save_file(untied(state), str(path))


def begin(ckpt_root: Path, step: int | str) -> Path:
    """Rank 0: a fresh temporary folder for checkpoint ``step`` (or "best")."""
    tmp = ckpt_root / (f".tmp-step-{step:06d}" if isinstance(step, int) else f".tmp-{step}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _seal(tmp: Path, meta: dict) -> None:
    """Hash and fsync every file of ``tmp``, then its meta.json (what ``verify`` checks)."""
    files = {p.relative_to(tmp).as_posix(): sha256(p) for p in _files(tmp)}
    for p in _files(tmp):
        fsync_file(p)
    (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1))
    fsync_file(tmp / "meta.json")
    for d in [tmp, *sorted({p.parent for p in _files(tmp)})]:
        fsync_dir(d)


def commit_best(ckpt_root: Path, tmp: Path, step: int, val_loss: float) -> Path:
    """Rank 0: ``tmp`` becomes ``checkpoints/best``; the previous best is removed only after."""
    _seal(tmp, {"step": step, "val_loss": val_loss, "best": True})
    final, old = ckpt_root / "best", ckpt_root / ".old-best"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def commit(ckpt_root: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written into ``tmp``: hash, fsync, rename, point LATEST at it."""
    _seal(tmp, {**meta, "step": step})
    final = ckpt_root / f"step-{step:06d}"
    if final.exists():  # a checkpoint of the same step that LATEST may not point at
        if read_latest(ckpt_root) == final:
            atomic_write_text(ckpt_root / LATEST, "")
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# reading


def read_latest(ckpt_root: Path) -> Path | None:
    try:
        name = (ckpt_root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return ckpt_root / name if name else None


def find(path: str | Path) -> Path:
    """A run folder, its checkpoints folder, or one checkpoint folder -> a verified checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p} does not exist: give a run folder or a checkpoint folder")
    if (p / "meta.json").exists() or (p / "model.safetensors").exists():
        ckpt = p
    else:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        ckpt = read_latest(root)
        if ckpt is None:
            raise CLIError(f"{p} holds no checkpoint (no {root / LATEST}); train first, or give a checkpoint folder")
    verify(ckpt)
    return ckpt


def verify(ckpt: Path) -> dict:
    earlier = sorted(p.name for p in ckpt.parent.glob("step-*") if p.is_dir() and p.name < ckpt.name)
    fix = (f"resume from an earlier one (--resume {ckpt.parent / earlier[-1]}), or start a new run" if earlier else
           "no earlier checkpoint is kept (keep_checkpoints decides how many): start a new run")
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CLIError(f"checkpoint {ckpt} is incomplete or corrupt (meta.json missing or unreadable); {fix}")
    for name, digest in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CLIError(f"checkpoint {ckpt} is incomplete: {name} is missing; {fix}")
        if sha256(f) != digest:
            raise CLIError(f"checkpoint {ckpt} is corrupt or truncated: {name} does not match its SHA-256; {fix}")
    return meta


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        raise CLIError(f"checkpoint {ckpt} has no readable config.json")


def load_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(ckpt / "model.safetensors"))
    except Exception as e:
        raise CLIError(f"checkpoint {ckpt}: model.safetensors could not be read ({str(e).splitlines()[0]})")


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"checkpoint {ckpt}: state.pt could not be read ({str(e).splitlines()[0]})")


# ----------------------------------------------------------------------------------------------
# torch.distributed.checkpoint without arbitrary unpickling


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata dataclasses, torch.Size / dtypes / layouts and plain containers."""

    def find_class(self, module, name):
        obj = super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint") and isinstance(obj, type):
            return obj
        if module == "torch" and (obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))):
            return obj
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts
                              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # the checkpoint's own path
                              ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}:
            return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")


def _dcp_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _RestrictedUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader, SafeLoadPlanner


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))


def dcp_load(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    SafeReader, SafeLoadPlanner = _dcp_classes()
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner())
    except pickle.UnpicklingError as e:
        raise CLIError(f"checkpoint {folder}: {e}")
