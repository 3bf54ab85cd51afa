"""IMTL-G against the authors' closed form (FAMO / Nash-MTL repositories)."""

import numpy as np

from tests.aggregation._flat import (
    aggregate,
    as_float32,
    random_flat,
)

# ---------------------------------------------------------------------------
# IMTL-G: the authors' closed form (FAMO / Nash-MTL repositories).


def authors_imtl_g(grads):
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    unit = grads / norms
    d = grads[0] - grads[1:]
    u = unit[0] - unit[1:]
    alpha_ = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
    alpha = np.r_[1 - alpha_.sum(), alpha_]
    return alpha @ grads


def test_imtl_g_equals_the_authors_closed_form():
    for seed in range(4):
        flat = random_flat(seed) * np.array([1.0, 5.0, 0.2, 1.0, 2.0])[:, None]
        grads = as_float32(flat)
        out, _ = aggregate("imtl_g", flat)
        reference = authors_imtl_g(grads)
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
        # Its defining property: equal projections on every task direction.
        projections = grads @ out / np.linalg.norm(grads, axis=1)
        np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_imtl_g_leaves_out_zero_gradients():
    flat = random_flat(7)
    flat[3] = 0.0
    grads = as_float32(flat)
    out, _ = aggregate("imtl_g", flat)
    active = np.delete(grads, 3, axis=0)
    np.testing.assert_allclose(out, authors_imtl_g(active), rtol=1e-4, atol=1e-6)
