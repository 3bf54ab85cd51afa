"""Preference vectors: TorchJD's ``pref_vector`` of UPGrad, DualProj, Aligned-MTL and ConFIG."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_pref_vector(pref_vector: Any) -> np.ndarray | None:
    """Validates a preference vector in Python: None, or a finite 1-D sequence of numbers."""
    if pref_vector is None:
        return None
    try:
        array = np.asarray(pref_vector, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"pref_vector must be None or a sequence of numbers, got {pref_vector!r}."
        ) from err
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(
            f"pref_vector must be a non-empty 1-D sequence (one entry per task), got shape "
            f"{array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"pref_vector must be finite, got {array}.")
    return array


def preferences(pref_vector: np.ndarray | None, num_tasks: int, dtype, default: float) -> jax.Array:
    """The ``(k,)`` preference vector for ``k`` tasks: the given one or ``default`` everywhere.

    Raises:
      ValueError: at trace time, if the given vector's length is not ``k``.
    """
    if pref_vector is None:
        return jnp.full((num_tasks,), default, dtype)
    if pref_vector.shape[0] != num_tasks:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but the task gradients have a "
            f"leading axis of size {num_tasks}."
        )
    return jnp.asarray(pref_vector, dtype)
