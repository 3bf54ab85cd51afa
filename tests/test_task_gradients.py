"""task_gradients (stacked per-task gradients) and shared_trunk (aggregate the trunk only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax

NUM_TASKS = 3


def init_params(key, dtype=jnp.float32):
    k_trunk, k_heads = jax.random.split(key)
    return {
        "trunk": {
            "w": jax.random.normal(k_trunk, (4, 5), dtype),
            "b": jnp.zeros((5,), dtype),
        },
        "heads": [
            {"w": jax.random.normal(k, (5,), dtype)} for k in jax.random.split(k_heads, NUM_TASKS)
        ],
    }


def task_losses(params, x, y):
    features = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    preds = [features @ head["w"] for head in params["heads"]]
    scales = (1.0, 10.0, 0.1)
    return jnp.stack(
        [
            s * jnp.mean((p - y[:, i]) ** 2)
            for i, (s, p) in enumerate(zip(scales, preds, strict=True))
        ]
    )


def data(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (8, 4)), jax.random.normal(ky, (8, NUM_TASKS))


IS_SHARED = {"trunk": True, "heads": False}


def test_task_gradients_match_per_task_grads():
    params, (x, y) = init_params(jax.random.key(0)), data(jax.random.key(1))
    losses, grads = jax.jit(famo_jax.task_gradients(task_losses))(params, x, y)
    np.testing.assert_allclose(losses, task_losses(params, x, y), rtol=1e-6)
    per_task = jax.jit(
        lambda p: [jax.grad(lambda q, i=i: task_losses(q, x, y)[i])(p) for i in range(NUM_TASKS)]
    )(params)
    for i, expected in enumerate(per_task):
        jax.tree.map(
            lambda g, e, i=i: np.testing.assert_allclose(g[i], e, rtol=1e-5, atol=1e-7),
            grads,
            expected,
        )
    # The mean over the task axis is the gradient of the mean loss.
    mean_grad = jax.jit(jax.grad(lambda p: jnp.mean(task_losses(p, x, y))))(params)
    jax.tree.map(
        lambda g, e: np.testing.assert_allclose(g.mean(0), e, rtol=1e-5, atol=1e-7),
        grads,
        mean_grad,
    )


def test_task_gradients_shapes_dtypes_argnums_and_aux():
    params = init_params(jax.random.key(0), jnp.bfloat16)
    x, y = data(jax.random.key(1))
    _, grads = jax.jit(famo_jax.task_gradients(task_losses))(params, x, y)
    jax.tree.map(
        lambda g, p: (
            (g.shape == (NUM_TASKS,) + p.shape and g.dtype == p.dtype)
            or pytest.fail(f"{g.shape} {g.dtype} vs {p.shape} {p.dtype}")
        ),
        grads,
        params,
    )

    def with_aux(p, x, y):
        losses = task_losses(p, x, y)
        return losses, {"total": losses.sum()}

    params = init_params(jax.random.key(0))
    (losses, aux), (g_params, g_x) = famo_jax.task_gradients(
        with_aux, argnums=(0, 1), has_aux=True
    )(params, x, y)
    np.testing.assert_allclose(aux["total"], losses.sum(), rtol=1e-6)
    assert g_x.shape == (NUM_TASKS,) + x.shape
    np.testing.assert_allclose(
        g_x[2], jax.grad(lambda xx: task_losses(params, xx, y)[2])(x), rtol=1e-5, atol=1e-7
    )
    assert jax.tree.structure(g_params) == jax.tree.structure(params)


def test_task_gradients_rejects_bad_losses():
    with pytest.raises(ValueError, match="1-D"):
        famo_jax.task_gradients(lambda p: jnp.sum(p))(jnp.ones(2))
    with pytest.raises(TypeError, match="floating"):
        famo_jax.task_gradients(lambda p: jnp.ones(2, jnp.int32))(jnp.ones(2))
    with pytest.raises(TypeError, match="pair"):
        famo_jax.task_gradients(lambda p: p * 2, has_aux=True)(jnp.ones(2))
    with pytest.raises(TypeError, match="loss_fn"):
        famo_jax.task_gradients(3)


def weighted_aggregator(weights):
    """A stateful test aggregator: sum_i weights_i g_i plus a step counter in its state."""

    def init_fn(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update_fn(updates, state, params=None, *, scale=1.0):
        del params
        out = jax.tree.map(lambda g: scale * jnp.tensordot(weights, g, axes=1), updates)
        return out, state + 1

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.mark.parametrize("head_reduction, head_scale", [("mean", 1 / NUM_TASKS), ("sum", 1.0)])
def test_shared_trunk_heads_get_their_own_gradient_trunk_the_aggregate(head_reduction, head_scale):
    params, (x, y) = init_params(jax.random.key(2)), data(jax.random.key(3))
    _, grads = famo_jax.task_gradients(task_losses)(params, x, y)
    weights = jnp.array([0.2, 0.5, 0.3])
    tx = famo_jax.shared_trunk(weighted_aggregator(weights), IS_SHARED, head_reduction)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)

    for i in range(NUM_TASKS):
        own = jax.grad(lambda h, i=i: task_losses({**params, "heads": h}, x, y)[i])(
            params["heads"]
        )[i]
        np.testing.assert_allclose(
            updates["heads"][i]["w"], head_scale * own["w"], rtol=1e-5, atol=1e-7
        )
    expected_trunk = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads["trunk"])
    jax.tree.map(
        lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-7),
        updates["trunk"],
        expected_trunk,
    )
    # The aggregator's state advanced, inside the partition state.
    assert int(state.inner_states["shared"].inner_state) == 1


def test_shared_trunk_with_the_mean_is_linear_scalarization_and_scales_to_the_sum():
    params, (x, y) = init_params(jax.random.key(4)), data(jax.random.key(5))
    _, grads = famo_jax.task_gradients(task_losses)(params, x, y)
    mean = weighted_aggregator(jnp.full((NUM_TASKS,), 1 / NUM_TASKS))
    tx = famo_jax.shared_trunk(mean, IS_SHARED)
    updates, _ = tx.update(grads, tx.init(params), params)
    ls_grad = jax.grad(lambda p: jnp.mean(task_losses(p, x, y)))(params)
    jax.tree.map(
        lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7), updates, ls_grad
    )

    # The authors' sum convention: chain with optax.scale(num_tasks).
    summed = optax.chain(tx, optax.scale(NUM_TASKS))
    updates, _ = summed.update(grads, summed.init(params), params)
    sum_grad = jax.grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)
    jax.tree.map(
        lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-6), updates, sum_grad
    )


def test_shared_trunk_accepts_a_label_function_and_extra_args():
    params, (x, y) = init_params(jax.random.key(6)), data(jax.random.key(7))
    _, grads = famo_jax.task_gradients(task_losses)(params, x, y)

    def is_shared(tree):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", tree)

    weights = jnp.array([1.0, 0.0, 0.0])
    tx = famo_jax.shared_trunk(weighted_aggregator(weights), is_shared, "sum")
    updates, _ = tx.update(grads, tx.init(params), params, scale=2.0)
    np.testing.assert_allclose(updates["trunk"]["w"], 2.0 * grads["trunk"]["w"][0], rtol=1e-6)
    np.testing.assert_allclose(updates["heads"][1]["w"], grads["heads"][1]["w"][1], rtol=1e-6)


def test_shared_trunk_trains_a_multi_head_model_in_a_jitted_step():
    params, (x, y) = init_params(jax.random.key(8)), data(jax.random.key(9))
    mean = weighted_aggregator(jnp.full((NUM_TASKS,), 1 / NUM_TASKS))
    tx = optax.chain(famo_jax.shared_trunk(mean, IS_SHARED), optax.adam(3e-2))
    value_and_grads = famo_jax.task_gradients(task_losses)

    @jax.jit
    def train_step(params, opt_state):
        losses, grads = value_and_grads(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    opt_state = tx.init(params)
    initial = task_losses(params, x, y)
    for _ in range(50):
        params, opt_state, _ = train_step(params, opt_state)
    final = task_losses(params, x, y)
    assert np.all(np.asarray(final) < np.asarray(initial))


def test_shared_trunk_rejects_bad_arguments():
    with pytest.raises(TypeError, match="aggregator"):
        famo_jax.shared_trunk(lambda g: g, IS_SHARED)
    with pytest.raises(ValueError, match="head_reduction"):
        famo_jax.shared_trunk(optax.identity(), IS_SHARED, head_reduction="max")
