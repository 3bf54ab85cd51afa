"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`.

    Attributes:
      key: the PRNG key (``(2,)`` uint32 from ``jax.random.PRNGKey``, or a typed
        key if one was given) from which the next update draws its task orders;
        every update replaces it by a fresh key.
    """

    key: jax.Array


def pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
    r"""PCGrad's output as weights on the task gradients, from their Gram matrix.

    Every projected gradient is a linear combination of the task gradients,
    :math:`g_i^{PC} = \sum_j C_{ij} g_j`, and every inner product it needs is
    :math:`\langle g_i^{PC}, g_j\rangle = (C A)_{ij}`, so the projections are
    done on the ``k x k`` coefficients :math:`C` (starting at the identity)
    and the output is :math:`\frac1k \sum_i g_i^{PC} = \sum_j (\frac1k
    \mathbf 1^\top C)_j\, g_j`.

    Args:
      gram: ``(k, k)`` Gram matrix.
      key: PRNG key for the task orders (one random order per task).

    Returns:
      ``(k,)`` weights (NaN if the Gram matrix is not finite).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from famo_jax.aggregation import pcgrad_weights
      >>> gram = jnp.array([[1.0, -1.0], [-1.0, 2.0]])  # g1 = e1, g2 = -e1 + e2
      >>> pcgrad_weights(gram, jax.random.PRNGKey(0))  # ((g1 + g2/2) + (g2 + g1)) / 2
      Array([1.  , 0.75], dtype=float32)
    """
    gram, k = _solvers.check_gram(gram)
    orders = jax.vmap(lambda sub: jax.random.permutation(sub, k))(jax.random.split(key, k))
    tasks = jnp.arange(k)
    squared_norms = jnp.diagonal(gram)

    def project(position, coefficients):
        other = orders[:, position]  # the task that each task projects against now
        inner = jnp.sum(coefficients * gram[other], axis=1)
        denominator = squared_norms[other]
        # A task is never projected on itself; a zero gradient conflicts with nothing.
        conflict = (inner < 0) & (other != tasks) & (denominator > 0)
        step = jnp.where(conflict, inner / jnp.where(conflict, denominator, 1.0), 0.0)
        return coefficients - step[:, None] * jax.nn.one_hot(other, k, dtype=gram.dtype)

    coefficients = jax.lax.fori_loop(0, k, project, jnp.eye(k, dtype=gram.dtype))
    return _numerics.nan_unless_finite(gram, jnp.mean(coefficients, axis=0))


def pcgrad(seed: int = 0, *, key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
    r"""PCGrad: remove from each task gradient its conflicts with the others.

    For every task :math:`i`, in a random order of the other tasks :math:`j`,
    if the current :math:`g_i^{PC}` conflicts with :math:`g_j`
    (:math:`\langle g_i^{PC}, g_j\rangle < 0`) it is projected onto the normal
    plane of :math:`g_j`:

    .. math::
        g_i^{PC} \leftarrow g_i^{PC}
            - \frac{\langle g_i^{PC}, g_j\rangle}{\|g_j\|^2}\, g_j ,

    and the update is the mean :math:`\frac1k \sum_i g_i^{PC}`. The
    projections are carried out on ``k x k`` coefficients from the Gram matrix
    (see :func:`famo_jax.aggregation.pcgrad_weights`), so memory stays that of the input
    and the result equals the vector-space algorithm up to rounding.

    Task order: each task gets its own random order of the others at every
    update (Algorithm 1 of the paper), drawn from a PRNG key kept in the state,
    so a run is reproducible from ``seed`` (or ``key``). Differences from the
    PyTorch port used by the Nash-MTL and FAMO repositories (Tseng's
    ``Pytorch-PCGrad``): that port shuffles with Python's ``random`` and its
    loop also visits :math:`j = i`, projecting :math:`g_i^{PC}` on :math:`g_i`
    when they conflict (which happens only after earlier projections, rarely);
    here, as in the paper, a task is never projected on its own gradient. A
    zero gradient conflicts with nothing.

    Scale convention: the output is on the scale of the *mean* of the task
    gradients (equal task gradients give exactly that gradient). The authors'
    trainers sum the projected gradients (sum convention):
    ``optax.chain(famo_jax.pcgrad(), optax.scale(num_tasks))``; Nash-MTL's and
    FAMO's trainers also clip the shared gradient to norm 1. For ``k = 1`` the
    output is the task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); the key still advances, as on every update.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum, and
    :math:`O(k^3)` for the projections in coefficient space.

    Args:
      seed: seed of the initial PRNG key (a non-negative int); ignored when
        ``key`` is given.
      key: an explicit initial PRNG key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` and returns one gradient pytree; state :class:`PCGradState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> tx = famo_jax.pcgrad(seed=0)
      >>> out, state = tx.update(task_grads, tx.init(None))
      >>> out  # both projected gradients: [0.5, 0.5] and [0, 1]; their mean
      Array([0.25, 0.75], dtype=float32)

    References:
      Yu, Kumar, Gupta, Levine, Hausman and Finn, *Gradient Surgery for
      Multi-Task Learning*, NeurIPS 2020. https://arxiv.org/abs/2001.06782
      (code: https://github.com/tianheyu927/PCGrad)
    """
    first_key = _checks.initial_key(seed, key)

    def weights(gram, state, losses):
        del losses
        next_key, orders_key = jax.random.split(state.key)
        return pcgrad_weights(gram, orders_key), PCGradState(key=next_key)

    return _base.gram_weighted(
        _base.GramWeighting(init=lambda: PCGradState(key=first_key()), weights=weights)
    )
