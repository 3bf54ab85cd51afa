"""The toy-problem example (paper Figure 1): fast runs of its functions and main."""

import jax
import numpy as np
import pytest

from examples import toy_pareto
from famo_jax import problems

_task_jacobian = jax.jit(jax.jacrev(problems.toy_losses))


def authors_loop(start, num_steps, method, lr=1e-3, logits_lr=0.025):
    """The authors' toy loop (experiments/toy/trainer.py), in NumPy, for LS and FAMO.

    Per iteration: losses f at x; for FAMO (from the second iteration on) one
    logits step with delta = log(prev - m) - log(f - m); the weighted gradient;
    one Adam step on x (PyTorch's Adam: bias-corrected moments, eps 1e-8 added
    to the square root).
    """
    min_losses = np.array(problems.TOY_MIN_LOSSES)
    x = np.array(start, np.float64)
    logits = np.zeros(2)
    moments = {"x": [np.zeros(2), np.zeros(2)], "logits": [np.zeros(2), np.zeros(2)]}

    def adam(name, param, grad, step, rate):
        m, v = moments[name]
        m[:] = 0.9 * m + 0.1 * grad
        v[:] = 0.999 * v + 0.001 * grad**2
        m_hat, v_hat = m / (1 - 0.9**step), v / (1 - 0.999**step)
        return param - rate * m_hat / (np.sqrt(v_hat) + 1e-8)

    trajectory, prev = [x.copy()], None
    for it in range(num_steps):
        f = np.asarray(problems.toy_losses(x.astype(np.float32)), np.float64)
        jac = np.asarray(_task_jacobian(x.astype(np.float32)), np.float64)
        if method == "LS":
            weights = np.ones(2)
        else:
            if it > 0:
                delta = np.log(prev - min_losses + 1e-8) - np.log(f - min_losses + 1e-8)
                z = np.exp(logits) / np.sum(np.exp(logits))
                logits = adam("logits", logits, z * (delta - z @ delta), it, logits_lr)
            z = np.exp(logits) / np.sum(np.exp(logits))
            gap = f - min_losses + 1e-8
            weights = (z / gap) / np.sum(z / gap)
            prev = f
        x = adam("x", x, weights @ jac, it + 1, lr)
        trajectory.append(x.copy())
    return np.stack(trajectory)


@pytest.fixture(scope="module")
def full_runs():
    """LS and FAMO at the paper's settings (50,000 steps): well under a second each.

    Plus FAMO with the library's default gamma = 1e-3 instead of the authors' 0.
    """
    runs = {m: toy_pareto.run_method(m, problems.TOY_STARTS, 50_000) for m in ("LS", "FAMO")}
    runs["FAMO gamma 1e-3"] = toy_pareto.run_method(
        "FAMO", problems.TOY_STARTS, 50_000, famo_gamma=1e-3
    )
    return runs


@pytest.mark.parametrize("method", ["LS", "FAMO"])
def test_runs_follow_the_authors_loop(full_runs, method):
    result, num_steps = full_runs[method], 150
    assert result.thetas.shape == (5, 50_001, 2)
    np.testing.assert_array_equal(result.thetas[:, 0], problems.TOY_STARTS)
    # FAMO from (0, 0) is a knife edge: min_losses = (-2.1, -21) has the ratio of
    # the loss scales, so at theta_1 = 0 FAMO's theta_1 gradient cancels exactly
    # and its sign is decided by float rounding (PyTorch's float32 run and this
    # float32 run part after a few steps too, by ~7e-3 after 300 steps).
    indices = (0, 1, 2, 3, 4) if method == "LS" else (0, 2, 3, 4)
    for index in indices:
        expected = authors_loop(problems.TOY_STARTS[index], num_steps, method)
        np.testing.assert_allclose(result.thetas[index, : num_steps + 1], expected, atol=2e-4)
    np.testing.assert_allclose(
        result.losses[:, ::1000], problems.toy_losses(result.thetas[:, ::1000]), atol=1e-5
    )


def test_vmapped_starts_equal_single_runs(full_runs):
    single = toy_pareto.run_method("FAMO", problems.TOY_STARTS[3:4], 100)
    np.testing.assert_allclose(
        single.thetas[0], full_runs["FAMO"].thetas[3, :101], rtol=1e-6, atol=1e-6
    )
    assert single.run_seconds > 0 and single.compile_seconds > 0


def test_paper_result_ls_stalls_once_famo_never(full_runs):
    ls, famo = full_runs["LS"], full_runs["FAMO"]
    threshold = toy_pareto.FRONT_THRESHOLD
    # LS stalls from (9, 9) in the upper valley, far from the Pareto set.
    np.testing.assert_array_equal(ls.residual < threshold, [True, True, False, True, True])
    assert ls.front_distance[2] > 5 and ls.residual[2] > 100 * threshold
    assert np.all(famo.residual < threshold) and np.all(famo.front_distance < 0.02)
    # FAMO balances: every run ends in the middle of the front, where neither
    # loss is near its own minimum; LS's runs all end near task 2's end.
    assert np.all(np.abs(famo.thetas[:, -1, 0]) < 2.5)
    np.testing.assert_array_less(ls.thetas[[0, 1, 3, 4], -1, 0], -5.0)
    # With gamma = 1e-3 the decay dominates the tiny logits gradients of this
    # smooth problem, FAMO stays near equal weights of the log losses and stalls
    # like LS: why the authors' toy script sets gamma = 0.
    assert np.sum(full_runs["FAMO gamma 1e-3"].residual < threshold) < 5


def test_distance_to_pareto_set():
    thetas, _ = problems.toy_pareto_front(33)
    np.testing.assert_allclose(toy_pareto.distance_to_pareto_set(thetas), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        toy_pareto.distance_to_pareto_set(np.array([[0.0, -8.0], [8.0, thetas[-1, 1]]])),
        [-8.0 - thetas[16, 1], 1.0],
        rtol=1e-6,
    )


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        toy_pareto.make_method("Adam")


def test_main_quick_prints_the_table_and_saves_both_figures(tmp_path, capsys):
    results = toy_pareto.main(["--quick", "--methods", "LS", "FAMO", "--out", str(tmp_path)])
    assert [r.method for r in results] == ["LS", "FAMO"]
    assert (tmp_path / "toy_pareto.png").stat().st_size > 10_000
    assert (tmp_path / "toy_pareto_curves.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    table_rows = [line for line in printed.splitlines() if line.startswith("| LS |")]
    assert len(table_rows) == 5 + 1  # five starts, one timing row
    assert "| FAMO | (9, 9) |" in printed and "200 Adam steps" in printed
    assert "smoke test" in printed


def _authors_pcgrad_sum(g):
    # Tseng's PCGrad as in the authors' WeightMethods, for two tasks (where the
    # random order does not matter), with their sum reduction.
    out = []
    for i in range(2):
        gi = g[i].copy()
        for j in (1 - i, i):
            dot = gi @ g[j]
            if dot < 0:
                gi -= dot * g[j] / (g[j] @ g[j])
        out.append(gi)
    return out[0] + out[1]


def _authors_cagrad(g, c=0.4):
    # The authors' cagrad(grads, alpha=c, rescale=1), its dual solved on a fine grid.
    gram = g @ g.T
    cc = c * np.sqrt(gram.mean() + 1e-8) + 1e-8
    a = np.linspace(0.0, 1.0, 200_001)
    w = np.stack([a, 1 - a], -1)
    objective = w @ gram @ np.full(2, 0.5) + cc * np.sqrt(
        np.einsum("ni,ij,nj->n", w, gram, w) + 1e-8
    )
    gw = w[np.argmin(objective)] @ g
    return (g.mean(0) + cc / (np.linalg.norm(gw) + 1e-8) * gw) / (1 + c**2)


def _clip(v, max_norm=1.0):
    # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) if < 1.
    return v * min(1.0, max_norm / (np.linalg.norm(v) + 1e-6))


GRADIENT_PAIRS = {
    "small, conflicting": np.array([[0.03, -0.01], [-0.02, 0.05]]),
    "large, conflicting": np.array([[3.0, -1.0], [-2.0, 5.0]]),
}


def test_aggregators_use_the_conventions_of_the_authors_toy():
    from scipy.optimize import fsolve

    expected = {name: [] for name in ("MGDA", "PCGrad", "CAGrad", "Nash-MTL")}
    for g in GRADIENT_PAIRS.values():
        # Sum convention everywhere; clipping to norm 1 for PCGrad and CAGrad.
        expected["PCGrad"].append(_clip(_authors_pcgrad_sum(g)))
        expected["CAGrad"].append(_clip(2 * _authors_cagrad(g)))
        # MGDA: min-norm weights of two gradients (closed form), times k.
        gamma = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0, 1)
        expected["MGDA"].append(2 * (gamma * g[0] + (1 - gamma) * g[1]))
        # Nash-MTL: alpha with G G^T alpha = 1 / alpha (the authors' raw units),
        # solved for G G^T / ||G G^T||_F, whose solution is sqrt(||G G^T||_F) alpha.
        frobenius = np.linalg.norm(g @ g.T)
        gram = g @ g.T / frobenius
        alpha = fsolve(lambda a, gram=gram: gram @ a - 1 / a, np.ones(2), xtol=1e-12)
        expected["Nash-MTL"].append(alpha @ g / np.sqrt(frobenius))
    pairs = jax.numpy.asarray(np.stack(list(GRADIENT_PAIRS.values())), "float32")
    for name, value in expected.items():
        tx = toy_pareto.authors_aggregator(name)
        # One compilation per aggregator: both pairs at once.
        got, _ = jax.jit(jax.vmap(tx.update, in_axes=(0, None)))(pairs, tx.init(np.zeros(2)))
        np.testing.assert_allclose(got, np.stack(value), rtol=2e-3, atol=1e-5, err_msg=name)
    # The clip is active on the large pair.
    assert np.linalg.norm(expected["CAGrad"][1]) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(expected["PCGrad"][1]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["MGDA", "PCGrad", "CAGrad", "Nash-MTL"])
def test_aggregator_runs_scan_over_vmapped_starts(method):
    # One compilation per aggregator (a few seconds each); the full 50,000-step
    # result is in the README table.
    result = toy_pareto.run_method(method, problems.TOY_STARTS, 300)
    assert result.thetas.shape == (5, 301, 2) and np.all(np.isfinite(result.thetas))
    # Every step moves theta by about Adam's learning rate, never more than 10x.
    steps = np.linalg.norm(np.diff(result.thetas, axis=1), axis=-1)
    assert np.all(steps < 1e-2) and np.all(steps[:, 0] > 1e-4)
    # Every run improves at least one task (Adam's per-coordinate scaling can
    # still make the other one worse for a while, as from (9, -1)).
    assert np.all(np.min(result.losses[:, -1] - result.losses[:, 0], axis=-1) < -1e-3)
