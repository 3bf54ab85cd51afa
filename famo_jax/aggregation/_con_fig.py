"""ConFIG: conflict-free training (Liu, Chu & Thuerey, ICLR 2025)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _preferences


def con_fig_weights(
    gram: jax.Array, pref_vector: Any = None, rtol: float | None = None
) -> jax.Array:
    r"""ConFIG's weights (mean convention) from the Gram matrix of the task gradients.

    With unit gradients :math:`\hat g_i = g_i / \|g_i\|` (zero for a zero
    gradient) and their cosine matrix :math:`C = D^{-1} A D^{-1}`, the
    direction :math:`x = \hat J^{+} u` (the pseudo-inverse of the unit-gradient
    matrix applied to the preferences :math:`u`) is :math:`x = J^\top \beta`
    with :math:`\beta = D^{-1} C^{+} u`, and the output :math:`\frac1k
    \big(\sum_i \langle g_i, \hat x\rangle\big) \hat x` has the weights

    .. math::
        w = \frac{\mathbf 1^\top A \beta}{k\, \beta^\top A \beta}\, \beta .

    :math:`C^{+}` drops the eigenvalues of :math:`C` below
    :math:`\mathrm{rtol}^2 \lambda_{\max}(C)` (singular values of :math:`\hat
    J` below :math:`\mathrm{rtol}\, \sigma_{\max}`).

    Args:
      gram: ``(k, k)`` Gram matrix.
      pref_vector: ``(k,)`` preferences :math:`u`, default ones.
      rtol: relative cut-off on the singular values of the unit-gradient
        matrix; default :math:`\sqrt{k \varepsilon}` (see :func:`famo_jax.con_fig`).

    Returns:
      ``(k,)`` weights (zero if every gradient is zero; NaN if the Gram matrix
      is not finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import con_fig_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 1 and 2
      >>> [round(w, 4) for w in con_fig_weights(gram).tolist()]  # x along e1/1 + e2/2
      [0.75, 0.375]
    """
    gram, k = _solvers.check_gram(gram)
    pref = _preferences.preferences(_preferences.check_pref_vector(pref_vector), k, gram.dtype, 1.0)
    eps = jnp.finfo(gram.dtype).eps
    cut_off = jnp.sqrt(k * eps) if rtol is None else float(_checks.check_nonnegative("rtol", rtol))
    safe = _numerics.finite_or_identity(gram)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(safe), 0.0))
    nonzero = norms > 0
    inv_norms = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
    cosines = safe * inv_norms[:, None] * inv_norms[None, :]
    eigenvalues, vectors = jnp.linalg.eigh(0.5 * (cosines + cosines.T))
    kept = eigenvalues > (cut_off**2) * jnp.max(eigenvalues)
    inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
    beta = inv_norms * (vectors @ (inverse * (vectors.T @ pref)))
    gram_beta = safe @ beta
    squared_norm = jnp.dot(beta, gram_beta)  # |x|^2
    # F.normalize's max(|x|, 1e-12): a zero direction (all gradients zero) stays zero.
    usable = squared_norm > 0
    length = jnp.sum(gram_beta) / jnp.where(usable, squared_norm, 1.0)
    weights = jnp.where(usable, length * beta / k, 0.0)
    return _numerics.nan_unless_finite(gram, weights)


def con_fig(
    pref_vector: Any = None, rtol: float | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""ConFIG: the direction with equal (preferred) cosines to every task gradient.

    (Named ``con_fig`` because ``famo_jax.config`` would read as a
    configuration object, like ``jax.config``.)

    ConFIG looks for the direction :math:`x` whose cosine with every unit task
    gradient :math:`\hat g_i = g_i / \|g_i\|` is the same (more generally
    proportional to a preference :math:`u_i`), the minimum-norm solution of
    :math:`\hat J x = u`: :math:`x = \hat J^{+} u`. Its length is the sum of the
    projections of the task gradients on it:

    .. math::
        d = \frac1k \Big(\sum_i \langle g_i, \hat x\rangle\Big) \hat x, \qquad
        \hat x = x / \|x\| .

    When the unit gradients are linearly independent, :math:`\langle
    g_i, d\rangle > 0` for every task (hence "conflict-free"). The
    pseudo-inverse is computed from the cosine matrix, so only the Gram matrix
    is needed (see :func:`famo_jax.aggregation.con_fig_weights`).

    Matches TorchJD 0.18's ``ConFIG`` and the authors' ``ConFIG_update``
    (their ``EqualWeight`` preferences and ``ProjectionLength``), except:

    - Scale: both output the *sum* of the projections, :math:`k` times
      :math:`d`; here the mean (equal task gradients give exactly that
      gradient): ``optax.chain(famo_jax.con_fig(), optax.scale(num_tasks))``
      reproduces theirs.
    - The pseudo-inverse's cut-off. TorchJD's ``torch.linalg.pinv`` (and the
      authors' default ``torch.linalg.lstsq``) treat singular values of
      :math:`\hat J` below :math:`\max(k, m)\, \varepsilon\, \sigma_{\max}` as
      zero, with :math:`m` the number of *parameters*: for a network of
      :math:`10^6` float32 parameters that is 12% of :math:`\sigma_{\max}`, and
      the cut then removes directions that a small model keeps. Here the
      default ``rtol`` is :math:`\sqrt{k\varepsilon}` (what the cosine matrix,
      whose eigenvalues are the squared singular values, resolves in the
      compute dtype: 6e-4 for ``k = 3`` in float32), independent of the model
      size; pass ``rtol=num_params * jnp.finfo(jnp.float32).eps`` to reproduce
      TorchJD's cut on a model of ``num_params`` parameters. Both agree
      whenever no singular value of :math:`\hat J` falls between the two
      cut-offs.

    Scale convention: mean (see above); for ``k = 1`` the output is the task
    gradient, and a zero gradient gets weight zero (the authors'
    ``nan_to_num``).

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum and an
    :math:`O(k^3)` symmetric eigendecomposition.

    Args:
      pref_vector: ``(k,)`` preferences :math:`u` (finite); default ones
        (the authors' ``EqualWeight``).
      rtol: relative cut-off on the singular values of the unit-gradient
        matrix, a number >= 0; default :math:`\sqrt{k\varepsilon}`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` (or ``ImplicitTaskGradients``) and returns one gradient pytree;
      state ``optax.EmptyState()``.

    Raises:
      ValueError, TypeError: for a malformed ``pref_vector`` or ``rtol``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> tx = famo_jax.con_fig()
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # the bisector, length (1 + 3) / sqrt(2) / 2
      [1.0, 1.0]

    References:
      Liu, Chu and Thuerey, *ConFIG: Towards Conflict-free
      Training of Physics Informed Neural Networks*, ICLR 2025.
      https://arxiv.org/abs/2408.11104 (code: https://github.com/tum-pbs/ConFIG)
    """
    pref = _preferences.check_pref_vector(pref_vector)
    if rtol is not None:
        rtol = float(_checks.check_nonnegative("rtol", rtol))
    return _base.gram_weighted(_base.stateless(lambda gram: con_fig_weights(gram, pref, rtol)))
