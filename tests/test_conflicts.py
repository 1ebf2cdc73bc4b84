"""The declared conflict table (the conflicts package): every entry refuses its example on every kind it
names, the error carries the entry, and no constructor refuses a combination outside the table."""

import re
from pathlib import Path

import pytest

from x_transformers import (ConfigConflictError, CrossAttender, Decoder, Encoder, FunnelEncoder, TransformerWrapper,
                            XTransformer)
from x_transformers.config import WRAPPER_KEYS, field_names
from x_transformers.conflicts import CONFLICTS, KINDS, check
from x_transformers.funnel import FunnelConfig
from x_transformers.wrappers import MODULE_KEYS

SRC = Path(__file__).resolve().parents[1] / "src" / "x_transformers"
# conflict() call sites in other modules still to be switched to conflicts.check (each has a table entry)
STACKS = {"decoder": Decoder, "encoder": Encoder, "cross": CrossAttender, "wrapper": Encoder}


def build_kind(kind: str, keywords: dict):
    """A model of ``kind`` from ``keywords``, the kind's required ones supplied."""
    kw = dict(keywords)
    if kind == "xtransformer":
        return XTransformer(**{**dict(dim=32, depth=1, heads=4, num_tokens=10, max_seq_len=16), **kw})
    wrapper = {k: kw.pop(k) for k in list(kw) if k in WRAPPER_KEYS or k in MODULE_KEYS}
    funnel = {k: kw.pop(k) for k in list(kw) if k in field_names(FunnelConfig)}
    if kind == "funnel" or funnel:
        layers = FunnelEncoder(kw.pop("dim", 32), **{"heads": 4, "depths": (1,), **funnel, **kw})
    else:  # an entry's example may set dim, depth or heads itself
        layers = STACKS[kind](**{"dim": 32, "heads": 4, "depth": 1, **kw})
    return TransformerWrapper(attn_layers=layers, **{"num_tokens": 10, "max_seq_len": 16, **wrapper})


CASES = [(i, kind) for i, entry in enumerate(CONFLICTS) for kind in entry.kinds]


@pytest.mark.parametrize("index, kind", CASES, ids=[f"{i}-{'+'.join(CONFLICTS[i].keys)}-{k}" for i, k in CASES])
def test_every_entry_refuses_its_example_on_every_kind_it_names(index, kind):
    entry = CONFLICTS[index]
    with pytest.raises(ConfigConflictError) as info:
        build_kind(kind, entry.example)
    assert all(key in str(info.value) for key in entry.keys), str(info.value)
    assert info.value.conflict is entry, f"{info.value.conflict.keys} fired before {entry.keys}"


def test_every_entry_is_well_formed():
    for entry in CONFLICTS:
        assert entry.kinds and set(entry.kinds) <= set(KINDS), entry.keys
        assert entry.reason and entry.example, entry.keys
        assert entry.when(entry.example), f"{entry.keys}: its example does not trigger it"


def test_the_message_names_the_keywords_and_the_kind():
    with pytest.raises(ConfigConflictError) as info:
        Decoder(dim=32, depth=1, heads=4, use_scalenorm=True, use_rmsnorm=True)
    assert str(info.value).startswith("use_scalenorm cannot be combined with use_rmsnorm (decoder): choose one norm")
    with pytest.raises(ValueError, match="unknown model kind"):
        check("decoderr", {})


def _conflict_calls(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines()
               if re.search(r"\bconflict\(", line) and not line.lstrip().startswith("def "))


def test_no_conflict_is_refused_outside_the_table():
    """Every ConfigConflictError comes from conflicts.check: no ad-hoc conflict() call anywhere."""
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "conflicts" or path.name == "config.py":
            continue
        assert _conflict_calls(path) == 0, f"{path.name}: conflict() outside the table"
        assert "ConfigConflictError(" not in path.read_text(), path.name
    assert _conflict_calls(SRC / "config.py") == 0


def test_xtransformer_refuses_cross_attend_and_shared_custom_layers():
    base = dict(dim=32, depth=1, heads=4, num_tokens=10, max_seq_len=16)
    for bad in (dict(cross_attend=True), dict(enc_cross_attend=True), dict(custom_layers=("a", "c", "f")),
                dict(dec_custom_layers=("a", "f")), dict(enc_custom_layers=("a", "c", "f"))):
        with pytest.raises(ConfigConflictError, match="xtransformer"):
            XTransformer(**base, **bad)
    model = XTransformer(**base, enc_custom_layers=("a", "f"), dec_custom_layers=("a", "c", "f"))
    assert model.decoder.attn_layers.layout_string == "a c f"


@pytest.mark.parametrize("feature", [dict(attn_talking_heads=True), dict(attn_use_entmax15=True),
                                     dict(attn_sparse_topk=2), dict(attn_post_talking_heads=True)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_forced_backend_refuses_what_it_cannot_compute_at_construction(feature, backend):
    with pytest.raises(ConfigConflictError, match="attn_backend"):
        Decoder(dim=32, depth=1, heads=4, attn_backend=backend, **feature)
    Decoder(dim=32, depth=1, heads=4, attn_backend="explicit", **feature)  # the explicit one computes all
    Decoder(dim=32, depth=1, heads=4, attn_backend=backend)
