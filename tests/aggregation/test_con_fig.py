"""ConFIG against TorchJD 0.18's and the authors' ConFIG_update, and its equal-cosine property."""

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

CONFIGS = {"default": lambda k: {}, "pref": lambda k: {"pref_vector": np.arange(1.0, k + 1)}}


@functools.cache
def batched_weights(config, k, dtype_name):
    del dtype_name  # one compilation per dtype
    kwargs = CONFIGS[config](k)
    return jax.jit(jax.vmap(lambda gram: aggregation.con_fig_weights(gram, **kwargs)))


def input_scale(matrix):
    """The sum of the task-gradient norms: the length ConFIG's output can reach."""
    return float(np.linalg.norm(matrix, axis=1).sum())


def pinv_cut_offs_agree(matrix, dtype):
    """Whether TorchJD's and this port's pseudo-inverses keep the same singular values.

    TorchJD's pinv of the unit-gradient matrix drops singular values below
    ``max(k, m) eps sigma_max``; a Gram-based pseudo-inverse cannot resolve those
    below ``sqrt(k eps) sigma_max`` (the Gram matrix squares them), so this port
    drops them. Between the two cut-offs the two differ by design.
    """
    k, m = matrix.shape
    eps = np.finfo(dtype).eps
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    units = np.where(norms > 0, matrix / np.where(norms > 0, norms, 1.0), 0.0)
    singular = np.linalg.svd(units, compute_uv=False)
    ratios = singular / singular[0]
    return not np.any((ratios > max(k, m) * eps) & (ratios < 10 * np.sqrt(k * eps)))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_con_fig_times_k_matches_torchjd(config, dtype_name):
    # TorchJD sums the projections (k times this port's mean). Errors relative to
    # the sum of the gradient norms (outputs cancel on the opposite cases):
    # measured 4e-7 in float32. Left out: (1) where the two pinv cut-offs keep
    # different singular values: in float64, the "parallel" cases (a row 3 times
    # another, rounded to float32, so their unit rows differ by 1e-8, which
    # TorchJD's float64 pinv inverts); (2) two exactly opposite gradients with
    # equal preferences, where the direction is zero up to rounding and the
    # peer's normalisation of that rounding is arbitrary (this port: zero, see
    # the next test).
    data = load("con_fig")
    tag, tol = {"float32": ("f32", 1e-5), "float64": ("f64", 1e-10)}[dtype_name]
    compared = 0
    with jax.enable_x64(dtype_name == "float64"):
        for k, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.dtype(dtype_name))
            weights = np.asarray(batched_weights(config, k, dtype_name)(gram_batch))
            for name, w in zip(names, weights, strict=True):
                matrix = data[f"{name}/J"].astype(np.float64)
                assert np.all(np.isfinite(w)), name
                if not pinv_cut_offs_agree(matrix, np.dtype(dtype_name)) or (
                    name == "k02_opposite" and config == "default"
                ):
                    continue
                compared += 1
                reference = data[f"{name}/{config}/torchjd_{tag}_out"]
                error = relative_error(k * (w @ matrix), reference, input_scale(matrix))
                assert error <= tol, (name, error)
    assert compared >= 29, compared


def test_con_fig_authors_lstsq_and_pinv_agree_with_torchjd_but_on_opposite_gradients():
    # The authors' default torch.linalg.lstsq (gelsy) and their pinv option agree
    # with TorchJD (pinv) except on two exactly opposite gradients, where the
    # least-squares direction is zero up to rounding and its normalisation is
    # arbitrary; this port returns zero there (no direction).
    data = load("con_fig")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights("default", k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            matrix = data[f"{name}/J"].astype(np.float64)
            ours = k * (w @ matrix)
            for peer in ("authors_lstsq", "authors_pinv"):
                reference = data[f"{name}/default/{peer}_f32_out"]
                error = relative_error(ours, reference, input_scale(matrix))
                if name == "k02_opposite":
                    np.testing.assert_array_equal(ours, 0.0)
                else:
                    assert error <= 1e-5, (name, peer, error)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 6))
def test_con_fig_has_equal_cosines_with_every_task_and_conflicts_with_none(seed, k):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((k, 8)) * 10.0 ** rng.uniform(-1, 1, (k, 1))
    matrix[1] -= 1.5 * matrix[0]
    with jax.enable_x64(True):
        weights = np.asarray(aggregation.con_fig_weights(jnp.asarray(matrix @ matrix.T)))
    d = weights @ matrix
    cosines = matrix @ d / np.linalg.norm(matrix, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cosines, cosines[0], rtol=1e-8)
    assert cosines[0] > 0
    # Length: the mean of the projections.
    np.testing.assert_allclose(np.linalg.norm(d), np.mean(matrix @ d) / np.linalg.norm(d))


def test_con_fig_zero_gradient_gets_no_weight_and_options_are_checked():
    matrix = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    weights = aggregation.con_fig_weights(matrix @ matrix.T)
    assert float(weights[1]) == 0.0
    with pytest.raises(ValueError, match="rtol"):
        famo_jax.con_fig(rtol=-1.0)
    out, _ = famo_jax.con_fig().update(jnp.zeros((2, 3)), None)
    np.testing.assert_array_equal(np.asarray(out), np.zeros(3))
