"""Smoke test of benchmarks/gramian.py (tiny model; no timing assertions)."""

from __future__ import annotations

from benchmarks import gramian as gramian_benchmark


def test_gramian_benchmark_quick(tmp_path, capsys):
    methods = ["LS", "MGDA jacrev", "MGDA engine"]
    results = gramian_benchmark.main(
        ["--quick", "--ks", "3", "--methods", *methods, "--torchjd", "no", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "smoke test" in out
    measured = {(r.method, r.num_tasks) for r in results if r.seconds is not None}
    assert {(m, 3) for m in [*methods, *gramian_benchmark.PARTS]} <= measured
    by_method = {r.method: r for r in results}
    # Deterministic analyses: the engine holds less than the stacked task gradients and
    # does fewer FLOPs than jacrev; the parts add up to at most the step.
    assert by_method["MGDA engine"].memory_total < by_method["MGDA jacrev"].memory_total
    assert by_method["MGDA engine"].flops < by_method["MGDA jacrev"].flops
    assert by_method["engine Gram"].flops <= by_method["MGDA engine"].flops
    table = (tmp_path / "gramian.md").read_text()
    assert "MGDA engine" in table and "Where the engine's time goes" in table
    assert (tmp_path / "gramian.json").exists()
