"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from famo_jax import _numerics, _solvers
from famo_jax.aggregation import _base, _preferences

_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: str) -> str:
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}.")
    return scale_mode


def aligned_mtl_weights(
    gram: jax.Array, pref_vector: Any = None, scale_mode: str = "min"
) -> jax.Array:
    r"""Aligned-MTL's weights :math:`B u` from the Gram matrix of the task gradients.

    With the eigendecomposition :math:`A = V \Lambda V^\top` restricted to the
    :math:`r` eigenvalues above :math:`\lambda_{\max} k \varepsilon` (the
    numerical rank, :math:`\varepsilon` the compute dtype's machine epsilon),
    the balance transformation is :math:`B = \sqrt{\sigma}\, V_r
    \Lambda_r^{-1/2} V_r^\top`, with :math:`\sigma` the smallest retained
    eigenvalue (``"min"``), their lower median (``"median"``) or their mean
    (``"rmse"``). If the rank is zero (all gradients zero), :math:`B = I`.

    Args:
      gram: ``(k, k)`` Gram matrix.
      pref_vector: ``(k,)`` preferences :math:`u`, default :math:`1/k`.
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

    Returns:
      ``(k,)`` weights (NaN if the Gram matrix is not finite).

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import aligned_mtl_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 1 and 2
      >>> [round(w, 4) for w in aligned_mtl_weights(gram).tolist()]  # both rescaled to norm 1
      [0.5, 0.25]
    """
    scale_mode = _check_scale_mode(scale_mode)
    gram, k = _solvers.check_gram(gram)
    pref = _preferences.preferences(
        _preferences.check_pref_vector(pref_vector), k, gram.dtype, 1.0 / k
    )
    safe = _numerics.finite_or_identity(gram)
    # eigh's ascending order, reversed: descending, as in the authors' code.
    eigenvalues, vectors = jnp.linalg.eigh(safe)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    tol = eigenvalues[0] * k * jnp.finfo(gram.dtype).eps
    retained = eigenvalues > tol
    rank = jnp.sum(retained)
    last = jnp.maximum(rank - 1, 0)
    if scale_mode == "min":
        scale = eigenvalues[last]
    elif scale_mode == "median":
        # torch.median: the lower of the two middle values of the retained ones.
        scale = eigenvalues[last - last // 2]
    else:
        scale = jnp.sum(jnp.where(retained, eigenvalues, 0.0)) / jnp.maximum(rank, 1)
    inv_roots = jnp.where(retained, 1.0 / jnp.sqrt(jnp.where(retained, eigenvalues, 1.0)), 0.0)
    balance = jnp.sqrt(jnp.maximum(scale, 0.0)) * (vectors * inv_roots) @ vectors.T
    balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=gram.dtype))
    return _numerics.nan_unless_finite(gram, balance @ pref)


def aligned_mtl(
    pref_vector: Any = None, scale_mode: str = "min"
) -> optax.GradientTransformationExtraArgs:
    r"""Aligned-MTL: align the principal components of the task gradients, then sum.

    Aligned-MTL replaces the task gradients :math:`G = J` (rows :math:`g_i`)
    by the closest (in Frobenius norm) matrix whose rows are orthogonal with
    equal norms, rescaled: with the SVD :math:`J = U \Sigma W^\top`, the
    aligned gradients are :math:`\hat J = \sqrt{\sigma}\, U W^\top` (the
    orthogonal Procrustes solution) and the output is :math:`\sum_i u_i \hat
    g_i`. In the Gram matrix's coordinates, :math:`\hat J = B J` with

    .. math::
        A = V \Lambda V^\top, \qquad B = \sqrt{\sigma}\, V \Lambda^{-1/2} V^\top ,

    so the output is :math:`J^\top (B u)` (see
    :func:`famo_jax.aggregation.aligned_mtl_weights`). The condition number of
    the aligned gradients is one; :math:`\sigma` sets their scale: the
    smallest eigenvalue of :math:`A` (``"min"``, the paper's and default), the
    median or the mean (``"rmse"``). Eigenvalues below :math:`\lambda_{\max}
    k \varepsilon` are dropped (the numerical rank), as in the authors' code.

    Matches TorchJD 0.18's ``AlignedMTL`` (``AlignedMTLWeighting``), which is
    adapted from the authors' ``ProcrustesSolver``: the same rank tolerance,
    the same three scale modes (``"median"`` is ``torch.median``'s lower
    median), and the same fallback :math:`B = I` when every gradient is zero
    (where the authors' code fails). Differences from the authors' code
    (SamsungLabs/MTL): they use ``torch.finfo().eps`` of the default dtype
    (float32) whatever the Gram matrix's dtype, TorchJD and this port the
    compute dtype's; and they sum the aligned gradients (weights :math:`B
    \mathbf 1`, sum convention). LibMTL's ``Aligned_MTL`` is the authors' code
    with ``scale_mode="min"`` (and calls ``torch.symeig``, removed from
    PyTorch 2).

    Scale convention: with the default preferences :math:`1/k` the output is
    on the scale of the *mean* of the task gradients (equal task gradients give
    exactly that gradient), as in TorchJD. The authors' and LibMTL's trainers
    use the sum: ``optax.chain(famo_jax.aligned_mtl(), optax.scale(num_tasks))``.
    For ``k = 1`` the output is the task gradient.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step); there is no state.

    Cost: :math:`O(k^2 m)` time and :math:`O(k^2)` extra memory for the Gram
    matrix of :math:`m` parameters, :math:`O(k m)` for the weighted sum and
    one :math:`O(k^3)` symmetric eigendecomposition.

    Args:
      pref_vector: ``(k,)`` preference vector :math:`u` (finite); default
        :math:`1/k` for every task.
      scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of size
      ``k`` (or ``ImplicitTaskGradients``) and returns one gradient pytree;
      state ``optax.EmptyState()``.

    Raises:
      ValueError: for an unknown ``scale_mode``; ValueError or TypeError for a
        malformed ``pref_vector``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> tx = famo_jax.aligned_mtl()
      >>> d, _ = tx.update(task_grads, tx.init(None))
      >>> [round(x, 4) for x in d.tolist()]  # both rescaled to the smallest norm, averaged
      [0.5, 0.5]

    References:
      Senushkin, Patakin, Kuznetsov and Konushin, *Independent Component
      Alignment for Multi-Task Learning*, CVPR 2023.
      https://arxiv.org/abs/2305.19000 (code:
      https://github.com/SamsungLabs/MTL, ``code/optim/aligned/solver.py``)
    """
    pref = _preferences.check_pref_vector(pref_vector)
    scale_mode = _check_scale_mode(scale_mode)
    return _base.gram_weighted(
        _base.stateless(lambda gram: aligned_mtl_weights(gram, pref, scale_mode))
    )
