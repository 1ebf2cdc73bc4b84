"""Session-wide reporting for the property harness: per-property counts, pair coverage, refusals
and the fuzz counts, printed at the end of every run that used the harness; and the fixtures more
than one test file uses."""

import json
import sys

import pytest


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Lift the CUDA check and run eager flex_attention (forward only on CPU) instead of the compiled
    one; returns a count of the block masks built."""
    from x_transformers import flex

    base = flex.FlexBackend.not_supported_reasons
    monkeypatch.setattr(flex.FlexBackend, "not_supported_reasons",
                        lambda self, req: [r for r in base(self, req) if "CUDA" not in r])
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: flex.flex_attention)
    calls = {"create_block_mask": 0}
    real = flex.create_block_mask

    def counting(*args, **kwargs):
        calls["create_block_mask"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(flex, "create_block_mask", counting)
    return calls


def pytest_sessionfinish(session):
    """Under pytest-xdist (make test runs two workers), a worker hands its harness counts to the
    controller, which prints the summary."""
    out, harness = getattr(session.config, "workeroutput", None), sys.modules.get("harness")
    if out is not None and harness is not None:
        out["harness"] = json.dumps({"stats": {p: dict(c) for p, c in harness.STATS.items()},
                                     "coverage": harness.COVERAGE, "refusals": dict(harness.REFUSALS),
                                     "fuzz": harness.FUZZ})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller's side: sum the workers' per-property counts (each ran its share of the tests);
    coverage comes from collection, the same in every worker; the fuzz test ran in one."""
    data = getattr(node, "workeroutput", {}).get("harness")
    if not data:
        return
    import harness

    got = json.loads(data)
    for prop, counts in got["stats"].items():
        harness.STATS[prop].update(counts)
    if not harness.COVERAGE:
        harness.COVERAGE.update(got["coverage"])
    harness.REFUSALS.update(got["refusals"])
    if got["fuzz"]:
        harness.FUZZ.update(got["fuzz"])


def pytest_terminal_summary(terminalreporter):
    harness = sys.modules.get("harness")
    if harness is None:
        return
    w = terminalreporter
    if harness.STATS:
        w.section("property harness")
        for prop in harness.PROPERTIES:
            counts = harness.STATS.get(prop)
            if counts:
                w.line(f"{prop}: " + ", ".join(f"{n:,} {what}" for what, n in sorted(counts.items())))
    if harness.COVERAGE and harness.STATS:
        w.line("pair coverage (covering array rows; same-group alternatives and keyword clashes are not pairs):")
        for kind, c in harness.COVERAGE.items():
            extra = ", ".join(f"{c[k]} {k}" for k in ("declared conflicts", "known undeclared refusals", "refused in a row")
                              if c.get(k))
            w.line(f"  {kind}: {c['covered']}/{c['coverable']} pairs in {c['rows']} rows"
                   + (f" ({extra})" if extra else ""))
    if harness.REFUSALS:
        w.line("rows refused by a declared entry: " + ", ".join(f"{k}: {n}" for k, n in harness.REFUSALS.items()))
    if harness.FUZZ:
        f = harness.FUZZ
        w.section("fuzz")
        part = f" of which shard {f['shard'][0]}/{f['shard'][1]}" if f.get("shard", (0, 1))[1] > 1 else ""
        w.line(f"{f['count']:,} configurations{part} (seed {f['seed']}, {f.get('seconds', '?')} s): {f['passed']:,} built "
               f"and passed, {f['refused']:,} refused by the table, {f['known']:,} known defects, "
               f"{len(f['failed']):,} failed")
        for entry, n in sorted(f["by_entry"].items()):
            w.line(f"  refused by {entry}: {n}")
        for key, n in sorted(f["known_keys"].items()):
            w.line(f"  known defect {key}: {n}")
        for line in f["failed"][:30]:
            w.line(f"  FAILED {line}")
