r"""The Gramian engine: task Gram matrices without materialising the Jacobian.

Every Gram-based aggregator needs only the ``k x k`` Gram matrix
:math:`A = J J^\top` of the task gradients to choose its weights :math:`w`,
and then the weighted sum :math:`J^\top w`. :func:`gramian_task_gradients`
computes both without the ``(k, m)`` Jacobian :math:`J`.

How: the loss function is traced to a jaxpr (calls to ``jax.jit`` functions
are inlined), and every place where a parameter enters an operation is found,
following it through value-preserving layout operations (reshapes,
transposes, floating-point dtype conversions, broadcasts that only add
size-1 dimensions). One forward pass and one backward pass batched over the
``k`` tasks (``vmap`` of the VJP over the unit cotangents of the loss vector)
then give, for each leaf, what its Gram contribution needs. Each leaf gets one
of these strategies (:func:`gramian_plan` reports them):

- ``"dense"``: a leaf used once, as an operand of a ``dot_general`` (dense
  layers, ``einsum``, the projections of attention layers; ``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nn.Dense``, ``nn.DenseGeneral``). The backward
  pass yields the per-task cotangents :math:`D_i` of the operation's output
  (shape ``(k, rows, width)``) instead of the per-task weight gradients. For
  :math:`y = x W` (``x``: ``(n, c)``, ``W``: ``(c, q)``), :math:`\nabla_W
  \ell_i = x^\top D_i` and

  .. math::
      \langle \nabla_W \ell_i, \nabla_W \ell_j \rangle
      = \sum_{b, b'} (x x^\top)_{b b'} (D_i D_j^\top)_{b b'}
      = \langle D_i, K D_j \rangle, \qquad K = x x^\top ,

  :math:`n^2 c + k n^2 q + k^2 n q` multiply-adds and :math:`O(k n q)`
  memory, against :math:`k n c q + k^2 c q` and :math:`O(k c q)` for the
  per-task weight gradients. Batch dimensions of the ``dot_general`` are
  handled group by group. A cost model picks the cheaper exact formula: when
  the rows outnumber the input features the leaf is ``"direct"`` instead. A
  weight used by several ``dot_general`` operations that lay it out alike (an unrolled
  recurrent layer, one module applied to several inputs) is one dense layer
  whose rows are those of all its uses.
- ``"bias"``: a leaf used once, added to the output of a ``"dense"``
  operation and broadcast along its rows only (``x @ W + b``; the biases of
  the layers above). Its gradient is the sum of :math:`D_i` over the rows,
  i.e. the weight of a constant input feature 1, so it costs nothing:
  :math:`K = x x^\top + 1`.
- ``"embedding"``: a leaf used only as the table of row lookups (``gather``
  along axis 0: ``jnp.take(table, ids, axis=0)``, ``nnx.Embed``,
  ``nn.Embed``; several lookups of one table are pooled), when there are
  fewer lookups than rows. The cotangents of the looked-up rows are summed per
  distinct index (a sort and a segment sum) and the Gram matrix is that of the
  sums: :math:`O(k \cdot \text{lookups} \cdot \text{width})` time and
  memory, whatever the vocabulary size. Out-of-range indices follow the
  gather's mode (dropped for ``fill``, clamped for ``clip``).
- ``"direct"``: any other leaf (normalisation scales and offsets, convolution
  kernels and biases, a weight used in different ways (a tied embedding and
  output projection), a parameter entering a
  ``scan``, a ``custom_jvp``/``custom_vjp`` function, ``jax.checkpoint`` or
  anything else) gets its per-task gradients from the same batched backward
  pass (what ``jax.jacrev`` computes for it), memory :math:`O(k \cdot
  \text{size})`, while the total of such leaves fits in ``max_direct_bytes``
  (smallest leaves first).
- ``"chunked"``: the leaves that do not fit go through a bounded-memory
  fallback: their per-task gradients are computed ``c`` tasks at a time
  (``c`` from ``max_direct_bytes``) and the Gram matrix block by block (the
  blocks on and above the diagonal), for about :math:`k^2 / (2c) + k / c`
  extra backward passes of ``c`` tasks and :math:`O(c \cdot \text{size})`
  memory.
- ``"unused"``: a leaf the losses do not depend on (zero gradient), and
  ``"not shared"``: a leaf outside ``is_shared`` (no Gram contribution; it
  gets the mean or summed gradient).

Every strategy is exact: it computes the same inner products as the
Jacobian, in another order (equal up to floating-point rounding); nothing is
approximated.

The batched backward pass runs in a loop over chunks of tasks and the dense
Gram products in a loop over blocks of rows (``task_chunks``; at least 4 by
default), so that their temporaries are a fraction of the cotangents: the
memory is that of the cotangents :math:`D_i` of the dense layers, plus the
per-task gradients of the ``"direct"`` leaves.

The weighted sum :math:`\sum_i w_i g_i` (``combine``) reuses the batched
backward pass: for a ``"dense"``, ``"bias"`` or ``"embedding"`` leaf it is
the operation's transpose applied to :math:`\sum_i w_i D_i` (one
weight-gradient product per layer, no further pass through the activations),
for a ``"direct"`` leaf the weighted sum of its gradients; ``"chunked"`` and
``"not shared"`` leaves need one more (partial) backward pass of a weighted loss.

Limitations: ``combine`` must be called inside the same ``jit`` (trace) as
the function that returned it. Under ``pmap``/``shard_map`` the engine computes
the Gram matrix of each device's local batch (no ``axis_name`` yet).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from famo_jax import _checks, _numerics
from famo_jax.aggregation import _base, _task_gradients

DENSE = "dense"
BIAS = "bias"
EMBEDDING = "embedding"
DIRECT = "direct"
CHUNKED = "chunked"
UNUSED = "unused"
NOT_SHARED = "not shared"
STRATEGIES = (DENSE, BIAS, EMBEDDING, DIRECT, CHUNKED, UNUSED, NOT_SHARED)

DEFAULT_MAX_DIRECT_BYTES = 2**28  # 256 MiB of per-task gradients of "direct" leaves.
# Automatic task chunks: at least 4 (a chunk's temporaries are at most a quarter of the
# cotangents), more when the cotangents exceed 128 MiB per chunk.
MIN_TASK_CHUNKS = 4
CHUNK_BYTES = 2**27

# Calls whose body is inlined, so that the parameters' uses inside them are seen.
_INLINED_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Operations through which a parameter is followed: their transposes preserve inner
# products (permutations of the entries, exact dtype conversions of the cotangent).
_LAYOUT_PRIMITIVES = frozenset(
    {"reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p", "rev"}
)
_HIGHEST = jax.lax.Precision.HIGHEST


# --- Tracing ------------------------------------------------------------------------


def _is_literal(v: Any) -> bool:
    return isinstance(v, jex_core.Literal)


def _read(env: dict, v: Any) -> Any:
    return v.val if _is_literal(v) else env[v]


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Applies one jaxpr equation to values, as ``jax.core.eval_jaxpr`` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # jax < 0.5 returns (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates a jaxpr, inlining the bodies of nested ``jit`` calls."""
    env: dict = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINED_CALLS:
            body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(body, jex_core.ClosedJaxpr):
                outs = _eval_inlined(body.jaxpr, body.consts, invals)
            else:
                outs = _eval_inlined(body, (), invals)
        else:
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


class _Traced(NamedTuple):
    """The loss function as a flat jaxpr of the differentiated leaves."""

    jaxpr: Any  # jex_core.Jaxpr: invars are the leaves; outvars [losses, *aux leaves]
    consts: list[Any]
    aux_treedef: Any  # None without has_aux


def _trace(flat_fn: Callable[..., list[Any]], leaves: Sequence[Any]) -> _Traced:
    aux_treedef = []

    def fn(*leaves):
        out, treedef = flat_fn(*leaves)
        aux_treedef.append(treedef)
        return out

    nested = jax.make_jaxpr(fn)(*leaves)
    flat = jax.make_jaxpr(lambda *xs: _eval_inlined(nested.jaxpr, nested.consts, xs))(*leaves)
    return _Traced(flat.jaxpr, list(flat.consts), aux_treedef[0])


# --- Where the parameters are used -------------------------------------------------


class _Use(NamedTuple):
    """One operation a parameter leaf enters.

    Attributes:
      eqn: index of the equation in the flat jaxpr (None: the leaf, through
        layout operations only, is an output of the function).
      position: which operand of the equation it is.
      chain: indices of the layout equations from the leaf to that operand.
    """

    eqn: int | None
    position: int
    chain: tuple[int, ...]


def _is_layout(eqn: Any) -> bool:
    name = eqn.primitive.name
    if len(eqn.invars) != 1 or len(eqn.outvars) != 1:
        return False
    in_aval, out_aval = eqn.invars[0].aval, eqn.outvars[0].aval
    if name in _LAYOUT_PRIMITIVES:
        return True
    if name == "convert_element_type":
        return jnp.issubdtype(in_aval.dtype, jnp.floating) and jnp.issubdtype(
            out_aval.dtype, jnp.floating
        )
    if name == "broadcast_in_dim":  # only adds size-1 dimensions
        return math.prod(in_aval.shape) == math.prod(out_aval.shape)
    return False


def _find_uses(jaxpr: Any, num_leaves: int) -> list[list[_Use]]:
    origin: dict[Any, tuple[int, tuple[int, ...]]] = {
        v: (i, ()) for i, v in enumerate(jaxpr.invars[:num_leaves])
    }
    uses: list[list[_Use]] = [[] for _ in range(num_leaves)]
    for index, eqn in enumerate(jaxpr.eqns):
        hits = [
            (pos, origin[v])
            for pos, v in enumerate(eqn.invars)
            if not _is_literal(v) and v in origin
        ]
        if not hits:
            continue
        if _is_layout(eqn):
            ((_, (leaf, chain)),) = hits
            origin[eqn.outvars[0]] = (leaf, (*chain, index))
            continue
        for pos, (leaf, chain) in hits:
            uses[leaf].append(_Use(index, pos, chain))
    for v in jaxpr.outvars:
        if not _is_literal(v) and v in origin:
            leaf, chain = origin[v]
            uses[leaf].append(_Use(None, 0, chain))
    return uses


class _DenseDims(NamedTuple):
    r"""A ``dot_general`` with a parameter operand, as ``(G, N, C) x (G, C, Q)``.

    ``x_perm`` orders the other operand ``x`` as (batch, free, contracting) and
    ``d_perm`` the task-stacked output cotangent as (task, batch, x-free,
    parameter-free), so that :math:`\nabla P_g = X_g^\top D_g` for every group
    ``g`` of the batch dimensions.
    """

    x_position: int
    x_perm: tuple[int, ...]
    d_perm: tuple[int, ...]
    p_perm: tuple[int, ...]  # the parameter operand as (batch, contracting, free)
    row_dims: tuple[int, ...]  # the output dimensions of x's free dimensions
    groups: int
    rows: int
    contracted: int
    columns: int


def _dense_dims(eqn: Any, position: int) -> _DenseDims | None:
    if eqn.primitive.name != "dot_general" or len(eqn.invars) != 2:
        return None
    x_position = 1 - position
    x_var, p_var = eqn.invars[x_position], eqn.invars[position]
    out_aval = eqn.outvars[0].aval
    if not jnp.issubdtype(out_aval.dtype, jnp.floating):
        return None
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    x_c, x_b = (lhs_c, lhs_b) if x_position == 0 else (rhs_c, rhs_b)
    p_c, p_b = (rhs_c, rhs_b) if x_position == 0 else (lhs_c, lhs_b)
    x_shape, p_shape = x_var.aval.shape, p_var.aval.shape
    x_free = [d for d in range(len(x_shape)) if d not in x_c and d not in x_b]
    p_free = [d for d in range(len(p_shape)) if d not in p_c and d not in p_b]
    num_batch = len(x_b)
    if x_position == 0:  # output: batch, x free, parameter free
        y_x = tuple(range(num_batch, num_batch + len(x_free)))
        y_p = tuple(range(num_batch + len(x_free), len(out_aval.shape)))
    else:  # output: batch, parameter free, x free
        y_p = tuple(range(num_batch, num_batch + len(p_free)))
        y_x = tuple(range(num_batch + len(p_free), len(out_aval.shape)))
    d_perm = (0, *(1 + d for d in range(num_batch)), *(1 + d for d in y_x), *(1 + d for d in y_p))
    return _DenseDims(
        x_position=x_position,
        x_perm=(*x_b, *x_free, *x_c),
        d_perm=d_perm,
        p_perm=(*p_b, *p_c, *p_free),
        row_dims=y_x,
        groups=math.prod(x_shape[d] for d in x_b),
        rows=math.prod(x_shape[d] for d in x_free),
        contracted=math.prod(x_shape[d] for d in x_c),
        columns=math.prod(p_shape[d] for d in p_free),
    )


def _dense_costs(dims: _DenseDims, k: int) -> tuple[int, int]:
    """Multiply-adds of the Gram trick and of the per-task weight gradients."""
    g, n, c, q = dims.groups, dims.rows, dims.contracted, dims.columns
    trick = g * n * n * c + k * g * n * n * q + k * k * g * n * q
    direct = k * g * n * c * q + k * k * g * c * q
    return trick, direct


def _canonical_index(jaxpr: Any, use: _Use, dims: _DenseDims, shape: tuple) -> np.ndarray | None:
    r"""Which entry of the leaf each entry of the use's ``(G, C, Q)`` operand is.

    Uses of one leaf whose operands lay its entries out identically can be
    pooled as extra rows of one dense layer: :math:`\nabla P = \sum_u X_u^\top
    D_u = [X_1; X_2; \dots]^\top [D_1; D_2; \dots]`.
    """
    index = np.arange(math.prod(shape)).reshape(shape)
    for c in use.chain:
        eqn = jaxpr.eqns[c]
        name = eqn.primitive.name
        if name == "transpose":
            index = np.transpose(index, eqn.params["permutation"])
        elif name == "rev":
            index = np.flip(index, tuple(eqn.params["dimensions"]))
        elif name == "reshape" and eqn.params.get("dimensions") is not None:
            return None
        elif name in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim"):
            index = index.reshape(eqn.outvars[0].aval.shape)
        elif name not in ("convert_element_type", "copy", "copy_p"):
            return None
    return np.transpose(index, dims.p_perm).reshape(-1)


def _pooled_dense_dims(jaxpr: Any, uses: Sequence[_Use], shape: tuple) -> list[_DenseDims] | None:
    """The uses' forms if they are ``dot_general`` operations pooled as rows."""
    maybe = [_dense_dims(jaxpr.eqns[u.eqn], u.position) for u in uses]
    forms = [f for f in maybe if f is not None]
    if len(forms) < len(maybe):
        return None
    first = forms[0]
    layout = _canonical_index(jaxpr, uses[0], first, shape)
    for use, form in zip(uses[1:], forms[1:], strict=True):
        if (form.groups, form.contracted, form.columns) != (
            first.groups,
            first.contracted,
            first.columns,
        ):
            return None
        other = _canonical_index(jaxpr, use, form, shape)
        if layout is None or other is None or not np.array_equal(layout, other):
            return None
    return forms


class _Lookup(NamedTuple):
    lookups: int  # number of looked-up rows
    row_size: int
    num_rows: int
    mode: Any  # jax.lax.GatherScatterMode


def _row_lookup(eqn: Any, position: int) -> _Lookup | None:
    """A ``gather`` of whole rows along axis 0 of the parameter (``jnp.take(p, ids, 0)``)."""
    if eqn.primitive.name != "gather" or position != 0:
        return None
    table, ids = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    row_rank = len(table.shape) - 1
    if not (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and not tuple(getattr(dn, "start_indices_batching_dims", ()))
        and tuple(eqn.params["slice_sizes"]) == (1, *table.shape[1:])
        and tuple(dn.offset_dims) == tuple(range(len(out.shape) - row_rank, len(out.shape)))
        and len(ids.shape) >= 1
        and ids.shape[-1] == 1
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        return None
    return _Lookup(
        lookups=math.prod(ids.shape[:-1]),
        row_size=math.prod(table.shape[1:]),
        num_rows=table.shape[0],
        mode=eqn.params["mode"],
    )


def _consumers(jaxpr: Any) -> dict[Any, list[tuple[int | None, int]]]:
    """Var -> the (equation, operand position) pairs reading it (None: an output)."""
    readers: dict[Any, list[tuple[int | None, int]]] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for pos, v in enumerate(eqn.invars):
            if not _is_literal(v):
                readers.setdefault(v, []).append((index, pos))
    for v in jaxpr.outvars:
        if not _is_literal(v):
            readers.setdefault(v, []).append((None, 0))
    return readers


def _bias_of(jaxpr: Any, use: _Use, dense: dict[int, _DenseDims], readers: dict) -> int | None:
    """The dense equation whose output this use adds the leaf to as a bias, if it does.

    A bias: ``add(y, b)`` where ``y`` is the output of a "dense" ``dot_general``
    read by this ``add`` only, and ``b`` is broadcast along ``y``'s row
    dimensions only (size 1 there, full elsewhere). Its gradient is then the
    sum over the rows of ``y``'s cotangent, and its Gram contribution that of a
    column of ones appended to ``x``.
    """
    if use.eqn is None:
        return None
    eqn = jaxpr.eqns[use.eqn]
    if eqn.primitive.name != "add" or len(eqn.invars) != 2:
        return None
    y = eqn.invars[1 - use.position]
    if _is_literal(y):
        return None
    producers = [
        i
        for i in dense
        if jaxpr.eqns[i].outvars[0] is y and readers.get(y) == [(use.eqn, 1 - use.position)]
    ]
    if not producers:
        return None
    (producer,) = producers
    y_shape = y.aval.shape
    b_shape = eqn.invars[use.position].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    dims = dense[producer]
    if len(b_shape) != len(y_shape) or tuple(out_shape) != tuple(y_shape):
        return None
    for d, (bs, ys) in enumerate(zip(b_shape, y_shape, strict=True)):
        if bs != (1 if d in dims.row_dims else ys):
            return None
    return producer


class _DenseOp(NamedTuple):
    dims: _DenseDims
    kernel_leaf: int
    bias_leaf: int | None
    bias_use: _Use | None


class _Plan(NamedTuple):
    strategies: list[str]  # per leaf
    uses: list[list[_Use]]  # per leaf
    perturbed: list[int]  # equations whose outputs get per-task cotangents, in order
    dense: dict[int, _DenseOp]  # "dense" equation -> its form and leaves
    lookups: dict[int, _Lookup]  # "embedding" equation -> its form
    tables: dict[int, list[int]]  # "embedding" leaf -> its lookup equations
    pooled: dict[int, list[int]]  # "dense" leaf used several times -> its equations
    pooled_dims: dict[int, _DenseDims]  # their forms
    chunk_size: int  # tasks per block of the "chunked" fallback
    num_chunks: int  # chunks of tasks of the batched backward pass


def _itemsize(leaf: Any) -> int:
    return jnp.dtype(jnp.result_type(leaf)).itemsize


def _make_plan(
    jaxpr: Any,
    leaves: Sequence[Any],
    shared: Sequence[bool],
    num_tasks: int,
    max_direct_bytes: int,
    task_chunks: int | None,
) -> _Plan:
    uses = _find_uses(jaxpr, len(leaves))
    readers = _consumers(jaxpr)
    strategies: list[str | None] = [None] * len(leaves)
    dense_dims: dict[int, _DenseDims] = {}
    kernel_of: dict[int, int] = {}
    lookups: dict[int, _Lookup] = {}
    tables: dict[int, list[int]] = {}
    pooled: dict[int, list[int]] = {}
    pooled_dims: dict[int, _DenseDims] = {}
    for leaf, (leaf_uses, is_shared) in enumerate(zip(uses, shared, strict=True)):
        size = math.prod(jnp.shape(leaves[leaf]))
        if not is_shared:
            strategies[leaf] = NOT_SHARED
            continue
        if not leaf_uses:
            strategies[leaf] = UNUSED
            continue
        eqn_ids = [u.eqn for u in leaf_uses if u.eqn is not None]
        if len(eqn_ids) < len(leaf_uses):
            continue
        eqns = [jaxpr.eqns[e] for e in eqn_ids]
        too_big = num_tasks * size * _itemsize(leaves[leaf]) > max_direct_bytes
        if len(leaf_uses) == 1:
            dims = _dense_dims(eqns[0], leaf_uses[0].position)
            if dims is not None:
                trick, direct = _dense_costs(dims, num_tasks)
                if trick <= direct or too_big:
                    strategies[leaf] = DENSE
                    dense_dims[eqn_ids[0]] = dims
                    kernel_of[eqn_ids[0]] = leaf
                    continue
        else:
            forms = _pooled_dense_dims(jaxpr, leaf_uses, jnp.shape(leaves[leaf]))
            if forms is not None:
                rows = sum(f.rows for f in forms)
                trick, direct = _dense_costs(forms[0]._replace(rows=rows), num_tasks)
                if trick <= direct or too_big:
                    strategies[leaf] = DENSE
                    pooled[leaf] = eqn_ids
                    pooled_dims.update(dict(zip(eqn_ids, forms, strict=True)))
                    continue
        maybe_lookups = [_row_lookup(e, u.position) for e, u in zip(eqns, leaf_uses, strict=True)]
        row_lookups = [f for f in maybe_lookups if f is not None]
        if len(row_lookups) == len(maybe_lookups):
            if sum(f.lookups for f in row_lookups) < row_lookups[0].num_rows or too_big:
                strategies[leaf] = EMBEDDING
                tables[leaf] = eqn_ids
                lookups.update(dict(zip(eqn_ids, row_lookups, strict=True)))
    # Biases of the dense layers ride along with their kernels.
    bias: dict[int, tuple[int, _Use]] = {}
    for leaf, leaf_uses in enumerate(uses):
        if strategies[leaf] is None and len(leaf_uses) == 1:
            producer = _bias_of(jaxpr, leaf_uses[0], dense_dims, readers)
            if producer is not None and producer not in bias:
                bias[producer] = (leaf, leaf_uses[0])
                strategies[leaf] = BIAS
    dense = {
        e: _DenseOp(dims, kernel_of[e], *bias.get(e, (None, None)))
        for e, dims in dense_dims.items()
    }
    # "direct" for the smallest remaining leaves while their per-task gradients fit.
    budget = max_direct_bytes
    chunked_bytes = 0
    direct_bytes = 0
    undecided = [i for i, s in enumerate(strategies) if s is None]
    for leaf in sorted(undecided, key=lambda i: math.prod(jnp.shape(leaves[i]))):
        per_task = math.prod(jnp.shape(leaves[leaf])) * _itemsize(leaves[leaf])
        if num_tasks * per_task <= budget:
            strategies[leaf] = DIRECT
            budget -= num_tasks * per_task
            direct_bytes += per_task
        else:
            strategies[leaf] = CHUNKED
            chunked_bytes += per_task
    chunk_size = max(1, min(num_tasks, max_direct_bytes // max(chunked_bytes, 1)))
    perturbed = sorted({*dense, *lookups, *pooled_dims})
    per_task_bytes = direct_bytes + sum(
        math.prod(jaxpr.eqns[e].outvars[0].aval.shape)
        * jnp.dtype(jaxpr.eqns[e].outvars[0].aval.dtype).itemsize
        for e in perturbed
    )
    if task_chunks is None:
        least = max(min(num_tasks, MIN_TASK_CHUNKS), -(-num_tasks * per_task_bytes // CHUNK_BYTES))
        candidates = [(n * -(-num_tasks // n), n) for n in range(least, 2 * least + 1)]
        _, num_chunks = min(candidates)  # the least padding, then the fewest chunks
    else:
        num_chunks = min(task_chunks, num_tasks)
    decided = [s for s in strategies if s is not None]
    assert len(decided) == len(strategies)  # every leaf has a strategy by now
    return _Plan(
        decided,
        uses,
        perturbed,
        dense,
        lookups,
        tables,
        pooled,
        pooled_dims,
        chunk_size,
        num_chunks,
    )


# --- Gram contributions ---------------------------------------------------------------


def _row_blocks(rows: int, target: int) -> int:
    """A number of equal blocks of rows near ``target`` (1 if none divides ``rows``)."""
    for blocks in range(target, 2 * target + 1):
        if rows % blocks == 0 and blocks <= rows:
            return blocks
    return 1


def _dense_gram(
    x: jax.Array, d: jax.Array, dims: _DenseDims, has_bias: bool, num_blocks: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    r""":math:`\langle D_i, K D_j \rangle` summed over groups, :math:`K = x x^\top (+1)`.

    With :math:`D_i` the output cotangents of task ``i`` (``d``: task-stacked),
    :math:`\langle D_i, K D_j\rangle = \sum_b \langle D_{i,b}, (K D_j)_b
    \rangle` is accumulated over blocks of rows ``b`` in a loop, so that only a
    block of the products :math:`K D_j` exists at once, while every product
    still spans all tasks (full-size matrix products).

    Returns:
      The ``(k, k)`` Gram contribution and ``d`` passed through the loop: using
      it afterwards (rather than the input) lets XLA run the loop on the same
      buffer instead of copying it.
    """
    k = d.shape[0]
    g, n, c, q = dims.groups, dims.rows, dims.contracted, dims.columns
    x = jnp.transpose(x, dims.x_perm).reshape(g, n, c).astype(dtype)
    kernel = jnp.einsum("gnc,gmc->gnm", x, x, precision=_HIGHEST)
    if has_bias:  # the bias is the weight of a constant input feature 1
        kernel = kernel + 1
    blocks = _row_blocks(n, num_blocks)
    size = n // blocks

    def block(b, d):
        d = jnp.transpose(d, dims.d_perm).reshape(k, g, n, q).astype(dtype)
        rows = jax.lax.dynamic_slice_in_dim(kernel, b * size, size, axis=1)  # (g, size, n)
        # The kernel rows are broadcast over the tasks: each product is a plain matrix
        # product of row-major blocks (no transposed copies of the cotangents).
        m = jnp.einsum(
            "kgnm,kgmq->kgnq", jnp.broadcast_to(rows, (k, *rows.shape)), d, precision=_HIGHEST
        )
        d_b = jax.lax.dynamic_slice_in_dim(d, b * size, size, axis=2)
        return jnp.matmul(d_b.reshape(k, -1), m.reshape(k, -1).T, precision=_HIGHEST)

    if blocks == 1:
        return block(0, d), d

    def body(b, carry):
        gram, d = carry
        return gram + block(b, d), d

    return jax.lax.fori_loop(0, blocks, body, (jnp.zeros((k, k), dtype), d))


def _pooled_dense_gram(
    xs: Sequence[jax.Array],
    ds: Sequence[jax.Array],
    forms: Sequence[_DenseDims],
    num_blocks: int,
    dtype: Any,
) -> jax.Array:
    """The Gram contribution of a weight used by several ``dot_general``, as one layer.

    The uses' inputs and output cotangents are put in the ``(G, N, C)`` and
    ``(k, G, N, Q)`` forms and concatenated along the rows.
    """
    k = ds[0].shape[0]
    x_rows, d_rows = [], []
    for x, d, f in zip(xs, ds, forms, strict=True):
        x_rows.append(jnp.transpose(x, f.x_perm).reshape(f.groups, f.rows, f.contracted))
        d_rows.append(jnp.transpose(d, f.d_perm).reshape(k, f.groups, f.rows, f.columns))
    x = jnp.concatenate(x_rows, axis=1)
    d = jnp.concatenate(d_rows, axis=2)
    first = forms[0]
    pooled = first._replace(x_perm=(0, 1, 2), d_perm=(0, 1, 2, 3), rows=sum(f.rows for f in forms))
    gram, _ = _dense_gram(x, d, pooled, False, num_blocks, dtype)
    return gram


def _embedding_gram(
    ids: Sequence[jax.Array], d: Sequence[jax.Array], forms: Sequence[_Lookup], dtype: Any
) -> jax.Array:
    """Gram matrix of the table gradients from all lookups of one table."""
    num_rows = forms[0].num_rows
    flat_ids, flat_d = [], []
    for idx, cot, form in zip(ids, d, forms, strict=True):
        idx = idx.reshape(form.lookups).astype(jnp.int32)
        cot = cot.reshape(cot.shape[0], form.lookups, form.row_size).astype(dtype)
        if form.mode == jax.lax.GatherScatterMode.CLIP:
            idx = jnp.clip(idx, 0, num_rows - 1)
        else:  # the transpose (a scatter-add) drops out-of-range rows
            valid = (idx >= 0) & (idx < num_rows)
            cot = jnp.where(valid[None, :, None], cot, 0)
            idx = jnp.where(valid, idx, num_rows)
        flat_ids.append(idx)
        flat_d.append(cot)
    idx = jnp.concatenate(flat_ids)
    cot = jnp.concatenate(flat_d, axis=1)
    n = idx.shape[0]
    # Rows looked up several times add up: sum the cotangents per distinct index.
    _, segments = jnp.unique(idx, return_inverse=True, size=n, fill_value=num_rows)
    sums = jax.ops.segment_sum(jnp.moveaxis(cot, 1, 0), segments.reshape(n), num_segments=n)
    return jnp.einsum("nkr,nlr->kl", sums, sums, precision=_HIGHEST)


def _flat_gram(grads: Sequence[jax.Array], dtype: Any) -> jax.Array:
    k = grads[0].shape[0]
    flat = jnp.concatenate([g.reshape(k, -1).astype(dtype) for g in grads], axis=1)
    return jnp.matmul(flat, flat.T, precision=_HIGHEST)


def _chunked_gram(
    task_grads: Callable[[jax.Array], jax.Array], num_tasks: int, chunk: int, dtype: Any
) -> jax.Array:
    """The Gram matrix of ``task_grads(cotangents) -> (c, m)``, ``chunk`` tasks at a time.

    Only the blocks on and above the diagonal are computed; each costs two
    batched backward passes of ``chunk`` tasks, and at most two blocks of
    per-task gradients are held at once.
    """
    num_chunks = -(-num_tasks // chunk)
    padded = num_chunks * chunk
    # Padding rows are zero cotangents: their gradients (and Gram rows) are zero.
    cotangents = jnp.eye(padded, num_tasks).reshape(num_chunks, chunk, num_tasks)

    def block_row(a):
        rows = task_grads(cotangents[a]).astype(dtype)

        def block(b):
            def compute(_):
                cols = task_grads(cotangents[b]).astype(dtype)
                return jnp.matmul(rows, cols.T, precision=_HIGHEST)

            return jax.lax.cond(b >= a, compute, lambda _: jnp.zeros((chunk, chunk), dtype), None)

        return jax.lax.map(block, jnp.arange(num_chunks))

    blocks = jax.lax.map(block_row, jnp.arange(num_chunks))  # (a, b, chunk, chunk)
    upper = jnp.transpose(blocks, (0, 2, 1, 3)).reshape(padded, padded)
    block_index = jnp.arange(padded) // chunk
    gram = jnp.where(block_index[:, None] <= block_index[None, :], upper, upper.T)
    return gram[:num_tasks, :num_tasks]


# --- The engine ---------------------------------------------------------------------


def _check_options(loss_fn, has_aux, head_reduction, max_direct_bytes, task_chunks):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}.")
    if head_reduction not in ("mean", "sum"):
        raise ValueError(f"head_reduction must be 'mean' or 'sum', got {head_reduction!r}.")
    max_direct_bytes = _checks.check_int("max_direct_bytes", max_direct_bytes, minimum=0)
    if task_chunks is not None:
        task_chunks = _checks.check_int("task_chunks", task_chunks, minimum=1)
    return max_direct_bytes, task_chunks


def _argnums_tuple(argnums: int | Sequence[int]) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,), False
    if isinstance(argnums, Sequence) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in argnums
    ):
        return tuple(argnums), True
    raise TypeError(f"argnums must be an int or a sequence of ints, got {argnums!r}.")


class _Setup(NamedTuple):
    traced: _Traced
    leaves: list[Any]
    treedef: Any
    shared: list[bool]
    num_tasks: int
    plan: _Plan


def _setup(loss_fn, argnums, has_aux, is_shared, budgets, args, kwargs) -> _Setup:
    positions, is_sequence = _argnums_tuple(argnums)
    for a in positions:
        if not -len(args) <= a < len(args):
            raise ValueError(
                f"argnums={argnums!r} refers to a positional argument that was not "
                f"passed ({len(args)} given)."
            )
    positions = tuple(a % len(args) for a in positions)
    diff_args = tuple(args[a] for a in positions) if is_sequence else args[positions[0]]
    leaves, treedef = jax.tree.flatten(diff_args)
    if not leaves:
        raise ValueError("the differentiated argument(s) contain no arrays.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                "gramian_task_gradients differentiates floating-point arrays only, got a "
                f"leaf of dtype {jnp.result_type(leaf)} (split integer state off the "
                "parameters, e.g. nnx.split(model, nnx.Param, ...))."
            )

    def flat_fn(*flat_leaves):
        new = jax.tree.unflatten(treedef, flat_leaves)
        call_args = list(args)
        for i, a in enumerate(positions):
            call_args[a] = new[i] if is_sequence else new
        out = loss_fn(*call_args, **kwargs)
        losses, aux = _task_gradients.split_losses_and_aux(out, has_aux)
        aux_leaves, aux_treedef = jax.tree.flatten(aux)
        return [losses, *aux_leaves], aux_treedef

    traced = _trace(flat_fn, leaves)
    num_tasks = traced.jaxpr.outvars[0].aval.shape[0]
    shared = _shared_mask(is_shared, diff_args, treedef)
    plan = _make_plan(traced.jaxpr, leaves, shared, num_tasks, *budgets)
    return _Setup(traced, leaves, treedef, shared, num_tasks, plan)


def _shared_mask(is_shared: Any, diff_args: Any, treedef: Any) -> list[bool]:
    if is_shared is None:
        return [True] * treedef.num_leaves
    mask = is_shared(diff_args) if callable(is_shared) else is_shared
    try:
        full = jax.tree.broadcast(mask, diff_args)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "is_shared must be a pytree of bools with the structure of the differentiated "
            f"argument(s) (or a prefix of it): {error}"
        ) from None
    flags = jax.tree.leaves(full)
    if len(flags) != treedef.num_leaves:
        raise ValueError(
            f"is_shared gives {len(flags)} flags for {treedef.num_leaves} parameter leaves."
        )
    flags = [bool(f) for f in flags]
    if not any(flags):
        raise ValueError("is_shared marks no parameter as shared: there is nothing to aggregate.")
    return flags


def _saved_position(plan: _Plan, eqn: int) -> int:
    """The operand of a perturbed equation that the Gram matrix needs."""
    if eqn in plan.dense:
        return plan.dense[eqn].dims.x_position
    if eqn in plan.pooled_dims:
        return plan.pooled_dims[eqn].x_position
    return 1  # a lookup's indices


def _perturbed_fn(setup: _Setup) -> Callable:
    """``(leaves, eps) -> (losses, (aux leaves, saved operands))``.

    ``eps[j]`` (zeros) is added to the output of the ``j``-th perturbed
    equation, so that the cotangent of ``eps[j]`` is the output's cotangent;
    the operand of that equation the Gram matrix needs (a dense layer's input,
    a lookup's indices) is returned as it is.
    """
    jaxpr, consts, plan = setup.traced.jaxpr, setup.traced.consts, setup.plan
    slots = {eqn: j for j, eqn in enumerate(plan.perturbed)}

    def fn(leaves, eps):
        env: dict = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, leaves, strict=True))
        saved = []
        for index, eqn in enumerate(jaxpr.eqns):
            invals = [_read(env, v) for v in eqn.invars]
            outs = _bind(eqn, invals)
            if index in slots:
                saved.append(invals[_saved_position(plan, index)])
                outs = [outs[0] + eps[slots[index]]]
            env.update(zip(eqn.outvars, outs, strict=True))
        outs = [_read(env, v) for v in jaxpr.outvars]
        return outs[0], (outs[1:], saved)

    return fn


def _use_vjp(jaxpr: Any, use: _Use, leaf: Any, other: Any) -> Callable:
    """The VJP with respect to the leaf of the use's equation (the other operand fixed)."""
    eqn = jaxpr.eqns[use.eqn]

    def fn(p):
        value = p
        for c in use.chain:
            (value,) = _bind(jaxpr.eqns[c], [value])
        invals = [other, other]
        invals[use.position] = value
        return _bind(eqn, invals)[0]

    return jax.vjp(fn, leaf)[1]


def gramian_task_gradients(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    is_shared: Any = None,
    head_reduction: str = "mean",
    max_direct_bytes: int = DEFAULT_MAX_DIRECT_BYTES,
    task_chunks: int | None = None,
) -> Callable[..., Any]:
    r"""Task losses and their gradients' Gram matrix, without the task gradients.

    The Gramian engine: the counterpart of :func:`task_gradients` for the
    Gram-based aggregators. For ``loss_fn(params, ...) -> losses`` of shape
    ``(k,)``, the returned function computes, inside one ``jit``,

    .. math::
        \ell(\theta), \qquad A = J J^\top \in \mathbb{R}^{k \times k},
        \qquad w \mapsto J^\top w ,

    with :math:`J` the ``(k, m)`` Jacobian of the losses with respect to the
    chosen parameters, as an :class:`ImplicitTaskGradients`: every
    Gram-based aggregator takes it in place of stacked task gradients and
    returns the same update (``famo_jax.mgda``, ``cagrad``, ``pcgrad``,
    ``imtl_g``, ``nash_mtl``, ``gradvac`` with its default
    ``algorithm="gram"`` and whole-model granularity, ``sdmgrad``, ``modo``,
    ``gradnorm`` without ``last_shared_layer``, and any :func:`gram_weighted`
    aggregator). For dense layers the memory is :math:`O(k \cdot
    \text{batch} \cdot \text{width})` instead of :math:`O(k m)`;
    :func:`gramian_plan` says which strategy each leaf gets (``"dense"``,
    ``"bias"``, ``"embedding"``: from the layer's inputs and per-task output
    cotangents; ``"direct"``: per-task gradients of that leaf only;
    ``"chunked"``: a bounded-memory fallback; all exact). The methods that need
    every entry of the task gradients or keep ``O(k m)`` state (``graddrop``,
    ``moco``, ``excess_mtl``, ``db_mtl``, ``gradvac``'s ``"vectors"``
    algorithm and per-leaf granularities) raise a ``TypeError`` on the result.

    Shared trunk: with ``is_shared``, the Gram matrix spans the shared leaves
    only, and ``combine(w)`` returns :math:`\sum_i w_i g_i` on those and the
    gradient of the mean (``head_reduction="mean"``) or summed (``"sum"``:
    each task head its own task's gradient) loss on every other leaf: exactly
    what ``famo_jax.shared_trunk(aggregator, is_shared, head_reduction)``
    returns from :func:`task_gradients`' output, without the trunk's stacked
    gradients.

    Args:
      loss_fn: function whose output is a 1-D floating array of task losses
        (or a pair ``(losses, aux)`` when ``has_aux``); plain JAX, Flax NNX
        (``nnx.merge`` inside) or Linen (``model.apply`` inside).
      argnums: which positional argument(s) to differentiate; with a sequence,
        ``combine`` returns a tuple.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      is_shared: None (all parameters are aggregated), a pytree of bools with
        the structure of the differentiated argument(s) (or a prefix of it),
        or a function of them returning one; ``True`` marks shared leaves.
      head_reduction: ``"mean"`` or ``"sum"``: the gradient the leaves that are
        not shared get.
      max_direct_bytes: memory allowed for the per-task gradients of the
        leaves computed directly (``"direct"``); leaves that do not fit use the
        bounded-memory ``"chunked"`` fallback.
      task_chunks: the batched backward pass runs over this many chunks of
        tasks (padded with zero cotangents to equal chunks), and the dense
        layers' Gram products over as many blocks of rows, which bounds their
        temporaries. None (default): at least 4, more when a chunk's
        cotangents would exceed 128 MiB. 1: all tasks at once (no loop; the
        most memory).

    Returns:
      A function with ``loss_fn``'s signature returning ``(losses,
      task_grads)``, or ``((losses, aux), task_grads)`` when ``has_aux``, with
      ``task_grads`` an :class:`ImplicitTaskGradients` whose ``gram`` is ``(k,
      k)`` in at least float32 and whose ``combine(weights)`` returns a
      pytree with the structure of the differentiated argument(s), each leaf
      in its dtype. Call ``combine`` inside the same ``jit``.

    Raises:
      ValueError, TypeError: for invalid options; at trace time if the losses
        are not a 1-D floating array, a differentiated leaf is not floating,
        or ``is_shared`` does not match the parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import famo_jax
      >>> def losses(params, x):
      ...   h = jnp.tanh(x @ params["w"])
      ...   return jnp.stack([jnp.mean(h), jnp.mean(h ** 2)])
      >>> params = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]])}
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> gram = jax.jit(lambda p, x: famo_jax.gramian_task_gradients(losses)(p, x)[1].gram)
      >>> _, stacked = famo_jax.task_gradients(losses)(params, x)
      >>> bool(jnp.allclose(gram(params, x), famo_jax.aggregation.gram_matrix(stacked)))
      True
      >>> @jax.jit
      ... def mgda_update(params, x):
      ...   _, task_grads = famo_jax.gramian_task_gradients(losses)(params, x)
      ...   tx = famo_jax.mgda()
      ...   update, _ = tx.update(task_grads, tx.init(params))
      ...   return update
      >>> jax.tree.map(lambda a: a.shape, mgda_update(params, x))
      {'w': (2, 2)}

    References:
      TorchJD's ``autogram`` (per-module Jacobians accumulated into the
      Gramian, https://github.com/TorchJD/torchjd); the dense-layer identity
      is that of per-example gradient norms: Goodfellow, *Efficient
      Per-Example Gradient Computations*, 2015, https://arxiv.org/abs/1510.01799.
    """
    budgets = _check_options(loss_fn, has_aux, head_reduction, max_direct_bytes, task_chunks)

    @functools.wraps(loss_fn)
    def value_and_gramian(*args, **kwargs):
        setup = _setup(loss_fn, argnums, has_aux, is_shared, budgets, args, kwargs)
        return _run(setup, head_reduction, has_aux)

    return value_and_gramian


def _run(setup: _Setup, head_reduction: str, has_aux: bool):
    plan, leaves, k = setup.plan, setup.leaves, setup.num_tasks
    jaxpr = setup.traced.jaxpr
    out_avals = [jaxpr.eqns[e].outvars[0].aval for e in plan.perturbed]
    eps = [jnp.zeros(a.shape, a.dtype) for a in out_avals]
    losses, vjp_fn, (aux_leaves, saved) = jax.vjp(
        _perturbed_fn(setup), list(leaves), eps, has_aux=True
    )
    dtype = _numerics.at_least_float32(
        jnp.result_type(*(leaf for leaf, s in zip(leaves, setup.shared, strict=True) if s))
    )
    strategies = plan.strategies
    direct = [i for i, s in enumerate(strategies) if s == DIRECT]
    chunked = [i for i, s in enumerate(strategies) if s == CHUNKED]
    slot = {eqn: j for j, eqn in enumerate(plan.perturbed)}

    # One backward pass batched over the tasks: the perturbed outputs' cotangents and
    # the "direct" leaves' gradients (the other leaves' gradients are dead code). It
    # runs in a loop over chunks of tasks (at least two, padded with zero cotangents):
    # the loop bounds the temporaries, and its outputs are materialised once (XLA
    # would otherwise fuse the last element-wise step of the backward pass, such as
    # an activation's mask, into every consumer, each with its own copy).
    num_chunks = plan.num_chunks
    chunk = -(-k // num_chunks)
    padded = num_chunks * chunk
    per_task_direct: list[jax.Array] = []
    cotangents: list[jax.Array] = []
    if direct or plan.perturbed:

        def per_task(cot):
            leaf_cots, eps_cots = vjp_fn(cot)
            return [leaf_cots[i] for i in direct], eps_cots

        eye = jnp.eye(padded, k, dtype=losses.dtype).reshape(num_chunks, chunk, k)
        stacked = jax.lax.map(jax.vmap(per_task), eye)
        per_task_direct, cotangents = jax.tree.map(
            lambda a: a.reshape(padded, *a.shape[2:]), stacked
        )
        cotangents = list(cotangents)

    gram = jnp.zeros((padded, padded), dtype)
    for e, op in plan.dense.items():
        dense_gram, cotangents[slot[e]] = _dense_gram(
            saved[slot[e]],
            cotangents[slot[e]],
            op.dims,
            op.bias_leaf is not None,
            num_chunks,
            dtype,
        )
        gram = gram + dense_gram
    for eqns in plan.pooled.values():
        gram = gram + _pooled_dense_gram(
            [saved[slot[e]] for e in eqns],
            [cotangents[slot[e]] for e in eqns],
            [plan.pooled_dims[e] for e in eqns],
            num_chunks,
            dtype,
        )
    for eqns in plan.tables.values():
        gram = gram + _embedding_gram(
            [saved[slot[e]] for e in eqns],
            [cotangents[slot[e]] for e in eqns],
            [plan.lookups[e] for e in eqns],
            dtype,
        )
    if direct:
        gram = gram + _flat_gram(per_task_direct, dtype)
    gram = gram[:k, :k]
    if chunked:

        def chunk_grads(cots):
            grads = jax.vmap(lambda c: vjp_fn(c)[0])(cots.astype(losses.dtype))
            return jnp.concatenate(
                [grads[i].reshape(cots.shape[0], -1).astype(dtype) for i in chunked], axis=1
            )

        gram = gram + _chunked_gram(chunk_grads, k, plan.chunk_size, dtype)
    # Each strategy's sum is symmetric in exact arithmetic; make it so in floating point.
    gram = 0.5 * (gram + gram.T)

    def weighted(weights, stacked):
        weights = jnp.pad(weights, (0, stacked.shape[0] - k))  # zero for the padding tasks
        w = weights.astype(jnp.promote_types(stacked.dtype, weights.dtype))
        return jnp.tensordot(w, stacked.astype(w.dtype), axes=1).astype(stacked.dtype)

    def combine(weights):
        weights = jnp.asarray(weights)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got shape {weights.shape}.")
        out: list[Any] = [None] * len(leaves)

        def add(leaf, grad):
            out[leaf] = grad if out[leaf] is None else out[leaf] + grad

        for e, op in plan.dense.items():
            cot = weighted(weights, cotangents[slot[e]])
            (use,) = plan.uses[op.kernel_leaf]
            add(
                op.kernel_leaf, _use_vjp(jaxpr, use, leaves[op.kernel_leaf], saved[slot[e]])(cot)[0]
            )
            if op.bias_leaf is not None and op.bias_use is not None:
                zeros = jnp.zeros(out_avals[slot[e]].shape, out_avals[slot[e]].dtype)
                add(op.bias_leaf, _use_vjp(jaxpr, op.bias_use, leaves[op.bias_leaf], zeros)(cot)[0])
        for leaf in [*plan.tables, *plan.pooled]:
            for use in plan.uses[leaf]:
                assert use.eqn is not None  # dense and embedding uses are equations
                cot = weighted(weights, cotangents[slot[use.eqn]])
                add(leaf, _use_vjp(jaxpr, use, leaves[leaf], saved[slot[use.eqn]])(cot)[0])
        for i, leaf in enumerate(direct):
            out[leaf] = weighted(weights, per_task_direct[i])
        for leaf, strategy in enumerate(strategies):
            if strategy == UNUSED:
                out[leaf] = jnp.zeros_like(leaves[leaf])
        if chunked:
            leaf_cots, _ = vjp_fn(weights.astype(losses.dtype))
            for leaf in chunked:
                out[leaf] = leaf_cots[leaf]
        others = [i for i, s in enumerate(strategies) if s == NOT_SHARED]
        if others:
            scale = 1.0 / k if head_reduction == "mean" else 1.0
            leaf_cots, _ = vjp_fn(jnp.full((k,), scale, losses.dtype))
            for leaf in others:
                out[leaf] = leaf_cots[leaf]
        out = [
            jnp.asarray(g).astype(jnp.result_type(leaf))
            for g, leaf in zip(out, leaves, strict=True)
        ]
        return jax.tree.unflatten(setup.treedef, out)

    implicit = _base.ImplicitTaskGradients(gram=gram, combine=combine)
    if has_aux:
        aux = jax.tree.unflatten(setup.traced.aux_treedef, aux_leaves)
        return (losses, aux), implicit
    return losses, implicit


def gramian_plan(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    is_shared: Any = None,
    max_direct_bytes: int = DEFAULT_MAX_DIRECT_BYTES,
    task_chunks: int | None = None,
) -> Callable[..., Any]:
    """How :func:`gramian_task_gradients` computes each leaf's Gram contribution.

    Traces ``loss_fn`` (no computation) and returns, for the given arguments,
    a pytree with the structure of the differentiated argument(s) whose
    leaves are the strategy names: ``"dense"``, ``"bias"``, ``"embedding"``,
    ``"direct"``, ``"chunked"``, ``"unused"``, or ``"not shared"`` (a leaf
    outside ``is_shared``, which gets the mean or summed gradient). See the
    module documentation for what each means. The plan depends on the shapes
    and on the number of tasks (the cost model picks the cheaper exact formula).

    Args:
      loss_fn: as for :func:`gramian_task_gradients`.
      argnums: as for :func:`gramian_task_gradients`.
      has_aux: as for :func:`gramian_task_gradients`.
      is_shared: as for :func:`gramian_task_gradients`.
      max_direct_bytes: as for :func:`gramian_task_gradients`.
      task_chunks: as for :func:`gramian_task_gradients`.

    Returns:
      A function with ``loss_fn``'s signature returning that pytree of strings.

    Example:
      >>> import jax.numpy as jnp
      >>> import famo_jax
      >>> def losses(params, x):
      ...   h = jnp.tanh(x @ params["w"] + params["b"])
      ...   return jnp.stack([jnp.mean(h), jnp.mean(h ** 2)]) * params["scale"]
      >>> params = {"w": jnp.ones((8, 3)), "b": jnp.zeros(3), "scale": jnp.ones(())}
      >>> famo_jax.gramian_plan(losses)(params, jnp.ones((4, 8)))
      {'b': 'bias', 'scale': 'direct', 'w': 'dense'}
    """
    budgets = _check_options(loss_fn, has_aux, "mean", max_direct_bytes, task_chunks)

    def plan(*args, **kwargs):
        setup = _setup(loss_fn, argnums, has_aux, is_shared, budgets, args, kwargs)
        return jax.tree.unflatten(setup.treedef, setup.plan.strategies)

    return plan
