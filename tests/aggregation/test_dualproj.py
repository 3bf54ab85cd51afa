"""DualProj against TorchJD 0.18's, and its projection properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import famo_jax
from famo_jax import aggregation
from tests.aggregation._flat import PROPERTY_SETTINGS
from tests.aggregation._peer_fixtures import cases_by_num_tasks, grams, load, relative_error


def pref(k):
    values = np.arange(1, k + 1, dtype=np.float64)
    return values / values.sum()


CONFIGS = {"default": lambda k: {}, "pref": lambda k: {"pref_vector": pref(k)}}


@functools.cache
def batched_weights(config, k, dtype_name):
    del dtype_name  # one compilation per dtype
    kwargs = CONFIGS[config](k)
    return jax.jit(jax.vmap(lambda gram: aggregation.dualproj_weights(gram, **kwargs)))


@pytest.mark.parametrize("config", CONFIGS)
def test_dualproj_matches_torchjd_in_float32(config):
    # As for UPGrad: float32 QPs whose matrices have condition numbers up to
    # 1 / reg_eps = 1e4; errors relative to the size of the terms summed.
    data = load("dualproj")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights(config, k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            matrix = data[f"{name}/J"].astype(np.float64)
            reference = data[f"{name}/{config}/torchjd_f32_weights"]
            scale = float((np.abs(reference) * np.abs(matrix).max(axis=1)).sum())
            out = w.astype(np.float64) @ matrix
            error = relative_error(out, data[f"{name}/{config}/torchjd_f32_out"], scale)
            assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("config", CONFIGS)
def test_dualproj_matches_torchjd_in_float64(config):
    data = load("dualproj")
    with jax.enable_x64(True):
        for k, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.float64)
            weights = np.asarray(batched_weights(config, k, "float64")(gram_batch))
            for name, w in zip(names, weights, strict=True):
                reference = data[f"{name}/{config}/torchjd_f64_weights"]
                assert relative_error(w, reference) <= 1e-8, name


EXACT = jax.jit(functools.partial(aggregation.dualproj_weights, norm_eps=0.0, reg_eps=0.0))


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 7), conflict=st.floats(0.0, 3.0))
def test_dualproj_is_the_projection_of_the_mean_onto_the_dual_cone(seed, k, conflict):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((k, 6))
    matrix[1:] -= conflict * matrix[0]
    matrix = np.asarray(matrix, np.float32).astype(np.float64)
    weights = np.asarray(EXACT(jnp.asarray(matrix @ matrix.T, jnp.float32)), np.float64)
    d, mean = weights @ matrix, matrix.mean(axis=0)
    scale = np.linalg.norm(matrix, axis=1).max() * (1 + np.abs(weights).sum())
    inner = matrix @ d
    assert np.all(inner >= -1e-5 * scale), inner  # in the cone
    assert np.all(weights >= 1.0 / k - 1e-6)
    # KKT of the projection: d - mean = sum_j mu_j g_j with mu >= 0 and mu_j <g_j, d> = 0.
    mu = weights - 1.0 / k
    np.testing.assert_allclose(mu * inner, 0.0, atol=1e-4 * scale * np.linalg.norm(d) + 1e-6)
    # And no closer point of the cone along the segment to the mean.
    assert np.linalg.norm(d - mean) <= np.linalg.norm(mean - 0.0) + 1e-5 * scale


def test_dualproj_of_a_non_conflicting_mean_is_the_mean():
    matrix = np.array([[1.0, 0.0], [-0.5, 1.0], [0.2, 0.3]])
    weights = aggregation.dualproj_weights(jnp.asarray(matrix @ matrix.T), reg_eps=0.0)
    np.testing.assert_allclose(np.asarray(weights), np.full(3, 1 / 3), rtol=1e-6)


def test_dualproj_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="reg_eps"):
        famo_jax.dualproj(reg_eps=-1e-4)
    with pytest.raises(TypeError, match="pref_vector"):
        famo_jax.dualproj(pref_vector=["a", "b"])
