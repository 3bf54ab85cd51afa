"""Krum and Multi-Krum against TorchJD 0.18's, and their robustness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation._peer_fixtures import cases_by_num_tasks, grams, load


@functools.cache
def batched_weights(n_byzantine, n_selected, dtype_name):
    del dtype_name  # one compilation per dtype
    return jax.jit(jax.vmap(lambda gram: aggregation.krum_weights(gram, n_byzantine, n_selected)))


def scores(matrix, n_byzantine):
    """Krum's scores in float64 (TorchJD's: Euclidean distances)."""
    k = matrix.shape[0]
    distances = np.linalg.norm(matrix[:, None] - matrix[None], axis=-1)
    return np.sort(distances, axis=1)[:, 1 : k - n_byzantine - 1].sum(axis=1)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_krum_selects_what_torchjd_selects(dtype_name):
    data = load("krum")
    tag = {"float32": "f32", "float64": "f64"}[dtype_name]
    checked = 0
    with jax.enable_x64(dtype_name == "float64"):
        for _, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.dtype(dtype_name))
            configs = sorted({key.split("/")[1] for key in data if key.startswith(f"{names[0]}/f")})
            for config in configs:
                f, s = (int(part[1:]) for part in config.split("_"))
                weights = np.asarray(batched_weights(f, s, dtype_name)(gram_batch))
                for name, w in zip(names, weights, strict=True):
                    reference = data[f"{name}/{config}/torchjd_{tag}_weights"]
                    matrix = data[f"{name}/J"].astype(np.float64)
                    if not np.array_equal(w, reference):
                        # Only a tie between scores may be broken differently.
                        ordered = np.sort(scores(matrix, f))
                        assert np.isclose(ordered[s - 1], ordered[s], rtol=1e-5), (name, config)
                        continue
                    out = data[f"{name}/{config}/torchjd_{tag}_out"]
                    np.testing.assert_allclose(w @ matrix, out, rtol=1e-6, atol=1e-6)
                    checked += 1
    assert checked > 100


def test_krum_ignores_up_to_n_byzantine_outliers():
    rng = np.random.default_rng(0)
    honest = 1.0 + 0.1 * rng.standard_normal((6, 4))
    outliers = np.array([[100.0, -50.0, 0.0, 3.0], [-80.0, 20.0, 10.0, 0.0]])
    matrix = np.concatenate([honest, outliers])
    tx = famo_jax.krum(n_byzantine=2, n_selected=3)
    out, _ = tx.update(jnp.asarray(matrix, jnp.float32), tx.init(None))
    weights = aggregation.krum_weights(jnp.asarray(matrix @ matrix.T, jnp.float32), 2, 3)
    np.testing.assert_array_equal(np.asarray(weights[6:]), 0.0)
    np.testing.assert_allclose(float(jnp.sum(weights)), 1.0)
    assert np.all(np.abs(np.asarray(out) - 1.0) < 0.5)


def test_krum_checks_its_options_and_the_number_of_tasks():
    with pytest.raises(ValueError, match="n_byzantine"):
        famo_jax.krum(n_byzantine=-1)
    with pytest.raises(TypeError, match="n_selected"):
        famo_jax.krum(n_byzantine=0, n_selected=1.5)
    tx = famo_jax.krum(n_byzantine=2)
    with pytest.raises(ValueError, match="needs at least n_byzantine \\+ 3 = 5 tasks"):
        tx.update(jnp.ones((4, 3)), tx.init(None))
    tx = famo_jax.krum(n_byzantine=0, n_selected=4)
    with pytest.raises(ValueError, match="n_selected=4 needs at least 4 tasks"):
        tx.update(jnp.ones((3, 3)), tx.init(None))
