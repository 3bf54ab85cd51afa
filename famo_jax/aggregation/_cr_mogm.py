"""CR-MOGM: exponentially averaged composite weights (Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base


class CRMOGMState(NamedTuple):
    r"""State of :func:`cr_mogm`.

    Attributes:
      weights: ``(num_tasks,)`` float32: the smoothed weights :math:`\lambda`
        of the last applied update (``initial_weights``, or zeros, before the
        first).
      inner: the state of the wrapped weighting (``optax.EmptyState()`` for a
        stateless one).
      num_updates: ``()`` int32: updates whose wrapped weights were finite.
      num_skipped: ``()`` int32: updates whose wrapped weights were not finite
        (a non-finite task gradient): the output is NaN and ``weights`` is kept.
    """

    weights: jax.Array
    inner: Any
    num_updates: jax.Array
    num_skipped: jax.Array


def _as_gram_weighting(weighting: Any) -> _base.GramWeighting:
    if isinstance(weighting, _base.GramWeighting):
        return weighting
    if isinstance(weighting, optax.GradientTransformation):
        raise TypeError(
            "cr_mogm wraps the weights of a method, not its optax transformation: pass a "
            "weights function such as famo_jax.aggregation.upgrad_weights (gram -> weights) "
            "or a famo_jax.aggregation.GramWeighting."
        )
    if callable(weighting):
        return _base.stateless(weighting)
    raise TypeError(
        "weighting must be a famo_jax.aggregation.GramWeighting or a function gram -> "
        f"weights, got {type(weighting).__name__}."
    )


def cr_mogm(
    num_tasks: int,
    weighting: _base.GramWeighting | Callable[[jax.Array], jax.Array],
    alpha: float | Callable[[jax.Array], jax.Array] = 0.9,
    *,
    initial_weights: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CR-MOGM: smooth another method's weights with an exponential moving average.

    Stochastic gradient-manipulation methods (MGDA, PCGrad, CAGrad, UPGrad,
    ...) compute their composite weights :math:`\hat\lambda_t` from the
    mini-batch gradients alone, which biases the update and can keep them
    from converging. CR-MOGM averages the weights over the steps,

    .. math::
        \lambda_t = \alpha_t \lambda_{t-1} + (1 - \alpha_t) \hat\lambda_t ,
        \qquad d_t = \sum_i \lambda_{t,i}\, g_{t,i} ,

    with :math:`\lambda_0 = \hat\lambda_1` (the first output is the wrapped
    method's own) unless ``initial_weights`` are given. ``alpha = 0`` is the
    wrapped method, ``alpha = 1`` freezes the weights at
    :math:`\lambda_0`. The paper's Corollary 1 lets :math:`\alpha_t` grow
    towards 1 as the learning rate decays, e.g. :math:`\alpha_t = 1 -
    \eta_t / \eta_0`: pass ``alpha`` as a schedule of the update count.

    Any method given by its weights works: a ``gram -> weights`` function
    (``famo_jax.aggregation.upgrad_weights``, ``mgda_weights``,
    ``functools.partial(cagrad_weights, c=0.4)``, ...) or a
    :class:`~famo_jax.aggregation.GramWeighting`, stateful or not, whose
    ``weights(gram, state, losses)`` is called with the task losses when the
    update is given ``losses=`` (its state is kept in ``state.inner``).

    Matches TorchJD 0.18's ``CRMOGMWeighting`` (wrapping a Gramian weighting
    in a ``GramianWeightedAggregator``): the same recursion, the same default
    ``alpha = 0.9`` and the same :math:`\lambda_0`. Neither the authors (no
    public code) nor LibMTL provide CR-MOGM, so TorchJD is the reference.
    Differences: TorchJD's ``alpha`` is a float changed between calls through
    its setter, here a float or a schedule; TorchJD stores whatever the wrapped
    weighting returns, so one non-finite gradient turns its average into NaN
    for good, where here the update is skipped (see below).

    Scale convention: that of the wrapped method (an average of its weights;
    for UPGrad or MGDA the *mean* of the task gradients). For ``k = 1`` the
    output is the wrapped method's.

    Non-finite task gradients: the wrapped weights are then NaN, so is the
    output (``optax.apply_if_finite`` skips the step); ``weights`` is kept and
    the update counted in ``num_skipped``. The wrapped state is updated by the
    wrapped method itself (which keeps it under its own rules).

    Cost: that of the wrapped method plus :math:`O(k)`.

    Args:
      num_tasks: the number of tasks :math:`k` (the average is kept in the
        state).
      weighting: the wrapped method: a ``gram -> (k,) weights`` function or a
        :class:`~famo_jax.aggregation.GramWeighting`.
      alpha: the averaging coefficient in :math:`[0, 1]`, or a schedule
        ``num_updates -> alpha`` (an optax schedule).
      initial_weights: ``(num_tasks,)`` :math:`\lambda_0`; default: the first
        wrapped weights.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, losses=None)`` takes per-task gradients stacked on a
      leading axis of size ``k`` (or ``ImplicitTaskGradients``) and returns
      one gradient pytree; state :class:`CRMOGMState`.

    Raises:
      ValueError, TypeError: for a bad ``num_tasks``, ``alpha`` or
        ``initial_weights``, or a ``weighting`` that is neither a function nor
        a ``GramWeighting``; at trace time if the task axis is not
        ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> from famo_jax import aggregation
      >>> tx = famo_jax.cr_mogm(2, aggregation.mgda_weights, alpha=0.5)
      >>> state = tx.init(None)
      >>> d, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 1.0]]), state)
      >>> [round(w, 4) for w in state.weights.tolist()]  # the first: MGDA's own
      [0.5, 0.5]
      >>> d, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 3.0]]), state)
      >>> [round(w, 4) for w in state.weights.tolist()]  # (0.5, 0.5) / 2 + (0.9, 0.1) / 2
      [0.7, 0.3]

    References:
      Zhou, Zhang, Jiang, Zhong, Gu and Zhu, *On the Convergence of Stochastic
      Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022.
      https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html
      (as implemented in TorchJD: https://github.com/TorchJD/torchjd,
      ``torchjd.aggregation.CRMOGMWeighting``)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    inner = _as_gram_weighting(weighting)
    alpha = _checks.check_nonnegative("alpha", alpha, allow_callable=True)
    if not callable(alpha) and alpha > 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    initial = None
    if initial_weights is not None:
        if np.ndim(initial_weights) == 0:
            raise ValueError(
                f"initial_weights must have shape (num_tasks,) = ({num_tasks},), got a scalar."
            )
        initial = _checks.check_task_vector("initial_weights", initial_weights, num_tasks)

    def init():
        weights = (
            jnp.zeros((num_tasks,), jnp.float32)
            if initial is None
            else jnp.asarray(initial, jnp.float32)
        )
        zero = jnp.zeros((), jnp.int32)
        return CRMOGMState(weights=weights, inner=inner.init(), num_updates=zero, num_skipped=zero)

    def weights_fn(gram, state, losses):
        k = gram.shape[0]
        _base.check_built_num_tasks(k, num_tasks, "cr_mogm")
        wrapped, inner_state = inner.weights(gram, state.inner, losses)
        wrapped = wrapped.astype(gram.dtype)
        valid = jnp.all(jnp.isfinite(wrapped))
        coefficient = alpha(state.num_updates) if callable(alpha) else alpha
        coefficient = jnp.asarray(coefficient, gram.dtype)
        previous = state.weights.astype(gram.dtype)
        if initial is None:
            previous = jnp.where(state.num_updates == 0, wrapped, previous)
        smoothed = coefficient * previous + (1.0 - coefficient) * wrapped
        # NaN weights (a NaN output) when the wrapped ones are not finite.
        smoothed = jnp.where(valid, smoothed, jnp.nan)
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = CRMOGMState(
            weights=_numerics.keep_if_valid(
                valid, smoothed.astype(state.weights.dtype), state.weights
            ),
            inner=inner_state,
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return smoothed, new_state

    return _base.gram_weighted(_base.GramWeighting(init=init, weights=weights_fn))
