"""The Gramian engine (gramian_task_gradients) against the jacrev path (task_gradients).

Every model is small; each check compiles one program that computes both the
engine's Gram matrix and weighted sum and the reference from the stacked
``jax.jacrev`` task gradients. Relative errors are ``max |a - b| / max |b|``
over the Gram matrix and over each leaf of the weighted sum. The plans are
checked too, so that a model meant to exercise the dense, bias or embedding
path does not pass through a fallback.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import famo_jax
from famo_jax import aggregation
from tests import registry

F32_TOL = 1e-5
F64_TOL = 1e-12


def normal(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def relative_error(actual, expected, floor=0.0):
    """``max |actual - expected| / max(max |expected|, floor)``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), floor)
    assert scale > 0, "a reference that is all zeros cannot check anything"
    return float(np.max(np.abs(actual - expected)) / scale)


def tree_relative_errors(actual, expected):
    """Per-leaf relative errors; a leaf's scale is at least 1e-3 of the largest leaf's.

    The floor keeps leaves whose gradient is zero in exact arithmetic (an
    attention key bias: softmax ignores a shift shared by all keys) from
    comparing rounding noise with rounding noise.
    """
    largest = max(float(np.max(np.abs(np.asarray(e)))) for e in jax.tree.leaves(expected))
    return jax.tree.map(lambda a, e: relative_error(a, e, 1e-3 * largest), actual, expected)


def cast_tree(tree, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


@functools.cache
def comparison(loss_fn, is_shared_items=None, has_aux=False, **engine_kwargs):
    """A jitted ``(params, args, weights) -> (engine gram, reference gram, engine sum, ref sum)``.

    ``is_shared_items`` is a tuple of ``(key, bool)`` for dict parameters (hashable
    for the cache). The reference weighted sum gives non-shared leaves the mean
    (or, with ``head_reduction="sum"``, the sum) over tasks, as ``shared_trunk``
    does.
    """
    is_shared = None if is_shared_items is None else dict(is_shared_items)
    engine = famo_jax.gramian_task_gradients(
        loss_fn, has_aux=has_aux, is_shared=is_shared, **engine_kwargs
    )
    jacobian = famo_jax.task_gradients(loss_fn, has_aux=has_aux)

    @jax.jit
    def run(params, args, weights):
        _, implicit = engine(params, *args)
        _, stacked = jacobian(params, *args)
        mask = (
            jax.tree.map(lambda _: True, params)
            if is_shared is None
            else jax.tree.broadcast(is_shared, params)
        )
        shared = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), stacked, mask)
        reduce = jnp.sum if engine_kwargs.get("head_reduction") == "sum" else jnp.mean
        reference = jax.tree.map(
            lambda g, m: aggregation.combine(g, weights) if m else reduce(g, 0), stacked, mask
        )
        return (
            implicit.gram,
            aggregation.gram_matrix(shared),
            implicit.combine(weights),
            reference,
        )

    return run


def check_against_jacrev(loss_fn, params, args, tol, *, is_shared=None, has_aux=False, **kw):
    items = None if is_shared is None else tuple(sorted(is_shared.items()))
    run = comparison(loss_fn, items, has_aux, **kw)
    k = len(jax.eval_shape(lambda p: _losses_only(loss_fn, has_aux)(p, *args), params))
    weights = jnp.linspace(0.2, 1.0, k, dtype=jnp.result_type(*jax.tree.leaves(params)))
    gram, ref_gram, combined, ref_combined = run(params, args, weights)
    assert gram.shape == (k, k)
    assert relative_error(gram, ref_gram) <= tol
    np.testing.assert_array_equal(gram, gram.T)
    errors = tree_relative_errors(combined, ref_combined)
    assert max(jax.tree.leaves(errors)) <= tol, errors
    chex.assert_trees_all_equal_dtypes(combined, params)
    return gram


def _losses_only(loss_fn, has_aux):
    return (lambda *a: loss_fn(*a)[0]) if has_aux else loss_fn


def plan_of(loss_fn, params, args, **kw):
    return famo_jax.gramian_plan(loss_fn, **kw)(params, *args)


# --- Models -----------------------------------------------------------------------


def mlp_losses(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    predictions = h @ p["head_w"].T + p["head_b"]  # (batch, k): one linear head per task
    return jnp.mean((predictions - y) ** 2, axis=0) * jnp.linspace(0.5, 2.0, y.shape[1])


def mlp_problem(seed=0, num_tasks=4, batch=4):
    rng = np.random.default_rng(seed)
    params = {
        "w1": normal(rng, 8, 16, scale=0.4),
        "b1": normal(rng, 16, scale=0.1),
        "w2": normal(rng, 16, 12, scale=0.3),
        "b2": normal(rng, 12, scale=0.1),
        "head_w": normal(rng, num_tasks, 12, scale=0.3),
        "head_b": normal(rng, num_tasks, scale=0.1),
    }
    return params, (normal(rng, batch, 8), normal(rng, batch, num_tasks))


MLP_SHARED = {"w1": True, "b1": True, "w2": True, "b2": True, "head_w": False, "head_b": False}


def cnn_losses(p, x, y):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn)
    h = jax.nn.relu(h + p["c1"])
    h = jax.lax.conv_general_dilated(h, p["k2"], (2, 2), "VALID", dimension_numbers=dn)
    features = jnp.tanh(h + p["c2"]).mean(axis=(1, 2))
    predictions = features @ p["head"]
    return jnp.mean((predictions - y) ** 2, axis=0)


def cnn_problem(seed=0, num_tasks=3):
    rng = np.random.default_rng(seed)
    params = {
        "k1": normal(rng, 3, 3, 2, 4, scale=0.4),
        "c1": normal(rng, 4, scale=0.1),
        "k2": normal(rng, 2, 2, 4, 6, scale=0.4),
        "c2": normal(rng, 6, scale=0.1),
        "head": normal(rng, 6, num_tasks, scale=0.5),
    }
    return params, (normal(rng, 2, 6, 6, 2), normal(rng, 2, num_tasks))


def layer_norm(x, scale, offset):
    mean = x.mean(-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + offset


def attention_losses(p, ids, y):
    x = jnp.take(p["embed"], ids, axis=0) + p["position"]  # (batch, seq, d)
    q = jnp.einsum("btd,dhe->bthe", x, p["wq"])
    k = jnp.einsum("btd,dhe->bthe", x, p["wk"])
    v = jnp.einsum("btd,dhe->bthe", x, p["wv"])
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    mixed = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)
    x = layer_norm(x + jnp.einsum("bqhe,hed->bqd", mixed, p["wo"]), p["ln_scale"], p["ln_bias"])
    predictions = x.mean(axis=1) @ p["head"]
    return jnp.mean((predictions - y) ** 2, axis=0)


def attention_problem(seed=0, num_tasks=4):
    rng = np.random.default_rng(seed)
    d, heads, e = 8, 2, 4
    params = {
        "embed": normal(rng, 20, d),
        "position": normal(rng, 3, d, scale=0.1),
        "wq": normal(rng, d, heads, e, scale=0.4),
        "wk": normal(rng, d, heads, e, scale=0.4),
        "wv": normal(rng, d, heads, e, scale=0.4),
        "wo": normal(rng, heads, e, d, scale=0.4),
        "ln_scale": 1.0 + normal(rng, d, scale=0.1),
        "ln_bias": normal(rng, d, scale=0.1),
        "head": normal(rng, d, num_tasks, scale=0.5),
    }
    ids = jnp.array([[1, 5, 1], [7, 19, 5]])  # repeated ids: their rows' cotangents add up
    return params, (ids, normal(rng, 2, num_tasks))


class NNXModel(nnx.Module):
    """Embedding, multi-head attention, a 1-D convolution, layer norm, a linear head."""

    def __init__(self, num_tasks, rngs, dtype=jnp.float32):
        # Features wider than the 8 rows (batch x sequence), so that the projections
        # take the dense path; every module computes in ``dtype``.
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.embed = nnx.Embed(20, 16, **kw)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=16, qkv_features=16, decode=False, **kw
        )
        self.conv = nnx.Conv(16, 16, kernel_size=(2,), **kw)
        self.norm = nnx.LayerNorm(16, **kw)
        self.head = nnx.Linear(16, num_tasks, **kw)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attention(x)
        x = self.norm(jax.nn.gelu(self.conv(x)))
        return self.head(x.mean(axis=1))


NNX_TASKS = 3


@functools.cache
def nnx_model(dtype):
    """``(loss function, parameters)`` of an NNX model computing in ``dtype``."""
    graphdef, params = nnx.split(NNXModel(NNX_TASKS, nnx.Rngs(0), dtype), nnx.Param)

    def losses(params, ids, y):
        model = nnx.merge(graphdef, params)
        return jnp.mean((model(ids) - y) ** 2, axis=0)

    return losses, params


def nnx_problem(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    ids = jnp.array([[1, 5, 1, 3], [7, 19, 5, 0]])
    losses, params = nnx_model(dtype)
    return losses, params, (ids, normal(rng, 2, NNX_TASKS).astype(dtype))


class LinenCNN(nn.Module):
    """Convolution, batch norm (batch statistics), dense, layer norm, dense heads."""

    num_tasks: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        x = nn.Conv(4, (3, 3), **kw)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False, **kw)(x))
        x = nn.Dense(8, **kw)(x.mean(axis=(1, 2)))
        return nn.Dense(self.num_tasks, **kw)(jnp.tanh(nn.LayerNorm(**kw)(x)))


LINEN_TASKS = 3


@functools.cache
def linen_losses_for(dtype):
    model = LinenCNN(LINEN_TASKS, dtype)

    def losses(params, batch_stats, x, y):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
        )
        return jnp.mean((out - y) ** 2, axis=0), updates["batch_stats"]

    return model, losses


def linen_problem(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = normal(rng, 3, 5, 5, 2).astype(dtype)
    model, losses = linen_losses_for(dtype)
    variables = model.init(jax.random.key(seed), x)
    y = normal(rng, 3, LINEN_TASKS).astype(dtype)
    return losses, variables["params"], (variables["batch_stats"], x, y)


# --- Exactness against jacrev ------------------------------------------------------


def test_mlp_gram_and_weighted_sum_match_jacrev():
    params, args = mlp_problem()
    assert plan_of(mlp_losses, params, args) == {
        "w1": "dense", "b1": "bias", "w2": "dense", "b2": "bias",
        "head_w": "dense", "head_b": "bias",
    }  # fmt: skip
    check_against_jacrev(mlp_losses, params, args, F32_TOL)


@pytest.mark.parametrize("head_reduction", ["mean", "sum"])
def test_shared_trunk_gram_spans_the_trunk_and_heads_get_the_mean_or_own_gradient(head_reduction):
    params, args = mlp_problem()
    plan = plan_of(mlp_losses, params, args, is_shared=MLP_SHARED)
    assert plan["w1"] == "dense" and plan["head_w"] == "not shared"
    check_against_jacrev(
        mlp_losses, params, args, F32_TOL, is_shared=MLP_SHARED, head_reduction=head_reduction
    )


def test_cnn_gram_and_weighted_sum_match_jacrev():
    params, args = cnn_problem()
    assert plan_of(cnn_losses, params, args) == {
        "k1": "direct", "c1": "direct", "k2": "direct", "c2": "direct", "head": "dense",
    }  # fmt: skip
    check_against_jacrev(cnn_losses, params, args, F32_TOL)


def test_attention_block_gram_and_weighted_sum_match_jacrev():
    params, args = attention_problem()
    plan = plan_of(attention_losses, params, args)
    assert plan["embed"] == "embedding"
    assert all(plan[w] == "dense" for w in ("wq", "wk", "wv", "wo", "head"))
    assert plan["ln_scale"] == plan["ln_bias"] == plan["position"] == "direct"
    check_against_jacrev(attention_losses, params, args, F32_TOL)


def test_nnx_model_gram_and_weighted_sum_match_jacrev():
    nnx_losses, params, args = nnx_problem()
    plan = nnx.to_pure_dict(plan_of(nnx_losses, params, args))
    assert plan["embed"]["embedding"] == "embedding"
    assert plan["attention"]["query"]["kernel"] == "dense"
    assert plan["attention"]["query"]["bias"] == "bias"
    assert plan["head"]["kernel"] == "dense"
    assert plan["conv"]["kernel"] == "direct" and plan["norm"]["scale"] == "direct"
    check_against_jacrev(nnx_losses, params, args, F32_TOL)


def test_linen_model_with_batch_stats_gram_and_weighted_sum_match_jacrev():
    linen_losses, params, args = linen_problem()
    plan = plan_of(linen_losses, params, args, has_aux=True)
    assert plan["Dense_0"] == {"kernel": "dense", "bias": "bias"}
    assert plan["Conv_0"]["kernel"] == "direct"
    assert plan["BatchNorm_0"]["scale"] == "direct"
    check_against_jacrev(linen_losses, params, args, F32_TOL, has_aux=True)


def _float64_problems():
    def plain(loss_fn, problem):
        def make():
            params, args = problem()
            return loss_fn, cast_tree(params, jnp.float64), cast_tree(args, jnp.float64), False

        return make

    def flax_model(problem, has_aux):
        def make():
            loss_fn, params, args = problem(dtype=jnp.float64)
            return loss_fn, params, args, has_aux

        return make

    return {
        "mlp": plain(mlp_losses, mlp_problem),
        "cnn": plain(cnn_losses, cnn_problem),
        "attention": plain(attention_losses, attention_problem),
        "nnx": flax_model(nnx_problem, False),
        "linen": flax_model(linen_problem, True),  # returns the batch statistics
    }


@pytest.mark.parametrize("model", list(_float64_problems()))
def test_float64_gram_and_weighted_sum_match_jacrev_to_1e_12(model):
    with jax.enable_x64(True):
        loss_fn, params, args, has_aux = _float64_problems()[model]()
        assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
        gram = check_against_jacrev(loss_fn, params, args, F64_TOL, has_aux=has_aux)
        assert gram.dtype == jnp.float64


# --- Fallbacks ---------------------------------------------------------------------


def tied_losses(p, x, y):
    """``w`` is used twice (an autoencoder with tied weights): no single-use form."""
    code = jnp.tanh(x @ p["w"])
    reconstruction = code @ p["w"].T
    return jnp.stack([jnp.mean((reconstruction - x) ** 2), jnp.mean((code @ p["v"] - y) ** 2)])


def scan_losses(p, xs, y):
    """A recurrent layer: the parameters enter a ``lax.scan``."""

    def cell(h, x):
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
        return h, h

    h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], p["wh"].shape[0])), xs)
    return jnp.mean((h @ p["out"] - y) ** 2, axis=0)


def test_weights_used_twice_or_inside_a_scan_fall_back_to_direct_gradients():
    rng = np.random.default_rng(1)
    params = {"w": normal(rng, 6, 4), "v": normal(rng, 4)}
    args = (normal(rng, 3, 6), normal(rng, 3))
    assert plan_of(tied_losses, params, args)["w"] == "direct"
    check_against_jacrev(tied_losses, params, args, F32_TOL)
    params = {"wh": normal(rng, 5, 5, scale=0.4), "wx": normal(rng, 3, 5), "out": normal(rng, 5, 3)}
    args = (normal(rng, 4, 2, 3), normal(rng, 2, 3))
    assert plan_of(scan_losses, params, args) == {"wh": "direct", "wx": "direct", "out": "dense"}
    check_against_jacrev(scan_losses, params, args, F32_TOL)


def unrolled_rnn_losses(p, xs, y):
    """A recurrent layer unrolled in Python: ``wh`` and ``wx`` are used at every step."""
    h = jnp.zeros((xs.shape[1], p["wh"].shape[0]))
    for x in xs:
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"] + p["b"])
    return jnp.mean((h @ p["out"] - y) ** 2, axis=0)


class Siamese(nn.Module):
    """One Dense module applied to two inputs."""

    @nn.compact
    def __call__(self, a, b):
        dense = nn.Dense(8)
        fa, fb = jnp.tanh(dense(a)), jnp.tanh(dense(b))
        return jnp.stack([jnp.mean(fa**2), jnp.mean(fa * fb), jnp.mean((fa - fb) ** 2)])


def test_a_weight_used_alike_several_times_is_one_dense_layer():
    rng = np.random.default_rng(6)
    params = {
        "wh": normal(rng, 16, 16, scale=0.3),
        "wx": normal(rng, 12, 16, scale=0.3),
        "b": normal(rng, 16, scale=0.1),
        "out": normal(rng, 16, 3),
    }
    args = (normal(rng, 3, 2, 12), normal(rng, 2, 3))  # 3 steps of a batch of 2
    plan = plan_of(unrolled_rnn_losses, params, args)
    assert plan == {"wh": "dense", "wx": "dense", "b": "direct", "out": "dense"}
    check_against_jacrev(unrolled_rnn_losses, params, args, F32_TOL)
    model = Siamese()
    a, b = normal(rng, 2, 32), normal(rng, 2, 32)
    variables = model.init(jax.random.key(0), a, b)

    def siamese_losses(params, a, b):
        return model.apply({"params": params}, a, b)

    assert plan_of(siamese_losses, variables["params"], (a, b))["Dense_0"]["kernel"] == "dense"
    check_against_jacrev(siamese_losses, variables["params"], (a, b), F32_TOL)


@jax.custom_vjp
def scaled_tanh(x, scale):
    return jnp.tanh(x) * scale


def _scaled_tanh_fwd(x, scale):
    return scaled_tanh(x, scale), (x, scale)


def _scaled_tanh_bwd(residuals, g):
    x, scale = residuals
    return g * scale * (1 - jnp.tanh(x) ** 2), jnp.sum(g * jnp.tanh(x), axis=0)


scaled_tanh.defvjp(_scaled_tanh_fwd, _scaled_tanh_bwd)


def custom_and_remat_losses(p, x, y):
    """A parameter entering a custom_vjp function, and a layer under jax.checkpoint."""
    h = scaled_tanh(x @ p["w1"], p["scale"])
    h = jax.checkpoint(lambda h, w: jnp.tanh(h @ w))(h, p["w2"])
    return jnp.mean((h @ p["head"] - y) ** 2, axis=0)


def test_custom_vjp_and_checkpointed_parameters_fall_back_to_direct_gradients():
    rng = np.random.default_rng(7)
    params = {
        "w1": normal(rng, 10, 12, scale=0.4),
        "scale": 1.0 + normal(rng, 12, scale=0.1),
        "w2": normal(rng, 12, 12, scale=0.3),
        "head": normal(rng, 12, 3),
    }
    args = (normal(rng, 3, 10), normal(rng, 3, 3))
    plan = plan_of(custom_and_remat_losses, params, args)
    assert plan == {"w1": "dense", "scale": "direct", "w2": "direct", "head": "dense"}
    check_against_jacrev(custom_and_remat_losses, params, args, F32_TOL)


def test_leaves_over_the_memory_budget_use_the_chunked_fallback():
    params, args = cnn_problem(num_tasks=5)
    # 5 tasks x (216 + 16) bytes fit; the kernels (>= 288 bytes per task) do not.
    plan = plan_of(cnn_losses, params, args, max_direct_bytes=5 * (216 + 16))
    assert plan == {
        "k1": "chunked",
        "c1": "direct",
        "k2": "chunked",
        "c2": "direct",
        "head": "dense",
    }
    check_against_jacrev(cnn_losses, params, args, F32_TOL, max_direct_bytes=5 * (216 + 16))


def test_chunked_fallback_alone_matches_jacrev():
    params, args = cnn_problem(num_tasks=5)
    plan = plan_of(cnn_losses, params, args, max_direct_bytes=0)
    assert set(jax.tree.leaves(plan)) == {"chunked", "dense"}
    check_against_jacrev(cnn_losses, params, args, F32_TOL, max_direct_bytes=0)


@pytest.mark.parametrize("num_tasks, chunks", [(11, None), (11, 11), (11, 1), (2, 2), (1, None)])
def test_task_chunks_and_padding_do_not_change_the_result(num_tasks, chunks):
    # 11 tasks run as 4 chunks of 3 by default (one padding task).
    params, args = mlp_problem(seed=2, num_tasks=num_tasks)
    check_against_jacrev(mlp_losses, params, args, F32_TOL, task_chunks=chunks)


def test_embedding_lookup_modes_and_repeated_tables():
    def losses(p, ids):
        rows = jnp.take(p["table"], ids, axis=0, mode="clip")  # 45 is clamped to row 39
        shifted = jnp.take(p["table"], ids + 3, axis=0, mode="fill", fill_value=0.0)  # 48 dropped
        h = jnp.tanh(rows @ p["w"]) + shifted @ p["w"]
        return jnp.stack([jnp.mean(h[..., 0] ** 2), jnp.mean(h[..., 1]), jnp.mean(rows**2)])

    rng = np.random.default_rng(3)
    params = {"table": normal(rng, 40, 4), "w": normal(rng, 4, 2)}
    ids = jnp.array([[1, 2, 37, 1], [6, 1, 45, 0]])  # 16 lookups of 40 rows, some repeated
    assert plan_of(losses, params, (ids,))["table"] == "embedding"
    check_against_jacrev(losses, params, (ids,), F32_TOL)


def test_a_dense_layer_with_more_rows_than_inputs_uses_direct_gradients():
    params, args = mlp_problem(batch=64)  # 64 rows > 8 inputs: x^T D_i is cheaper
    assert plan_of(mlp_losses, params, args)["w1"] == "direct"
    check_against_jacrev(mlp_losses, params, args, F32_TOL)


def test_unused_parameters_get_zero_gradients():
    def losses(p, x):
        return jnp.stack([jnp.sum(x @ p["used"]), jnp.sum((x @ p["used"]) ** 2)])

    params = {"used": jnp.ones((3, 2)), "unused": jnp.ones(4)}
    assert plan_of(losses, params, (jnp.ones((2, 3)),))["unused"] == "unused"

    @jax.jit
    def run(params, x):
        _, implicit = famo_jax.gramian_task_gradients(losses)(params, x)
        return implicit.combine(jnp.array([0.5, 0.5]))

    out = run(params, jnp.ones((2, 3)))
    np.testing.assert_array_equal(out["unused"], np.zeros(4))


# --- Every Gram-based aggregator through the engine -------------------------------


GRAM_BASED = tuple(case for case in registry.AGGREGATORS if case.gram_based)


def test_the_registry_marks_every_aggregator_that_takes_implicit_task_gradients():
    """``gram_based`` is what the engine test below iterates over; it must be exact."""
    params, (x, y) = mlp_problem(num_tasks=3)

    def run(case, params, x, y):
        losses, implicit = famo_jax.gramian_task_gradients(mlp_losses)(params, x, y)
        tx = case.make(3)
        return tx.update(implicit, tx.init(params), params, losses=losses)

    for case in registry.AGGREGATORS:
        if case.gram_based:
            jax.eval_shape(functools.partial(run, case), params, x, y)
        else:
            with pytest.raises(TypeError, match="ImplicitTaskGradients"):
                jax.eval_shape(functools.partial(run, case), params, x, y)


def aggregators(num_tasks):
    """Every Gram-based aggregator of the registry, and a user's gram_weighted."""
    mean = aggregation.stateless(lambda gram: jnp.full(gram.shape[0], 1.0 / gram.shape[0]))
    out = {case.name: case.make(num_tasks) for case in GRAM_BASED}
    out["gram_weighted_mean"] = aggregation.gram_weighted(mean)
    return out


@functools.cache
def aggregator_comparison(shared):
    """All aggregators through both paths in one program (one compilation per dtype)."""
    is_shared = MLP_SHARED if shared else None

    @jax.jit
    def run(params, x, y):
        engine = famo_jax.gramian_task_gradients(mlp_losses, is_shared=is_shared)
        losses, implicit = engine(params, x, y)
        _, stacked = famo_jax.task_gradients(mlp_losses)(params, x, y)
        out = {}
        for name, tx in aggregators(y.shape[1]).items():
            reference = famo_jax.shared_trunk(tx, is_shared) if shared else tx
            got, got_state = tx.update(implicit, tx.init(params), params, losses=losses)
            want, want_state = reference.update(
                stacked, reference.init(params), params, losses=losses
            )
            if shared:  # shared_trunk's state wraps the aggregator's
                want_state = want_state.inner_states["shared"].inner_state
            out[name] = (got, want, got_state, want_state)
        return out

    return run


@pytest.mark.parametrize(
    "shared, dtype",
    [(False, jnp.float32), (True, jnp.float64)],
    ids=["all-parameters-float32", "shared-trunk-float64"],
)
def test_every_gram_aggregator_through_the_engine_matches_the_jacrev_path(shared, dtype):
    tol = F32_TOL if dtype == jnp.float32 else F64_TOL
    with jax.enable_x64(dtype == jnp.float64):
        params, (x, y) = mlp_problem(seed=4, num_tasks=4)
        params, x, y = cast_tree((params, x, y), dtype)
        results = aggregator_comparison(shared)(params, x, y)
        for name, (got, want, got_state, want_state) in results.items():
            errors = tree_relative_errors(got, want)
            assert max(jax.tree.leaves(errors)) <= tol, (name, errors)
            chex.assert_trees_all_close(got_state, want_state, rtol=tol, atol=0)


def test_training_with_the_engine_follows_the_jacrev_path_and_does_not_retrace():
    params, (x, y) = mlp_problem(seed=5)
    tx = optax.chain(famo_jax.mgda(), optax.adam(1e-2))
    traces = {True: 0, False: 0}

    def make_step(use_engine):
        @jax.jit
        def step(params, opt_state):
            traces[use_engine] += 1
            if use_engine:
                _, task_grads = famo_jax.gramian_task_gradients(mlp_losses)(params, x, y)
            else:
                _, task_grads = famo_jax.task_gradients(mlp_losses)(params, x, y)
            updates, opt_state = tx.update(task_grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step

    trained = {}
    for use_engine in (True, False):
        step, p, state = make_step(use_engine), params, tx.init(params)
        for _ in range(10):
            p, state = step(p, state)
        trained[use_engine] = p
    assert traces == {True: 1, False: 1}
    chex.assert_trees_all_close(trained[True], trained[False], rtol=1e-4, atol=1e-6)
    assert float(jnp.sum(mlp_losses(trained[True], x, y))) < float(
        jnp.sum(mlp_losses(params, x, y))
    )


def test_vmap_over_seeds():
    problems = [mlp_problem(seed=s) for s in range(3)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in problems])
    xs, ys = (jnp.stack(a) for a in zip(*[args for _, args in problems], strict=True))

    def gram(params, x, y):
        return famo_jax.gramian_task_gradients(mlp_losses)(params, x, y)[1].gram

    def reference(params, x, y):
        return aggregation.gram_matrix(famo_jax.task_gradients(mlp_losses)(params, x, y)[1])

    batched = jax.jit(jax.vmap(gram))(params, xs, ys)
    expected = jax.jit(jax.vmap(reference))(params, xs, ys)
    assert relative_error(batched, expected) <= F32_TOL


def test_bfloat16_parameters_keep_their_dtype_and_the_gram_is_float32():
    params, (x, y) = mlp_problem()
    params = cast_tree(params, jnp.bfloat16)

    @jax.jit
    def run(params):
        _, implicit = famo_jax.gramian_task_gradients(mlp_losses)(params, x, y)
        return implicit.gram, implicit.combine(jnp.full(4, 0.25))

    gram, combined = run(params)
    assert gram.dtype == jnp.float32
    chex.assert_trees_all_equal_dtypes(combined, params)
    _, stacked = jax.jit(famo_jax.task_gradients(mlp_losses))(params, x, y)
    assert relative_error(gram, aggregation.gram_matrix(stacked)) < 0.05  # bfloat16 rounding


# --- Errors ------------------------------------------------------------------------


def test_invalid_options_raise():
    with pytest.raises(TypeError, match="loss_fn"):
        famo_jax.gramian_task_gradients(3)
    with pytest.raises(TypeError, match="has_aux"):
        famo_jax.gramian_task_gradients(mlp_losses, has_aux=1)
    with pytest.raises(ValueError, match="head_reduction"):
        famo_jax.gramian_task_gradients(mlp_losses, head_reduction="max")
    with pytest.raises(ValueError, match="max_direct_bytes"):
        famo_jax.gramian_task_gradients(mlp_losses, max_direct_bytes=-1)
    with pytest.raises(ValueError, match="task_chunks"):
        famo_jax.gramian_task_gradients(mlp_losses, task_chunks=0)
    params, (x, y) = mlp_problem()
    with pytest.raises(TypeError, match="argnums"):
        famo_jax.gramian_plan(mlp_losses, argnums="0")(params, x, y)


def test_invalid_inputs_raise_at_trace_time():
    params, (x, y) = mlp_problem()
    engine = famo_jax.gramian_task_gradients
    with pytest.raises(ValueError, match="1-D"):
        jax.eval_shape(engine(lambda p, x, y: mlp_losses(p, x, y)[None]), params, x, y)
    with pytest.raises(TypeError, match="floating"):
        jax.eval_shape(engine(lambda p: jnp.stack([p.sum() * 1.0] * 2)), jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="no parameter as shared"):
        jax.eval_shape(engine(mlp_losses, is_shared=False), params, x, y)
    with pytest.raises(ValueError, match="is_shared"):
        jax.eval_shape(engine(mlp_losses, is_shared={"w1": True}), params, x, y)

    def wrong_weights(params):
        _, implicit = engine(mlp_losses)(params, x, y)
        return implicit.combine(jnp.ones(3))

    with pytest.raises(ValueError, match="weights"):
        jax.eval_shape(wrong_weights, params)


def test_argnums_sequence_and_aux():
    params, (x, y) = mlp_problem()
    trunk = {k: v for k, v in params.items() if not k.startswith("head")}
    heads = {k: v for k, v in params.items() if k.startswith("head")}

    def losses(trunk, heads, x, y):
        return mlp_losses({**trunk, **heads}, x, y), {"scale": jnp.float32(2.0)}

    @jax.jit
    def run(trunk, heads):
        engine = famo_jax.gramian_task_gradients(losses, argnums=(0, 1), has_aux=True)
        (values, aux), implicit = engine(trunk, heads, x, y)
        return values, aux, implicit.gram, implicit.combine(jnp.full(4, 0.25))

    values, aux, gram, (g_trunk, g_heads) = run(trunk, heads)
    np.testing.assert_allclose(values, mlp_losses(params, x, y), rtol=1e-6)
    assert float(aux["scale"]) == 2.0
    mean_grad = jax.grad(lambda p: jnp.mean(mlp_losses(p, x, y)))(params)
    chex.assert_trees_all_close({**g_trunk, **g_heads}, mean_grad, rtol=1e-5, atol=1e-7)
    _, stacked = famo_jax.task_gradients(mlp_losses)(params, x, y)
    assert relative_error(gram, aggregation.gram_matrix(stacked)) <= F32_TOL
