"""Multitask evaluation metrics: the relative drop Delta_m% and the mean rank (MR).

Both are the summary metrics of the multitask literature that the FAMO paper
reports (following Nash-MTL): :func:`delta_m` compares a method's per-task
metrics with single-task baselines, :func:`mean_rank` ranks methods against one
another metric by metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["delta_m", "mean_rank"]


def _directions(higher_is_better: ArrayLike | Sequence[bool], num_metrics: int) -> np.ndarray:
    directions = np.asarray(higher_is_better)
    if directions.dtype != np.bool_:
        raise TypeError(
            f"higher_is_better must be a sequence of bools, got dtype {directions.dtype}."
        )
    if directions.shape != (num_metrics,):
        raise ValueError(
            f"higher_is_better must have shape (num_metrics,) = ({num_metrics},), got "
            f"shape {directions.shape}."
        )
    return directions


def _as_float(name: str, value: ArrayLike, min_ndim: int) -> jnp.ndarray:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    if array.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {array.shape}."
        )
    return array


def delta_m(
    metrics: ArrayLike, baseline: ArrayLike, higher_is_better: Sequence[bool]
) -> jnp.ndarray:
    r"""The average relative performance drop :math:`\Delta_m\%` against a baseline.

    .. math::
        \Delta_m\% = \frac{100}{K} \sum_{k=1}^K (-1)^{s_k}\,
        \frac{M_{k} - B_{k}}{B_{k}},

    with :math:`s_k = 1` when higher is better for metric :math:`k` and 0 when
    lower is better, :math:`M` the method's metrics and :math:`B` the baseline's
    (usually single-task learning, STL). Lower is better; 0 means "as good as
    the baseline on average", negative means better.

    Args:
      metrics: shape ``(..., K)``: one row of :math:`K` metrics per method (or
        per seed); leading axes are kept.
      baseline: shape ``(K,)`` (or broadcastable to ``metrics``): the baseline
        metrics :math:`B`, all nonzero.
      higher_is_better: :math:`K` bools, ``True`` where a larger metric is better
        (accuracy, mIoU, within-angle rates), ``False`` for errors.

    Returns:
      :math:`\Delta_m` in percent, shape ``metrics.shape[:-1]``.

    Raises:
      TypeError, ValueError: if ``higher_is_better`` is not a vector of
        :math:`K` bools, or the shapes do not match.

    Example:
      >>> from famo_jax.metrics import delta_m
      >>> # accuracy 0.8 -> 0.9 (12.5% better), error 2.0 -> 2.1 (5% worse)
      >>> d = delta_m([0.9, 2.1], baseline=[0.8, 2.0], higher_is_better=[True, False])
      >>> round(float(d), 4)
      -3.75

    References:
      Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022;
      Liu, Feng, Stone and Liu, *FAMO: Fast Adaptive Multitask Optimization*,
      NeurIPS 2023, Section 5.2. https://arxiv.org/abs/2306.03792
    """
    metrics = _as_float("metrics", metrics, 1)
    baseline = _as_float("baseline", baseline, 1)
    num_metrics = metrics.shape[-1]
    if baseline.shape[-1] != num_metrics:
        raise ValueError(
            f"baseline must have {num_metrics} metrics on its last axis like metrics, got "
            f"shape {baseline.shape}."
        )
    sign = jnp.where(_directions(higher_is_better, num_metrics), -1.0, 1.0)
    return 100.0 * jnp.mean(sign * (metrics - baseline) / baseline, axis=-1)


def mean_rank(
    metrics: ArrayLike, higher_is_better: Sequence[bool], ties: str = "average"
) -> jnp.ndarray:
    r"""The mean rank (MR) of each method over the metrics.

    For every metric, the methods (rows of ``metrics``) are ranked from 1 (best)
    to ``num_methods`` (worst); a method's MR is the mean of its ranks over the
    :math:`K` metrics. A method that is best on every metric has MR 1.

    Ties: with ``ties="average"`` (the default, "fractional ranking") methods
    with equal values share the mean of the ranks they span (two methods tied for
    first both get 1.5), so the MRs always sum to
    ``num_methods * (num_methods + 1) / 2``. With ``ties="min"`` ("competition
    ranking") they all get the best rank they span (both get 1). Values are
    compared exactly, so round them first if equal-to-the-reported-precision
    should count as a tie.

    Which methods take part changes the ranks: the FAMO paper ranks the
    compared methods *without* the single-task baseline (this reproduces the MR
    column of its Table 1); include or exclude rows accordingly.

    Args:
      metrics: shape ``(num_methods, K)``.
      higher_is_better: :math:`K` bools, ``True`` where a larger metric is better.
      ties: ``"average"`` or ``"min"``, see above.

    Returns:
      Shape ``(num_methods,)``: the mean ranks.

    Raises:
      TypeError, ValueError: for a bad ``higher_is_better`` or ``ties`` or a
        ``metrics`` that is not 2-D.

    Example:
      >>> from famo_jax.metrics import mean_rank
      >>> # three methods, accuracy (higher is better) and error (lower is better)
      >>> mean_rank([[0.9, 1.0], [0.8, 1.0], [0.7, 3.0]], [True, False])
      Array([1.25, 1.75, 3.  ], dtype=float32)

    References:
      Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022;
      Liu, Feng, Stone and Liu, *FAMO: Fast Adaptive Multitask Optimization*,
      NeurIPS 2023, Section 5.2. https://arxiv.org/abs/2306.03792
    """
    if ties not in ("average", "min"):
        raise ValueError(f'ties must be "average" or "min", got {ties!r}.')
    metrics = _as_float("metrics", metrics, 2)
    if metrics.ndim != 2:
        raise ValueError(
            f"metrics must have shape (num_methods, num_metrics), got shape {metrics.shape}."
        )
    # Negate the higher-is-better columns so that smaller is better everywhere.
    sign = jnp.where(_directions(higher_is_better, metrics.shape[1]), -1.0, 1.0)
    scores = sign * metrics
    # better[i, j, k]: method j beats method i on metric k (O(n^2 K), n is small).
    better = scores[None, :, :] < scores[:, None, :]
    equal = scores[None, :, :] == scores[:, None, :]
    num_better = jnp.sum(better, axis=1)
    num_tied_others = jnp.sum(equal, axis=1) - 1
    if ties == "average":
        ranks = 1.0 + num_better + 0.5 * num_tied_others
    else:
        ranks = 1.0 + num_better
    return jnp.mean(ranks, axis=-1)
