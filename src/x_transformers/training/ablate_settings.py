"""The :class:`Setting` of ``xtransformers ablate`` (one row of its table) and the attention-variant rows
(issue 20), kept beside ``ablate.py`` so that module stays a runner; ``ablate.LM_SETTINGS`` includes them.

Each attention row changes one keyword of the ablate base (dim 256, depth 4, heads 4, seq 256, learned
absolute positions); where a keyword takes a size it is stated against the base's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One row of the table: keyword changes over the base model.

    ``model`` values may be callables of the base's shape (``dim, heads, depth, seq_len, dim_head``),
    e.g. grouped KV heads as half the base's heads. ``section`` is the heading of docs/features.md
    that the row is evidence for; ``notes`` says how the row is sized against the baseline."""

    name: str
    model: dict[str, Any]
    paper: str = ""
    section: str = ""
    notes: str = ""
    lrs: tuple[float, ...] = ()  # this setting's own learning rates (default: the sweep's, --lrs)


def _quarter_seq(c):
    return max(1, c["seq_len"] // 4)


def _half_dim(c):
    return max(1, c["dim"] // 2)


# Issue 20's rows: every attention variant that changes what the model learns (talking heads and value
# residual have their rows already). No features.md section: docs/evidence/ablation.md holds the table.
ATTENTION_SETTINGS: tuple[Setting, ...] = (
    Setting("gate_values", {"attn_gate_values": True}, "2505.06708", "",
            "a sigmoid gate from x on each head's output (one linear map dim -> heads x dim_head)"),
    Setting("softcap", {"attn_softclamp_logits": True}, "2408.00118", "",
            "logits 50 tanh(logits / 50), Gemma 2's value"),
    Setting("sinks", {"attn_head_learned_sink": True}, "2309.17453", "",
            "a learned per-head sink logit in the softmax (gpt-oss); one scalar per head"),
    Setting("sliding_window", {"attn_max_attend_past": _quarter_seq}, "2004.05150", "",
            "each query sees at most seq/4 keys back (64 at seq 256): less context, not matched"),
    Setting("sigmoid_attn", {"attn_sigmoid": True}, "2409.04431", "",
            "sigmoid(logits) weights, unnormalised, no bias term"),
    Setting("l2_distance", {"attn_l2_distance": True}, "2006.04710", "", "logits -|q - k|^2 * scale"),
    Setting("laser", {"attn_laser": True}, "2411.03493", "", "attention in exp(v) space, log of the output"),
    Setting("mla", {"attn_use_latent_kv": True, "attn_dim_latent_kv": _half_dim}, "2405.04434", "",
            "k, v from a latent of width dim/2 (fewer key/value weights)"),
    Setting("cope", {"attn_use_cope": True}, "2405.18719", "",
            "contextual positions (max_pos 16) added to the learned absolute table"),
    Setting("forgetting", {"attn_data_dependent_alibi": True}, "2503.02130", "",
            "data-dependent ALiBi (forgetting transformer) added to the learned absolute table"),
)

__all__ = ["Setting", "ATTENTION_SETTINGS"]
