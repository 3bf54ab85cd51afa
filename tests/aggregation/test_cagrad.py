"""CAGrad against the authors' ``cagrad`` function, ported to NumPy (float64), and its laws."""

import jax
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

import famo_jax
from famo_jax import aggregation
from famo_jax.aggregation._cagrad import _dual_weights as cagrad_dual_weights
from tests._compat import enable_x64
from tests.aggregation._flat import (
    PROPERTY_SETTINGS,
    K,
    M,
    aggregate,
    as_float32,
    flat_output,
    from_flat,
    jitted,
    random_flat,
)

C = 0.4

# ---------------------------------------------------------------------------
# CAGrad: the authors' ``cagrad`` function (Cranial-XIX/CAGrad and FAMO repositories),
# ported to NumPy with their grads as columns: GG = grads^T grads.


def authors_cagrad(grads, alpha=C, rescale=1, ftol=None):
    """Returns ``(g, w, objective)`` as their code computes them (grads: (m, k))."""
    n_tasks = grads.shape[1]
    gg = grads.T @ grads
    g0_norm = np.sqrt(gg.mean() + 1e-8)
    x_start = np.ones(n_tasks) / n_tasks
    bnds = tuple((0, 1) for _ in x_start)
    cons = {"type": "eq", "fun": lambda x: 1 - sum(x)}
    b = x_start.copy()
    c = alpha * g0_norm + 1e-8

    def objfn(x):
        return (
            x.reshape(1, n_tasks).dot(gg).dot(b.reshape(n_tasks, 1))
            + c * np.sqrt(x.reshape(1, n_tasks).dot(gg).dot(x.reshape(n_tasks, 1)) + 1e-8)
        ).sum()

    options = {} if ftol is None else {"ftol": ftol, "maxiter": 1000}
    res = scipy.optimize.minimize(objfn, x_start, bounds=bnds, constraints=cons, options=options)
    return cagrad_from_weights(grads, res.x, alpha, rescale), res.x, objfn(res.x)


def cagrad_from_weights(grads, w, alpha=C, rescale=1):
    """The authors' g from the dual weights w (their code after ``minimize``)."""
    gg = grads.T @ grads
    c = alpha * np.sqrt(gg.mean() + 1e-8) + 1e-8
    gw = grads @ w
    lmbda = c / (np.linalg.norm(gw) + 1e-8)
    g = grads.mean(axis=1) + lmbda * gw
    return {0: g, 1: g / (1 + alpha**2), 2: g / (1 + alpha)}[rescale]


@jax.jit
def cagrad_dual(task_grads):
    """The dual weights from the same Gram matrix as the aggregator's."""
    return cagrad_dual_weights(aggregation.gram_matrix(task_grads), C)


def cagrad_inputs(seed):
    return random_flat(seed) * np.array([1.0, 0.3, 3.0, 1.0, 0.1])[:, None]


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_equals_the_authors_g_in_float64(rescale):
    # Their code run to convergence (a tight SLSQP tolerance) gives our output.
    for seed in range(3):
        flat = cagrad_inputs(seed)
        with enable_x64(True):
            tx, update = jitted("cagrad", c=C, rescale=rescale)
            out, _ = update(from_flat(flat, np.float64), tx.init(None))
            out = flat_output(out)
        reference, _, _ = authors_cagrad(flat.T, rescale=rescale, ftol=1e-15)
        np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7 * np.abs(reference).max())


def test_cagrad_equals_the_authors_g_in_float32():
    for seed in range(3):
        flat = cagrad_inputs(seed)
        grads = as_float32(flat).T
        out, _ = aggregate("cagrad", flat, c=C, rescale=1)
        # float32 determines the dual weights (a flat minimum) to ~1e-4, hence g.
        reference, _, _ = authors_cagrad(grads, ftol=1e-15)
        assert np.linalg.norm(out - reference) <= 1e-4 * np.linalg.norm(reference)
        # Their formula applied to our dual weights gives our output to float32 precision.
        w = np.asarray(cagrad_dual(from_flat(flat)), np.float64)
        np.testing.assert_allclose(out, cagrad_from_weights(grads, w), rtol=2e-5, atol=1e-6)
        # Their default call (SLSQP, ftol 1e-6) does not solve the dual better than we
        # do, up to float32 rounding of the objective (~1e-7 of the Gram's scale).
        _, _, their_value = authors_cagrad(grads)
        gram = grads.T @ grads
        b, cc = gram.mean(axis=1), C * np.sqrt(gram.mean() + 1e-8) + 1e-8
        our_value = float(b @ w + cc * np.sqrt(w @ gram @ w + 1e-8))
        scale = np.mean(np.diag(gram))
        assert our_value <= their_value + 1e-6 * scale, (our_value, their_value)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), conflict=st.floats(0.0, 3.0))
def test_cagrad_maximises_the_worst_improvement_in_a_ball_around_the_mean(seed, conflict):
    # CAGrad's primal: d maximises min_i <g_i, d> over |d - g0| <= c |g0| (rescale=0
    # returns d itself). g0 is in the ball, so d does at least as well as the mean.
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal((K, M))
    flat[1] -= conflict * flat[0]
    grads = as_float32(flat)
    out, _ = aggregate("cagrad", flat, c=C, rescale=0)
    mean = grads.mean(axis=0)
    scale = np.sum(grads**2)
    assert np.linalg.norm(out - mean) <= C * np.linalg.norm(mean) * (1 + 1e-4) + 1e-6
    assert np.min(grads @ out) >= np.min(grads @ mean) - 1e-5 * scale


def test_cagrad_rescale_and_c_zero():
    flat = random_flat(10)
    out0, _ = aggregate("cagrad", flat, c=C, rescale=0)
    out1, _ = aggregate("cagrad", flat, c=C, rescale=1)
    out2, _ = aggregate("cagrad", flat, c=C, rescale=2)
    np.testing.assert_allclose(out1 * (1 + C**2), out0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2 * (1 + C), out0, rtol=1e-5, atol=1e-6)
    # Equal gradients: (1 + c) v / r, the mean exactly for rescale=2.
    equal = np.tile(flat[:1], (K, 1))
    v = as_float32(flat[0])
    np.testing.assert_allclose(aggregate("cagrad", equal, c=C, rescale=2)[0], v, rtol=1e-5)
    np.testing.assert_allclose(
        aggregate("cagrad", equal, c=C, rescale=1)[0], (1 + C) / (1 + C**2) * v, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"c": -0.1}, ValueError),
        ({"c": float("nan")}, ValueError),
        ({"c": "0.4"}, TypeError),
        ({"rescale": 3}, ValueError),
        ({"rescale": 1.0}, TypeError),
    ],
)
def test_cagrad_rejects_bad_hyperparameters(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        famo_jax.cagrad(**kwargs)
