"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base, _stacked


class GradNormState(NamedTuple):
    r"""State of :func:`gradnorm`.

    Attributes:
      logits: ``(num_tasks,)`` float32: the task weights' parameters
        :math:`\theta` (LibMTL's ``loss_scale``); the weights are
        :math:`w = k \operatorname{softmax}(\theta)`. They start at ones, as
        in LibMTL (the weights are then equal; the default optimizer's coupled
        decay, :math:`10^{-5}\theta`, then acts as in LibMTL).
      opt_state: the state of the logits' optimizer.
      initial_losses: ``(num_tasks,)`` float32: the reference losses
        :math:`\ell_i(0)` (LibMTL's ``train_loss_buffer[:, 0]``): the mean of
        the losses over the warm-up updates, or the first update's losses
        without warm-up; zero before the first update.
      num_updates: ``()`` int32: applied updates (warm-up included).
      num_skipped: ``()`` int32: updates with non-finite task gradients or
        invalid losses, which left the state unchanged.
    """

    logits: jax.Array
    opt_state: Any
    initial_losses: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def torch_adam(learning_rate: optax.ScalarOrSchedule, weight_decay: float):
    """PyTorch's ``Adam(lr, weight_decay)``: coupled L2 decay, then Adam (LibMTL's default)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(learning_rate),
    )


def gradnorm_logits_gradient(
    logits: jax.Array,
    grad_norms: jax.Array,
    losses: jax.Array,
    initial_losses: jax.Array,
    alpha: float = 1.5,
) -> jax.Array:
    r"""The gradient of GradNorm's balancing loss with respect to the weights' logits.

    With :math:`w = k \operatorname{softmax}(\theta)`, :math:`G_i = w_i
    \|\nabla_W \ell_i\|`, the relative inverse training rates :math:`r_i =
    \tilde\ell_i / \operatorname{mean}_j \tilde\ell_j` of :math:`\tilde\ell_i =
    \ell_i / \ell_i(0)`, and the targets :math:`T_i = \bar G\, r_i^\alpha`
    (:math:`\bar G = \operatorname{mean}_j G_j`, held constant), returns
    :math:`\nabla_\theta \sum_i |G_i - T_i|`, with the subgradient 0 where
    :math:`G_i = T_i` (PyTorch's).

    Args:
      logits: ``(k,)`` :math:`\theta`.
      grad_norms: ``(k,)`` :math:`\|\nabla_W \ell_i\|`.
      losses: ``(k,)`` current losses (non-negative).
      initial_losses: ``(k,)`` reference losses; a zero one counts as ratio 1.
      alpha: the asymmetry :math:`\alpha`.

    Returns:
      ``(k,)`` gradient with respect to ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import gradnorm_logits_gradient
      >>> grad = gradnorm_logits_gradient(jnp.zeros(2), jnp.array([1.0, 3.0]),
      ...                                 jnp.ones(2), jnp.ones(2))
      >>> grad  # equal training rates: shrink the larger gradient norm's weight
      Array([-2.,  2.], dtype=float32)
    """
    dtype = _numerics.at_least_float32(jnp.result_type(logits, grad_norms, losses))
    logits, grad_norms = logits.astype(dtype), grad_norms.astype(dtype)
    losses, initial_losses = losses.astype(dtype), initial_losses.astype(dtype)
    k = logits.shape[0]
    probabilities = jax.nn.softmax(logits)
    contributions = k * probabilities * grad_norms
    has_initial = initial_losses > 0
    relative = jnp.where(has_initial, losses / jnp.where(has_initial, initial_losses, 1.0), 1.0)
    mean_relative = jnp.mean(relative)
    rates = relative / jnp.where(mean_relative > 0, mean_relative, 1.0)
    targets = jnp.mean(contributions) * rates**alpha
    weights_gradient = jnp.sign(contributions - targets) * grad_norms
    # The softmax's Jacobian, times k.
    return k * probabilities * (weights_gradient - jnp.dot(probabilities, weights_gradient))


def gradnorm(
    num_tasks: int,
    alpha: float = 1.5,
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    weight_decay: float = 1e-5,
    optimizer: optax.GradientTransformation | None = None,
    *,
    last_shared_layer: Any = None,
    warmup_steps: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: weights that equalise the tasks' gradient norms, scaled by their training rates.

    GradNorm learns task weights :math:`w` (summing to :math:`k`) so that
    each task's weighted gradient norm on the last shared layer :math:`W`,
    :math:`G_i = \|\nabla_W w_i \ell_i\|`, approaches the mean norm times the
    task's relative inverse training rate to the power :math:`\alpha`:

    .. math::
        L_{grad} = \sum_i \big|G_i - \bar G\, r_i^\alpha\big|, \qquad
        r_i = \frac{\ell_i / \ell_i(0)}{\operatorname{mean}_j \ell_j / \ell_j(0)},

    with :math:`\bar G\, r_i^\alpha` held constant. Each update combines the
    task gradients with the current weights, :math:`d = \frac1k \sum_i w_i
    g_i`, then takes one step of the weights' optimizer on :math:`\nabla
    L_{grad}` (:func:`famo_jax.aggregation.gradnorm_logits_gradient`).

    Inputs (as :func:`famo_jax.shared_trunk` takes its selection):

    - ``updates``: the stacked task gradients to combine (usually the shared
      trunk's, inside :func:`famo_jax.shared_trunk`);
    - ``last_shared_layer``: which of their leaves are :math:`W`, whose
      per-task gradient norms GradNorm balances: a pytree of bools with the
      structure of the parameters (or a prefix of it; inside
      :func:`famo_jax.shared_trunk` the full parameters' structure works), or
      a function ``tree -> such a pytree`` called on the stacked task
      gradients. None (default): every leaf of ``updates``, as LibMTL does (it
      takes the norms over all shared parameters). The paper uses the last
      shared layer, which costs only that layer's norms;
    - ``losses=`` (an extra argument, forwarded by ``optax.chain``): the
      ``(k,)`` task losses of this step, for the training rates.

    The reference losses :math:`\ell_i(0)` are the mean of the losses over the
    first ``warmup_steps`` updates, during which the weights stay equal and
    are not trained (LibMTL: the first epoch, with equal weights; set
    ``warmup_steps`` to the number of steps per epoch), or, with
    ``warmup_steps=0``, the first update's losses (the paper's :math:`\ell_i(0)`).

    This follows LibMTL's ``GradNorm`` (there is no code from the authors; TorchJD
    has no GradNorm). Convention differences: LibMTL parametrises
    :math:`w = k \operatorname{softmax}(\theta)` (the paper renormalises raw
    weights to sum to :math:`k` after every step; here LibMTL's
    parametrisation, which keeps them positive), and trains :math:`\theta`
    with its model's optimizer (PyTorch's ``Adam(lr=1e-4,
    weight_decay=1e-5)`` by default, the coupled L2 decay pulling the logits
    to zero), its own step right after the model's backward pass. Here the
    logits have their own optimizer, by default that same Adam
    (``learning_rate``, ``weight_decay``; PyTorch's betas and epsilon), or any
    optax ``optimizer``. The weights of an update are those from before its
    step, as in LibMTL. :math:`\alpha = 1.5` is LibMTL's default (``alpha``).

    Scale convention: the output is :math:`\frac1k \sum_i w_i g_i`, on the
    scale of the *mean* of the task gradients (equal weights, the initial
    ones, give exactly the mean; for ``k = 1`` the task gradient). LibMTL's
    is :math:`\sum_i w_i g_i` (sum convention, its loss-weighted sum):
    ``optax.chain(famo_jax.gradnorm(k), optax.scale(k))``.

    Invalid inputs (non-finite task gradients, non-finite or negative
    losses): the output is NaN (``optax.apply_if_finite`` then skips the step)
    and the state is kept (counted in ``num_skipped``).

    Cost: :math:`O(k m)` for the weighted sum of :math:`m` parameters and
    :math:`O(k m_W)` for the norms of :math:`W`'s gradients; no Gram matrix.
    With ``last_shared_layer=None`` it also takes
    :class:`~famo_jax.aggregation.ImplicitTaskGradients` (norms from the Gram
    matrix's diagonal).

    Args:
      num_tasks: the number of tasks :math:`k`.
      alpha: the asymmetry :math:`\alpha \ge 0` (0 equalises the norms).
      learning_rate: learning rate (or optax schedule) of the default optimizer.
      weight_decay: coupled L2 decay of the default optimizer.
      optimizer: an optax transformation for the logits instead of the default.
      last_shared_layer: the leaves whose gradient norms are balanced (see above).
      warmup_steps: updates with equal weights that define :math:`\ell(0)`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, losses)`` takes per-task gradients stacked on a leading
      axis of size ``k`` and the task losses, and returns one gradient pytree;
      state :class:`GradNormState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import famo_jax
      >>> tx = famo_jax.gradnorm(num_tasks=2, optimizer=optax.sgd(0.1))
      >>> grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> out, state = tx.update(grads, tx.init(None), losses=jnp.array([1.0, 1.0]))
      >>> out  # equal weights at first
      Array([0.5, 1.5], dtype=float32)
      >>> [round(w, 4) for w in (2 * jax.nn.softmax(state.logits)).tolist()]
      [1.1974, 0.8026]

    References:
      Chen, Badrinarayanan, Lee and Rabinovich, *GradNorm: Gradient
      Normalization for Adaptive Loss Balancing in Deep Multitask Networks*,
      ICML 2018. https://proceedings.mlr.press/v80/chen18a.html (LibMTL:
      https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/GradNorm.py)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    alpha = float(_checks.check_nonnegative("alpha", alpha))
    learning_rate = _checks.check_nonnegative("learning_rate", learning_rate, allow_callable=True)
    weight_decay = float(_checks.check_nonnegative("weight_decay", weight_decay))
    optimizer = _checks.check_optimizer(optimizer, lambda: torch_adam(learning_rate, weight_decay))
    warmup_steps = _checks.check_int("warmup_steps", warmup_steps, minimum=0)
    if last_shared_layer is not None and not callable(last_shared_layer):
        # A pytree of bools: check it now, not at the first update.
        for flag in jax.tree.leaves(last_shared_layer):
            if not isinstance(flag, bool):
                raise TypeError(
                    "last_shared_layer must be None, a pytree of bools or a function returning "
                    f"one, got a leaf {flag!r}."
                )

    def init_fn(params):
        del params
        logits = jnp.ones((num_tasks,), jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return GradNormState(
            logits=logits,
            opt_state=optimizer.init(logits),
            initial_losses=jnp.zeros((num_tasks,), jnp.float32),
            num_updates=zero,
            num_skipped=zero,
        )

    def layer_squared_norms(updates, k, dtype):
        if isinstance(updates, _base.ImplicitTaskGradients):
            if last_shared_layer is not None:
                raise TypeError(
                    "gradnorm(last_shared_layer=...) needs the selected leaves' gradients; it "
                    "cannot take ImplicitTaskGradients (pass the stacked task gradients)."
                )
            return jnp.maximum(jnp.diagonal(_base.gram_matrix(updates, dtype)), 0.0)
        if last_shared_layer is None:
            leaves = jax.tree.leaves(updates)
        else:
            mask = last_shared_layer(updates) if callable(last_shared_layer) else last_shared_layer
            picked = jax.tree.map(lambda flag, subtree: subtree if flag else None, mask, updates)
            leaves = jax.tree.leaves(picked)
            if not leaves:
                raise ValueError("last_shared_layer selects no leaf of the task gradients.")
        return _stacked.squared_norms(leaves, k, dtype)

    def update_fn(updates, state, params=None, *, losses: Any = None, **extra_args):
        del params, extra_args
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "gradnorm")
        losses = _base.check_losses_extra_arg(losses, k, "gradnorm")
        dtype = _base.compute_dtype(updates)
        losses = losses.astype(dtype)
        norms = jnp.sqrt(layer_squared_norms(updates, k, dtype))
        logits = state.logits.astype(dtype)
        valid = jnp.all(jnp.isfinite(norms)) & jnp.all(jnp.isfinite(losses)) & jnp.all(losses >= 0)
        out = _base.combine(updates, jnp.where(valid, jax.nn.softmax(logits), jnp.nan))
        valid = valid & _stacked.tree_all_finite(out)

        count = state.num_updates
        defining = count < max(warmup_steps, 1)  # the running mean that gives l(0)
        initial = state.initial_losses.astype(dtype)
        initial = jnp.where(
            defining, initial + (losses - initial) / (count + 1).astype(dtype), initial
        )
        gradient = gradnorm_logits_gradient(logits, norms, losses, initial, alpha)
        step, opt_state = optimizer.update(gradient, state.opt_state, logits)
        trained = optax.apply_updates(logits, step)
        training = valid & (count >= warmup_steps) & jnp.all(jnp.isfinite(trained))
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = GradNormState(
            logits=jnp.where(training, trained, logits).astype(state.logits.dtype),
            opt_state=_numerics.keep_if_valid(training, opt_state, state.opt_state),
            initial_losses=jnp.where(valid, initial, state.initial_losses).astype(
                state.initial_losses.dtype
            ),
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
