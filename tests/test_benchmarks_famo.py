"""Smoke tests of the FAMO diagnosis and acceptance benchmarks (tiny settings).

They run each script's ``main`` with ``--quick`` on a few rows and check that
every requested row was measured, that the output is labelled a smoke test and
that ``--out`` receives the table (and the figures of the diagnosis).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from benchmarks import famo_acceptance, famo_dynamics


def test_famo_dynamics_quick(tmp_path, capsys):
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    out_args = ["--out", str(tmp_path)] if has_matplotlib else []
    results = famo_dynamics.main(
        ["--quick", "--problems", "full", "--rows", "robust FAMO", *out_args]
    )
    out = capsys.readouterr().out
    assert "QUICK SMOKE TEST" in out
    assert set(results) == {"full"}
    for traces in results.values():
        assert {"LS", "robust FAMO", "robust FAMO-lagged"} <= set(traces)
    # LS's task losses after training are finite ratios of the initial ones.
    summary = famo_dynamics.summarize_regression(results["full"]["LS"])
    assert np.all(np.isfinite(summary.late_worst)) and np.all(summary.late_worst > 0)
    if has_matplotlib:
        assert "full" in (tmp_path / "famo_dynamics.md").read_text()
        assert (tmp_path / "full.png").stat().st_size > 0


def test_famo_acceptance_quick(tmp_path, capsys):
    # The regression columns run famo_dynamics' code, tested above.
    columns = ["toy", "quickstart"]
    text = famo_acceptance.main(
        ["--quick", "--columns", *columns, "--rows", "robust FAMO", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "QUICK SMOKE TEST" in out and text in out
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| LS",
        "| robust FAMO",
        "| robust FAMO-lagged",
    ]
    for line in table[1:]:  # every requested column of every row is filled
        cells = line.strip("|").split(" | ")
        filled = [c.strip() != "" for c in cells[1:-1]]
        assert sum(filled) >= len(columns)
    assert (tmp_path / "robust_famo_acceptance.md").read_text().strip() == text.strip()
