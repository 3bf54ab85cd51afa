"""task_gradients (stacked per-task gradients) and shared_trunk (aggregate the trunk only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import famo_jax

NUM_TASKS = 3


def init_params(rng, dtype=jnp.float32):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return {
        "trunk": {"w": normal(4, 5), "b": jnp.zeros((5,), dtype)},
        "heads": [{"w": normal(5)} for _ in range(NUM_TASKS)],
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


def problem(seed, dtype=jnp.float32):
    """Parameters and data from an integer seed (NumPy draws: no compilation)."""
    rng = np.random.default_rng(seed)
    params = init_params(rng, dtype)
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, NUM_TASKS)), jnp.float32)
    return params, (x, y)


IS_SHARED = {"trunk": True, "heads": False}

# Module-level jitted functions: one compilation per input dtype for the whole file.
value_and_task_grads = jax.jit(famo_jax.task_gradients(task_losses))


@jax.jit
def reference_grads(params, x, y):
    """Per-task gradients one jax.grad at a time, and those of the mean and summed losses."""
    per_task = [jax.grad(lambda p, i=i: task_losses(p, x, y)[i])(params) for i in range(NUM_TASKS)]
    mean = jax.grad(lambda p: jnp.mean(task_losses(p, x, y)))(params)
    total = jax.grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)
    return per_task, mean, total


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected
    )


def test_task_gradients_match_per_task_grads():
    params, (x, y) = problem(0)
    losses, grads = value_and_task_grads(params, x, y)
    np.testing.assert_allclose(losses, task_losses(params, x, y), rtol=1e-6)
    per_task, mean_grad, _ = reference_grads(params, x, y)
    for i, expected in enumerate(per_task):
        assert_trees_close(jax.tree.map(lambda g, i=i: g[i], grads), expected)
    # The mean over the task axis is the gradient of the mean loss.
    assert_trees_close(jax.tree.map(lambda g: g.mean(0), grads), mean_grad)


def test_task_gradients_shapes_dtypes_argnums_and_aux():
    params, (x, y) = problem(0, jnp.bfloat16)
    _, grads = value_and_task_grads(params, x, y)
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

    params, _ = problem(0)
    (losses, aux), (g_params, g_x) = jax.jit(
        famo_jax.task_gradients(with_aux, argnums=(0, 1), has_aux=True)
    )(params, x, y)
    np.testing.assert_allclose(aux["total"], losses.sum(), rtol=1e-6)
    assert g_x.shape == (NUM_TASKS,) + x.shape
    expected_g_x = jax.jit(jax.grad(lambda p, xx: task_losses(p, xx, y)[2], argnums=1))(params, x)
    np.testing.assert_allclose(g_x[2], expected_g_x, rtol=1e-5, atol=1e-7)
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
    params, (x, y) = problem(2)
    _, grads = value_and_task_grads(params, x, y)
    weights = jnp.array([0.2, 0.5, 0.3])
    tx = famo_jax.shared_trunk(weighted_aggregator(weights), IS_SHARED, head_reduction)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)

    per_task, _, _ = reference_grads(params, x, y)
    for i, own in enumerate(per_task):
        np.testing.assert_allclose(
            updates["heads"][i]["w"], head_scale * own["heads"][i]["w"], rtol=1e-5, atol=1e-7
        )
    expected_trunk = jax.tree.map(
        lambda g: np.tensordot(np.asarray(weights), np.asarray(g), axes=1), grads["trunk"]
    )
    assert_trees_close(updates["trunk"], expected_trunk, rtol=1e-6)
    # The aggregator's state advanced, inside the partition state.
    assert int(state.inner_states["shared"].inner_state) == 1


def test_shared_trunk_with_the_mean_is_linear_scalarization_and_scales_to_the_sum():
    params, (x, y) = problem(4)
    _, grads = value_and_task_grads(params, x, y)
    _, ls_grad, sum_grad = reference_grads(params, x, y)
    mean = weighted_aggregator(jnp.full((NUM_TASKS,), 1 / NUM_TASKS))
    tx = famo_jax.shared_trunk(mean, IS_SHARED)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert_trees_close(updates, ls_grad)

    # The authors' sum convention: chain with optax.scale(num_tasks).
    summed = optax.chain(tx, optax.scale(NUM_TASKS))
    updates, _ = jax.jit(summed.update)(grads, summed.init(params), params)
    assert_trees_close(updates, sum_grad, atol=1e-6)


def test_shared_trunk_accepts_a_label_function_and_extra_args():
    params, (x, y) = problem(6)
    _, grads = value_and_task_grads(params, x, y)

    def is_shared(tree):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", tree)

    weights = jnp.array([1.0, 0.0, 0.0])
    tx = famo_jax.shared_trunk(weighted_aggregator(weights), is_shared, "sum")
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, scale=2.0)
    np.testing.assert_allclose(updates["trunk"]["w"], 2.0 * grads["trunk"]["w"][0], rtol=1e-6)
    np.testing.assert_allclose(updates["heads"][1]["w"], grads["heads"][1]["w"][1], rtol=1e-6)


def test_shared_trunk_trains_a_multi_head_model_in_a_jitted_step():
    params, (x, y) = problem(8)
    mean = weighted_aggregator(jnp.full((NUM_TASKS,), 1 / NUM_TASKS))
    tx = optax.chain(famo_jax.shared_trunk(mean, IS_SHARED), optax.adam(3e-2))
    value_and_grads = famo_jax.task_gradients(task_losses)

    @jax.jit
    def train_step(params, opt_state):
        losses, grads = value_and_grads(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    opt_state = tx.init(params)
    initial, _ = value_and_task_grads(params, x, y)
    for _ in range(50):
        params, opt_state, _ = train_step(params, opt_state)
    final, _ = value_and_task_grads(params, x, y)
    assert np.all(np.asarray(final) < np.asarray(initial))


def test_shared_trunk_rejects_bad_arguments():
    with pytest.raises(TypeError, match="aggregator"):
        famo_jax.shared_trunk(lambda g: g, IS_SHARED)
    with pytest.raises(ValueError, match="head_reduction"):
        famo_jax.shared_trunk(optax.identity(), IS_SHARED, head_reduction="max")
