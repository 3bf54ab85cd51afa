"""MultiDigits and synthetic loss-scales benchmarks: data and harness checks, --quick runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from benchmarks import _mtl_bench as mtl
from benchmarks import loss_scales, multidigits

SMALL = dict(num_train=300, num_val=60, num_test=80)


def test_digit_pools_are_disjoint_and_cover_the_data():
    pools = multidigits.split_pools(1797, data_seed=0)
    indices = np.concatenate(list(pools.values()))
    assert sorted(indices.tolist()) == list(range(1797))
    assert len(pools["train"]) == 1078 and len(pools["test"]) == 360


def test_overlay_places_left_top_left_and_right_bottom_right():
    images = np.zeros((2, 8, 8), np.float32)
    images[0, 0, 0] = 1.0  # a pixel at the left digit's corner
    images[1, 7, 7] = 0.5  # a pixel at the right digit's far corner
    rng = np.random.default_rng(0)
    canvas = multidigits.overlay_pairs(rng, images, np.zeros(50, int), np.ones(50, int))
    assert canvas.shape == (50, 12, 12)
    for c in canvas:
        (r1, c1), (r2, c2) = np.argwhere(c == 1.0)[0], np.argwhere(c == 0.5)[0]
        assert 0 <= r1 <= 2 and 0 <= c1 <= 2  # shifted by 0..2 from (0, 0)
        assert 9 <= r2 <= 11 and 9 <= c2 <= 11  # shifted by 0..2 towards (11, 11)
        assert c.sum() == 1.5


def test_overlapping_pixels_take_the_maximum():
    images = np.full((2, 8, 8), 0.25, np.float32)
    images[1] = 0.75
    canvas = multidigits.overlay_pairs(
        np.random.default_rng(1), images, np.zeros(5, int), np.ones(5, int)
    )
    assert set(np.unique(canvas)) <= {0.0, 0.25, 0.75}
    # The right digit (0.75) covers every pixel where the two overlap.
    assert np.all((canvas == 0.75).sum(axis=(1, 2)) == 64)


def test_multidigits_shapes_and_labels():
    pairs = multidigits.make_pairs({"train": 300, "val": 60, "test": 80})
    pair = multidigits.load_multidigits("pair", **SMALL)
    many = multidigits.load_multidigits("many", **SMALL)
    assert pair.task_names == ("left", "right") and pair.kind == "multiclass"
    assert many.num_tasks == 12 and many.kind == "binary"
    for split, n in (("train", 300), ("val", 60), ("test", 80)):
        x, left, right = pairs[split]
        for bench in (pair, many):
            # The two variants share the images; only the labels differ.
            np.testing.assert_array_equal(getattr(bench, f"x_{split}"), x)
        assert x.shape == (n, 144) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        np.testing.assert_array_equal(getattr(pair, f"y_{split}"), np.stack([left, right], 1))
        y_many = getattr(many, f"y_{split}")
        assert y_many.shape == (n, 12) and set(np.unique(y_many)) <= {0, 1}
        for d in range(10):
            np.testing.assert_array_equal(y_many[:, d], (left == d) | (right == d))
        np.testing.assert_array_equal(y_many[:, 10], left > right)
        np.testing.assert_array_equal(y_many[:, 11], left + right >= 10)
    assert set(np.unique(pair.y_train)) == set(range(10))
    with pytest.raises(ValueError, match="variant"):
        multidigits.load_multidigits("triple", **SMALL)


def test_multidigits_is_deterministic():
    a = multidigits.load_multidigits("pair", **SMALL)
    b = multidigits.load_multidigits("pair", **SMALL)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    c = multidigits.load_multidigits("pair", **SMALL, data_seed=1)
    assert not np.array_equal(a.x_test, c.x_test)


def test_loss_scales_span_four_orders_of_magnitude():
    bench = loss_scales.load_loss_scales(num_train=2000, num_val=200, num_test=200)
    assert bench.num_tasks == 11 and bench.kind == "regression"
    assert bench.x_train.shape == (2000, 16) and bench.y_train.shape == (2000, 11)
    assert np.all(np.isfinite(bench.y_train))
    # The zero-initialised heads start at the losses E[y^2]; the best constant
    # predictor's loss is the variance. Both span > 4 orders of magnitude.
    initial_losses = np.mean(bench.y_train.astype(np.float64) ** 2, axis=0)
    variances = bench.y_train.astype(np.float64).var(axis=0)
    assert initial_losses.max() / initial_losses.min() > 1e4
    assert variances.max() / variances.min() > 1e4
    np.testing.assert_allclose(np.sqrt(variances), loss_scales.TARGET_STD, rtol=0.1)
    # The energy-like targets are nearly the same function, the others are not.
    corr = np.corrcoef(bench.y_train.T)
    energies = list(loss_scales.ENERGY_TASKS)
    assert corr[np.ix_(energies, energies)].min() > 0.85
    assert np.abs(corr[0, 1:6]).max() < 0.8


def test_task_losses_and_metrics_of_each_kind():
    evaluate = jax.jit(mtl.task_losses_and_metrics, static_argnums=0)
    # Two tasks, two examples: outputs (k, n, out), labels (n, k).
    logits = jnp.array([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])
    labels = jnp.array([[0, 0], [1, 1]])
    losses, acc = evaluate("multiclass", logits, labels)
    ce_right = np.log1p(np.exp(-2.0))
    np.testing.assert_allclose(losses, [ce_right, (ce_right + 2.0 + ce_right) / 2], rtol=1e-5)
    np.testing.assert_allclose(acc, [100.0, 50.0])
    binary = jnp.array([[[3.0], [-1.0]], [[-2.0], [-2.0]]])
    _, acc = evaluate("binary", binary, jnp.array([[1, 0], [1, 0]]))
    np.testing.assert_allclose(acc, [50.0, 100.0])
    pred = jnp.array([[[1.0], [2.0]], [[0.0], [0.0]]])
    losses, mae = evaluate("regression", pred, jnp.array([[0.0, 1.0], [0.0, -3.0]]))
    np.testing.assert_allclose(losses, [2.5, 5.0])
    np.testing.assert_allclose(mae, [1.5, 2.0])


def test_each_head_only_affects_its_own_task():
    model = mtl.SharedTrunkNet((8,), num_tasks=3, num_outputs=1)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y = jax.random.normal(jax.random.key(1), (5, 3))
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]
    assert set(params) == {"trunk", "heads"}

    def losses(p):
        return mtl.task_losses_and_metrics("regression", model.apply({"params": p}, x), y)[0]

    head_jac = jax.jit(jax.jacrev(losses))(params)["heads"]["kernel"]  # (task, head, in, out)
    for task in range(3):
        for head in range(3):
            assert bool(jnp.any(head_jac[task, head] != 0)) == (task == head)


def test_stl_trains_each_task_alone_and_rows_line_up():
    bench = loss_scales.load_loss_scales(num_train=128, num_val=32, num_test=32)
    cfg = mtl.TrainConfig(
        hidden=(8,),
        epochs=10,
        batch_size=64,
        learning_rate=1e-2,
        num_seeds=2,
        zero_init_heads=True,
        compile_options=mtl.QUICK_COMPILE_OPTIONS,
    )
    stl = mtl.train_method(bench, mtl.method_registry()["STL"], cfg)
    assert stl.test_metrics.shape == (2, 10, 11) and stl.train_losses.shape == (2, 11)
    assert stl.task_weights is None
    metrics = mtl.selected_test_metrics(stl)
    assert metrics.shape == (2, 11) and np.all(np.isfinite(metrics))
    # Every task's model has learned its target: its MAE is below that of the
    # untrained zero-initialised heads (predicting 0), so row i is model i.
    assert np.all(metrics < np.abs(bench.y_test).mean(axis=0))


def test_aggregator_rows_train_alike_through_the_engine_and_jacrev():
    bench = qm9_like.load_qm9_like(num_train=128, num_val=32, num_test=32)
    method = mtl.method_registry()["MGDA"]
    results = {}
    for gradients in mtl.TASK_GRADIENTS:
        cfg = mtl.TrainConfig(
            hidden=(8,),
            epochs=2,
            batch_size=64,
            learning_rate=1e-2,
            num_seeds=2,
            zero_init_heads=True,
            compile_options=mtl.QUICK_COMPILE_OPTIONS,
            task_gradients=gradients,
        )
        results[gradients] = mtl.train_method(bench, method, cfg)
    engine, jacrev = results["engine"], results["jacrev"]
    # The same updates up to rounding, over 4 Adam steps of 2 seeds.
    np.testing.assert_allclose(engine.train_losses, jacrev.train_losses, rtol=1e-4)
    np.testing.assert_allclose(engine.val_losses, jacrev.val_losses, rtol=1e-4)


def test_gram_based_marks_the_aggregator_rows_that_take_the_engine():
    # Every row's min_tasks (Krum's n_byzantine + 3 is the most).
    k = max(method.min_tasks for method in mtl.method_registry().values())
    model = mtl.SharedTrunkNet((8,), k, 1)
    x, y = jnp.ones((4, 5)), jnp.ones((4, k))
    params = model.init(jax.random.key(0), x[:1])["params"]
    context = mtl.RunContext(steps_per_epoch=2, learning_rate=1e-2)

    def losses(p, x, y):
        return mtl.task_losses_and_metrics("regression", model.apply({"params": p}, x), y)[0]

    def update(method, params):
        args = (k, jax.random.key(0)) + ((context,) if method.takes_context else ())
        tx = method.build(*args)
        value, implicit = famo_jax.gramian_task_gradients(losses, is_shared=mtl.SHARED)(
            params, x, y
        )
        return tx.update(implicit, tx.init(params), params, losses=value)

    for method in mtl.method_registry().values():
        if method.family != "aggregator":
            continue
        if method.gram_based:
            jax.eval_shape(lambda p, method=method: update(method, p), params)
        else:
            with pytest.raises(TypeError, match="ImplicitTaskGradients"):
                jax.eval_shape(lambda p, method=method: update(method, p), params)


def test_unknown_task_gradients_option_raises():
    bench = qm9_like.load_qm9_like(num_train=128, num_val=32, num_test=32)
    cfg = mtl.TrainConfig(task_gradients="hessian")
    with pytest.raises(ValueError, match="task_gradients"):
        mtl.train_method(bench, mtl.method_registry()["MGDA"], cfg)


def test_rlw_states_are_reseeded_per_run():
    rlw = mtl.method_registry()["RLW"]
    weighting = rlw.build(3, jax.random.key(0))
    losses = jnp.ones(3)

    @jax.jit
    def weights_of(key):
        state = rlw.reseed(weighting.init(), key)
        return jax.grad(weighting.weigh)(losses, state)

    w0, w1 = weights_of(jax.random.key(0)), weights_of(jax.random.key(1))
    np.testing.assert_allclose(w0.sum(), 1.0, rtol=1e-5)
    assert not np.allclose(w0, w1)


def test_gradnorm_row_balances_the_trunks_last_dense_layer_only():
    params = {
        "trunk": {f"Dense_{i}": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)} for i in (0, 1)},
        "heads": {"kernel": jnp.ones((3, 2, 1))},
    }
    flags = mtl._last_dense_layer(params)
    assert flags == {
        "trunk": {
            "Dense_0": {"kernel": False, "bias": False},
            "Dense_1": {"kernel": True, "bias": True},
        },
        "heads": {"kernel": False},
    }


def test_rows_that_follow_the_schedule_are_built_from_the_run():
    registry = mtl.method_registry()
    context = mtl.RunContext(steps_per_epoch=7, learning_rate=1e-2)
    stch = registry["STCH"]
    assert stch.takes_context
    weighting = stch.build(3, jax.random.key(0), context)
    state = weighting.init()
    losses = jnp.array([1.0, 2.0, 4.0])
    # The reference's 4 warm-up epochs (28 steps) are scale-invariant weights.
    for _ in range(28):
        state = weighting.update(losses, losses, state)
    np.testing.assert_allclose(
        jax.grad(weighting.weigh)(losses, state), 1 / (3 * losses), rtol=1e-5
    )
    # Every row builds with or without a context, as _make_run calls it.
    for name, method in registry.items():
        if method.build is None:
            continue
        args = (3, jax.random.key(0)) + ((context,) if method.takes_context else ())
        assert method.build(*args) is not None, name
    assert mtl._go4align_groups(2) == 2 and mtl._go4align_groups(12) == 3


# Together the two runs take every code path of the harness: STL, a loss
# weighting updated with the step's losses, FAMO same-batch and lagged, and a
# gradient aggregator (with and without a PRNG key), on the three task kinds.
# The full method list runs with `--quick` alone (about three times longer).
QUICK_METHODS = {
    "multidigits": ["STL", "FAMO", "CAGrad"],
    "loss_scales": ["STL", "LS", "FAMO", "FAMO-lagged", "PCGrad"],
}


@pytest.mark.parametrize("script", ["multidigits", "loss_scales"])
def test_quick_run_end_to_end(script, capsys):
    module = {"multidigits": multidigits, "loss_scales": loss_scales}[script]
    methods = QUICK_METHODS[script]
    result = module.main(["--quick", "--methods", *methods])
    summaries = list(result.values()) if isinstance(result, dict) else [result]
    assert len(summaries) == (2 if script == "multidigits" else 1)
    out = capsys.readouterr().out
    assert "Δm%" in out and "γ = 0.001" in out and "FAMO variants" in out
    for summary in summaries:
        assert list(summary.results) == methods
        k = summary.bench.num_tasks
        for name, result in summary.results.items():
            assert result.test_metrics.shape == (2, 2, k), name  # seeds, epochs, tasks
            assert np.all(np.isfinite(result.train_losses)), name
            if name != "STL":
                dm = summary.delta_m_per_seed(name)
                assert dm.shape == (2,) and np.all(np.isfinite(dm)), name
        famo = summary.results["FAMO"]
        assert famo.task_weights is not None
        np.testing.assert_allclose(famo.task_weights.sum(-1), 1.0, rtol=1e-5)
