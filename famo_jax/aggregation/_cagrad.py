"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base

_RESCALE_DIVISORS = {0: lambda c: 1.0, 1: lambda c: 1.0 + c**2, 2: lambda c: 1.0 + c}


def _objective_terms(gram: jax.Array, c: float) -> tuple[jax.Array, jax.Array]:
    r"""``(b, cc)`` of CAGrad's dual ``min_w b^T w + cc sqrt(w^T A w + 1e-8)``.

    As in the authors' code: ``b = A 1 / k`` and ``cc = c sqrt(mean(A) + 1e-8)
    + 1e-8``.
    """
    b = jnp.mean(gram, axis=1)
    cc = c * jnp.sqrt(jnp.mean(gram) + 1e-8) + 1e-8
    return b, cc


def _dual_weights(
    gram: jax.Array, c: float, *, max_iters: int = _solvers.IPM_MAX_ITERS
) -> jax.Array:
    r"""The minimiser of CAGrad's dual over the simplex, as in the authors' code.

    .. math::
        \min_{w \in \Delta_k} \; w^\top A \mathbf 1 / k
            + c_c \sqrt{w^\top A w + 10^{-8}}, \qquad
        c_c = c \sqrt{\mathrm{mean}(A) + 10^{-8}} + 10^{-8}.

    The objective is divided by ``s = mean(diag(A))`` before solving (the
    minimiser is unchanged): ``b/s``, ``cc/sqrt(s)`` and ``1e-8/s`` in the square
    root.

    Args:
      gram: the ``(k, k)`` Gram matrix ``A``.
      c: CAGrad's ``c >= 0``.
      max_iters: cap on the interior-point iterations.

    Returns:
      ``(k,)`` weights on the simplex. NaN if ``gram`` is not finite.
    """
    gram, k = _solvers.check_gram(gram)
    if k == 1:
        return _numerics.nan_unless_finite(gram, jnp.ones((1,), gram.dtype))
    safe = _numerics.finite_or_identity(gram)
    b, cc = _objective_terms(safe, c)
    scale = _solvers.unit_scale(safe)
    scaled = safe / scale
    b = b / scale
    cc = cc / jnp.sqrt(scale)
    offset = 1e-8 / scale

    def value(w):
        return jnp.dot(b, w) + cc * jnp.sqrt(jnp.maximum(jnp.dot(w, scaled @ w), 0.0) + offset)

    def value_grad_hessian(w):
        aw = scaled @ w
        root = jnp.sqrt(jnp.maximum(jnp.dot(w, aw), 0.0) + offset)
        grad = b + cc * aw / root
        hess = (cc / root) * (scaled - jnp.outer(aw, aw) / root**2)
        return jnp.dot(b, w) + cc * root, grad, hess

    w = _solvers.simplex_interior_point(value_grad_hessian, value, k, gram.dtype, max_iters)
    return _numerics.nan_unless_finite(gram, w)


def _check_hyperparameters(c: float, rescale: int) -> tuple[float, int]:
    c = _checks.check_nonnegative("c", c)
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Integral):
        raise TypeError(f"rescale must be 0, 1 or 2, got {rescale!r}.")
    if rescale not in _RESCALE_DIVISORS:
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}.")
    return float(c), int(rescale)


def cagrad_weights(gram: jax.Array, c: float = 0.4, rescale: int = 1) -> jax.Array:
    r"""CAGrad's output as weights on the task gradients, from their Gram matrix.

    With :math:`A = G G^\top`, :math:`w^\star` the minimiser of the dual (see
    :func:`cagrad`), :math:`c_c = c\sqrt{\mathrm{mean}(A) + 10^{-8}} + 10^{-8}`
    and :math:`\lambda = c_c / (\|G^\top w^\star\| + 10^{-8})`, the output is
    :math:`\sum_i \beta_i g_i` with :math:`\beta = (\mathbf 1/k + \lambda
    w^\star) / r`, where :math:`r` is 1, :math:`1 + c^2` or :math:`1 + c` for
    ``rescale`` 0, 1 or 2.

    Args:
      gram: ``(k, k)`` Gram matrix of the task gradients.
      c: CAGrad's ``c``.
      rescale: 0, 1 or 2.

    Returns:
      ``(k,)`` weights in the Gram matrix's dtype (at least float32); NaN if the
      Gram matrix is not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import cagrad_weights
      >>> gram = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # two conflicting unit gradients
      >>> w = cagrad_weights(gram, c=0.4)  # symmetric: (1 + c) / (2 (1 + c^2)) each
      >>> [round(x, 4) for x in w.tolist()]
      [0.6034, 0.6034]
    """
    c, rescale = _check_hyperparameters(c, rescale)
    gram, k = _solvers.check_gram(gram)
    w = _dual_weights(gram, c)
    _, cc = _objective_terms(gram, c)
    gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, gram @ w), 0.0))
    lmbda = cc / (gw_norm + 1e-8)
    weights = (1.0 / k + lmbda * w) / _RESCALE_DIVISORS[rescale](c)
    return weights.astype(gram.dtype)


def cagrad(c: float = 0.4, rescale: int = 1) -> optax.GradientTransformationExtraArgs:
    r"""CAGrad: the update that maximises the worst task's improvement near the mean.

    CAGrad looks for the direction :math:`d` that maximises the smallest task
    improvement :math:`\min_i \langle g_i, d\rangle` within a ball around the
    mean gradient :math:`g_0 = \frac1k \sum_i g_i`,
    :math:`\|d - g_0\| \le c\,\|g_0\|`. Its dual is a problem over the simplex,
    solved here in pure JAX by an interior-point method exactly as the authors
    pose it, epsilons included: with :math:`A = G G^\top`,

    .. math::
        w^\star = \arg\min_{w \in \Delta_k} \; w^\top A \mathbf 1 / k
            + c_c \sqrt{w^\top A w + 10^{-8}}, \qquad
        c_c = c \sqrt{\mathrm{mean}(A) + 10^{-8}} + 10^{-8},

    .. math::
        g = \Big(g_0 + \frac{c_c}{\|g_{w^\star}\| + 10^{-8}}\, g_{w^\star}\Big) / r,
        \qquad g_{w} = \sum_i w_i g_i,

    with :math:`r = 1` (``rescale=0``), :math:`1 + c^2` (``rescale=1``, the
    authors' default) or :math:`1 + c` (``rescale=2``). This is the authors'
    ``g`` (their ``cagrad`` function), computed from the Gram matrix so that the
    memory stays that of the input.

    Scale convention: the output is on the scale of the *mean* of the task
    gradients, the authors' ``g``. Their trainers then multiply it by
    :math:`k` (the sum convention) and clip the shared gradient to norm 1; to
    reproduce that, use ``optax.chain(famo_jax.cagrad(), optax.scale(num_tasks),
    optax.clip_by_global_norm(1.0), ...)`` (with :func:`famo_jax.shared_trunk`
    so that only the shared parameters are aggregated and clipped). With
    ``c = 0`` the output is the mean gradient (up to the authors' ``1e-8``
    terms). With equal task gradients :math:`g_i = v` it is
    :math:`(1 + c)\,v / r`: exactly the mean for ``rescale=2``, and
    :math:`(1 + c)/(1 + c^2) \approx 1.21` times the mean for the default
    ``rescale=1`` (the authors' normalisation, kept as is); a single task
    (:math:`k = 1`) behaves the same way.

    Non-finite task gradients: the output is NaN, so that
    ``optax.apply_if_finite`` skips the step; the transformation has no state
    to corrupt.

    Cost: the Gram matrix, :math:`O(k^2 m)` time for :math:`m` parameters and
    :math:`O(k^2)` extra memory, one weighted sum :math:`O(k m)`, and an
    interior-point solve of :math:`O(k^3)` per iteration (5-30 iterations, at most 60).

    Args:
      c: the radius :math:`c \ge 0` of the ball around the mean gradient, in
        units of its norm. ``c = 0`` gives the mean.
      rescale: 0, 1 or 2: how the output is divided, as in the authors' code.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (see
      :func:`famo_jax.aggregation.gram_weighted`) whose ``update(updates, state,
      params=None)`` takes per-task gradients stacked on a leading axis of
      size ``k`` (every leaf ``(k, ...)``) and returns one gradient pytree.
      Its state is ``optax.EmptyState()``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import famo_jax
      >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
      >>> tx = optax.chain(famo_jax.cagrad(c=0.4), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, _ = tx.update(task_grads, tx.init(params), params)
      >>> updates["w"].shape
      (2,)

    References:
      Liu, Liu, Jin, Stone and Liu, *Conflict-Averse Gradient Descent for
      Multi-task Learning*, NeurIPS 2021. https://arxiv.org/abs/2110.14048
      (code: https://github.com/Cranial-XIX/CAGrad)
    """
    c, rescale = _check_hyperparameters(c, rescale)
    return _base.gram_weighted(_base.stateless(lambda gram: cagrad_weights(gram, c, rescale)))
