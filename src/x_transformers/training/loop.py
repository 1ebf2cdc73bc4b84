"""The training loop: AdamW, warmup + cosine, clipping, accumulation, validation, samples, checkpoints.

Determinism: batch ``i`` is a pure function of (seed, i) (see data.py), the optimizer, scheduler and
RNG states are checkpointed, and evaluation / sampling use their own generators; so on CPU a resumed
run logs bit-identical losses to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checks import warn_nonfinite
from ..loss import chunked_cross_entropy, head_weight
from . import checkpoint as ckpt_io
from .config import CUDAGRAPH_MODES, CLIError, TrainConfig
from .data import BOS, TaskData, bits_per_byte, load_data
from .distributed import Env, autocast, compile_step, full_state_dict, no_sync, parallelize, setup, teardown
from .metrics import MetricsLog, check_logger, plot
from .model import build_model, count_params, load_pretrained
from .sampler import greedy_seq2seq, sample


def lr_factor(cfg: TrainConfig):
    """Linear warmup to lr over warmup_steps, then a cosine to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


COMPILE_CHECKS = 2  # compiled steps checked against eager at the start of a run
COMPILE_TOL = 1e-3  # relative; bf16 compiled-vs-eager losses agreed to ~1e-5 where the step was right


def _has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        getattr(m, "layer_dropout", 0) > 0 for m in model.modules())


def lm_loss(model, head, inputs: list, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. ``model`` is what runs the forward (maybe DDP / FSDP /
    compiled), ``head`` the plain module whose output head it uses. A decoder's loss is fused with
    its head where that is one weight (:func:`~x_transformers.loss.head_weight`;
    :func:`~x_transformers.loss.chunked_cross_entropy`: the (tokens, vocab) logits are never
    built); other heads and the encoder-decoder go through the logits."""
    from ..wrappers import TransformerWrapper

    if isinstance(head, TransformerWrapper) and head_weight(head) is not None:
        hidden = model(*inputs, return_embeddings=True)  # (b, n, d); memory tokens already removed
        if head.logits_scale != 1.0:  # the forward scales the hidden states before its head
            hidden = hidden * head.logits_scale
        # under FSDP the root keeps its parameters gathered after forward (its reshard_after_forward
        # is off), so this is the full (vocab, d) weight and its gradient is reduced with the rest
        return chunked_cross_entropy(hidden, head_weight(head), target)  # read after the forward
    logits = model(*inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def make_optimizer(model, cfg: TrainConfig, env: Env) -> torch.optim.AdamW:
    # weight decay on matrices only: not on norms, biases, or 1-d scales
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=env.device.type == "cuda")


def config_line(cfg: TrainConfig, width: int = 100) -> str:
    """The resolved configuration, every key, wrapped: what this run trains with."""
    items = [f"{k}={json.dumps(v) if isinstance(v, (dict, list, str)) else v}" for k, v in cfg.to_dict().items()]
    lines, line = [], "config:"
    for item in items:
        if len(line) + 1 + len(item) > width and line.strip():
            lines.append(line)
            line = "       "
        line += " " + item
    return "\n".join(lines + [line])


class Trainer:
    def __init__(self, cfg: TrainConfig, run: Path, resume: Path | None = None, log=print):
        self.cfg, self.run, self.log = cfg, run, log
        self.env = env = setup(cfg)
        try:
            self._build(resume)
        except BaseException:
            teardown(env)
            raise

    # -- set-up: validate everything before writing anything ---------------------------------
    def _build(self, resume: Path | None):
        cfg, env = self.cfg, self.env
        check_logger(cfg.logger)
        self.restart = False
        if resume is None and self.run.exists() and any(self.run.iterdir()):
            if (self.run / "checkpoints").is_dir() or not (self.run / "config.json").is_file():
                raise CLIError(f"run folder {self.run} already exists; choose another --out, or --resume {self.run}")
            self.restart = True  # a run of ours that stopped before its first checkpoint: nothing to resume
        pretrained = None
        if resume is None and cfg.init_from is not None:  # a resumed run rebuilds from the stored keywords
            cfg, pretrained = load_pretrained(cfg)
            self.cfg = cfg
        self.data = load_data(cfg)
        torch.manual_seed(cfg.seed)
        # identical on every rank
        self.inner = pretrained if pretrained is not None else build_model(cfg, self.data.vocab_size)
        self.n_params = count_params(self.inner)
        state = None
        if resume is not None:
            state = ckpt_io.load_state(resume)
            saved = state.get("data_sha256")
            if saved != self.data.digest:
                raise CLIError(f"the data differs from the checkpoint's (sha256 {str(saved)[:12]}... vs "
                               f"{self.data.digest[:12]}...); resume with the data the run was trained on")
            try:
                weights = ckpt_io.load_weights(resume)
                warn_nonfinite(weights, f"checkpoint {resume}")
                self.inner.load_state_dict(weights)
            except RuntimeError as e:
                raise CLIError(f"checkpoint {resume} does not fit the model: {str(e).splitlines()[0]}")
        self.attach()
        self.opt = make_optimizer(self.inner, cfg, env)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))
        self.step = 0
        if state is not None:
            self._restore(resume, state)
        else:
            torch.manual_seed(cfg.seed + 1_000 * env.rank)  # dropout differs between ranks
        if env.main:  # only now does anything touch the run folder
            self.run.mkdir(parents=True, exist_ok=True)
            if self.restart:
                (self.run / "metrics.jsonl").unlink(missing_ok=True)
            ckpt_io.atomic_write_text(self.run / "config.json", json.dumps(cfg.to_dict(), indent=1))
            ckpt_io.atomic_write_text(self.run / "data.json", json.dumps(self.data.describe(), indent=1))
        env.barrier()
        self.metrics = MetricsLog(self.run, env.main, resume_step=self.step if state is not None else None,
                                  logger=cfg.logger, config=cfg.to_dict())
        self.best = state.get("best_val_loss", math.inf) if state is not None else math.inf
        self.stale = state.get("validations_without_gain", 0) if state is not None else 0

    def _restore(self, resume: Path, state: dict):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        if "optimizer" in state:
            set_optimizer_state_dict(self.inner, self.opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:  # sharded by FSDP, resharded here for this number of processes
            template = get_optimizer_state_dict(self.inner, self.opt)
            ckpt_io.dcp_load({"optim": template}, resume / "optim")
            set_optimizer_state_dict(self.inner, self.opt, template)
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng["cpu"]) == self.env.world:
            torch.set_rng_state(rng["cpu"][self.env.rank])
            if torch.cuda.is_available() and rng.get("cuda"):
                torch.cuda.set_rng_state(rng["cuda"][self.env.rank])
        else:  # another number of processes: fresh, but still seeded, dropout streams
            torch.manual_seed(self.cfg.seed + 1_000 * self.env.rank + self.step)

    def attach(self):
        """Place / shard / wrap the built model (``self.inner``) and make the step's forward + loss."""
        cfg, env = self.cfg, self.env
        if cfg.fp8:  # before compile, FSDP and the optimizer, as torchao asks
            from .. import fp8

            try:
                fp8.convert(self.inner.to(env.device), recipe=cfg.fp8_recipe)
            except (ValueError, ImportError) as e:
                raise CLIError(f"--fp8: {e}") from e
        self.model = parallelize(self.inner, cfg, env)
        self.forward_loss = compile_step(self._forward_loss, cfg)
        self.cudagraphs = cfg.compile and cfg.compile_mode in CUDAGRAPH_MODES and env.device.type == "cuda"
        # The compiled step's first losses are checked against the eager forward on the same batch:
        # on an H200 some compilations of a 1B-shaped step once computed a wrong loss and gradients
        # (issue #24: a race in an inductor kernel, guarded by inductor_fix since; the check stays
        # as a guard against the next such compiler bug). With dropout the two draw different
        # masks, so there is nothing to compare.
        compiled = self.forward_loss is not self._forward_loss
        self.compile_checks = COMPILE_CHECKS if compiled and not _has_dropout(self.inner) else 0

    def _forward_loss(self, inputs: list, target: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, self.env):
            return lm_loss(self.model, self.inner, inputs, target)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, sync: bool = True) -> dict:
        """One optimizer step -> {"loss", "lr", "tokens", "grad_norm" (with clipping)}. ``sync=False``
        leaves the loss and norm as device tensors, so the host does not wait for the GPU: the
        training loop reads them (:meth:`read`) only on the steps it logs."""
        cfg, env = self.cfg, self.env
        self.model.train()
        micro = cfg.batch_size // cfg.grad_accum  # global sequences per micro-step
        total, tokens = torch.zeros((), device=env.device), 0
        for k in range(cfg.grad_accum):
            batch = self.data.batch(self.step * cfg.grad_accum + k, "train", micro, env.rows(micro))
            inputs = [t.to(env.device) for t in batch.inputs]
            with no_sync(self.model, cfg, last=k == cfg.grad_accum - 1):
                if self.cudagraphs:  # the previous replay's outputs are no longer read
                    torch.compiler.cudagraph_mark_step_begin()
                loss = self.forward_loss(inputs, batch.target.to(env.device))
                if self.compile_checks and k == 0:
                    loss = self._check_compiled(loss, inputs, batch.target.to(env.device))
            (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
            tokens += batch.tokens * env.world
        norm = None
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": total, "lr": lr, "tokens": tokens}
        if norm is not None:
            out["grad_norm"] = norm.detach()
        return self.read([out])[0] if sync else out

    def read(self, recs: list[dict]) -> list[dict]:
        """Replace the device tensors of step records by floats: one host sync (and, across
        processes, one all-reduce of the losses) for all of them."""
        todo = [(r, k) for r in recs for k in ("loss", "grad_norm") if torch.is_tensor(r.get(k))]
        if not todo:
            return recs
        values = torch.stack([r[k].float() for r, k in todo])
        is_loss = torch.tensor([k == "loss" for _, k in todo], device=values.device)
        if self.env.distributed:  # grad norms are already global; losses are each process's own
            summed = values.masked_fill(~is_loss, 0.0).double()
            dist.all_reduce(summed)
            values = torch.where(is_loss, (summed / self.env.world).to(values.dtype), values)
        for (r, k), v in zip(todo, values.tolist()):
            r[k] = v
        return recs

    def _check_compiled(self, loss: torch.Tensor, inputs: list, target: torch.Tensor) -> torch.Tensor:
        """The compiled loss if it agrees with the eager forward's; otherwise a warning, the eager
        step from here on, and this step's loss recomputed eagerly (its graph not yet backpropagated)."""
        self.compile_checks -= 1
        with torch.no_grad():
            eager = self._forward_loss(inputs, target).item()
        got = loss.item()
        if abs(got - eager) <= COMPILE_TOL * max(1.0, abs(eager)):
            return loss
        self.log(f"warning: the compiled step's loss {got:.4f} differs from the eager forward's {eager:.4f} "
                 f"on the same batch (step {self.step}); training continues without torch.compile")
        self.compile_checks = 0
        self.forward_loss = self._forward_loss
        self.cudagraphs = False
        del loss
        return self._forward_loss(inputs, target)

    # -- validation and a sample ---------------------------------------------------------------
    def evaluate(self) -> dict:
        # the uncompiled module; FSDP's sharded module still gathers its own parameters
        return evaluate(self.inner, self.data, self.cfg, self.env, self.step)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        cfg, env = self.cfg, self.env
        root = self.run / "checkpoints"
        tmp = root / f".tmp-step-{self.step:06d}"
        if env.main:
            ckpt_io.begin(root, self.step)
            (tmp / "optim").mkdir()
        env.barrier()
        sharded = cfg.strategy == "fsdp"
        weights = full_state_dict(self.inner, cfg)
        if sharded:
            ckpt_io.dcp_save({"optim": get_optimizer_state_dict(self.inner, self.opt)}, tmp / "optim")
        rng = {"cpu": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}
        if env.distributed:
            gathered = [None] * env.world
            torch.distributed.all_gather_object(gathered, rng)
            rng = {"cpu": [r["cpu"][0] for r in gathered], "cuda": [c for r in gathered for c in r["cuda"]]}
        if env.main:
            state = {"step": self.step, "scheduler": self.sched.state_dict(), "rng": rng,
                     "best_val_loss": self.best, "validations_without_gain": self.stale,
                     "data_sha256": self.data.digest, "data_batch_index": self.step * cfg.grad_accum}
            if not sharded:
                state["optimizer"] = get_optimizer_state_dict(self.inner, self.opt)
                (tmp / "optim").rmdir()
            ckpt_io.save_weights(weights, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            torch.save(state, tmp / "state.pt")
        env.barrier()
        final = None
        if env.main:
            final = ckpt_io.commit(root, tmp, self.step, {"world_size": env.world, "strategy": cfg.strategy},
                                   cfg.keep_checkpoints)
        env.barrier()
        return final

    def save_best(self) -> Path | None:
        """The current weights as checkpoints/best (weights and config: enough for eval and generate),
        replacing the previous best atomically. Every process calls it (FSDP gathers the weights)."""
        cfg, env = self.cfg, self.env
        weights = full_state_dict(self.inner, cfg)
        final = None
        if env.main:
            root = self.run / "checkpoints"
            tmp = ckpt_io.begin(root, "best")
            ckpt_io.save_weights(weights, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            final = ckpt_io.commit_best(root, tmp, self.step, self.best)
        env.barrier()
        return final

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        say = self.log if env.main else (lambda *a, **k: None)
        say(f"model: {cfg.arch}, {self.n_params / 1e6:.2f}M parameters; data: {self.data.source} "
            f"({self.data.describe().get('train_tokens', 'synthetic')} train tokens); {env.world} process(es) on "
            f"{env.device.type}; run folder {self.run}")
        if self.restart:
            say(f"note: {self.run} held a run that stopped before its first checkpoint; starting it over")
        say(config_line(cfg))
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        bar = None
        if tqdm is not None and cfg.progress and env.main:
            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
            say = bar.write

        evals = []

        def validate():
            ev = self.evaluate()
            text = ev.pop("sample")
            self.metrics.log({"kind": "val", "step": self.step, **ev})
            extra = f", exact match {ev['val_exact_match']:.3f}" if "val_exact_match" in ev else ""
            say(f"step {self.step}: val loss {ev['val_loss']:.4f}, val bits/byte {ev['val_bpb']:.4f}{extra}")
            if text is not None:
                say(f"sample: {text!r}")
            evals.append(ev)
            if ev["val_loss"] < self.best:
                self.best, self.stale = ev["val_loss"], 0
                if cfg.keep_best:
                    path = self.save_best()
                    say(f"best checkpoint (val loss {ev['val_loss']:.4f}): {path}") if path else None
            else:
                self.stale += 1

        if self.step == 0:
            validate()
        t0, tokens, start_step, started = time.perf_counter(), 0, self.step, time.perf_counter()
        losses = []
        end = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
        pending = []  # steps not yet read back from the device
        while self.step < end:
            rec = self.train_step(sync=False)
            tokens += rec.pop("tokens")
            pending.append(rec)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or self.step == end:
                losses.extend(r["loss"] for r in self.read(pending))
                pending = []
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                dt = time.perf_counter() - t0
                rec["tokens_per_s"] = tokens / max(dt, 1e-9)
                self.metrics.log({"kind": "train", "step": self.step, **rec})
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                else:
                    say(f"step {self.step}: loss {rec['loss']:.4f}, lr {rec['lr']:.3e}, {rec['tokens_per_s']:.0f} tokens/s")
                t0, tokens = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                validate()
            stop = bool(cfg.patience) and self.stale >= cfg.patience
            if self.step % cfg.save_every == 0 or self.step == end or stop:
                path = self.save()
                say(f"checkpoint: {path}") if path else None
            if stop:
                say(f"early stop at step {self.step}: {self.stale} validations without a lower loss than "
                    f"{self.best:.4f} (patience {cfg.patience})")
                break
        losses.extend(r["loss"] for r in self.read(pending))  # steps after the last read (an early stop)
        if bar is not None:
            bar.close()
        self.metrics.close()
        summary = {"steps": self.step, "train_losses": losses, "evals": evals,
                   "seconds": time.perf_counter() - started, "steps_run": self.step - start_step}
        if env.main and self.step > start_step:
            try:
                summary["plot"] = str(plot([str(self.run)], self.run / "loss.png"))
            except CLIError as e:  # matplotlib missing: the run still succeeded
                self.log(f"note: {e}")
        return summary

    def close(self):
        teardown(self.env)


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, env: Env, step: int = 0) -> dict:
    """Validation loss and bits per byte over ``eval_batches`` fixed batches (exact match for a
    task), and a sample. Every process must call it (FSDP gathers parameters collectively)."""
    model.eval()
    micro = cfg.batch_size // cfg.grad_accum
    losses, correct, seen = [], 0, 0
    for i in range(cfg.eval_batches):
        batch = data.batch(i, "val", micro, env.rows(micro))
        inputs = [t.to(env.device) for t in batch.inputs]
        target = batch.target.to(env.device)
        with autocast(cfg, env):
            losses.append(lm_loss(model, model, inputs, target).item())
        if isinstance(data, TaskData):
            pred = greedy_seq2seq(model, inputs[0], target.shape[1], BOS)
            correct += (pred == target).all(-1).sum().item()
            seen += target.shape[0]
    loss = env.mean(sum(losses) / len(losses))
    out = {"val_loss": loss, "val_bpb": bits_per_byte(loss, data.bytes_per_token)}
    if isinstance(data, TaskData):
        out["val_exact_match"] = env.mean(correct / seen)
    # sample_tokens 0 asks for no sample (the evaluation's other numbers stay)
    out["sample"] = sample_text(model, data, cfg, env, step) if cfg.sample_tokens else None
    return out


def sample_text(model, data, cfg: TrainConfig, env: Env, step: int = 0, prompt: str | None = None,
                strict: bool = False) -> str:
    """A sample from ``prompt`` (``cfg.sample_prompt``). Learned absolute positions end at
    ``max_seq_len`` and the cached sampler slides no window: a sample that would pass it is cut
    short (the prompt keeps its last tokens), or with ``strict`` is an error."""
    g = torch.Generator().manual_seed(cfg.seed + step)  # leaves the training RNG alone
    if isinstance(data, TaskData):
        src, tgt = data.examples(g, 1)
        if prompt is not None:
            src = torch.tensor([list(prompt.encode())], dtype=torch.long)
        pred = greedy_seq2seq(model, src.to(env.device), tgt.shape[1], BOS)
        dec = data.tokenizer.decode
        return f"{dec(src[0])} -> {dec(pred[0].cpu())}" + ("" if prompt is not None else f" (target {dec(tgt[0])})")
    text = cfg.sample_prompt if prompt is None else prompt
    ids = torch.tensor([list(data.tokenizer.encode(text.encode()))], dtype=torch.long)
    steps = cfg.sample_tokens
    limit = model.max_seq_len if getattr(model, "pos_emb", None) is not None else None
    if limit is not None and ids.shape[1] + steps > limit:
        if strict:
            raise CLIError(f"the prompt ({ids.shape[1]} tokens) and {steps} new tokens exceed the model's "
                           f"max_seq_len ({limit}) of its learned positions; ask for fewer tokens or a shorter prompt")
        ids = ids[:, -(limit - 1):]
        steps = limit - ids.shape[1]
    if env.device.type != "cpu":  # draws on the model's device: reproducible per device type
        g = torch.Generator(env.device).manual_seed(cfg.seed + step)
    out = sample(model, ids.to(env.device), steps, cfg.temperature, g)
    return data.tokenizer.decode(out[0].cpu().tolist())
