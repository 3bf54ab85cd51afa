"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify
from jax.typing import ArrayLike, DTypeLike

from famo_jax import _checks, _numerics
from famo_jax.weighting import _base


class FAMOState(NamedTuple):
    r"""State of :func:`famo`.

    Attributes:
      logits: ``(num_tasks,)`` float32 (or the ``logits_dtype`` asked for): the
        task logits :math:`\xi`; the task weights are ``softmax(logits)``, see
        :attr:`task_weights`. They start at zero (equal weights).
      opt_state: the state of the logits optimizer (an optax state pytree).
        With the default optimizer it holds the injected hyperparameters
        ``learning_rate`` and ``gamma`` (``opt_state.hyperparams``), readable
        and settable during training, e.g. with
        ``optax.tree_utils.tree_set(state, gamma=0.0)``.
      num_updates: ``()`` int32: updates applied to the logits.
      num_skipped: ``()`` int32: updates skipped because a loss was non-finite
        or at or below ``min_losses - eps``, where its log is undefined (the
        logits and ``opt_state`` are then left unchanged).
      min_losses: ``(num_tasks,)`` in the logits' dtype: the lower bounds
        :math:`m` of the task losses, from :func:`famo`'s ``min_losses``;
        settable during training (the authors' ``set_min_losses``) with
        :meth:`with_min_losses`.
    """

    logits: jax.Array
    opt_state: optax.OptState
    num_updates: jax.Array
    num_skipped: jax.Array
    min_losses: jax.Array

    def with_min_losses(self, min_losses: ArrayLike) -> FAMOState:
        """This state with new lower bounds of the task losses (a scalar or ``(k,)``).

        The next ``weigh`` and ``update`` use them; the logits and the
        optimizer state are kept. Works under ``jit`` (the bounds may be traced).

        Example:
          >>> import famo_jax
          >>> state = famo_jax.famo(2).init().with_min_losses([-1.0, 0.5])
          >>> state.min_losses.tolist()
          [-1.0, 0.5]
        """
        return self._replace(min_losses=_checks.new_min_losses(min_losses, self.min_losses))

    @property
    def task_weights(self) -> jax.Array:
        """FAMO's task weights :math:`z`, ``softmax(logits)``, on the simplex.

        These are the weights of the log losses. The weights of the losses
        themselves, which the model's gradient uses, also depend on the losses:
        see :func:`famo_jax.loss_weights`. Works on a batch of states (for
        example under ``jax.vmap`` over seeds) since the softmax is over the
        last axis.
        """
        return jax.nn.softmax(self.logits, axis=-1)


DEFAULT_LEARNING_RATE = 0.025
DEFAULT_GAMMA = 0.001


def reference_adam(
    learning_rate: optax.ScalarOrSchedule, gamma: float
) -> optax.GradientTransformation:
    """PyTorch's ``Adam(lr, weight_decay=gamma)``: *coupled* L2 decay, then Adam.

    ``gamma * xi`` is added to the gradient before the Adam moments (unlike AdamW,
    whose decoupled decay is added after). Betas (0.9, 0.999), eps 1e-8 and the
    bias corrections are PyTorch's defaults, which ``optax.scale_by_adam`` shares.
    This is the logits optimizer of the FAMO authors' class, and :func:`famo`'s
    default (wrapped in ``optax.inject_hyperparams``).

    Args:
      learning_rate: a float, an array or an optax schedule.
      gamma: the decay, a float or an array.

    Returns:
      An ``optax.GradientTransformation``.
    """
    return optax.chain(
        optax.add_decayed_weights(gamma),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(learning_rate),
    )


def famo(
    num_tasks: int,
    learning_rate: optax.ScalarOrSchedule | None = None,
    gamma: float | None = None,
    min_losses: ArrayLike | None = None,
    eps: float = 1e-8,
    optimizer: optax.GradientTransformation | None = None,
    axis_name: Any | None = None,
    *,
    logits_dtype: DTypeLike = jnp.float32,
) -> _base.LossWeighting:
    r"""FAMO, the O(1) dynamic task weighting that balances the rates of loss decrease.

    FAMO keeps task logits :math:`\xi` (weights :math:`z = \mathrm{softmax}(\xi)`)
    and trains the model on

    .. math::
        L(\ell) = \sum_i c\, z_i \log(\ell_i - m_i + \epsilon), \qquad
        c = \Big(\sum_i \frac{z_i}{\ell_i - m_i + \epsilon}\Big)^{-1}

    with :math:`c` under ``stop_gradient``, so :math:`\nabla_\theta L =
    \sum_i w_i \nabla_\theta \ell_i` with :math:`w_i = c z_i / (\ell_i - m_i +
    \epsilon)` on the simplex. After the model step, the change of the log losses
    :math:`\delta_i = \log(\ell^{\rm prev}_i - m_i + \epsilon) - \log(\ell^{\rm
    curr}_i - m_i + \epsilon)` drives one optimizer step on the logits along

    .. math::
        g_\xi = J_{\mathrm{softmax}}(\xi)^\top \delta = z \odot (\delta -
        \langle z, \delta \rangle),

    which raises the weight of tasks whose losses decreased least.

    The authors call ``update`` with the losses re-computed on the same batch
    after the model step (``prev`` = losses used for the step, ``curr`` = the
    same batch's losses under the new parameters). Passing the previous step's
    losses as ``prev`` and this step's as ``curr`` avoids the extra forward pass
    (a "lagged" variant that no reference implements).

    Invalid losses: if any entry of ``prev_losses`` or ``curr_losses`` is not
    finite, or is at or below ``min_losses - eps`` (its log is undefined),
    ``update`` leaves ``logits`` and ``opt_state`` unchanged and increments
    ``num_skipped``. ``weigh`` returns NaN for such losses, exactly as the
    reference does, and so does its gradient: the reference's gradient is
    finite there with flipped signs (losses ``[1, -0.5, 2]`` with bound 0 give
    weights ``[-2, 4, -1]``), a silent wrong step that here becomes a
    non-finite model gradient, which ``optax.apply_if_finite`` skips. To turn
    them into an error naming the task, call
    :func:`check_famo_losses` (eagerly, or inside a function transformed by
    ``jax.experimental.checkify.checkify``).

    Defaults, and what the authors use: the logits learning rate 0.025 is the
    authors' everywhere. Their decay ``gamma`` differs between their files:
    0.01 in their ``famo.py`` class, 1e-5 in ``methods/weight_methods.py``,
    and in their run scripts 1e-3 for NYU-v2, QM9 and CelebA and 1e-2 for
    Cityscapes (0 on the toy problem); 1e-3 is also LibMTL's default, and is
    the default here. With smooth, slowly decreasing losses the decay pins the
    logits near zero and FAMO behaves like scale-invariant weighting (see the
    README's "Which FAMO?"). The authors' trainers also clip the model's
    gradient to norm 1: add ``optax.clip_by_global_norm(1.0)`` to the model
    optimizer to reproduce them.

    Args:
      num_tasks: number of tasks :math:`k` (a positive int).
      learning_rate: the logits learning rate :math:`\beta` (a float or an optax
        schedule); default 0.025. Only for the default optimizer: passing it
        with ``optimizer`` is an error.
      gamma: the decay :math:`\gamma` of the logits; default 0.001. Only for
        the default optimizer: passing it with ``optimizer`` is an error.
      min_losses: lower bounds :math:`m` of the task losses, a scalar or shape
        ``(num_tasks,)``; default 0. Kept in the state (``state.min_losses``),
        where :meth:`FAMOState.with_min_losses` changes them during training.
      eps: the constant :math:`\epsilon` added to ``losses - min_losses``.
      optimizer: the optax transformation that updates the logits. Default: the
        reference's PyTorch ``Adam(learning_rate, weight_decay=gamma)``, i.e.
        coupled L2 decay (``gamma * xi`` added to the gradient before the Adam
        moments; not AdamW), betas (0.9, 0.999), eps 1e-8, built with
        ``optax.inject_hyperparams`` so that ``learning_rate`` and ``gamma`` are
        in ``state.opt_state.hyperparams``.
      axis_name: name of a mapped axis (``pmap``, ``shard_map``). When given,
        ``weigh`` and ``update`` use losses averaged over that axis, so every
        replica keeps the same state; the gradient of ``weigh`` w.r.t. each
        replica's losses is the global weight vector, so averaging the model
        gradients over the axis gives the gradient of the global batch. Under
        ``shard_map`` (with its default ``check_vma=True``) the gradient of a
        replicated parameter is already summed over the axis: differentiate
        ``pmean(weigh(losses, state))`` instead. Differentiating that ``pmean``
        and then averaging the gradients is right under both.
      logits_dtype: dtype of the logits and of the default optimizer's state.
        The weighting is computed in the promotion of this dtype and the losses'
        dtype, so bfloat16/float16 losses still use float32 logits.

    Returns:
      A :class:`~famo_jax.LossWeighting` with ``init() -> FAMOState``,
      ``weigh(losses, state) -> scalar`` (in the dtype of ``losses``) and
      ``update(prev_losses, curr_losses, state) -> FAMOState``.

    Raises:
      TypeError, ValueError: for an invalid hyperparameter (the message names
        it), and at trace time for losses of the wrong shape or a non-float dtype.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import famo_jax
      >>> def task_losses(params, x):
      ...   return jnp.stack([jnp.mean((x @ params - 1.0) ** 2),
      ...                     100.0 * jnp.mean((x @ params + 1.0) ** 2)])
      >>> weighting = famo_jax.famo(num_tasks=2)
      >>> opt = optax.adam(1e-2)
      >>> params, x = jnp.ones(3), jnp.eye(3)
      >>> state, opt_state = weighting.init(), opt.init(params)
      >>> @jax.jit
      ... def train_step(params, opt_state, state):
      ...   loss_fn = lambda p: weighting.weigh(task_losses(p, x), state)
      ...   grads = jax.grad(loss_fn)(params)
      ...   updates, opt_state = opt.update(grads, opt_state, params)
      ...   new_params = optax.apply_updates(params, updates)
      ...   # Same-batch update, as in the authors' code.
      ...   state = weighting.update(task_losses(params, x),
      ...                            task_losses(new_params, x), state)
      ...   return new_params, opt_state, state
      >>> for _ in range(3):
      ...   params, opt_state, state = train_step(params, opt_state, state)
      >>> state.task_weights.shape
      (2,)

    References:
      Liu, Feng, Stone and Liu, *FAMO: Fast Adaptive Multitask Optimization*,
      NeurIPS 2023 (Algorithm 1; PyTorch pseudocode in Appendix C).
      https://arxiv.org/abs/2306.03792
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    if learning_rate is not None:
        learning_rate = _checks.check_nonnegative(
            "learning_rate", learning_rate, allow_callable=True, allow_traced=True
        )
    if gamma is not None:
        gamma = _checks.check_nonnegative("gamma", gamma, allow_traced=True)
    eps = _checks.check_nonnegative("eps", eps)
    initial_min_losses = _checks.check_task_vector(
        "min_losses", 0.0 if min_losses is None else min_losses, num_tasks
    )
    logits_dtype = jnp.dtype(logits_dtype)
    if not jnp.issubdtype(logits_dtype, jnp.floating):
        raise TypeError(f"logits_dtype must be a floating dtype, got {logits_dtype}.")

    def default_optimizer() -> optax.GradientTransformation:
        return optax.inject_hyperparams(reference_adam, hyperparam_dtype=logits_dtype)(
            learning_rate=DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate,
            gamma=DEFAULT_GAMMA if gamma is None else gamma,
        )

    optimizer = _checks.check_optimizer(
        optimizer, default_optimizer, learning_rate=learning_rate, gamma=gamma
    )

    def gaps(losses: jax.Array, state: FAMOState, dtype) -> jax.Array:
        # l - m + eps, the quantity whose log FAMO balances; <= 0 when l <= m - eps.
        return losses.astype(dtype) - state.min_losses.astype(dtype) + eps

    def global_losses(losses: jax.Array) -> jax.Array:
        return losses if axis_name is None else jax.lax.pmean(losses, axis_name)

    def init() -> FAMOState:
        logits = jnp.zeros((num_tasks,), logits_dtype)
        return FAMOState(
            logits=logits,
            opt_state=optimizer.init(logits),
            num_updates=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
            min_losses=jnp.asarray(initial_min_losses, logits_dtype),
        )

    def check_state(state: FAMOState) -> None:
        # A state made for another num_tasks would otherwise fail in broadcasting.
        for field in ("logits", "min_losses"):
            if jnp.shape(getattr(state, field)) != (num_tasks,):
                raise ValueError(
                    f"state.{field} must have shape (num_tasks,) = ({num_tasks},), got shape "
                    f"{jnp.shape(getattr(state, field))}: was the state made by init() of "
                    "this famo()?"
                )

    def weigh(losses: ArrayLike, state: FAMOState) -> jax.Array:
        losses = _checks.check_losses("losses", losses, num_tasks)
        check_state(state)
        dtype = jnp.promote_types(losses.dtype, state.logits.dtype)
        z = jax.nn.softmax(state.logits).astype(dtype)
        if axis_name is None:
            gap = gaps(losses, state, dtype)
            c = jax.lax.stop_gradient(1.0 / jnp.sum(z / gap))
            weighted = jnp.sum(c * z * jnp.log(gap))
        else:
            # The value is the reference's loss at the replica-averaged losses;
            # its gradient w.r.t. this replica's losses is the global weight
            # vector w (a straight-through term), so averaging the parameter
            # gradients over the axis gives sum_i w_i grad(mean loss_i) without
            # relying on how psum is transposed.
            gap = jax.lax.stop_gradient(gaps(global_losses(losses), state, dtype))
            c = 1.0 / jnp.sum(z / gap)
            local = losses.astype(dtype)
            weighted = jnp.sum(c * z * jnp.log(gap)) + jnp.sum(
                (c * z / gap) * (local - jax.lax.stop_gradient(local))
            )
        # Where a loss is invalid the reference's value is NaN but its gradient
        # is finite with flipped signs (a negative gap): never a silent step.
        valid = jnp.all(jnp.isfinite(gap) & (gap > 0))
        return _numerics.nan_unless(valid, weighted).astype(losses.dtype)

    def update(prev_losses: ArrayLike, curr_losses: ArrayLike, state: FAMOState) -> FAMOState:
        prev_losses = _checks.check_losses("prev_losses", prev_losses, num_tasks)
        curr_losses = _checks.check_losses("curr_losses", curr_losses, num_tasks)
        check_state(state)
        dtype = jnp.promote_types(
            jnp.promote_types(prev_losses.dtype, curr_losses.dtype), state.logits.dtype
        )
        delta = jnp.log(gaps(global_losses(prev_losses), state, dtype)) - jnp.log(
            gaps(global_losses(curr_losses), state, dtype)
        )
        z = jax.nn.softmax(state.logits.astype(dtype))
        # Vector-Jacobian product of softmax with delta: what the reference gets
        # from torch.autograd.grad(softmax(xi), xi, grad_outputs=delta).
        # Shifting delta by a constant does not change this product; shifting it by
        # the heaviest task's delta avoids the cancellation in delta - <z, delta>
        # when z is nearly one-hot (that task's gradient would be rounding noise).
        # A masked max rather than delta[argmax(z)]: argmax plus a gather made a
        # small scanned step about 3x slower on XLA:CPU (benchmarks/performance.md).
        heaviest_delta = jnp.max(jnp.where(z == jnp.max(z), delta, -jnp.inf))
        shifted = delta - heaviest_delta
        logits_grad = (z * (shifted - jnp.dot(z, shifted))).astype(state.logits.dtype)
        # delta is NaN/inf exactly when a loss is non-finite or at/below its
        # bound; such a step is skipped so that the state is never corrupted.
        step = _numerics.guarded_optimizer_step(
            optimizer,
            logits_grad,
            state.logits,
            state.opt_state,
            jnp.all(jnp.isfinite(delta)),
            state.num_updates,
            state.num_skipped,
        )
        return FAMOState(*step, min_losses=state.min_losses)

    return _base.LossWeighting(init=init, weigh=weigh, update=update)


def check_famo_losses(
    losses: ArrayLike,
    min_losses: ArrayLike | None = None,
    eps: float = 1e-8,
    *,
    name: str = "losses",
) -> None:
    r"""Checks that every task loss is finite and above its lower bound.

    FAMO needs :math:`\ell_i - m_i + \epsilon > 0` for every task. Under ``jit``
    values cannot raise, so :func:`famo` skips such updates instead (see its
    docstring). This function turns them into an error naming the first
    offending task: called eagerly it raises immediately; inside a function
    transformed by ``jax.experimental.checkify.checkify`` (jitted or not) the
    error is returned by ``checkify`` and can be raised with ``err.throw()``.

    Args:
      losses: shape ``(num_tasks,)`` task losses.
      min_losses: the lower bounds passed to :func:`famo` (scalar or vector);
        default 0.
      eps: the ``eps`` passed to :func:`famo`.
      name: the argument name used in the message.

    Raises:
      jax.errors.JaxRuntimeError: when called eagerly, naming the first invalid task.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import famo_jax
      >>> def checked(losses):
      ...   famo_jax.check_famo_losses(losses, min_losses=0.0)
      ...   return losses.sum()
      >>> err, _ = jax.jit(checkify.checkify(checked))(jnp.array([1.0, -2.0]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      losses[1] = -2.0 is not finite or not above min_losses[1] - eps = ...
    """
    losses = jnp.asarray(losses)
    if not jnp.issubdtype(losses.dtype, jnp.floating) or losses.ndim != 1:
        raise TypeError(
            f"{name} must be a 1-D array of floats, got {losses.dtype}{list(losses.shape)}."
        )
    # Same precision as famo() with its float32 logits: in bfloat16/float16 the
    # rounded bound could disagree with the one that update() uses.
    losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
    bound = jnp.asarray(
        _checks.check_task_vector(
            "min_losses", 0.0 if min_losses is None else min_losses, losses.shape[0]
        ),
        losses.dtype,
    )
    valid = jnp.isfinite(losses) & (losses - bound + eps > 0)
    first_bad = jnp.argmin(valid)
    checkify.check(
        jnp.all(valid),
        f"{name}[{{task}}] = {{value}} is not finite or not above "
        f"min_losses[{{task}}] - eps = {{bound}}; FAMO needs losses - min_losses "
        "+ eps > 0 for every task.",
        task=first_bad,
        value=losses[first_bad],
        bound=bound[first_bad] - eps,
    )
