"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base


class GradDropState(NamedTuple):
    """State of :func:`graddrop`.

    Attributes:
      key: the PRNG key (``(2,)`` uint32 from ``jax.random.PRNGKey``, or a typed
        key if one was given) from which the next update draws its uniform
        thresholds; every update replaces it by a fresh key.
    """

    key: jax.Array


def graddrop(
    leak: float | tuple[float, ...] = 0.0, seed: int = 0, *, key: jax.Array | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""GradDrop: keep, entry by entry, only the gradients of one randomly chosen sign.

    For every parameter entry, the positive sign purity of the task gradients

    .. math::
        P = \tfrac12 \Big(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Big) \in [0, 1]

    is compared with a uniform draw :math:`U`: if :math:`P > U` only the
    positive task gradients are kept (:math:`M_i = [g_i > 0]`), if :math:`P <
    U` only the negative ones (:math:`M_i = [g_i < 0]`). With leak parameters
    :math:`\ell_i \in [0, 1]` the output is

    .. math::
        \frac1k \sum_i \big(\ell_i + (1 - \ell_i) M_i\big) \odot g_i .

    As in the Nash-MTL and FAMO repositories (used for the FAMO paper's tables),
    GradDrop acts on the parameter gradients; the paper applies it to the
    gradients w.r.t. a shared activation, with :math:`P` summed over the batch,
    which an aggregator over parameter gradients cannot see. Deviations: the
    authors' port divides by :math:`\sum_i |g_i| + 10^{-8}`, which makes
    :math:`P` depend on the gradients' scale (entries below ~1e-8 are dropped at
    random even when all tasks agree); here the division is exact (an entry
    where every gradient is zero gets :math:`P = 1/2` and stays zero), and
    :math:`U` is drawn from :math:`(0, 1)` so that entries where all tasks
    agree are always kept. Leaks are the paper's (the ports have none).

    Scale convention: the output is on the scale of the *mean* of the task
    gradients (equal task gradients give exactly that gradient). The authors'
    port multiplies it by :math:`k` (sum convention):
    ``optax.chain(famo_jax.graddrop(), optax.scale(num_tasks))``; their trainer
    also clips the shared gradient to norm 1. For ``k = 1`` the output is the
    task gradient.

    Non-finite task gradients: the affected entries of the output are NaN, so
    ``optax.apply_if_finite`` skips the step; the key advances on every update.

    Cost: element-wise, :math:`O(k m)` time and :math:`O(m)` extra memory (the
    uniform draws) for :math:`m` parameters; no Gram matrix.

    Args:
      leak: the leak :math:`\ell` in :math:`[0, 1]`, one number for every task
        or a sequence of one per task (its length must then match the task
        axis). 0 (default) is pure GradDrop, 1 the plain mean.
      seed: seed of the initial PRNG key (a non-negative int); ignored when
        ``key`` is given.
      key: an explicit initial PRNG key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` and returns one gradient pytree; state :class:`GradDropState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]])
      >>> tx = famo_jax.graddrop(seed=0)
      >>> out, state = tx.update(task_grads, tx.init(None))
      >>> out[0], out[2]  # the tasks agree on entries 0 and 2: their mean
      (Array(2., dtype=float32), Array(-1., dtype=float32))
      >>> bool(out[1] == 1.0) or bool(out[1] == -1.0)  # one sign survives
      True

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, *Just Pick a
      Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
      NeurIPS 2020. https://arxiv.org/abs/2010.06808
    """
    try:
        leaks = np.asarray(leak, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"leak must be a number or a sequence of numbers, got {leak!r}.") from err
    if leaks.ndim > 1:
        raise ValueError(f"leak must be a scalar or a 1-D sequence, got shape {leaks.shape}.")
    if not np.all(np.isfinite(leaks)) or np.any(leaks < 0) or np.any(leaks > 1):
        raise ValueError(f"leak must lie in [0, 1], got {leak!r}.")
    first_key = _checks.initial_key(seed, key)

    def init_fn(params):
        del params
        return GradDropState(key=first_key())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if isinstance(updates, _base.ImplicitTaskGradients):
            raise TypeError(
                "graddrop needs every task gradient entry by entry; it cannot take "
                "ImplicitTaskGradients (use task_gradients for it)."
            )
        k = _base.num_tasks_of(updates)
        if leaks.ndim == 1 and leaks.shape[0] != k:
            raise ValueError(
                f"leak has {leaks.shape[0]} entries but the task gradients have a leading "
                f"axis of size {k}."
            )
        next_key, draw_key = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        leaf_keys = jax.random.split(draw_key, len(leaves))

        def drop(leaf, leaf_key):
            dtype = _numerics.at_least_float32(leaf.dtype)
            grads = leaf.astype(dtype)
            total = jnp.sum(grads, axis=0)
            magnitude = jnp.sum(jnp.abs(grads), axis=0)
            purity = 0.5 * (1.0 + total / jnp.where(magnitude > 0, magnitude, 1.0))
            # U in (0, 1): purity 1 (all positive) and 0 (all negative) always keep.
            uniform = jax.random.uniform(
                leaf_key, purity.shape, dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0
            )
            keep = jnp.where(purity > uniform, grads > 0, grads < 0) & (purity != uniform)
            task_leaks = jnp.asarray(leaks, dtype).reshape((-1,) + (1,) * (grads.ndim - 1))
            factors = task_leaks + (1.0 - task_leaks) * keep.astype(dtype)
            out = jnp.mean(factors * grads, axis=0)
            # A dropped non-finite entry would vanish (XLA may turn the product
            # with a 0/1 mask into a select); make the entry non-finite instead.
            out = jnp.where(jnp.isfinite(magnitude), out, jnp.nan)
            return out.astype(leaf.dtype)

        out = [drop(leaf, leaf_key) for leaf, leaf_key in zip(leaves, leaf_keys, strict=True)]
        return jax.tree.unflatten(treedef, out), GradDropState(key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
