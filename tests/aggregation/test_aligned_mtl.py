"""Aligned-MTL against TorchJD 0.18's, LibMTL's and the authors' ProcrustesSolver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation._peer_fixtures import cases_by_num_tasks, grams, load, relative_error


def pref(k):
    values = np.arange(1, k + 1, dtype=np.float64)
    return values / values.sum()


CONFIGS = {
    "min": lambda k: {"scale_mode": "min"},
    "median": lambda k: {"scale_mode": "median"},
    "rmse": lambda k: {"scale_mode": "rmse"},
    "pref": lambda k: {"pref_vector": pref(k)},
}


@functools.cache
def batched_weights(config, k, dtype_name):
    del dtype_name  # one compilation per dtype
    kwargs = CONFIGS[config](k)
    return jax.jit(jax.vmap(lambda gram: aggregation.aligned_mtl_weights(gram, **kwargs)))


def term_scale(weights, matrix, dtype=np.float32, tol=1e-5):
    """The size of the terms w_i g_i summed into the output (the rounding level's unit).

    Floored so that an absolute error of 4 eps of the mean gradient passes at
    ``tol``: the preferences of the opposite case make TorchJD's weights exactly
    zero, and ours zero up to rounding.
    """
    matrix = np.abs(matrix).max(axis=1)
    floor = 4 * np.finfo(dtype).eps * matrix.mean() / tol
    return max(float((np.abs(weights) * matrix).sum()), floor)


def condition_number(matrix):
    """lambda_max / lambda_min of the Gram matrix over its float64 numerical rank."""
    eigenvalues = np.linalg.eigvalsh(matrix @ matrix.T)
    kept = eigenvalues[eigenvalues > eigenvalues.max() * len(matrix) * np.finfo(np.float64).eps]
    return float(kept.max() / kept.min())


# B = sqrt(sigma) A^(-1/2) amplifies the rounding of A by its condition number. The
# badly scaled cases (rows scaled by 10^U(-3, 3)) have condition numbers 4e4 to 6e11:
# in float32 the rank decision (lambda > lambda_max k eps) itself is rounding there,
# and TorchJD's own float32 outputs differ from its float64 ones by 0.8 to 400
# (measured) relative to the terms summed. The float32 comparisons are made where
# eps32 * cond <= 1e-4; the badly scaled cases are compared in float64.
def well_posed_in_float32(matrix):
    return np.finfo(np.float32).eps * condition_number(matrix) <= 1e-4


@pytest.mark.parametrize("config", CONFIGS)
def test_aligned_mtl_matches_torchjd_in_float32(config):
    # Measured: within 3e-6 of TorchJD's outputs, relative to the terms summed, where
    # float32 can decide the rank.
    data = load("aligned_mtl")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights(config, k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            matrix = data[f"{name}/J"].astype(np.float64)
            assert np.all(np.isfinite(w)), name
            if not well_posed_in_float32(matrix):
                continue
            reference = data[f"{name}/{config}/torchjd_f32_weights"]
            out = w.astype(np.float64) @ matrix
            scale = term_scale(reference, matrix)
            error = relative_error(out, data[f"{name}/{config}/torchjd_f32_out"], scale)
            assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("config", CONFIGS)
def test_aligned_mtl_matches_torchjd_in_float64(config):
    data = load("aligned_mtl")
    with jax.enable_x64(True):
        for k, names in cases_by_num_tasks(data).items():
            gram_batch = grams(data, names, jnp.float64)
            weights = np.asarray(batched_weights(config, k, "float64")(gram_batch))
            for name, w in zip(names, weights, strict=True):
                matrix = data[f"{name}/J"].astype(np.float64)
                reference = data[f"{name}/{config}/torchjd_f64_weights"]
                # Measured: at most 0.17 eps64 * cond (2e-6 for k = 20 at cond 6e11).
                tol = max(1e-9, np.finfo(np.float64).eps * condition_number(matrix))
                scale = term_scale(reference, matrix, np.float64, tol)
                error = relative_error(w @ matrix, reference @ matrix, scale)
                assert error <= tol, (name, error, tol)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_times_k_is_the_authors_sum_in_float32(mode):
    # The authors' ProcrustesSolver (SamsungLabs/MTL) and LibMTL sum the aligned
    # gradients. In float64 they differ from TorchJD and this port on the badly
    # scaled cases: their rank tolerance uses float32's epsilon in every dtype.
    data = load("aligned_mtl")
    for k, names in cases_by_num_tasks(data).items():
        weights = np.asarray(batched_weights(mode, k, "float32")(grams(data, names)))
        for name, w in zip(names, weights, strict=True):
            matrix = data[f"{name}/J"].astype(np.float64)
            if not well_posed_in_float32(matrix):
                continue
            authors = data[f"{name}/{mode}/authors_f32_out"]
            scale = term_scale(data[f"{name}/{mode}/authors_f32_weights"], matrix)
            assert relative_error(k * (w @ matrix), authors, scale) <= 1e-5, name
            if mode == "min":
                libmtl = data[f"{name}/min/libmtl_f32_weights"]
                assert relative_error(k * w, libmtl) <= 1e-4, name


def test_aligned_mtl_aligns_the_gradients():
    # B J has orthogonal rows of equal norm sqrt(sigma): the condition number is one.
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4, 9)) * np.array([[0.1], [1.0], [3.0], [10.0]])
    gram = matrix @ matrix.T
    eigenvalues = np.linalg.eigvalsh(gram)
    for mode, sigma in [("min", eigenvalues[0]), ("rmse", eigenvalues.mean())]:
        with jax.enable_x64(True):
            columns = [
                np.asarray(aggregation.aligned_mtl_weights(jnp.asarray(gram), e, mode))
                for e in np.eye(4)
            ]
        balance = np.stack(columns, axis=1)  # B, column by column
        aligned = balance @ matrix
        np.testing.assert_allclose(aligned @ aligned.T, sigma * np.eye(4), atol=1e-9 * sigma)


def test_aligned_mtl_of_zero_gradients_is_zero_and_rejects_bad_modes():
    tx = famo_jax.aligned_mtl()
    out, _ = tx.update(jnp.zeros((3, 4)), tx.init(None))
    np.testing.assert_array_equal(np.asarray(out), np.zeros(4))
    with pytest.raises(ValueError, match="scale_mode"):
        famo_jax.aligned_mtl(scale_mode="max")
