"""Fast smoke tests of the performance benchmarks (tiny settings; no timing assertions).

They check that the scripts run end to end from their ``main``, that every
method they report was measured (or skipped for a stated reason), that the
recompilation guard does fire on a recompilation, and that the PyTorch
comparison skips cleanly without torch and agrees with torch when present.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _timing, famo_overhead, scaling, vs_pytorch

FAST = ["--quick", "--rounds", "2", "--repeats", "2"]


def _mean_aggregator() -> optax.GradientTransformation:
    """Stand-in aggregator (the mean of the task gradients) for the budget logic."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda g: g.mean(0), updates), state),
    )


def test_scaling_quick_loss_weightings(tmp_path, capsys):
    # The plot needs matplotlib (the "examples" extra), so --out does too.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    out_args = ["--out", str(tmp_path)] if has_matplotlib else []
    methods = ["LS", "FAMO lagged", "FAMO same-batch"]
    results = scaling.main([*FAST, "--ks", "3", "--methods", *methods, *out_args])
    out = capsys.readouterr().out
    assert {(r.method, r.num_tasks) for r in results} == {(m, 3) for m in methods}
    for r in results:
        assert r.skipped is None
        assert len(r.times) == 2 and r.seconds > 0
        assert r.memory_total > 0 and r.flops > 0
    # The FLOP estimate is deterministic: FAMO lagged adds O(k) work to LS, the
    # same-batch mode a whole extra forward pass.
    lagged = scaling.ratio(results, "FAMO lagged", 3, "flops")
    same = scaling.ratio(results, "FAMO same-batch", 3, "flops")
    assert 1.0 <= lagged < 1.1 and same > lagged
    assert "Median step time" in out and "Recompilation check" in out and "cpu count" in out
    assert "smoke test" in out
    if has_matplotlib:
        assert '"results"' in (tmp_path / "scaling.json").read_text()
        assert "Median step time" in (tmp_path / "scaling.md").read_text()
        assert (tmp_path / "scaling.png").stat().st_size > 0


def test_scaling_memory_budget_skips_large_k(capsys):
    # Room for the float32 per-task gradients of 32 tasks: k=2 fits, k=64 does not.
    cfg = scaling.QUICK_MODEL
    budget_gib = 4 * 32 * cfg.trunk_params / 2**30
    results = scaling.main(
        [*FAST, "--ks", "2", "64", "--methods", "LS", "O(k) floor",
         "--memory-budget-gib", str(budget_gib)]
    )  # fmt: skip
    by_key = {(r.method, r.num_tasks): r for r in results}
    assert by_key[("LS", 64)].seconds is not None
    small, large = by_key[("O(k) floor", 2)], by_key[("O(k) floor", 64)]
    assert small.skipped is None and small.seconds > 0
    assert small.memory_total > by_key[("LS", 2)].memory_total
    assert "memory budget" in large.skipped and large.seconds is None
    assert "O(k) floor from k=64" in capsys.readouterr().out


@pytest.mark.slow
def test_scaling_runs_every_aggregator():
    # Every O(k) method goes through the benchmark's step (the full run would
    # otherwise find a broken one only after minutes).
    # k = 3: Krum and TrimmedMean need three tasks.
    results = scaling.main([*FAST, "--ks", "3", "--methods", "LS", *scaling.AGGREGATORS])
    for r in results:
        assert r.skipped is None and r.seconds > 0 and r.memory_total > 0


def test_floor_aggregator_weights_by_inverse_norm():
    task_grads = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}  # norms 5 and 1
    out, _ = scaling.floor_aggregator().update(task_grads, optax.EmptyState())
    weights = np.array([1 / 5, 1.0]) / (1 / 5 + 1.0)
    np.testing.assert_allclose(out["w"], weights @ np.array([[3.0, 4.0], [0.0, 1.0]]), rtol=1e-6)


def test_scaling_aggregator_step_matches_mean_gradient(monkeypatch):
    # With the mean aggregator, the aggregator step must be exactly the LS step.
    cfg = scaling.QUICK_MODEL
    params = scaling.init_params(jax.random.key(0), cfg, 3)
    x, y = scaling.make_batch(jax.random.key(1), cfg, 3)
    monkeypatch.setitem(scaling.AGGREGATORS, "CAGrad", _mean_aggregator)
    agg_step, agg_carry = scaling.make_aggregator("CAGrad")(params, x, y)
    ls_step, ls_carry = scaling.make_ls(params, x, y)
    agg_params = jax.jit(agg_step)(agg_carry, x, y)[0]
    ls_params = jax.jit(ls_step)(ls_carry, x, y)[0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), agg_params, ls_params
    )


def test_famo_lagged_skips_only_the_first_update():
    cfg = scaling.QUICK_MODEL
    params = scaling.init_params(jax.random.key(0), cfg, 3)
    x, y = scaling.make_batch(jax.random.key(1), cfg, 3)
    step, carry = scaling.make_famo_lagged(params, x, y)
    step = jax.jit(step)
    for _ in range(3):
        carry = step(carry, x, y)
    state = carry[2]
    assert int(state.num_skipped) == 1 and int(state.num_updates) == 2
    assert np.all(np.isfinite(state.logits))


def test_predict_seconds_extrapolates_linearly_in_k():
    assert scaling._predict_seconds([], 10) is None
    assert scaling._predict_seconds([(10, 1.0)], 40) == pytest.approx(4.0)
    assert scaling._predict_seconds([(10, 1.0), (20, 4.0)], 40) == pytest.approx(8.0)


def test_compile_counter_detects_recompilation():
    f = jax.jit(lambda x: x * 2.0)
    f(jnp.ones(3)).block_until_ready()
    with _timing.CompileCounter("same shape") as counter:
        f(jnp.ones(3)).block_until_ready()
    assert counter.traces == 0 and counter.compiles == 0
    with pytest.raises(_timing.RecompilationError, match="new shape"):
        with _timing.CompileCounter("new shape"):
            f(jnp.ones(4)).block_until_ready()


def test_time_steps_reuses_the_ahead_of_time_compilation():
    step = lambda carry, x: jax.tree.map(lambda a: a * 0.5 + x, carry)
    carry = {"a": jnp.ones((4, 4))}
    compiled = _timing.compile_step(step, carry, jnp.float32(1.0))
    assert compiled.memory.total > 0
    # Raises RecompilationError if the timed calls traced or compiled anything.
    times = _timing.time_steps(compiled.fn, carry, (jnp.float32(1.0),), warmup=1, repeats=3)
    assert len(times) == 3
    # The caller's carry is not donated away.
    np.testing.assert_array_equal(carry["a"], np.ones((4, 4)))


def test_famo_overhead_quick(capsys):
    rows = famo_overhead.main(["--quick", "--ks", "2", "64"])
    assert [r["num_tasks"] for r in rows] == [2, 64]
    for r in rows:
        assert r["step_us"] >= 0 and r["in_scan_us"] >= 0
        assert r["per_call_us"] > 0 and math.isfinite(r["dispatch_us"])
    assert "ns / task" in capsys.readouterr().out


def test_famo_overhead_scan_runs_famo():
    # The timed scan really updates FAMO (the measured work is not dead code).
    weighting, _, with_famo, _ = famo_overhead.make_functions(3, steps=50)
    state, losses, _ = jax.jit(with_famo)(weighting.init(), jnp.array([1.0, 2.0, 3.0]))
    assert int(state.num_updates) == 50
    assert not np.allclose(state.logits, 0.0)


def test_vs_pytorch_skips_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert vs_pytorch.main(["--quick"]) is None
    assert "PyTorch is not installed" in capsys.readouterr().out


def test_vs_pytorch_quick_agrees_with_torch(capsys):
    pytest.importorskip("torch")
    out = vs_pytorch.main(["--quick", "--toy-steps", "300", "--repeats", "2"])
    assert max(out["toy"]["diffs64"].values()) <= vs_pytorch.TOY_ATOL
    # 300 float32 steps are far from the front, where rounding starts to matter.
    assert max(out["toy"]["diffs"].values()) <= 1e-3
    for (_, precision), agreement in out["mlp"]["agreement"].items():
        tol = vs_pytorch.MLP_ATOL if precision == "float64" else 1e-4
        assert agreement["params"] <= tol and agreement["logits"] <= tol
    assert {precision for _, precision in out["mlp"]["agreement"]} == {"float32", "float64"}
    assert "speed-up" in capsys.readouterr().out
