"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax

from famo_jax import _aggregation, _checks, _solvers

_RESCALE_DIVISORS = {0: lambda c: 1.0, 1: lambda c: 1.0 + c**2, 2: lambda c: 1.0 + c}


def cagrad_combination_weights(gram: jax.Array, c: float, rescale: int = 1) -> jax.Array:
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
    """
    gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
    k = gram.shape[0]
    w = _solvers.cagrad_weights(gram, c)
    _, cc = _solvers.cagrad_objective_terms(gram, c)
    gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, gram @ w), 0.0))
    lmbda = cc / (gw_norm + 1e-8)
    weights = (1.0 / k + lmbda * w) / _RESCALE_DIVISORS[rescale](c)
    return weights.astype(gram.dtype)


def cagrad(c: float = 0.4, rescale: int = 1) -> optax.GradientTransformation:
    r"""CAGrad: the update that maximises the worst task's improvement near the mean.

    CAGrad looks for the direction :math:`d` that maximises the smallest task
    improvement :math:`\min_i \langle g_i, d\rangle` within a ball around the
    mean gradient :math:`g_0 = \frac1k \sum_i g_i`,
    :math:`\|d - g_0\| \le c\,\|g_0\|`. Its dual is a problem over the simplex,
    solved here in pure JAX (see ``famo_jax._solvers``) exactly as the authors
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
      An ``optax.GradientTransformation`` whose ``update(updates, state,
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
    c = _checks.check_nonnegative("c", c)
    if isinstance(rescale, bool) or not isinstance(rescale, numbers.Integral):
        raise TypeError(f"rescale must be 0, 1 or 2, got {rescale!r}.")
    if rescale not in _RESCALE_DIVISORS:
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}.")
    c, rescale = float(c), int(rescale)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        gram = _aggregation.gram_matrix(updates)
        weights = cagrad_combination_weights(gram, c, rescale)
        return _aggregation.combine(updates, weights), state

    return optax.GradientTransformation(init_fn, update_fn)
