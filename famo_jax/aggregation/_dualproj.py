"""DualProj: the mean gradient projected onto the dual cone of the task gradients (TorchJD)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _preferences
from famo_jax.aggregation._upgrad import NORM_EPS, REG_EPS


def dualproj_weights(
    gram: jax.Array,
    pref_vector: Any = None,
    *,
    norm_eps: float = NORM_EPS,
    reg_eps: float = REG_EPS,
) -> jax.Array:
    r"""DualProj's weights :math:`v = \arg\min_{v \ge u} v^\top A' v` from the Gram matrix.

    :math:`J^\top v` is the projection of :math:`J^\top u` (default :math:`u =
    1/k`: the mean gradient) onto the dual cone of the task gradients;
    :math:`A'` is the Gram matrix divided by its trace with ``reg_eps`` added to
    its diagonal, as in TorchJD (see :func:`famo_jax.aggregation.upgrad_weights`
    for ``norm_eps`` and ``reg_eps``).

    Args:
      gram: ``(k, k)`` Gram matrix.
      pref_vector: ``(k,)`` preferences :math:`u`, default :math:`1/k`.
      norm_eps: traces below it leave :math:`u` unprojected.
      reg_eps: added to the diagonal of the normalised Gram matrix.

    Returns:
      ``(k,)`` weights, at least :math:`u` (NaN if the Gram matrix is not
      finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import dualproj_weights
      >>> gram = jnp.array([[1.0, -0.8], [-0.8, 1.0]])  # their mean conflicts with neither
      >>> [round(w, 4) for w in dualproj_weights(gram, reg_eps=0.0).tolist()]
      [0.5, 0.5]
      >>> gram = jnp.array([[1.0, -2.0], [-2.0, 9.0]])  # the mean conflicts with task 1
      >>> [round(w, 4) for w in dualproj_weights(gram, reg_eps=0.0).tolist()]
      [1.0, 0.5]
    """
    gram, k = _solvers.check_gram(gram)
    pref = _preferences.preferences(
        _preferences.check_pref_vector(pref_vector), k, gram.dtype, 1.0 / k
    )
    norm_eps = float(_checks.check_nonnegative("norm_eps", norm_eps))
    reg_eps = float(_checks.check_nonnegative("reg_eps", reg_eps))
    safe = _numerics.finite_or_identity(gram)
    weights = _solvers.dual_cone_weights(safe, pref, norm_eps=norm_eps, reg_eps=reg_eps)
    return _numerics.nan_unless_finite(gram, weights)


def dualproj(
    pref_vector: Any = None, *, norm_eps: float = NORM_EPS, reg_eps: float = REG_EPS
) -> optax.GradientTransformationExtraArgs:
    r"""DualProj: the mean of the task gradients, projected onto their dual cone.

    The projection of the (preference-weighted) mean gradient onto the set of
    directions that conflict with no task, :math:`\{d : \langle g_j, d\rangle
    \ge 0 \ \forall j\}`:

    .. math::
        d = \pi\Big(\sum_i u_i g_i\Big) = J^\top v, \qquad
        v = \arg\min_{v \ge u} v^\top A v ,

    one non-negative QP of size :math:`k` on the Gram matrix :math:`A` (see
    :func:`famo_jax.aggregation.dualproj_weights`). This is the projection of
    Equation 11 of GEM (Lopez-Paz & Ranzato, 2017), which projects one
    gradient onto the dual cone of the others'. When the mean conflicts with
    no task it is returned unchanged.

    Matches TorchJD 0.18's ``DualProj`` with its default ``QuadprogProjector``:
    the Gram matrix divided by its trace (zero below ``norm_eps``), ``reg_eps``
    on its diagonal, defaults ``1e-4`` both. As for
    :func:`famo_jax.upgrad`, ``norm_eps`` is an absolute threshold on the sum
    of the squared task-gradient norms (below it the mean is returned without
    projection; ``norm_eps=0`` turns this off) and ``reg_eps`` lets the output
    conflict with task :math:`j` by at most :math:`\text{reg\_eps}\,
    \mathrm{tr}(A)\, v_j` (``reg_eps=0``: the exact projection). TorchJD solves
    the QP with quadprog in float64 on the host; here an active-set method
    runs in the compute dtype inside jit.

    Scale convention: with the default preferences :math:`1/k` the output is
    on the scale of the *mean* of the task gradients (equal task gradients give
    exactly that gradient), as in TorchJD. For ``k = 1`` the output is the
    task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum, and
    one active-set solve, :math:`O(k^3)` per iteration (at most :math:`3k + 10`).

    Args:
      pref_vector: ``(k,)`` preference vector :math:`u` (finite); default
        :math:`1/k` for every task.
      norm_eps: absolute threshold on the trace of the Gram matrix; TorchJD's
        default ``1e-4``.
      reg_eps: ridge added to the trace-normalised Gram matrix; TorchJD's
        default ``1e-4``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` (or ``ImplicitTaskGradients``) and returns one gradient pytree;
      state ``optax.EmptyState()``.

    Raises:
      ValueError, TypeError: for a malformed ``pref_vector`` or a negative or
        non-finite ``norm_eps`` or ``reg_eps``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 1.0], [-4.0, 1.0]])  # the mean conflicts with g1
      >>> tx = famo_jax.dualproj(reg_eps=0.0)
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # 0.75 g1 + 0.5 g2, orthogonal to g1
      [-1.25, 1.25]

    References:
      Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*,
      2024. https://arxiv.org/abs/2406.16232 (code:
      https://github.com/TorchJD/torchjd, ``torchjd.aggregation.DualProj``);
      Lopez-Paz and Ranzato, *Gradient Episodic Memory for Continual
      Learning*, NeurIPS 2017. https://arxiv.org/abs/1706.08840
    """
    pref = _preferences.check_pref_vector(pref_vector)
    norm_eps = float(_checks.check_nonnegative("norm_eps", norm_eps))
    reg_eps = float(_checks.check_nonnegative("reg_eps", reg_eps))
    return _base.gram_weighted(
        _base.stateless(
            lambda gram: dualproj_weights(gram, pref, norm_eps=norm_eps, reg_eps=reg_eps)
        )
    )
