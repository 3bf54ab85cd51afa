"""Penalty-based boundary intersection (PBI, Zhang and Li 2007), the MOEA/D scalarisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from famo_jax import _checks
from famo_jax.weighting import _base


def _norm(vector: jax.Array) -> jax.Array:
    """The Euclidean norm, with gradient zero at the origin.

    ``jnp.sqrt(jnp.sum(v**2))`` has a NaN gradient at ``v = 0``; PyTorch's
    ``torch.norm``, which the reference uses, gives zero there. Like the
    reference's, the squares overflow float32 beyond 1.8e19.
    """
    squares = jnp.sum(vector * vector)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def pbi_scalarization(
    losses: ArrayLike, preference: ArrayLike, theta: ArrayLike = 1.0, ideal: ArrayLike = 0.0
) -> jax.Array:
    r"""The PBI value :math:`c\,(d_1 + \theta d_2)` of :func:`pbi`, with array arguments.

    A pure function of arrays (all may be traced), for preferences that change
    from step to step: LibMOON's ``agg_pbi`` draws a Dirichlet preference for
    every batch, for instance. :func:`pbi` is this function with a fixed
    preference, validated when it is built; here the preference's entries are
    assumed positive.

    Args:
      losses: ``(k,)`` task losses (a floating dtype).
      preference: ``(k,)`` the preference :math:`\lambda` (entries > 0).
      theta: the penalty :math:`\theta \ge 0` (a scalar).
      ideal: the ideal point :math:`z`, a scalar or ``(k,)``.

    Returns:
      The scalar :math:`c\,(d_1 + \theta d_2)`, in the promotion of the
      arguments' dtypes (no invalid-loss masking: see :func:`pbi`).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.weighting import pbi_scalarization
      >>> value = pbi_scalarization(jnp.array([1.0, 3.0]), jnp.array([1.0, 1.0]), theta=0.0)
      >>> round(float(value), 5)  # theta = 0: the mean
      2.0
    """
    losses = jnp.asarray(losses)
    dtype = jnp.result_type(losses, preference, theta, ideal)
    losses = losses.astype(dtype)
    preference = jnp.asarray(preference, dtype)
    length = _norm(preference)
    unit = preference / length
    scale = length / jnp.sum(preference)
    shifted = losses - jnp.asarray(ideal, dtype)
    along = jnp.dot(shifted, unit)
    off = _norm(shifted - along * unit)
    # On the ray the residual is rounding noise whose direction would decide the
    # penalty's gradient: below the rounding level it counts as zero.
    noise = 8 * losses.shape[0] * jnp.finfo(dtype).eps * _norm(shifted)
    off = jnp.where(off > jax.lax.stop_gradient(noise), off, 0.0)
    return scale * (along + jnp.asarray(theta, dtype) * off)


def pbi(
    num_tasks: int,
    preference: ArrayLike | None = None,
    theta: float = 1.0,
    ideal: ArrayLike | None = None,
) -> _base.LossWeighting:
    r"""Penalty-based boundary intersection (PBI): distance along and off a preference ray.

    With a preference :math:`\lambda` (positive, one entry per task), its unit
    vector :math:`u = \lambda / \|\lambda\|_2` and the ideal point :math:`z`,
    PBI measures how far the losses are along the ray :math:`z + t u` and how
    far they are from it:

    .. math::
        d_1 = \langle \ell - z, u\rangle, \qquad
        d_2 = \big\| \ell - z - d_1 u \big\|_2, \qquad
        L(\ell) = c\,(d_1 + \theta\, d_2), \quad
        c = \frac{\|\lambda\|_2}{\|\lambda\|_1},

    so that :math:`\nabla_\ell L = c\,u + \theta c\, r / \|r\|` with
    :math:`r = \ell - z - d_1 u`: the :math:`d_1` term weighs the tasks by
    :math:`\lambda / \sum_i \lambda_i` (for the uniform default, :math:`1/k`:
    the mean scale of :func:`~famo_jax.linear_scalarization`), and the penalty
    pulls the losses onto the ray. **The weights can be negative**: a task whose
    loss is below its share of the ray gets pushed up (with the uniform
    preference and :math:`z = 0`, PBI equalises the losses). It is not Pareto
    compliant (its minimisers need not be Pareto optimal); :math:`\theta = 0`
    is linear scalarisation with weights :math:`\lambda / \sum_i\lambda_i`.
    There is no state; ``update`` returns it unchanged. Losses must be finite
    (any sign is fine). For a preference that changes from step to step, call
    :func:`pbi_scalarization` directly.

    Reference followed: PBI as used for multitask learning in LibMOON (Zhang,
    Lin et al., the STCH authors' group; ``libmoon/util/scalarization.py::pbi``,
    the ``agg_pbi`` solver), which LibMTL and the STCH repository lack.
    Differences from it:

    - the value is multiplied by :math:`c = \|\lambda\|_2/\|\lambda\|_1`
      (:math:`1/\sqrt{k}` for the uniform preference) to be on the mean scale;
      LibMOON's value (and gradient) is :math:`1/c` times this one;
    - the ideal point :math:`z` (default 0) is subtracted as in MOEA/D; LibMOON's
      PyTorch ``pbi`` accepts ``z`` but ignores it (it measures from the origin,
      which is the default here);
    - :math:`\theta` defaults to LibMOON's ``coeff=1``; Zhang and Li's MOEA/D
      uses :math:`\theta = 5` (also LibMOON's PBI indicator);
    - losses beyond about 1e19 overflow float32 in :math:`d_2` (as in the
      reference): the value is then infinite;
    - at :math:`d_2 = 0` the penalty's gradient is zero, as with ``torch.norm``
      in the reference; so it is when :math:`d_2` is below the rounding level
      of the losses, :math:`8 k\,\varepsilon_{\rm mach} \|\ell - z\|` (e.g.
      equal losses on the uniform ray, where the reference's residual is
      rounding noise and its penalty gradient a unit vector of arbitrary
      direction).
      (LibMOON's MOEA/D module ``penalty_boundary_intersection`` uses the
      un-normalised :math:`\lambda` in :math:`d_2`; the gradient solvers use
      :math:`u`, as here.)

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      preference: the preference :math:`\lambda`, a scalar or shape
        ``(num_tasks,)``, entries > 0; default uniform.
      theta: the penalty :math:`\theta \ge 0`.
      ideal: the ideal point :math:`z`, a scalar or shape ``(num_tasks,)``;
        default 0.

    Returns:
      A :class:`~famo_jax.LossWeighting`; ``weigh(losses, state)`` returns a
      scalar in the dtype of ``losses`` (computed in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> weighting = famo_jax.pbi(2, theta=2.0)
      >>> state = weighting.init()
      >>> w = famo_jax.loss_weights(weighting, jnp.array([1.0, 1.0]), state)
      >>> [round(x, 4) for x in w.tolist()]  # on the ray
      [0.5, 0.5]
      >>> w = famo_jax.loss_weights(weighting, jnp.array([1.0, 3.0]), state)
      >>> [round(x, 4) for x in w.tolist()]  # task 0 is below the ray: its loss is pushed up
      [-0.5, 1.5]

    References:
      Zhang and Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on
      Decomposition*, IEEE TEC 2007 (PBI). Zhang, Lin et al., *LibMOON: A
      Gradient-based MultiObjective OptimizatioN Library in PyTorch*, NeurIPS
      2024 Datasets and Benchmarks. Code: https://github.com/xzhang2523/libmoon
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    preference = _checks.check_task_vector(
        "preference", 1.0 if preference is None else preference, num_tasks
    )
    if np.any(preference <= 0):
        raise ValueError(f"preference must be > 0 for every task, got {preference}.")
    theta = _checks.check_nonnegative("theta", theta)
    ideal = _checks.check_task_vector("ideal", 0.0 if ideal is None else ideal, num_tasks)

    def weigh_fn(losses: jax.Array) -> jax.Array:
        return pbi_scalarization(
            losses,
            jnp.asarray(preference, losses.dtype),
            jnp.asarray(theta, losses.dtype),
            jnp.asarray(ideal, losses.dtype),
        )

    return _base.stateless(num_tasks, weigh_fn)
