"""The peers' outputs stored by ``tests/reference/make_breadth_a_fixtures.py``, for replay.

A fixture file holds, for every case ``c``, the float32 task-gradient matrix
``c/J`` (shape ``(k, m)``) and for every configuration ``f`` and peer ``p``
(``torchjd``, ``libmtl``, ``authors``...) in precision ``d`` (``f32``,
``f64``) the arrays ``c/f/p_d_out`` (aggregated vector) and ``c/f/p_d_weights``.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "reference" / "fixtures" / "breadth_a"


@functools.cache
def load(method: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{method}.npz") as data:
        return {key: data[key] for key in data.files}


def cases(data: dict[str, np.ndarray]) -> list[str]:
    return sorted(key[: -len("/J")] for key in data if key.endswith("/J"))


def cases_by_num_tasks(data: dict[str, np.ndarray]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for case in cases(data):
        groups.setdefault(data[f"{case}/J"].shape[0], []).append(case)
    return groups


def grams(data: dict[str, np.ndarray], names: list[str], dtype=jnp.float32) -> jax.Array:
    """The stacked Gram matrices of the cases, computed as famo_jax computes them."""
    from famo_jax import aggregation

    return jnp.stack(
        [aggregation.gram_matrix(jnp.asarray(data[f"{name}/J"], dtype)) for name in names]
    )


def relative_error(ours: np.ndarray, reference: np.ndarray, scale: float | None = None) -> float:
    """``max |ours - reference|`` over ``max |reference|`` (or over ``scale``)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    scale = np.abs(reference).max() if scale is None else scale
    return float(np.abs(ours - reference).max() / max(scale, np.finfo(np.float64).tiny))
