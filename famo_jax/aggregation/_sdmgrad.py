"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _stacked


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`.

    Attributes:
      weights: ``(num_tasks,)`` float32: the simplex weights :math:`w` of the
        last solve, the warm start of the next one (LibMTL's and the authors'
        ``self.w``; TorchJD's ``_w``). They start at :math:`1/k`.
      num_updates: ``()`` int32: updates that moved the weights.
      num_skipped: ``()`` int32: updates with a non-finite input (task
        gradients, their Gram or cross-Gram matrix), which kept the weights.
    """

    weights: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def sdmgrad_weights(
    cross_gram: jax.Array,
    init: jax.Array,
    *,
    lamda: float = 0.3,
    num_iters: int = 20,
    learning_rate: float = 5.0,
    momentum: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    r"""SDMGrad's weights from a (cross-)Gram matrix, by projected heavy-ball steps.

    With :math:`A = G_{\xi} G_{\xi'}^\top` (two independent batches' task
    gradients; the Gram matrix :math:`G G^\top` of one batch in the
    single-batch mode), normalised as :math:`\hat A = A / (s^2 + 10^{-8})` with
    :math:`s` the mean of :math:`\sqrt{\max(A_{ii}, 0)}`, runs ``num_iters``
    steps of

    .. math::
        v \leftarrow \mu v + \hat A\,(w + \tfrac{\lambda}{k}\mathbf 1), \qquad
        w \leftarrow \Pi_\Delta(w - \eta\, v)

    from :math:`w` = ``init`` and :math:`v = 0` (PyTorch's ``SGD`` with
    momentum :math:`\mu`, rebuilt at every call as in the peers' code), then
    returns the direction's weights :math:`(w + \frac{\lambda}{k}\mathbf 1) /
    (1 + \lambda)`. See :func:`famo_jax.sdmgrad` for the method.

    Args:
      cross_gram: ``(k, k)`` matrix :math:`A` (not necessarily symmetric).
      init: ``(k,)`` starting weights, on the simplex.
      lamda: the regularisation :math:`\lambda \ge 0` towards the mean gradient.
      num_iters: the number of projected steps.
      learning_rate: the step size :math:`\eta`.
      momentum: the heavy-ball momentum :math:`\mu`.

    Returns:
      ``(direction_weights, w)``: the ``(k,)`` weights of the task gradients in
      the update direction, and the solved simplex weights :math:`w` (the next
      warm start). NaN if ``cross_gram`` is not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import sdmgrad_weights
      >>> gram = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> direction, w = sdmgrad_weights(
      ...     gram, jnp.full(2, 0.5), lamda=0.0, num_iters=100, learning_rate=0.5)
      >>> [round(x, 4) for x in w.tolist()]  # with lamda 0: MGDA's min-norm weights
      [0.8, 0.2]
    """
    cross_gram = jnp.asarray(cross_gram)
    k = cross_gram.shape[0]
    if cross_gram.shape != (k, k):
        raise ValueError(f"cross_gram must be a square (k, k) matrix, got {cross_gram.shape}.")
    dtype = _numerics.at_least_float32(cross_gram.dtype)
    cross_gram = cross_gram.astype(dtype)
    init = jnp.asarray(init, dtype)
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(cross_gram), 0.0)))
    normalized = cross_gram / (scale**2 + 1e-8)
    preference = jnp.full((k,), lamda / k, dtype)

    def step(_, carry):
        weights, velocity = carry
        velocity = momentum * velocity + normalized @ (weights + preference)
        return _solvers.project_onto_simplex(weights - learning_rate * velocity), velocity

    weights, _ = jax.lax.fori_loop(0, num_iters, step, (init, jnp.zeros_like(init)))
    return (weights + preference) / (1.0 + lamda), weights


def sdmgrad(
    num_tasks: int,
    lamda: float = 0.3,
    num_iters: int = 20,
    learning_rate: float = 5.0,
    momentum: float = 0.5,
) -> optax.GradientTransformationExtraArgs:
    r"""SDMGrad: a direction close to the mean gradient that improves every task.

    SDMGrad looks for the direction :math:`d = G^\top w_\lambda` nearest to the
    min-norm point of the task gradients' convex hull, regularised towards the
    mean gradient :math:`g_0 = \frac1k \sum_i g_i`:

    .. math::
        w = \arg\min_{w \in \Delta_k} \tfrac12 \|G^\top w\|^2
            + \lambda \langle G^\top w, g_0 \rangle, \qquad
        d = \frac{G^\top w + \lambda g_0}{1 + \lambda},

    with :math:`w` from a few projected stochastic gradient steps warm-started
    from the previous update's (:func:`famo_jax.aggregation.sdmgrad_weights`).
    In the paper (and the peers' code) three independent batches are used per
    update: two, :math:`\xi` and :math:`\xi'`, give an unbiased estimate
    :math:`G_\xi G_{\xi'}^\top` of the Gram matrix for the weights, the third,
    :math:`\zeta`, the gradients :math:`G_\zeta` that are combined.

    Inputs (the closest honest counterpart of the peers' three backward passes):

    - ``updates``: the task gradients :math:`G_\zeta` that are combined;
    - ``weight_batches=(grads_xi, grads_xi_prime)`` (an extra argument,
      forwarded by ``optax.chain``): the task gradients of two further
      independent batches, stacked like ``updates`` (inside
      :func:`famo_jax.shared_trunk`, give them for the full parameters: the
      leaves outside the trunk are dropped); :math:`A = G_\xi G_{\xi'}^\top`.
    - Without ``weight_batches`` (the single-batch fallback), :math:`A` is the
      Gram matrix of ``updates`` itself: no extra batch or backward pass, but
      the weights then see the same noise as the direction (the bias the
      double sampling removes). This is what TorchJD computes when given
      ``J J^T`` of one batch; the authors' NYU-v2 and Cityscapes trainers and
      LibMTL's draw the three batches.

    A training step with the three batches, for example::

        _, grads_zeta = famo_jax.task_gradients(task_losses)(params, batch_zeta)
        _, grads_xi = famo_jax.task_gradients(task_losses)(params, batch_xi)
        _, grads_xi2 = famo_jax.task_gradients(task_losses)(params, batch_xi_prime)
        updates, opt_state = tx.update(
            grads_zeta, opt_state, params, weight_batches=(grads_xi, grads_xi2)
        )

    This follows LibMTL's ``SDMGrad`` (adapted from the authors'): the same
    normalisation :math:`A / (s^2 + 10^{-8})`, :math:`s = \operatorname{mean}
    \sqrt{\max(A_{ii}, 0)}`, the update :math:`v \leftarrow \mu v + A w +
    \lambda A \mathbf 1 / k` with PyTorch's ``SGD(lr=5, momentum=0.5)`` made
    afresh at every call, 20 iterations, :math:`\lambda = 0.3` and :math:`w`
    kept between calls. Differences among the peers: the authors' code uses
    ``lr=10``, normalises by :math:`s^2` with :math:`s = \operatorname{mean}
    \sqrt{A_{ii} + 10^{-4}}` and defaults to :math:`\lambda = 0.6` (0.3 in their
    experiments); TorchJD 0.18 uses ``lr=10`` and otherwise LibMTL's formulas
    (``learning_rate=10`` gives both). LibMTL and the authors project onto the
    simplex in float64 NumPy; here in the weights' dtype (at least float32), in
    pure JAX. The task heads: LibMTL accumulates the heads' gradients of all
    three batches; :func:`famo_jax.shared_trunk` gives them the ``updates``
    batch's.

    Scale convention: the output :math:`d` is on the scale of the *mean* of
    the task gradients (equal task gradients give exactly that gradient; for
    ``k = 1``, the task gradient). The authors' trainer multiplies by
    :math:`k` (sum convention) and clips the shared gradient to norm 1:
    ``optax.chain(famo_jax.sdmgrad(k), optax.scale(k),
    optax.clip_by_global_norm(1.0))``; LibMTL and TorchJD use :math:`d` as it is.

    Non-finite inputs (task gradients or weight batches): the output is NaN
    (``optax.apply_if_finite`` then skips the step), the weights are kept and
    the update is counted in ``num_skipped``.

    Cost: :math:`O(k^2 m)` for the (cross-)Gram matrix of :math:`m`
    parameters, :math:`O(k m)` for the weighted sum, :math:`O(k^2)` per inner
    iteration (and a sort of :math:`k` entries for each projection); with
    ``weight_batches``, two more backward passes per step (by the caller).

    Args:
      num_tasks: the number of tasks :math:`k` (the state holds the weights).
      lamda: :math:`\lambda \ge 0` (LibMTL's ``SDMGrad_lamda``).
      num_iters: inner iterations (LibMTL's ``SDMGrad_niter``).
      learning_rate: inner step size (5 in LibMTL; 10 in the authors' code and
        TorchJD).
      momentum: inner heavy-ball momentum in ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, weight_batches=None)`` takes per-task gradients stacked on
      a leading axis of size ``k`` (or an
      :class:`~famo_jax.aggregation.ImplicitTaskGradients`) and returns one
      gradient pytree; state :class:`SDMGradState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> tx = famo_jax.sdmgrad(num_tasks=2)
      >>> direction_batch = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> batches = (jnp.array([[1.1, 0.1], [0.0, 1.9]]), jnp.array([[0.9, -0.1], [0.1, 2.1]]))
      >>> out, state = tx.update(direction_batch, tx.init(None), weight_batches=batches)
      >>> [round(x, 3) for x in state.weights.tolist()]  # w, from the two extra batches
      [0.347, 0.653]
      >>> [round(x, 3) for x in out.tolist()]  # (G w + lamda g0) / (1 + lamda)
      [0.382, 1.235]

    References:
      Xiao, Ban and Ji, *Direction-oriented Multi-objective Learning: Simple
      and Provable Stochastic Algorithms*, NeurIPS 2023.
      https://arxiv.org/abs/2305.18409 (code: https://github.com/OptMN-Lab/sdmgrad;
      LibMTL: https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/SDMGrad.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    lamda = float(_checks.check_nonnegative("lamda", lamda))
    num_iters = _checks.check_int("num_iters", num_iters)
    learning_rate = float(_checks.check_nonnegative("learning_rate", learning_rate))
    if learning_rate == 0:
        raise ValueError("learning_rate must be positive, got 0.")
    momentum = float(_checks.check_nonnegative("momentum", momentum))
    if momentum >= 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}.")

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.int32)
        return SDMGradState(
            weights=jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, *, weight_batches: Any = None, **extra_args):
        del params, extra_args
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "sdmgrad")
        dtype = _base.compute_dtype(updates)
        matrix = _stacked.weight_matrix(updates, weight_batches, dtype, "sdmgrad")
        valid = jnp.all(jnp.isfinite(matrix))
        safe = jnp.where(valid, matrix, jnp.eye(k, dtype=dtype))
        direction, weights = sdmgrad_weights(
            safe,
            state.weights.astype(dtype),
            lamda=lamda,
            num_iters=num_iters,
            learning_rate=learning_rate,
            momentum=momentum,
        )
        out = _base.combine(updates, jnp.where(valid, direction, jnp.nan))
        # A non-finite direction batch with finite weight batches: skip too.
        valid = valid & _stacked.tree_all_finite(out)
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = SDMGradState(
            weights=jnp.where(valid, weights, state.weights).astype(state.weights.dtype),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
