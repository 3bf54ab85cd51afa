"""Validation shared by every method: hyperparameters in Python, inputs at trace time.

Factories validate their hyperparameters eagerly and raise ``ValueError`` or
``TypeError`` naming the argument. Array inputs are checked on their *static*
properties (shape and dtype) only, because values cannot raise under ``jit``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Returns ``value`` as an int, or raises if it is not an int ``>= minimum``.

    Args:
      name: the argument name used in the message.
      value: the value to check; NumPy integers are accepted, bools are not.
      minimum: the smallest allowed value (1: a positive int, 0: non-negative).
    """
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if minimum == 0:
        expected = "a non-negative int"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}.")
    return int(value)


def check_num_tasks(num_tasks: Any) -> int:
    """Returns ``num_tasks`` as an int, or raises if it is not a positive int."""
    return check_int("num_tasks", num_tasks)


def initial_key(seed: Any, key: jax.Array | None) -> Callable[[], jax.Array]:
    """Validates ``seed`` (unless ``key`` is given) and returns a maker of the first key.

    Every method that draws random numbers keeps a PRNG key in its state, made
    from ``seed`` (a non-negative int) or taken as given. The key is built at
    ``init`` time, not here, so that building a method does not run JAX code.
    """
    if key is not None:
        return lambda: key
    seed = check_int("seed", seed, minimum=0)
    return lambda: jax.random.PRNGKey(seed)


def check_optimizer(
    optimizer: Any, default: Callable[[], optax.GradientTransformation], **ignored: Any
) -> optax.GradientTransformation:
    """Returns ``optimizer``, or ``default()`` when it is None.

    Args:
      optimizer: an ``optax.GradientTransformation`` or None.
      default: builds the method's own optimizer.
      **ignored: the hyperparameters that only configure ``default`` (name ->
        value, None when the user did not pass it); passing any of them with
        an explicit ``optimizer`` is an error, since it would be silently
        ignored.
    """
    if optimizer is None:
        return default()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation or None, "
            f"got {type(optimizer).__name__}."
        )
    given = sorted(name for name, value in ignored.items() if value is not None)
    if given:
        raise ValueError(
            f"{', '.join(given)} only configure{'s' if len(given) == 1 else ''} the default "
            "optimizer and would be ignored with optimizer=...: set them on the optimizer "
            "you pass instead."
        )
    return optimizer


def check_nonnegative(
    name: str, value: Any, *, allow_callable: bool = False, allow_traced: bool = False
) -> Any:
    """Raises unless ``value`` is a finite real number >= 0 (or a schedule).

    With ``allow_traced``, a traced 0-d floating array passes unchecked: what
    ``optax.inject_hyperparams`` gives a factory inside ``jit``, where the value
    cannot be read (it was checked when the hyperparameter was first given).
    """
    if allow_callable and callable(value):
        return value
    if allow_traced and isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0:
        return value
    if np.ndim(value) == 0 and isinstance(value, (np.ndarray, np.generic, jax.Array)):
        # A concrete 0-d array (e.g. jnp.asarray(0.01)) is a number too; a tracer
        # is not, because the factory runs in Python and needs the value.
        if isinstance(value, jax.core.Tracer) or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"{name} must be a concrete number >= 0, got {value!r}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a number >= 0 or an optax schedule" if allow_callable else "a number >= 0"
        raise TypeError(f"{name} must be {expected}, got {value!r}.")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def check_task_vector(name: str, value: Any, num_tasks: int) -> np.ndarray:
    """Returns a hyperparameter given per task (or as a scalar) as a float64 vector."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a number or a sequence of {num_tasks} numbers, got {value!r}."
        ) from err
    if array.ndim == 0:
        array = np.full((num_tasks,), float(array))
    if array.shape != (num_tasks,):
        raise ValueError(
            f"{name} must be a scalar or have shape (num_tasks,) = ({num_tasks},), "
            f"got shape {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array}.")
    return array


def new_min_losses(min_losses: Any, current: jax.Array) -> jax.Array:
    """``min_losses`` (a scalar or ``(num_tasks,)``) in the shape and dtype of ``current``."""
    shape = jnp.shape(current)
    values = jnp.asarray(min_losses)
    if values.ndim > 1 or (values.ndim == 1 and values.shape != shape):
        raise ValueError(
            f"min_losses must be a scalar or have shape (num_tasks,) = {shape}, got shape "
            f"{values.shape}."
        )
    if not jnp.issubdtype(values.dtype, jnp.number):
        raise TypeError(f"min_losses must be numbers, got dtype {values.dtype}.")
    return jnp.broadcast_to(values.astype(current.dtype), shape)


def check_losses(name: str, losses: Any, num_tasks: int) -> jax.Array:
    """Checks the static shape and dtype of a loss vector and returns it as an array.

    One rule for every input: ``losses`` (an array, or a sequence of numbers)
    must have a real floating dtype once converted with ``jnp.asarray``, so a
    Python list of floats is taken and a list of ints is rejected exactly as an
    int32 array is.

    Args:
      name: the argument name used in error messages.
      losses: array-like of task losses.
      num_tasks: the expected length.

    Returns:
      ``losses`` as a ``jax.Array`` of a floating dtype.

    Raises:
      TypeError: if ``losses`` is not an array or its dtype is not a real
        floating dtype.
      ValueError: if the shape is not ``(num_tasks,)``.
    """
    try:
        array = jnp.asarray(losses)
    except TypeError as err:
        raise TypeError(
            f"{name} must be an array of shape (num_tasks,) = ({num_tasks},) with a floating "
            f"dtype, got {type(losses).__name__}."
        ) from err
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or "
            f"float64), got {array.dtype}: compute the losses in floating point, or cast "
            "them with .astype(jnp.float32)."
        )
    if array.shape != (num_tasks,):
        raise ValueError(
            f"{name} must have shape (num_tasks,) = ({num_tasks},), got shape {array.shape}."
        )
    return array
