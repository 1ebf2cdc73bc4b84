"""Test-time training (TTT) for ``XLAutoregressiveWrapper`` (upstream 2.31.10's ``ttt_*`` keywords).

"Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (Sun et al., 2407.04620):
some weights are a per-sequence hidden state that is trained by gradient descent while the
sequence is read. Here the chosen modules (by path, e.g. a layer's value projection ``to_v``) get
one copy of their parameters per batch row (``TTTModuleWrapper.batch_params``). After each
segment, every row takes one step on its own next-token loss (or a custom loss)::

    W_target <- W_target - lr * dL/dW_source - lr * wd * W_target

(source and target are the same module unless a ``(source, target)`` pair is given). With
``ttt_use_muon`` a matrix gradient (batch, out, in) is first orthogonalised by the Newton-Schulz
iteration of Muon (Keller Jordan et al., 2024) and stepped with ``ttt_muon_lr``. In training the
step keeps its graph (``create_graph``), so the outer loss learns the initial weights through the
inner updates (the meta-learning of the paper's outer loop). ``LowRankLinear`` replaces a linear
layer's weight by a product ``A @ B`` whose two factors are the test-time-trained state.

Paths are upstream's (``attn_layers.layers.0.1.to_v``, ``...layers.3.1.ff.0.0``) or ours
(``attn_layers.blocks.0.fn.to_v``). Legend: b batch, n tokens, v vocabulary.
"""

from __future__ import annotations

import re
from functools import reduce
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["EpisodicMemories", "TTTModuleWrapper", "LowRankLinear", "TTTMetaLearningTargetKLLoss", "TTTNextLatentPredictionLoss",
           "newton_schulz", "TTTSetup"]

_MUON_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients


class EpisodicMemories(nn.Module):
    """Upstream's episodic memories: learned keys and values (2, attention blocks, kv heads, m, dim_head),
    N(0, 0.02), that every self-attention block reads before its own (``self_attn_additional_kv``);
    ``episodic_mems`` may be test-time trained like any other module."""

    def __init__(self, depth: int, heads: int, seq_len: int, dim_head: int):
        super().__init__()
        self.mem_kv = nn.Parameter(torch.randn(2, depth, heads, seq_len, dim_head) * 0.02)

    def forward(self):
        return self.mem_kv

    @staticmethod
    def for_stack(stack, seq_len: int) -> "EpisodicMemories | None":
        """Sized for an ``AttentionLayers``: one key/value set per self-attention block (None for 0)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"episodic_mem_len must be an integer >= 0, got {seq_len!r}")
        if seq_len == 0:
            return None
        blocks = [b.fn for b, s in zip(stack.blocks, stack.layout) if s.kind == "a"]
        if not blocks:
            raise ValueError("episodic_mem_len needs a stack with self-attention blocks")
        if stack.attn_cfg.dim_head != stack.attn_cfg.v_dim_head:
            raise ValueError("episodic_mem_len needs keys and values of one head width (attn_dim_head == v_dim_head)")
        return EpisodicMemories(len(blocks), blocks[0].kv_heads, seq_len, stack.attn_cfg.dim_head)

    @staticmethod
    def as_additional_kv(mem_kv, batch: int) -> list:
        """(2, depth, g, m, d) or per row (b, 2, depth, g, m, d) -> [(k, v) each (b, g, m, d)] per block."""
        if mem_kv.ndim == 5:
            mem_kv = mem_kv.expand(batch, *mem_kv.shape)
        return list(zip(mem_kv[:, 0].unbind(dim=1), mem_kv[:, 1].unbind(dim=1)))


class TTTModuleWrapper(nn.Module):
    """Runs ``module`` with per-row parameters ``batch_params`` (name -> (b, ...)) when they are set
    (each row through ``functional_call``, vectorised by ``vmap``), else as the module itself."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.batch_params = None

    def reset(self):
        self.batch_params = None

    @staticmethod
    def reset_all(module: nn.Module):
        """Drop the test-time-trained state of every ``TTTModuleWrapper`` inside ``module``."""
        for mod in module.modules():
            if isinstance(mod, TTTModuleWrapper):
                mod.reset()

    def forward(self, *args, **kwargs):
        if self.batch_params is None:
            return self.module(*args, **kwargs)
        rows = next(iter(self.batch_params.values())).shape[0]
        if args and isinstance(args[0], torch.Tensor) and args[0].shape[0] != rows:
            raise ValueError(f"this test-time-trained module holds weights for {rows} rows, called with a batch of "
                             f"{args[0].shape[0]}; drop them first with TTTModuleWrapper.reset_all(model)")
        return vmap(lambda params, *row: functional_call(self.module, params, row, kwargs))(self.batch_params, *args)


class LowRankLinear(nn.Module):
    """A linear layer whose weight is ``weight_a @ weight_b`` (out, r) @ (r, in); ``weight_b`` starts
    at zero (so the product starts at zero) and ``weight_a`` random, so both receive gradients once
    ``weight_b`` moves. The bias, if any, is the original layer's."""

    def __init__(self, module: nn.Module, low_rank_dim: int):
        super().__init__()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"LowRankLinear needs a module with a 2-d weight, got {type(module).__name__}")
        out_dim, in_dim = weight.shape
        if isinstance(low_rank_dim, bool) or not isinstance(low_rank_dim, int) \
                or not 0 < low_rank_dim < min(out_dim, in_dim):
            raise ValueError(f"low_rank_dim must be an integer in [1, {min(out_dim, in_dim)}) for a "
                             f"({out_dim}, {in_dim}) weight, got {low_rank_dim!r}")
        self.weight_a = nn.Parameter(torch.randn(out_dim, low_rank_dim))
        self.weight_b = nn.Parameter(torch.zeros(low_rank_dim, in_dim))
        bias = getattr(module, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x):
        return F.linear(x, self.weight_a @ self.weight_b, self.bias)


class TTTMetaLearningTargetKLLoss(nn.Module):
    """A learned inner loss: per token, KL(p || q) with p = softmax(to_prediction(h)) and
    q = softmax(to_meta_prediction(Encoder(h))), h the last layer's hidden states. -> (b, n)."""

    def __init__(self, *, dim: int, num_classes: int, depth: int = 1, heads: int = 4, dim_head: int = 64, **kwargs):
        super().__init__()
        from .layers import Encoder
        self.encoder = Encoder(dim=dim, depth=depth, heads=heads, attn_dim_head=dim_head, **kwargs)
        self.to_prediction = nn.Linear(dim, num_classes)
        self.to_meta_prediction = nn.Linear(dim, num_classes)

    def forward(self, intermediates, mask=None):
        hiddens = intermediates.last_layer_hiddens  # (b, n, d)
        log_p = self.to_prediction(hiddens).log_softmax(dim=-1)
        log_q = self.to_meta_prediction(self.encoder(hiddens, mask=mask)).log_softmax(dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class TTTNextLatentPredictionLoss(nn.Module):
    """A learned inner loss: an MLP predicts each position's next last-layer hidden state (the last
    position predicts the first, so every position has a target); smooth-L1 or MSE per token -> (b, n)."""

    def __init__(self, *, dim: int, hidden_dim: int | None = None, num_layers: int = 3, loss_type: str = "smooth_l1"):
        super().__init__()
        if loss_type not in ("smooth_l1", "mse"):
            raise ValueError(f"loss_type must be 'smooth_l1' or 'mse', got {loss_type!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        hidden_dim = hidden_dim or dim
        widths = [dim] + [hidden_dim] * (num_layers - 1) + [dim]
        layers = [nn.LayerNorm(dim)]
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < num_layers - 1 else [])
        self.predictor = nn.Sequential(*layers)
        self.loss_fn = F.smooth_l1_loss if loss_type == "smooth_l1" else F.mse_loss

    def forward(self, intermediates, mask=None):
        hiddens = intermediates.last_layer_hiddens
        target = hiddens.roll(-1, dims=1).detach()
        loss = self.loss_fn(self.predictor(hiddens), target, reduction="none").mean(dim=-1)  # (b, n)
        return loss if mask is None else loss.masked_fill(~mask.roll(-1, dims=1), 0.0)


def newton_schulz(g, steps: int = 5, eps: float = 1e-7):
    """Muon's quintic Newton-Schulz iteration on the last two dims: -> an approximately orthogonal
    matrix with g's singular vectors (singular values pushed towards 1)."""
    a, b, c = _MUON_COEFFS
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


def _upstream_path(root: nn.Module, path: str) -> str:
    """Upstream's module path -> ours: ``layers.i.1`` is our ``blocks.i.fn``; in a feed-forward,
    upstream's ``ff`` sequence is (proj_in, [post-activation norm], dropout, proj_out), with
    ``ff.0.0`` / ``ff.0.proj`` the input linear (plain / GLU)."""
    m = re.fullmatch(r"(.*?)layers\.(\d+)\.1(?:\.(.*))?", path)
    if m is None:
        return path
    head, index, rest = m.groups()
    ours = f"{head}blocks.{index}.fn"
    fn = _get(root, ours)
    if rest is not None and hasattr(fn, "proj_in") and rest.startswith("ff."):
        sequence = ["proj_in"] + (["post_act_norm"] if getattr(fn, "post_act_norm", None) is not None else []) \
            + ["dropout", "proj_out"]
        k = re.fullmatch(r"ff\.(\d+)", rest)
        if re.fullmatch(r"ff\.0\.(0|proj)", rest):
            rest = "proj_in"
        elif k is not None and int(k.group(1)) < len(sequence):
            rest = sequence[int(k.group(1))]
    return ours + (f".{rest}" if rest else "")


def _get(root: nn.Module, path: str):
    try:
        return reduce(getattr, path.split("."), root)
    except AttributeError:
        return None


def _set(root: nn.Module, path: str, module: nn.Module):
    *parents, last = path.split(".")
    setattr(reduce(getattr, parents, root), last, module)


def _check_number(name, value, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


class TTTSetup:
    """Validates the ``ttt_*`` keywords, wraps the chosen modules of ``root`` in ``TTTModuleWrapper``
    (``wrappers``: the given path -> its wrapper) and performs the inner steps. ``prefix`` is put before
    every path but ``episodic_mems`` (upstream's ``net.`` when the wrapper holds episodic memories)."""

    def __init__(self, root: nn.Module, module_paths, low_rank_paths, lr, wd, use_muon, muon_steps, muon_lr,
                 prefix: str = ""):
        for name, value in (("ttt_lr", lr), ("ttt_wd", wd), ("ttt_muon_lr", muon_lr)):
            _check_number(name, value)
        if isinstance(muon_steps, bool) or not isinstance(muon_steps, int) or muon_steps < 1:
            raise ValueError(f"ttt_muon_steps must be an integer >= 1, got {muon_steps!r}")
        if not isinstance(use_muon, bool):
            raise ValueError(f"ttt_use_muon must be a bool, got {use_muon!r}")
        self.lr, self.wd, self.use_muon, self.muon_steps, self.muon_lr = lr, wd, use_muon, muon_steps, muon_lr
        pairs = []
        for item in _as_tuple("ttt_module_paths", module_paths):
            pair = (item, item) if isinstance(item, str) else tuple(item) if isinstance(item, (tuple, list)) else ()
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"ttt_module_paths entries must be a path or a (source, target) pair, got {item!r}")
            pairs.append(tuple(p if p == "episodic_mems" else prefix + p for p in pair))
        low_rank = {}
        for item in _as_tuple("ttt_low_rank_paths", low_rank_paths):
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise ValueError(f"ttt_low_rank_paths entries must be (path, low_rank_dim), got {item!r}")
            low_rank[prefix + item[0]] = item[1]
        self.paths_map = tuple(pairs) + tuple((p, p) for p in low_rank if (p, p) not in pairs)
        found = {}  # path -> (our path, the module to wrap); nothing is replaced until every path checks out
        for path in (p for pair in self.paths_map for p in pair):
            if path in found:
                continue
            ours = path if _get(root, path) is not None else _upstream_path(root, path)
            module = _get(root, ours)
            if not isinstance(module, nn.Module) or module is root:
                raise ValueError(f"ttt_module_paths: no module at {path!r}")
            if isinstance(module, TTTModuleWrapper):
                raise ValueError(f"ttt_module_paths: {path!r} is already test-time trained")
            if path in low_rank:
                module = LowRankLinear(module, low_rank[path])
            if not any(True for _ in module.parameters()):
                raise ValueError(f"ttt_module_paths: the module at {path!r} has no parameters")
            found[path] = (ours, module)
        for source, target in self.paths_map:
            s, t = (list(found[p][1].named_parameters()) for p in (source, target))
            if [p.shape for _, p in s] != [p.shape for _, p in t]:
                raise ValueError(f"ttt_module_paths: source {source!r} and target {target!r} must have parameters of "
                                 f"the same shapes, got {[tuple(p.shape) for _, p in s]} and "
                                 f"{[tuple(p.shape) for _, p in t]}")
        self.wrappers = {path: TTTModuleWrapper(module) for path, (_, module) in found.items()}
        for path, (ours, _) in found.items():
            _set(root, ours, self.wrappers[path])

    def init(self, batch: int):
        """Every row starts from the modules' own parameters (a differentiable copy per row)."""
        for wrapper in self.wrappers.values():
            wrapper.batch_params = {name: (p if p.requires_grad else p.detach().requires_grad_()).expand(
                batch, *p.shape).clone() for name, p in wrapper.module.named_parameters()}

    def detach(self):
        for wrapper in self.wrappers.values():
            wrapper.batch_params = {k: v.detach().requires_grad_() for k, v in wrapper.batch_params.items()}

    def step(self, loss_per_row, create_graph: bool):
        """One step per row on ``loss_per_row`` (b,): gradients at the sources, applied to the targets."""
        sources = [list(self.wrappers[s].batch_params.values()) for s, _ in self.paths_map]
        flat = [p for params in sources for p in params]
        grads = torch.autograd.grad(loss_per_row.sum(), flat, create_graph=create_graph, retain_graph=create_graph,
                                    allow_unused=True)
        updated = {}
        i = 0
        for (_, target), params in zip(self.paths_map, sources):
            current = updated.get(target, self.wrappers[target].batch_params)
            new = {}
            for (name, w), g in zip(current.items(), grads[i:i + len(params)]):
                if g is not None:
                    lr = self.lr
                    if self.use_muon and g.ndim >= 3:
                        g, lr = newton_schulz(g, self.muon_steps), self.muon_lr
                    w = w - lr * g - lr * self.wd * w
                new[name] = w if create_graph else w.detach().requires_grad_()
            i += len(params)
            updated[target] = new
        for target, params in updated.items():
            self.wrappers[target].batch_params = params


def _as_tuple(name, value):
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple of entries, got {value!r}")
    return tuple(value)
