"""TrimmedMean against TorchJD 0.18's, and its non-finite inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation._peer_fixtures import cases, load


@functools.cache
def jitted(trim_number):
    tx = famo_jax.trimmed_mean(trim_number)
    return jax.jit(lambda grads: tx.update(grads, tx.init(None))[0])


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_trimmed_mean_matches_torchjd(dtype_name):
    data = load("trimmed_mean")
    tag = {"float32": "f32", "float64": "f64"}[dtype_name]
    with jax.enable_x64(dtype_name == "float64"):
        for name in cases(data):
            matrix = data[f"{name}/J"]
            for key in sorted(k for k in data if k.startswith(f"{name}/t") and tag in k):
                trim = int(key.split("/")[1][1:])
                out = np.asarray(jitted(trim)(jnp.asarray(matrix, jnp.dtype(dtype_name))))
                tol = 1e-6 if tag == "f32" else 1e-14
                np.testing.assert_allclose(
                    out, data[key], rtol=tol, atol=tol * np.abs(matrix).max()
                )


def test_trimmed_mean_is_the_median_of_three_and_the_mean_without_trimming():
    grads = {"a": jnp.array([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0]]), "b": jnp.arange(3.0)[:, None]}
    out, _ = famo_jax.trimmed_mean(1).update(grads, None)
    np.testing.assert_array_equal(np.asarray(out["a"]), [2.0, 0.0])
    np.testing.assert_array_equal(np.asarray(out["b"]), [1.0])
    out, _ = famo_jax.trimmed_mean(0).update(grads, None)
    np.testing.assert_allclose(np.asarray(out["a"]), [2.0, 4.0 / 3.0])


def test_trimmed_mean_does_not_trim_a_non_finite_entry_away():
    # TorchJD's sort puts NaN last and trims it: a finite output. Here it is NaN,
    # so optax.apply_if_finite skips the step.
    grads = jnp.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 3.0], [np.inf, 0.0], [2.0, 2.0]])
    out, _ = famo_jax.trimmed_mean(2).update(grads, None)
    assert np.isnan(np.asarray(out)[0]) and np.asarray(out)[1] == 2.0


def test_trimmed_mean_rejects_implicit_gradients_and_bad_options():
    with pytest.raises(ValueError, match="trim_number"):
        famo_jax.trimmed_mean(-1)
    grads = jnp.ones((3, 2))
    implicit = aggregation.ImplicitTaskGradients(
        gram=aggregation.gram_matrix(grads), combine=lambda w: w @ grads
    )
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        famo_jax.trimmed_mean(1).update(implicit, None)
