"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024; TorchJD)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _preferences

NORM_EPS = 1e-4  # TorchJD's QuadprogProjector defaults.
REG_EPS = 1e-4


def upgrad_weights(
    gram: jax.Array,
    pref_vector: Any = None,
    *,
    norm_eps: float = NORM_EPS,
    reg_eps: float = REG_EPS,
) -> jax.Array:
    r"""UPGrad's weights from the Gram matrix of the task gradients.

    With preferences :math:`u` (default :math:`1/k`), each :math:`u_i g_i` is
    projected onto the dual cone of the task gradients; the projection of
    :math:`J^\top (u_i e_i)` is :math:`J^\top v^{(i)}` with :math:`v^{(i)} =
    \arg\min_{v \ge u_i e_i} v^\top A' v`, and the weights are :math:`w =
    \sum_i v^{(i)}`. :math:`A'` is the Gram matrix divided by its trace, with
    ``reg_eps`` added to its diagonal (TorchJD's ``QuadprogProjector``); each
    projection is a non-negative QP solved by an active-set method in pure JAX
    (``famo_jax._solvers.nonnegative_qp``).

    Args:
      gram: ``(k, k)`` Gram matrix.
      pref_vector: ``(k,)`` preferences :math:`u`, default :math:`1/k`.
      norm_eps: if the trace of the Gram matrix (the squared Frobenius norm of
        the task gradients) is below it, :math:`A'` is ``reg_eps`` times the
        identity and the weights are :math:`u`.
      reg_eps: added to the diagonal of the normalised Gram matrix.

    Returns:
      ``(k,)`` weights (NaN if the Gram matrix is not finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import upgrad_weights
      >>> gram = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # unit gradients at 120 degrees
      >>> [round(w, 4) for w in upgrad_weights(gram, reg_eps=0.0).tolist()]  # each projected
      [0.75, 0.75]
    """
    gram, k = _solvers.check_gram(gram)
    pref = _preferences.preferences(
        _preferences.check_pref_vector(pref_vector), k, gram.dtype, 1.0 / k
    )
    norm_eps = float(_checks.check_nonnegative("norm_eps", norm_eps))
    reg_eps = float(_checks.check_nonnegative("reg_eps", reg_eps))
    safe = _numerics.finite_or_identity(gram)
    projected = _solvers.dual_cone_weights(safe, jnp.diag(pref), norm_eps=norm_eps, reg_eps=reg_eps)
    return _numerics.nan_unless_finite(gram, jnp.sum(projected, axis=0))


def upgrad(
    pref_vector: Any = None, *, norm_eps: float = NORM_EPS, reg_eps: float = REG_EPS
) -> optax.GradientTransformationExtraArgs:
    r"""UPGrad: the mean of the task gradients, each projected onto the dual cone of all.

    The dual cone of the task gradients :math:`g_1, \dots, g_k` is the set of
    directions that conflict with none of them, :math:`\{d : \langle g_j,
    d\rangle \ge 0 \ \forall j\}`. UPGrad projects every (preference-weighted)
    task gradient onto it and sums the projections,

    .. math::
        d = \sum_i \pi\big(u_i g_i\big), \qquad
        \pi(J^\top u) = J^\top \arg\min_{v \ge u} v^\top A v ,

    the second identity being Proposition 1 of the paper (:math:`A = J J^\top`
    the Gram matrix), so the weights of :math:`d` come from :math:`k`
    non-negative QPs of size :math:`k` (see
    :func:`famo_jax.aggregation.upgrad_weights`). A projected gradient is the
    gradient itself when it conflicts with no task, so non-conflicting
    gradients give their weighted mean; :math:`d` conflicts with no task, and
    its weights are at least :math:`u`.

    Matches TorchJD 0.18's ``UPGrad`` (``UPGradWeighting`` with the default
    ``QuadprogProjector``): the same normalisation of the Gram matrix by its
    trace, the same ``norm_eps`` and ``reg_eps`` (defaults ``1e-4`` both), the
    same preference vector. TorchJD solves each QP with quadprog (dual active
    set, float64, on the host); here an active-set method runs in the
    gradients' compute dtype inside jit. Differences:

    - ``norm_eps`` is an absolute threshold on the trace of the Gram matrix
      (the sum of the squared task-gradient norms): below it TorchJD replaces
      the Gram matrix by zero, so task gradients whose squared norms add up to
      less than ``1e-4`` are averaged without any projection. This is kept for
      parity; pass ``norm_eps=0`` to project at every scale.
    - ``reg_eps`` perturbs the problem: the output conflicts with task
      :math:`j` by at most :math:`\text{reg\_eps}\,\mathrm{tr}(A)\, v_j` (in
      :math:`\langle g_j, d\rangle`); ``reg_eps=0`` gives the exact projection.
      LibMTL's ``UPGrad`` is a copy of TorchJD's, with the same defaults.

    Scale convention: with the default preferences :math:`1/k` the output is
    on the scale of the *mean* of the task gradients (equal task gradients give
    exactly that gradient), as in TorchJD; LibMTL's trainer uses the same
    weights. For ``k = 1`` the output is the task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum, and
    :math:`k` active-set solves of :math:`O(k^3)` per iteration (about as
    many iterations as there are conflicting tasks; at most :math:`3k + 10`).

    Args:
      pref_vector: ``(k,)`` preference vector :math:`u` (finite); default
        :math:`1/k` for every task (its length is checked against the task
        axis at trace time).
      norm_eps: absolute threshold on the trace of the Gram matrix (see
        above); TorchJD's default ``1e-4``.
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
      >>> task_grads = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # TorchJD's example
      >>> tx = famo_jax.upgrad()
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> [round(x, 3) for x in d.tolist()]  # TorchJD: tensor([0.2929, 1.9004, 1.9004])
      [0.293, 1.9, 1.9]

    References:
      Quinton and Rey, *Jacobian Descent for Multi-Objective Optimization*,
      2024. https://arxiv.org/abs/2406.16232 (code:
      https://github.com/TorchJD/torchjd, ``torchjd.aggregation.UPGrad``).
    """
    pref = _preferences.check_pref_vector(pref_vector)
    norm_eps = float(_checks.check_nonnegative("norm_eps", norm_eps))
    reg_eps = float(_checks.check_nonnegative("reg_eps", reg_eps))
    return _base.gram_weighted(
        _base.stateless(lambda gram: upgrad_weights(gram, pref, norm_eps=norm_eps, reg_eps=reg_eps))
    )
