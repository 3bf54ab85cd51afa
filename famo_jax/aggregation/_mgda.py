"""MGDA: the min-norm point of the task gradients' convex hull (Sener & Koltun, 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from famo_jax import _solvers
from famo_jax.aggregation import _base

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _check_normalization(normalization: str) -> str:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
    return normalization


def mgda_weights(
    gram: jax.Array, normalization: str = "none", losses: jax.Array | None = None
) -> jax.Array:
    r"""MGDA's weights :math:`w \in \Delta_k` from the Gram matrix of the task gradients.

    With normalisers :math:`n_i` (1, :math:`\|g_i\|`, :math:`\ell_i` or
    :math:`\ell_i \|g_i\|`), :math:`w` is the min-norm point's weights of the
    normalised gradients :math:`g_i / n_i`; it is applied to the raw gradients.

    Args:
      gram: ``(k, k)`` Gram matrix.
      normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
      losses: ``(k,)`` task losses, needed by ``"loss"`` and ``"loss+"``.

    Returns:
      ``(k,)`` weights on the simplex (NaN if the Gram matrix is not finite).

    Raises:
      ValueError: for an unknown ``normalization``, or when ``losses`` is
        missing or not of shape ``(k,)`` although ``normalization`` needs it.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import mgda_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 1 and 2
      >>> [round(w, 4) for w in mgda_weights(gram).tolist()]  # min-norm point: 0.8 e1 + 0.2 (2 e2)
      [0.8, 0.2]
    """
    normalization = _check_normalization(normalization)
    gram, k = _solvers.check_gram(gram)
    if normalization in ("loss", "loss+"):
        losses = _base.check_losses_extra_arg(losses, k, f"mgda(normalization={normalization!r})")
    if normalization != "none":
        ones = jnp.ones(gram.shape[0], gram.dtype)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        if normalization == "l2":
            normalizers = norms
        else:
            assert losses is not None  # checked above
            losses = losses.astype(gram.dtype)
            normalizers = losses if normalization == "loss" else losses * norms
        # A zero normaliser would divide a zero gradient (norm) or is an invalid
        # loss; the gradient is then used as it is.
        normalizers = jnp.where(normalizers > 0, normalizers, ones)
        gram = gram / normalizers[:, None] / normalizers[None, :]
    return _solvers.min_norm_weights(gram)


def mgda(normalization: str = "none") -> optax.GradientTransformationExtraArgs:
    r"""MGDA: the min-norm convex combination of the task gradients.

    The multiple-gradient descent algorithm steps along the element of the
    convex hull of the task gradients with the smallest norm,

    .. math::
        d = \sum_i w_i g_i, \qquad
        w = \arg\min_{w \in \Delta_k} \Big\|\sum_i w_i g_i\Big\|^2 ,

    found in pure JAX by an interior-point method on the ``k x k`` Gram matrix
    (see ``famo_jax._solvers``). When the hull does not contain zero,
    :math:`\langle d, g_i\rangle \ge \|d\|^2 > 0` for every task, so no task
    gets worse to first order; when it does, the parameters are
    Pareto-stationary and :math:`d = 0`. Sener & Koltun's ``MinNormSolver``
    (also used by the Nash-MTL and FAMO repositories) starts from the best pair
    of tasks and runs projected-gradient steps until the weights change by less
    than 1e-5, so its weights are approximate; its two-task formula also clamps
    the weight to [0.001, 0.999], where here it can be exactly 0 or 1.

    Normalisation (Sener & Koltun's ``gradient_normalizers``): the weights can
    be computed from normalised gradients :math:`g_i / n_i` with :math:`n_i =
    \|g_i\|` (``"l2"``), the loss :math:`\ell_i` (``"loss"``) or :math:`\ell_i
    \|g_i\|` (``"loss+"``, the setting of their sample configuration); as in
    their code the weights are then applied to the raw gradients. ``"none"``
    (the default here and in the Nash-MTL and FAMO repositories) uses the raw
    gradients. ``"loss"`` and
    ``"loss+"`` need the task losses, passed as ``update(updates, state,
    params, losses=losses)`` (``optax.chain`` forwards keyword arguments). A
    zero normaliser (a zero gradient or loss, where their code divides by zero)
    is replaced by 1.

    Scale convention: :math:`\sum_i w_i = 1`, so the output is on the scale of
    the *mean* of the task gradients (equal task gradients give exactly that
    gradient), as in Sener & Koltun's trainer. The Nash-MTL and FAMO trainers
    multiply the weights by :math:`k` (sum convention):
    ``optax.chain(famo_jax.mgda(), optax.scale(num_tasks))``, and clip the
    shared gradient to norm 1. For ``k = 1`` the output is the task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state to corrupt.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum, and an
    interior-point solve of :math:`O(k^3)` per iteration (5-30 iterations,
    at most 60; Pareto-stationary inputs use the most).

    Args:
      normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates,
      state, params=None, *, losses=None)`` takes per-task gradients stacked on
      a leading axis of size ``k`` and returns one gradient pytree. Its state is
      ``optax.EmptyState()``.

    Raises:
      ValueError: for an unknown ``normalization``; at trace time if
        ``losses`` is missing or not of shape ``(k,)`` when it is needed.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> tx = famo_jax.mgda()
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> jnp.round(d, 4)  # the min-norm point of the segment between e1 and e2
      Array([0.5, 0.5], dtype=float32)

    References:
      Sener and Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
      NeurIPS 2018. https://arxiv.org/abs/1810.04650 (code:
      https://github.com/isl-org/MultiObjectiveOptimization); Désidéri,
      *Multiple-gradient descent algorithm (MGDA) for multiobjective
      optimization*, Comptes Rendus Mathématique 350, 2012.
    """
    normalization = _check_normalization(normalization)

    def weights(gram, state, losses):
        return mgda_weights(gram, normalization, losses), state

    return _base.gram_weighted(_base.GramWeighting(init=optax.EmptyState, weights=weights))
