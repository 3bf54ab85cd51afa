"""Numerical conventions shared by every method: compute dtypes and safe state updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def at_least_float32(dtype: DTypeLike) -> jnp.dtype:
    """The dtype in which a method computes: ``dtype`` promoted to at least float32.

    Reductions over tasks and logarithms lose the small terms in bfloat16 and
    float16; the results are cast back to the input's dtype by the callers.
    """
    return jnp.promote_types(dtype, jnp.float32)


def keep_if_valid(valid: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``valid`` (a scalar bool) holds, else ``old``, leaf by leaf.

    This is how a state update is skipped under ``jit`` without a branch: the
    update is computed, then discarded when its inputs were invalid.
    """
    return jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, old)


def counters_after(valid: jax.Array, num_updates: jax.Array, num_skipped: jax.Array):
    """``(num_updates, num_skipped)`` after an update that was applied iff ``valid``."""
    applied = valid.astype(jnp.int32)
    return num_updates + applied, num_skipped + (1 - applied)


def nan_unless(valid: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` where ``valid`` holds; NaN otherwise, *with a NaN gradient*.

    ``jnp.where(valid, value, nan)`` would give a zero gradient where invalid;
    multiplying by a NaN factor makes the gradient NaN as well, so that a loss
    weighting given invalid losses yields non-finite model gradients, which
    ``optax.apply_if_finite`` skips, instead of a finite, wrong step.
    """
    return value * jnp.where(valid, 1.0, jnp.nan).astype(value.dtype)


def nan_unless_finite(gram: jax.Array, weights: jax.Array) -> jax.Array:
    """NaN weights when the Gram matrix is not finite (a non-finite task gradient).

    The aggregators' outputs are then NaN too, so ``optax.apply_if_finite``
    skips the step instead of applying weights computed from garbage.
    """
    return jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)


def finite_or_identity(gram: jax.Array) -> jax.Array:
    """``gram``, or the identity when it is not finite.

    Solving a harmless problem in place of a non-finite one keeps the solvers'
    loops bounded and NaN out of their iterates; the result is masked
    afterwards by :func:`nan_unless_finite`.
    """
    return jnp.where(jnp.all(jnp.isfinite(gram)), gram, jnp.eye(gram.shape[0], dtype=gram.dtype))


class GuardedStep(NamedTuple):
    """The result of :func:`guarded_optimizer_step`."""

    params: Any
    opt_state: Any
    num_updates: jax.Array
    num_skipped: jax.Array


def guarded_optimizer_step(
    optimizer: Any,
    grads: Any,
    params: Any,
    opt_state: Any,
    inputs_valid: jax.Array,
    num_updates: jax.Array,
    num_skipped: jax.Array,
) -> GuardedStep:
    """One step of an optax optimizer on a method's own parameters, skipped if invalid.

    The step is applied only when ``inputs_valid`` holds and its result is
    finite; otherwise the parameters and the optimizer state are kept, and the
    step is counted in ``num_skipped`` instead of ``num_updates``. This is how
    the learned weightings (FAMO's logits, UW's log-variances, ...) never let an
    invalid loss corrupt their state.
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    valid = inputs_valid & finite
    params, opt_state = keep_if_valid(valid, (new_params, new_opt_state), (params, opt_state))
    return GuardedStep(params, opt_state, *counters_after(valid, num_updates, num_skipped))
