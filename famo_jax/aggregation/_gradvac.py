"""GradVac: Gradient Vaccine (Wang, Tsvetkov, Firat and Cao, ICLR 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from famo_jax import _checks, _numerics, _solvers
from famo_jax.aggregation import _base, _stacked

_GRANULARITIES = ("whole_model", "all_layer", "all_matrix")


class GradVacState(NamedTuple):
    r"""State of :func:`gradvac`.

    Attributes:
      cosine_targets: ``(num_groups, num_tasks, num_tasks)`` float32: the EMA
        targets :math:`\hat\phi_{ij}` of the cosine similarity between the
        (corrected) gradient of task ``i`` and the gradient of task ``j``, per
        parameter group (one group for ``granularity="whole_model"``; LibMTL's
        ``rho_T``, with the group axis first). They start at zero.
      key: the PRNG key (``(2,)`` uint32 from ``jax.random.PRNGKey``, or a typed
        key if one was given) from which the next update draws its task orders;
        every update replaces it by a fresh key.
      num_updates: ``()`` int32: updates that moved the targets.
      num_skipped: ``()`` int32: updates with a non-finite Gram matrix (a
        non-finite task gradient), which left the targets unchanged.
    """

    cosine_targets: jax.Array
    key: jax.Array
    num_updates: jax.Array
    num_skipped: jax.Array


def gradvac_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """``(k, k - 1)`` int32: for every task, a uniformly random order of the other tasks.

    Args:
      key: PRNG key.
      num_tasks: the number of tasks :math:`k`.

    Example:
      >>> import jax
      >>> from famo_jax.aggregation import gradvac_orders
      >>> orders = gradvac_orders(jax.random.PRNGKey(0), 3)
      >>> orders.shape, [sorted(row) for row in orders.tolist()]
      ((3, 2), [[1, 2], [0, 2], [0, 1]])
    """
    positions = jnp.arange(num_tasks - 1, dtype=jnp.int32)

    def order(task, task_key):
        others = positions + (positions >= task).astype(jnp.int32)
        return others[jax.random.permutation(task_key, num_tasks - 1)]

    keys = jax.random.split(key, num_tasks)
    return jax.vmap(order)(jnp.arange(num_tasks, dtype=jnp.int32), keys)


def _correction(dot, norm, other_norm, target, beta, eps):
    """GradVac's step on :math:`g_j` and the next target, for arrays of pairs (i, j)."""
    # |phi| <= 1 in exact arithmetic; rounding may exceed it (opposite gradients).
    phi = jnp.clip(dot / (norm * other_norm + eps), -1.0, 1.0)
    sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
    sin_target = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
    step = norm * (target * sin_phi - phi * sin_target) / (other_norm * sin_target + eps)
    # A zero g_j changes nothing (the vector-space update adds step * 0).
    step = jnp.where((phi < target) & (other_norm > 0), step, 0.0)
    return step, (1.0 - beta) * target + beta * phi


def gradvac_weights(
    gram: jax.Array,
    cosine_targets: jax.Array,
    orders: jax.Array,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    r"""GradVac's output as weights on the task gradients, and the next EMA targets.

    Every corrected gradient is a combination of the task gradients,
    :math:`g_i^{PC} = \sum_l C_{il} g_l` (starting at :math:`C = I`), so the
    inner products and norms it needs come from the Gram matrix :math:`A`:
    :math:`\langle g_i^{PC}, g_j\rangle = (C A)_{ij}`, :math:`\|g_i^{PC}\|^2
    = (C A C^\top)_{ii}`. For every task :math:`i`, visiting the other tasks
    :math:`j` in the order ``orders[i]``, with :math:`\phi_{ij} = \langle
    g_i^{PC}, g_j\rangle / (\|g_i^{PC}\| \|g_j\| + \epsilon)`: if
    :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math::
        g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\| \big(\hat\phi_{ij}
        \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}
        {\|g_j\| \sqrt{1 - \hat\phi_{ij}^2} + \epsilon}\, g_j ,

    and in every case :math:`\hat\phi_{ij} \leftarrow (1 - \beta)\hat\phi_{ij}
    + \beta \phi_{ij}`. The tasks :math:`i` are independent of each other, so
    they advance together, one position of their orders at a time. See
    :func:`famo_jax.gradvac` for the method.

    Args:
      gram: ``(k, k)`` Gram matrix of the task gradients (of one parameter group).
      cosine_targets: ``(k, k)`` targets :math:`\hat\phi` before the update.
      orders: ``(k, k - 1)`` integer array: ``orders[i]`` lists the other tasks in
        the order task ``i`` visits them (:func:`gradvac_orders` draws them).
      beta: EMA rate of the targets.
      eps: added to the denominators, as in the peers' code.

    Returns:
      ``(weights, cosine_targets)``: ``(k,)`` weights, on the scale of the mean
      (:math:`\frac1k \mathbf 1^\top C`), and the ``(k, k)`` next targets.

    Example:
      >>> import jax.numpy as jnp
      >>> from famo_jax.aggregation import gradvac_weights
      >>> gram = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # unit gradients at 120 degrees
      >>> weights, targets = gradvac_weights(gram, jnp.zeros((2, 2)), jnp.array([[1], [0]]))
      >>> [round(w, 4) for w in weights.tolist()]  # targets 0: each gets the PCGrad correction
      [0.75, 0.75]
      >>> [round(t, 4) for t in targets.ravel().tolist()]  # beta * phi off the diagonal
      [0.0, -0.25, -0.25, 0.0]
    """
    gram, k = _solvers.check_gram(gram)
    cosine_targets = jnp.asarray(cosine_targets, gram.dtype)
    orders = jnp.asarray(orders)
    if cosine_targets.shape != (k, k):
        raise ValueError(
            f"cosine_targets must have shape (k, k) = ({k}, {k}), got {cosine_targets.shape}."
        )
    if orders.shape != (k, k - 1) or not jnp.issubdtype(orders.dtype, jnp.integer):
        raise ValueError(
            f"orders must be an integer array of shape (k, k - 1) = ({k}, {k - 1}), got "
            f"{orders.dtype} of shape {orders.shape}."
        )
    if k == 1:  # no other task to visit
        return jnp.ones((1,), gram.dtype), cosine_targets
    tasks = jnp.arange(k)
    own_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

    def visit(position, carry):
        coefficients, inner, targets = carry  # inner = C A: <g_i^PC, g_l>
        other = orders[:, position]
        dot = inner[tasks, other]
        norm = jnp.sqrt(jnp.maximum(jnp.sum(coefficients * inner, axis=1), 0.0))
        other_norm = own_norms[other]
        step, new_targets = _correction(dot, norm, other_norm, targets[tasks, other], beta, eps)
        coefficients = coefficients.at[tasks, other].add(step)
        inner = inner + step[:, None] * gram[other]
        return coefficients, inner, targets.at[tasks, other].set(new_targets)

    coefficients, _, targets = jax.lax.fori_loop(
        0, k - 1, visit, (jnp.eye(k, dtype=gram.dtype), gram, cosine_targets)
    )
    return jnp.mean(coefficients, axis=0), targets


def _group_ids(tree: Any, granularity: str) -> tuple[list[int], int]:
    """The parameter group of every leaf of ``tree`` and the number of groups."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if granularity == "whole_model":
        return [0] * len(paths), 1
    if granularity == "all_matrix":
        return list(range(len(paths))), len(paths)
    # all_layer: the leaves of one node (a layer's kernel and bias) form a group.
    parents: dict[Any, int] = {}
    ids = [parents.setdefault(path[:-1], len(parents)) for path in paths]
    return ids, len(parents)


def _corrected_mean(updates, ids, targets, orders, beta, eps, dtype):
    """The vector-space algorithm on stacked task gradients, every group at once.

    Returns the mean of the corrected gradients (a pytree like one task's
    gradient), the next ``(G, k, k)`` targets and whether the input was finite.
    In Gram-coefficient space, inner products of a corrected gradient that is
    much shorter than the terms of its combination (many tasks in a few
    dimensions, or task scales spanning 1e-3..1e3) cancel catastrophically in
    float32; here they are taken of the corrected vectors themselves, as
    LibMTL does. The leaves are concatenated into one ``(k, m)`` matrix (one
    gather per visit, a small program to compile); a group's leaves are
    consecutive in it (groups are leaves, or the leaves under one node), so
    its sums are over a static range of columns.
    """
    leaves, treedef = jax.tree.flatten(updates)
    k = leaves[0].shape[0]
    num_groups = targets.shape[0]
    grads = jnp.concatenate([leaf.astype(dtype).reshape(k, -1) for leaf in leaves], axis=1)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    ranges = []  # (first column, end) of every group
    for group in range(num_groups):
        members = [index for index, leaf_group in enumerate(ids) if leaf_group == group]
        assert members == list(range(members[0], members[-1] + 1)), ids
        ranges.append((int(bounds[members[0]]), int(bounds[members[-1] + 1])))

    def per_group(values):  # (k, m) -> (num_groups, k), summed over each group's columns
        return jnp.stack([jnp.sum(values[:, a:b], axis=1) for a, b in ranges])

    def broadcast(step):  # (num_groups, k) -> (k, m): each group's step on its columns
        if num_groups == 1:
            return step[0][:, None]
        return jnp.concatenate(
            [jnp.broadcast_to(step[g][:, None], (k, b - a)) for g, (a, b) in enumerate(ranges)],
            axis=1,
        )

    own_norms = jnp.sqrt(per_group(grads * grads))
    valid = jnp.all(jnp.isfinite(own_norms))
    grads = jnp.where(valid, grads, 0.0)
    tasks = jnp.arange(k)

    def visit(position, carry):
        corrected, targets = carry
        other = orders[:, position]
        others = grads[other]  # row i: the g_j that task i visits now
        step, new_targets = _correction(
            per_group(corrected * others),
            jnp.sqrt(per_group(corrected * corrected)),
            own_norms[:, other],
            targets[:, tasks, other],
            beta,
            eps,
        )
        return corrected + broadcast(step) * others, targets.at[:, tasks, other].set(new_targets)

    corrected = grads
    if k > 1:  # with one task there is nothing to visit
        corrected, targets = jax.lax.fori_loop(0, k - 1, visit, (grads, targets))
    mean = jnp.where(valid, jnp.mean(corrected, axis=0), jnp.nan)
    out, start = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape[1:]))
        out.append(mean[start : start + size].reshape(leaf.shape[1:]).astype(leaf.dtype))
        start += size
    return jax.tree.unflatten(treedef, out), targets, valid


def gradvac(
    num_tasks: int,
    beta: float = 0.5,
    granularity: str = "whole_model",
    eps: float = 1e-8,
    seed: int = 0,
    *,
    key: jax.Array | None = None,
    algorithm: str = "gram",
) -> optax.GradientTransformationExtraArgs:
    r"""GradVac: raise the cosine similarity of every pair of tasks to its running target.

    Gradient Vaccine keeps, for every ordered pair of tasks :math:`(i, j)`, an
    exponential moving average :math:`\hat\phi_{ij}` of their gradients'
    cosine similarity. At every update, each task :math:`i` visits the other
    tasks in a random order; when the cosine similarity :math:`\phi_{ij}`
    between its (already corrected) gradient and :math:`g_j` is below the
    target, it adds the multiple of :math:`g_j` that raises the similarity to
    exactly :math:`\hat\phi_{ij}`:

    .. math::
        g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\| \big(\hat\phi_{ij}
        \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}
        {\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}}\, g_j ,
        \qquad \hat\phi_{ij} \leftarrow (1 - \beta)\hat\phi_{ij} + \beta \phi_{ij} .

    With targets at zero (the first update) this is PCGrad's projection. The
    output is the mean of the corrected gradients. Two algorithms, equal in
    exact arithmetic:

    - ``algorithm="gram"`` (default, as TorchJD): the corrections are made on
      ``k x k`` coefficients from the Gram matrix of each parameter group
      (:func:`famo_jax.aggregation.gradvac_weights`); with
      ``"whole_model"`` it also takes
      :class:`~famo_jax.aggregation.ImplicitTaskGradients`. Its cost is about
      PCGrad's. Its float32 accuracy is that of the Gram matrix: components of
      a corrected gradient below :math:`\sqrt{\epsilon_{32}} \approx 3 \cdot
      10^{-4}` of the terms it is combined from are lost, which matters when
      the corrections nearly cancel a gradient (many tasks in a few
      dimensions, or task scales spanning :math:`10^{\pm 3}`: a few percent of
      error in the targets after one update for the parity fixtures' 10 tasks
      in a 2-entry leaf; 1.4e-6 of the output on their whole-model cases).
    - ``algorithm="vectors"`` (as LibMTL): the corrections are made on the
      stacked gradients themselves, as accurate in float32 as LibMTL's
      (1e-7 on that leaf), at the price of :math:`k - 1` sequential,
      memory-bound passes over them (a training step of a 263k-parameter
      trunk with 10 tasks took 5.5x as long as with the Gram path, which took
      as long as PCGrad's).

    This follows LibMTL's ``GradVac`` (there is no code from the authors) and
    TorchJD 0.18's ``GradVac``, which agree: the same order of operations, the
    targets updated with the cosine computed *before* the correction,
    :math:`\epsilon = 10^{-8}` in the cosine's and the correction's
    denominators (which makes gradients much smaller than
    :math:`10^{-4}` look less similar than they are), targets starting at zero,
    default :math:`\beta = 0.5`, and one shuffle of the other tasks per task
    and update (Python's ``random.shuffle`` in LibMTL, ``torch.randperm`` in
    TorchJD; here a PRNG key kept in the state, and ``update(...,
    task_orders=orders)`` replays given orders). ``granularity`` is LibMTL's
    ``GradVac_group_type``: ``"whole_model"`` (0, the default), ``"all_layer"``
    (1: LibMTL groups the parameters of each PyTorch module; here the leaves
    under one node of the pytree, such as a Flax layer's ``kernel`` and
    ``bias``) and ``"all_matrix"`` (2: every leaf is a group); each group keeps
    its own targets and corrections, with the same task orders. TorchJD offers
    only the whole model (other groupings by calling it per group). The only
    difference from both: :math:`\sqrt{1 - \phi^2}` is clamped at zero, where
    rounding can make :math:`|\phi|` exceed 1 for exactly opposite gradients
    (LibMTL would take the square root of a negative number; TorchJD clamps).

    Scale convention: the output is :math:`\frac1k \sum_i g_i^{PC}`, on the
    scale of the *mean* of the task gradients (equal task gradients give
    exactly that gradient). LibMTL and TorchJD sum the corrected gradients
    (sum convention): ``optax.chain(famo_jax.gradvac(k), optax.scale(k))``
    reproduces them. For ``k = 1`` the output is the task gradient. The paper
    aggregates over the shared parameters only: use :func:`famo_jax.shared_trunk`.

    Non-finite task gradients: the output is NaN (``optax.apply_if_finite``
    then skips the step), the targets are kept and the update is counted in
    ``num_skipped``; the key advances, as on every update.

    Cost: :math:`O(k^2 m)` time for :math:`m` parameters (``"gram"``: the
    Gram matrices, then :math:`O(k^3)` per group; ``"vectors"``: :math:`k - 1`
    sequential passes of :math:`O(k m)`), :math:`O(k^2)` extra memory per group
    (``"vectors"``: :math:`O(k m)` for the corrected gradients), :math:`O(k^2)`
    state per group.

    Args:
      num_tasks: the number of tasks :math:`k` (the state holds the targets).
      beta: EMA rate of the targets, in ``[0, 1]`` (LibMTL's ``GradVac_beta``).
      granularity: ``"whole_model"``, ``"all_layer"`` or ``"all_matrix"``.
        With the last two, ``init`` needs the parameters (their pytree paths
        define the groups) and the input must be stacked task gradients.
      eps: added to the denominators (``>= 0``).
      seed: seed of the initial PRNG key (a non-negative int); ignored when
        ``key`` is given.
      key: an explicit initial PRNG key.
      algorithm: ``"gram"`` or ``"vectors"`` (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, task_orders=None)`` takes per-task gradients stacked on a
      leading axis of size ``k`` (or, with ``"whole_model"`` and ``"gram"``,
      :class:`~famo_jax.aggregation.ImplicitTaskGradients`) and returns one
      gradient pytree; ``task_orders`` (``(k, k - 1)`` integers) replaces the
      random orders of that update. State :class:`GradVacState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> task_grads = jnp.array([[1.0, 0.0], [-0.5, 1.0]])  # conflicting
      >>> tx = famo_jax.gradvac(num_tasks=2)
      >>> state = tx.init(None)
      >>> out, state = tx.update(task_grads, state)  # targets 0: PCGrad's projections
      >>> [round(x, 4) for x in out.tolist()]
      [0.4, 0.7]
      >>> round(float(state.cosine_targets[0, 0, 1]), 4)  # beta * cos(g_1, g_2)
      -0.2236

    References:
      Wang, Tsvetkov, Firat and Cao, *Gradient Vaccine: Investigating and
      Improving Multi-task Optimization in Massively Multilingual Models*,
      ICLR 2021. https://openreview.net/forum?id=F1vEjWK-lH\_ (implementations:
      https://github.com/median-research-group/LibMTL/blob/main/LibMTL/weighting/GradVac.py,
      https://github.com/TorchJD/torchjd)
    """
    num_tasks = _checks.check_num_tasks(num_tasks)
    beta = float(_checks.check_nonnegative("beta", beta))
    if beta > 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    eps = float(_checks.check_nonnegative("eps", eps))
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}.")
    if algorithm not in ("gram", "vectors"):
        raise ValueError(f"algorithm must be 'gram' or 'vectors', got {algorithm!r}.")
    first_key = _checks.initial_key(seed, key)
    per_group = jax.vmap(
        lambda gram, targets, orders: gradvac_weights(gram, targets, orders, beta=beta, eps=eps),
        in_axes=(0, 0, None),
    )

    def init_fn(params):
        if granularity == "whole_model":
            num_groups = 1
        elif params is None:
            raise ValueError(
                f"gradvac(granularity={granularity!r}) groups the parameters by their pytree "
                "paths: call init(params) with the parameters."
            )
        else:
            num_groups = _group_ids(params, granularity)[1]
        zero = jnp.zeros((), jnp.int32)
        return GradVacState(
            cosine_targets=jnp.zeros((num_groups, num_tasks, num_tasks), jnp.float32),
            key=first_key(),
            num_updates=zero,
            num_skipped=zero,
        )

    def update_fn(updates, state, params=None, *, task_orders=None, **extra_args):
        del params, extra_args
        if granularity != "whole_model":
            _stacked.reject_implicit(
                updates, f"gradvac(granularity={granularity!r})", "needs the Gram matrix per group"
            )
        if algorithm == "vectors":
            _stacked.reject_implicit(
                updates, 'gradvac(algorithm="vectors")', "corrects the task gradients themselves"
            )
        k = _base.num_tasks_of(updates)
        _base.check_built_num_tasks(k, num_tasks, "gradvac")
        dtype = _base.compute_dtype(updates)
        next_key, orders_key = jax.random.split(state.key)
        if task_orders is None:
            orders = gradvac_orders(orders_key, k)
        else:
            orders = jnp.asarray(task_orders)
            if orders.shape != (k, k - 1) or not jnp.issubdtype(orders.dtype, jnp.integer):
                raise ValueError(
                    f"task_orders must be an integer array of shape (k, k - 1) = ({k}, "
                    f"{k - 1}), got {orders.dtype} of shape {orders.shape}."
                )
        targets = state.cosine_targets.astype(dtype)
        if isinstance(updates, _base.ImplicitTaskGradients):
            ids, grams = None, _base.gram_matrix(updates, dtype)[None]
        else:
            ids, num_groups = _group_ids(updates, granularity)
            if num_groups != targets.shape[0]:
                raise ValueError(
                    f"gradvac(granularity={granularity!r}): the task gradients have "
                    f"{num_groups} parameter groups, the state was made for "
                    f"{targets.shape[0]} (call init with the same parameters)."
                )
        if algorithm == "vectors":
            out, new_targets, valid = _corrected_mean(
                updates, ids, targets, orders, beta, eps, dtype
            )
        else:
            if ids is not None:
                grams = jnp.zeros((num_groups, k, k), dtype)
                for group, leaf in zip(ids, jax.tree.leaves(updates), strict=True):
                    grams = grams.at[group].add(_base.gram_matrix(leaf, dtype))
            valid = jnp.all(jnp.isfinite(grams))
            weights, new_targets = per_group(
                jnp.where(valid, grams, jnp.eye(k, dtype=dtype)), targets, orders
            )
            weights = jnp.where(valid, weights, jnp.nan)
            if ids is None or granularity == "whole_model":
                out = _base.combine(updates, weights[0])
            else:
                leaves, treedef = jax.tree.flatten(updates)
                out = jax.tree.unflatten(
                    treedef,
                    [_base.combine(leaf, weights[g]) for g, leaf in zip(ids, leaves, strict=True)],
                )
        num_updates, num_skipped = _numerics.counters_after(
            valid, state.num_updates, state.num_skipped
        )
        new_state = GradVacState(
            cosine_targets=jnp.where(valid, new_targets, targets).astype(
                state.cosine_targets.dtype
            ),
            key=next_key,
            num_updates=num_updates,
            num_skipped=num_skipped,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
