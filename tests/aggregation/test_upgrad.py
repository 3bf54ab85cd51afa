"""UPGrad against TorchJD 0.18's and LibMTL's, and its projection properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import famo_jax
from famo_jax import aggregation
from tests.aggregation._flat import PROPERTY_SETTINGS, flat_output, from_flat
from tests.aggregation._peer_fixtures import (
    cases_by_num_tasks,
    grams,
    load,
    relative_error,
)


def pref(k):
    values = np.arange(1, k + 1, dtype=np.float64)
    return values / values.sum()


# The fixture's configurations: TorchJD's UPGrad(), UPGrad(pref_vector=...) and
# UPGrad(projector=QuadprogProjector(norm_eps=0, reg_eps=1e-6)).
CONFIGS = {
    "default": lambda k: {},
    "pref": lambda k: {"pref_vector": pref(k)},
    "reg1e-6": lambda k: {"norm_eps": 0.0, "reg_eps": 1e-6},
}


@functools.cache
def batched_weights(config, k, dtype_name):
    del dtype_name  # one compilation per dtype
    kwargs = CONFIGS[config](k)
    return jax.jit(jax.vmap(lambda gram: aggregation.upgrad_weights(gram, **kwargs)))


# float32: the QPs are solved in float32 (TorchJD solves the float32 Gram matrix in
# float64), and their matrices A/tr(A) + reg_eps I have condition numbers up to
# 1 / reg_eps. Errors are measured relative to the size of the terms w_i g_i
# summed into the output (the outputs of the opposite and rank-deficient cases
# cancel to a fraction of their terms): measured 2e-7 with reg_eps = 1e-4.
FLOAT32_TOL = {"default": 1e-5, "pref": 1e-5, "reg1e-6": 1e-4}


def term_scale(weights, matrix):
    """The size of the terms w_i g_i summed into the output (the rounding level's unit)."""
    return float((np.abs(weights) * np.abs(matrix).max(axis=1)).sum())


@pytest.mark.parametrize("config", CONFIGS)
def test_upgrad_matches_torchjd_in_float32(config):
    data = load("upgrad")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights(config, k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            matrix = data[f"{name}/J"].astype(np.float64)
            reference = data[f"{name}/{config}/torchjd_f32_out"]
            scale = term_scale(data[f"{name}/{config}/torchjd_f32_weights"], matrix)
            error = relative_error(w.astype(np.float64) @ matrix, reference, scale)
            assert error <= FLOAT32_TOL[config], (name, error)


@pytest.mark.parametrize("config", CONFIGS)
def test_upgrad_matches_torchjd_in_float64(config):
    data = load("upgrad")
    with jax.enable_x64(True):
        for k, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.float64)
            weights = np.asarray(batched_weights(config, k, "float64")(gram_batch))
            for name, w in zip(names, weights, strict=True):
                reference = data[f"{name}/{config}/torchjd_f64_weights"]
                # Unique weights (A' is positive definite): compared directly.
                assert relative_error(w, reference) <= 1e-8, name
                out = w @ data[f"{name}/J"].astype(np.float64)
                assert relative_error(out, data[f"{name}/{config}/torchjd_f64_out"]) <= 1e-8


def test_libmtl_upgrad_is_torchjds_and_ours():
    data = load("upgrad")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights("default", k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            libmtl = data[f"{name}/default/libmtl_f64_weights"]
            torchjd = data[f"{name}/default/torchjd_f64_weights"]
            np.testing.assert_allclose(libmtl, torchjd, rtol=1e-12, atol=1e-14)
            matrix = data[f"{name}/J"].astype(np.float64)
            scale = term_scale(libmtl, matrix)
            assert relative_error(w @ matrix, libmtl @ matrix, scale) <= 1e-5, name


def test_upgrad_transformation_gives_the_weighted_sum_of_its_weights():
    data = load("upgrad")
    names = [n for n in cases_by_num_tasks(data)[3] if data[f"{n}/J"].shape == (3, 11)]
    tx = famo_jax.upgrad()
    update = jax.jit(jax.vmap(lambda g: tx.update(g, tx.init(None))[0]))
    stacked = np.stack([data[f"{n}/J"] for n in names])  # (cases, 3, 11)
    batched = jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *[from_flat(matrix) for matrix in stacked]
    )
    outs = update(batched)
    for i, name in enumerate(names):
        out = flat_output(jax.tree.map(lambda leaf, i=i: leaf[i], outs))
        reference = data[f"{name}/default/torchjd_f32_out"]
        scale = term_scale(data[f"{name}/default/torchjd_f32_weights"], data[f"{name}/J"])
        assert relative_error(out, reference, scale) <= 1e-5, name


# ---------------------------------------------------------------------------
# Properties of the exact projection (norm_eps = reg_eps = 0).

EXACT = jax.jit(functools.partial(aggregation.upgrad_weights, norm_eps=0.0, reg_eps=0.0))


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 7), conflict=st.floats(0.0, 3.0))
def test_upgrad_conflicts_with_no_task_and_weighs_each_task_at_least_its_preference(
    seed, k, conflict
):
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((k, 6))
    matrix[1:] -= conflict * matrix[0]  # conflicts with task 0
    matrix = np.asarray(matrix, np.float32).astype(np.float64)
    weights = np.asarray(EXACT(jnp.asarray(matrix @ matrix.T, jnp.float32)), np.float64)
    d = weights @ matrix
    norms = np.linalg.norm(matrix, axis=1)
    # <g_j, d> >= 0 up to float32 rounding of the QP.
    assert np.all(matrix @ d >= -1e-4 * norms * np.linalg.norm(d) - 1e-6), matrix @ d
    assert np.all(weights >= 1.0 / k - 1e-6)


def test_upgrad_of_non_conflicting_gradients_is_their_mean():
    matrix = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 2.0]])
    for kwargs in ({}, {"norm_eps": 0.0, "reg_eps": 0.0}):
        weights = aggregation.upgrad_weights(jnp.asarray(matrix @ matrix.T), **kwargs)
        np.testing.assert_allclose(np.asarray(weights), np.full(3, 1 / 3), rtol=1e-6)


def test_upgrad_below_norm_eps_is_the_mean_as_in_torchjd():
    # Squared norms summing to less than 1e-4: TorchJD zeroes the Gram matrix.
    matrix = 1e-3 * np.array([[1.0, 0.0], [-2.0, 1.0]])
    gram = jnp.asarray(matrix @ matrix.T)
    np.testing.assert_allclose(np.asarray(aggregation.upgrad_weights(gram)), [0.5, 0.5])
    projected = np.asarray(aggregation.upgrad_weights(gram, norm_eps=0.0))
    assert projected[1] > 0.5 and projected[0] > 0.5  # both tasks' conflicts resolved


def test_upgrad_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="norm_eps"):
        famo_jax.upgrad(norm_eps=-1.0)
    with pytest.raises(TypeError, match="reg_eps"):
        famo_jax.upgrad(reg_eps="small")
    with pytest.raises(ValueError, match="pref_vector"):
        famo_jax.upgrad(pref_vector=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="pref_vector must be finite"):
        famo_jax.upgrad(pref_vector=[1.0, np.nan])
    tx = famo_jax.upgrad(pref_vector=[0.5, 0.5])
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        tx.update(jnp.ones((3, 4)), tx.init(None))
