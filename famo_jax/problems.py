r"""Test problems for multitask optimizers: the two-task toy of the FAMO paper.

The toy problem (Appendix D of the FAMO paper; the code comes from Nash-MTL,
after CAGrad) has parameters :math:`\theta = (\theta_1, \theta_2) \in
\mathbb{R}^2` and two task losses whose scales differ by a factor of ten. Its
Pareto front is a curve at :math:`\theta_2 \in [-8.44, -8.35]`,
:math:`\theta_1 \in [-7, 7]`; Adam on the sum of the losses can stall in the
valley of the upper half-plane before reaching it.

This module gives the losses exactly as the authors' code computes them
(including the gradients at the clamps, which matter at the start ``(0, 0)``),
the starting points of the authors' script, the exact Pareto front, and the
Pareto-stationarity residual used to decide whether a run reached the front.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "TOY_LOWER",
    "TOY_MIN_LOSSES",
    "TOY_PAPER_STARTS",
    "TOY_SCALE",
    "TOY_STARTS",
    "pareto_stationarity_residual",
    "toy_losses",
    "toy_pareto_front",
    "toy_pareto_residual",
]

TOY_LOWER = 5e-6
"""The lower clamp inside the logs of the toy losses (``LOWER`` in the authors' code)."""

TOY_SCALE = 0.1
"""The factor on the first toy loss (``--scale`` in the authors' toy script)."""

TOY_STARTS = np.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]])
"""The five starting points of the authors' toy script, shape ``(5, 2)``.

The paper's text lists slightly different points; see :data:`TOY_PAPER_STARTS`.
"""

TOY_PAPER_STARTS = np.array([[-8.5, 7.5], [-8.5, 5.0], [0.0, 0.0], [9.0, 9.0], [10.0, -8.0]])
"""The five starting points listed in Section 5.1 of the paper, shape ``(5, 2)``."""

TOY_MIN_LOSSES = (-2.1, -21.0)
"""The ``min_losses`` that the authors pass to FAMO on the toy, ``(-21 * TOY_SCALE, -21)``.

They are strict lower bounds: the losses are bounded below by ``-2.0`` and
``-20.0``.
"""


def _clamp_below(x: jax.Array, lower: float) -> jax.Array:
    # torch.clamp(x, min=lower): its gradient is 1 where x >= lower (ties
    # included) and 0 below. jnp.maximum would split the gradient 1/2-1/2 at a
    # tie, which changes the first step from the start (0, 0), where
    # tanh(theta_2 / 2) is exactly 0.
    return jnp.where(x >= lower, x, lower)


@jax.jit
def toy_losses(theta: ArrayLike) -> jax.Array:
    r"""The two task losses of the FAMO toy problem (paper Appendix D).

    .. math::
        L_1(\theta) &= 0.1\,\big(c_1(\theta) f_1(\theta) + c_2(\theta) g_1(\theta)\big),
        \qquad L_2(\theta) = c_1(\theta) f_2(\theta) + c_2(\theta) g_2(\theta),\\
        f_1 &= \log\max\big(|0.5(-\theta_1 - 7) - \tanh(-\theta_2)|,\ 5\cdot10^{-6}\big) + 6,\\
        f_2 &= \log\max\big(|0.5(-\theta_1 + 3) + \tanh(-\theta_2) + 2|,\ 5\cdot10^{-6}\big) + 6,\\
        g_1 &= \big((-\theta_1 + 7)^2 + 0.1(-\theta_2 - 8)^2\big)/10 - 20,\\
        g_2 &= \big((-\theta_1 - 7)^2 + 0.1(-\theta_2 - 8)^2\big)/10 - 20,\\
        c_1 &= \max(\tanh(0.5\,\theta_2), 0), \qquad c_2 = \max(\tanh(-0.5\,\theta_2), 0).

    The ``max`` is applied to the absolute value (inside the log), as in the
    authors' code. Gradients follow PyTorch's ``clamp`` and ``abs``: the clamp
    passes the gradient where its input is at or above the bound, ``|x|`` has
    gradient 0 at 0.

    Args:
      theta: parameters, shape ``(..., 2)`` (any leading batch shape), floating.

    Returns:
      The losses :math:`(L_1, L_2)`, shape ``(..., 2)``, in the dtype of
      ``theta`` (at least float32 for integer inputs).

    Raises:
      ValueError: if the last axis of ``theta`` does not have size 2.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.problems import toy_losses
      >>> toy_losses(jnp.array([0.0, -8.0]))  # on the Pareto front's side
      Array([ -1.5089872, -15.089871 ], dtype=float32)

    References:
      Liu, Feng, Stone and Liu, *FAMO: Fast Adaptive Multitask Optimization*,
      NeurIPS 2023, Appendix D. https://arxiv.org/abs/2306.03792 ; Navon et al.,
      *Multi-Task Learning as a Bargaining Game*, ICML 2022 (the problem's code).
    """
    theta = jnp.asarray(theta)
    if not jnp.issubdtype(theta.dtype, jnp.floating):
        theta = theta.astype(jnp.result_type(float))
    if theta.ndim < 1 or theta.shape[-1] != 2:
        raise ValueError(f"theta must have shape (..., 2), got shape {theta.shape}.")
    x1, x2 = theta[..., 0], theta[..., 1]
    f1 = jnp.log(_clamp_below(jnp.abs(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)), TOY_LOWER)) + 6.0
    f2 = jnp.log(_clamp_below(jnp.abs(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0), TOY_LOWER)) + 6.0
    c1 = _clamp_below(jnp.tanh(0.5 * x2), 0.0)
    g1 = ((-x1 + 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    g2 = ((-x1 - 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    c2 = _clamp_below(jnp.tanh(-0.5 * x2), 0.0)
    loss1 = TOY_SCALE * (f1 * c1 + g1 * c2)
    loss2 = f2 * c1 + g2 * c2
    return jnp.stack([loss1, loss2], axis=-1)


@jax.jit
def pareto_stationarity_residual(task_grads: ArrayLike) -> jax.Array:
    r"""Norm of the min-norm convex combination of two task gradients.

    .. math::
        r = \min_{w \in [0, 1]} \|w\, g_1 + (1 - w)\, g_2\|, \qquad
        w^\star = \mathrm{clip}\Big(\frac{(g_2 - g_1)^\top g_2}{\|g_1 - g_2\|^2}, 0, 1\Big).

    A point is Pareto stationary (no direction decreases both losses) exactly
    when :math:`r = 0`; MGDA's update is this combination.

    Args:
      task_grads: shape ``(..., 2, d)``: the two task gradients (task axis
        second to last, as ``jax.jacrev`` of a vector of two losses gives).

    Returns:
      :math:`r`, shape ``(...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.problems import pareto_stationarity_residual
      >>> pareto_stationarity_residual(jnp.array([[1.0, 0.0], [-1.0, 0.0]]))
      Array(0., dtype=float32)
      >>> pareto_stationarity_residual(jnp.array([[1.0, 0.0], [0.0, 1.0]]))
      Array(0.70710677, dtype=float32)
    """
    task_grads = jnp.asarray(task_grads)
    if task_grads.ndim < 2 or task_grads.shape[-2] != 2:
        raise ValueError(f"task_grads must have shape (..., 2, d), got shape {task_grads.shape}.")
    g1, g2 = task_grads[..., 0, :], task_grads[..., 1, :]
    diff = g1 - g2
    diff_sq = jnp.sum(diff * diff, axis=-1)
    # Equal gradients: every w gives the same point; the guard avoids 0/0.
    w = jnp.clip(-jnp.sum(diff * g2, axis=-1) / jnp.where(diff_sq > 0, diff_sq, 1.0), 0.0, 1.0)
    combination = w[..., None] * g1 + (1.0 - w[..., None]) * g2
    return jnp.linalg.norm(combination, axis=-1)


@jax.jit
def toy_pareto_residual(theta: ArrayLike) -> jax.Array:
    """:func:`pareto_stationarity_residual` of the toy losses at ``theta``.

    Args:
      theta: shape ``(..., 2)``.

    Returns:
      Shape ``(...)``: 0 on the Pareto front; grows with the distance to it.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.problems import toy_pareto_residual
      >>> bool(toy_pareto_residual(jnp.array([0.0, 5.0])) > 0.01)  # upper valley
      True
    """
    theta = jnp.asarray(theta)
    jac = jnp.vectorize(jax.jacrev(toy_losses), signature="(n)->(k,n)")
    return pareto_stationarity_residual(jac(theta))


def toy_pareto_front(num_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    r"""The exact Pareto front of the toy problem, in parameters and in losses.

    On the lower half-plane :math:`c_1 = 0` and, with :math:`s = \tanh(-\theta_2/2)`,
    :math:`q = 0.01(\theta_2 + 8)^2`, :math:`A_1 = (\theta_1 - 7)^2/10 - 20`,
    :math:`A_2 = (\theta_1 + 7)^2/10 - 20`, the losses are
    :math:`L_1 = 0.1\,s\,(A_1 + q)` and :math:`L_2 = s\,(A_2 + q)`. Cancelling
    the :math:`\theta_1` components of the two gradients needs
    :math:`\theta_1 \in [-7, 7]` and fixes the mixing weight
    :math:`a = (\theta_1 + 7)/14`; the :math:`\theta_2` component then vanishes
    where

    .. math::
        s'(\theta_2)\,\big(a A_1 + (1 - a) A_2 + q\big) + s\,q' = 0,

    solved here by bisection on :math:`\theta_2 \in [-9, -8]` in float64. The
    curve is close to (not exactly on) the line :math:`\theta_2 = -8.3552` that
    the authors plot.

    Args:
      num_points: points along :math:`\theta_1 \in [-7, 7]` (at least 2).

    Returns:
      ``(thetas, losses)``: float64 NumPy arrays of shape ``(num_points, 2)``,
      the Pareto-optimal parameters and their losses :math:`(L_1, L_2)`.

    Example:
      >>> from famo_jax.problems import toy_pareto_front
      >>> thetas, losses = toy_pareto_front(3)
      >>> thetas.round(4).tolist()
      [[-7.0, -8.4345], [0.0, -8.3551], [7.0, -8.4345]]
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}.")
    x1 = np.linspace(-7.0, 7.0, num_points)
    a = (x1 + 7.0) / 14.0
    mixed_a = a * ((x1 - 7.0) ** 2 / 10.0 - 20.0) + (1.0 - a) * ((x1 + 7.0) ** 2 / 10.0 - 20.0)

    def stationarity(x2):
        s = np.tanh(-0.5 * x2)
        ds = -0.5 * (1.0 - s**2)
        q = 0.01 * (x2 + 8.0) ** 2
        dq = 0.02 * (x2 + 8.0)
        return ds * (mixed_a + q) + s * dq

    # stationarity(-9) < 0 < stationarity(-8) for every a in [0, 1].
    lo, hi = np.full_like(x1, -9.0), np.full_like(x1, -8.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        negative = stationarity(mid) < 0
        lo, hi = np.where(negative, mid, lo), np.where(negative, hi, mid)
    x2 = 0.5 * (lo + hi)
    s, q = np.tanh(-0.5 * x2), 0.01 * (x2 + 8.0) ** 2
    losses = np.stack(
        [
            TOY_SCALE * s * ((x1 - 7.0) ** 2 / 10.0 - 20.0 + q),
            s * ((x1 + 7.0) ** 2 / 10.0 - 20.0 + q),
        ],
        axis=-1,
    )
    return np.stack([x1, x2], axis=-1), losses
