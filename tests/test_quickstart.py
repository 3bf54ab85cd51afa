"""The quick start runs end to end on tiny settings, and its methods behave as claimed."""

import jax
import numpy as np
import pytest

from examples import quickstart


def test_main_runs_and_reports_every_method(capsys):
    ratios = quickstart.main(["--num-tasks", "3", "--steps", "40"])
    assert set(ratios) == set(quickstart.METHODS)
    for method, ratio in ratios.items():
        assert ratio.shape == (3,), method
        assert np.all(np.isfinite(ratio)), method
    out = capsys.readouterr().out
    assert "famo_lagged" in out and "worst/best" in out


def test_famo_balances_loss_reduction_better_than_ls():
    problem = quickstart.make_problem(jax.random.key(0), num_tasks=4, num_train=1024)
    key = jax.random.key(1)
    initial = quickstart.task_losses(
        quickstart.init_params(jax.random.split(key)[0], 16, 4),
        problem.x_test,
        problem.y_test,
        problem.scales,
    )
    spread = {}
    for method in ("ls", "famo"):
        params, losses, weights = quickstart.train(method, problem, key, steps=600)
        assert losses.shape == (600, 4) and weights.shape == (600, 4)
        ratio = quickstart.task_losses(params, problem.x_test, problem.y_test, problem.scales)
        ratio = np.asarray(ratio / initial)
        spread[method] = ratio.max() / ratio.min()
    # LS neglects the task with the smallest loss scale; FAMO does not.
    assert spread["famo"] < spread["ls"] / 3


def test_unknown_method_is_rejected():
    problem = quickstart.make_problem(jax.random.key(0), num_tasks=2, num_train=64, num_test=8)
    with pytest.raises(ValueError, match="method must be one of"):
        quickstart.train("sum", problem, jax.random.key(0), steps=1)
