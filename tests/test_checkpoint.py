"""FAMO's whole state checkpoints with orbax next to the model, and resumes bit-identically.

Each test trains N + M steps in one go, and separately trains N steps, saves to
disk, restores into freshly built (differently initialised) objects, and trains
M more steps: the two runs must agree exactly. orbax-checkpoint is a test
dependency only; famo_jax's states are plain pytrees of arrays.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import famo_jax
import famo_jax.nnx
from examples import _digits, flax_linen_multitask, flax_nnx_multitask

NUM_TASKS = 3
FIRST, SECOND = 4, 3  # steps before and after the interruption


def save(directory, step, tree):
    """Saves ``tree`` (any pytree of arrays, PRNG keys included) at ``step``."""
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def restore(directory, like):
    """Restores the latest checkpoint into the structure, dtypes and types of ``like``.

    ``like`` is a freshly built tree of the same kind (its values are ignored):
    restoring into it gives back NamedTuples such as ``famo_jax.FAMOState`` and
    optax states, typed PRNG keys, and the dtypes of the saved arrays.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.CheckpointManager(directory) as manager:
        return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))


# --- a functional loop: params, optax chains, FAMO, RLW, PCGrad, PRNG keys -------------------

FAMO = famo_jax.famo(NUM_TASKS)
# A logits optimizer with state beyond Adam's: an injected, scheduled learning rate.
FAMO_SCHEDULED = famo_jax.famo(
    NUM_TASKS,
    optimizer=optax.inject_hyperparams(optax.adam)(
        learning_rate=optax.exponential_decay(0.05, 5, 0.5)
    ),
)
RLW = famo_jax.random_loss_weighting(NUM_TASKS, seed=3)
MODEL_TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20), weight_decay=1e-3),
)
# A second model trained with PCGrad on its trunk: a PRNG key (typed) in an optax state.
PCGRAD_TX = optax.chain(
    famo_jax.shared_trunk(
        famo_jax.pcgrad(key=jax.random.key(5)), {"trunk": True, "heads": False}, "sum"
    ),
    optax.adam(1e-2),
)
SCALES = jnp.array([1e-2, 1.0, 1e2])


def key_data(tree):
    """Typed PRNG keys replaced by their raw data, so that trees compare with chex."""
    is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def init_run(seed):
    """Everything a run carries; ``seed`` changes every value, not the structure."""
    key = jax.random.key(seed)
    k_params, k_dropout = jax.random.split(key)
    params = {
        "trunk": jax.random.normal(k_params, (4, 8)),
        "heads": jnp.full((8, NUM_TASKS), 0.1 * seed, jnp.float32),
    }
    return {
        "params": params,
        "opt_state": MODEL_TX.init(params),
        "pcgrad_params": params,
        "pcgrad_opt_state": PCGRAD_TX.init(params),
        "famo": FAMO.init(),
        "famo_scheduled": FAMO_SCHEDULED.init(),
        "rlw": RLW.init()._replace(key=jax.random.PRNGKey(seed)),
        "prev_losses": jnp.full((NUM_TASKS,), seed, jnp.float32),
        "dropout_key": k_dropout,  # a typed PRNG key
        "step": jnp.asarray(seed, jnp.int32),
    }


def task_losses(params, x, y, mask):
    h = jnp.tanh(x @ params["trunk"]) * mask
    return SCALES * jnp.mean((h @ params["heads"] - y) ** 2, axis=0)


@jax.jit
def train_step(run):
    """One lagged-FAMO step that also advances every other stateful piece."""
    data_key = jax.random.fold_in(jax.random.key(42), run["step"])
    x = jax.random.normal(data_key, (16, 4))
    y = jnp.sin(x @ jnp.ones((4, NUM_TASKS)))
    dropout_key, mask_key = jax.random.split(run["dropout_key"])
    mask = jax.random.bernoulli(mask_key, 0.9, (16, 8)) / 0.9
    losses = task_losses(run["params"], x, y, mask)
    first = run["step"] == 0
    famo_state = jax.lax.cond(
        first, lambda s: s, lambda s: FAMO.update(run["prev_losses"], losses, s), run["famo"]
    )
    rlw_weights = famo_jax.loss_weights(RLW, losses, run["rlw"])

    def objective(params):
        current = task_losses(params, x, y, mask)
        return FAMO.weigh(current, famo_state) + 0.1 * jnp.dot(rlw_weights, current)

    grads = jax.grad(objective)(run["params"])
    updates, opt_state = MODEL_TX.update(grads, run["opt_state"], run["params"])
    _, task_grads = famo_jax.task_gradients(task_losses)(run["pcgrad_params"], x, y, mask)
    pcgrad_updates, pcgrad_opt_state = PCGRAD_TX.update(
        task_grads, run["pcgrad_opt_state"], run["pcgrad_params"]
    )
    return {
        "params": optax.apply_updates(run["params"], updates),
        "opt_state": opt_state,
        "pcgrad_params": optax.apply_updates(run["pcgrad_params"], pcgrad_updates),
        "pcgrad_opt_state": pcgrad_opt_state,
        "famo": famo_state,
        "famo_scheduled": FAMO_SCHEDULED.update(
            run["prev_losses"] + 1.0, losses + 1.0, run["famo_scheduled"]
        ),
        "rlw": RLW.update(run["prev_losses"], losses, run["rlw"]),
        "prev_losses": losses,
        "dropout_key": dropout_key,
        "step": run["step"] + 1,
    }


def train(run, steps):
    for _ in range(steps):
        run = train_step(run)
    return run


def test_functional_run_resumes_bit_identically(tmp_path):
    uninterrupted = train(init_run(0), FIRST + SECOND)

    interrupted = train(init_run(0), FIRST)
    save(tmp_path / "ckpt", FIRST, interrupted)
    # A new process would build its objects from scratch: the restore must not
    # rely on them holding the right values.
    fresh = init_run(7)
    restored = restore(tmp_path / "ckpt", fresh)
    chex.assert_trees_all_equal_structs(restored, fresh)
    assert isinstance(restored["famo"], famo_jax.FAMOState)
    assert jax.dtypes.issubdtype(restored["dropout_key"].dtype, jax.dtypes.prng_key)
    chex.assert_trees_all_equal(key_data(restored), key_data(interrupted))

    resumed = train(restored, SECOND)
    chex.assert_trees_all_equal(key_data(resumed), key_data(uninterrupted))
    # The run really exercised every piece of state.
    assert int(resumed["famo"].num_updates) == FIRST + SECOND - 1
    assert int(resumed["famo_scheduled"].num_updates) == FIRST + SECOND
    assert float(resumed["famo_scheduled"].opt_state.hyperparams["learning_rate"]) < 0.05
    assert not np.allclose(resumed["famo"].logits, 0.0)
    pcgrad_key = lambda run: key_data(jax.tree.leaves(run["pcgrad_opt_state"][0]))
    assert not np.array_equal(pcgrad_key(resumed)[0], pcgrad_key(init_run(0))[0])


def test_restore_without_a_target_loses_the_state_types(tmp_path):
    """Why the recipe restores into a freshly built tree: raw restores give dicts."""
    save(tmp_path / "ckpt", 0, {"famo": FAMO.init()})
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        raw = manager.restore(0)
    assert not isinstance(raw["famo"], famo_jax.FAMOState)


# --- Flax NNX: model, nnx.Optimizer and FAMO -------------------------------------------------


def _digit_batches(steps):
    train_split, _ = _digits.load_split()
    data = _digits.batches(train_split, 32, seed=0)
    return [next(data) for _ in range(steps)]


@pytest.fixture(scope="module")
def digit_batches():
    return _digit_batches(FIRST + SECOND)


# One optax object for every optimizer: it is static in nnx.jit's cache key.
NNX_TX = optax.adam(1e-2)
NNX_FAMO = famo_jax.famo(_digits.NUM_TASKS)


def _nnx_objects(seed):
    model = flax_nnx_multitask.MultiHeadMLP(16, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, NNX_TX, wrt=nnx.Param)
    return model, optimizer, famo_jax.nnx.Weighting(NNX_FAMO)


def _nnx_train(model, optimizer, weighting, prev_losses, batches):
    for images, digits in batches:
        prev_losses, _ = flax_nnx_multitask.lagged_step(
            model, optimizer, weighting, prev_losses, images, digits
        )
    return prev_losses


def test_nnx_run_resumes_bit_identically(tmp_path, digit_batches):
    model, optimizer, weighting = _nnx_objects(0)
    nan = jnp.full(_digits.NUM_TASKS, jnp.nan)
    expected_prev = _nnx_train(model, optimizer, weighting, nan, digit_batches)
    expected = (nnx.state(model), nnx.state(weighting), expected_prev)

    model, optimizer, weighting = _nnx_objects(0)
    prev = _nnx_train(model, optimizer, weighting, nan, digit_batches[:FIRST])
    save(
        tmp_path / "ckpt",
        FIRST,
        {
            "model": nnx.state(model),
            "optimizer": nnx.state(optimizer),
            "famo": nnx.state(weighting),
            "prev_losses": prev,
        },
    )

    # Fresh objects (other initial values), then the saved values poured in.
    model, optimizer, weighting = _nnx_objects(1)
    like = {
        "model": nnx.state(model),
        "optimizer": nnx.state(optimizer),
        "famo": nnx.state(weighting),
        "prev_losses": nan,
    }
    restored = restore(tmp_path / "ckpt", like)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    nnx.update(weighting, restored["famo"])
    assert int(optimizer.step[...]) == FIRST
    assert isinstance(weighting.value, famo_jax.FAMOState)
    resumed_prev = _nnx_train(
        model, optimizer, weighting, restored["prev_losses"], digit_batches[FIRST:]
    )
    chex.assert_trees_all_equal((nnx.state(model), nnx.state(weighting), resumed_prev), expected)


# --- Flax Linen: a TrainState that carries FAMO ----------------------------------------------


def test_linen_train_state_resumes_bit_identically(tmp_path, digit_batches):
    def run(state, batches):
        for images, digits in batches:
            state, _ = flax_linen_multitask.lagged_step(state, images, digits)
        return state

    initial = flax_linen_multitask.create_train_state(jax.random.key(0), hidden=16)
    expected = run(initial, digit_batches)
    state = run(initial, digit_batches[:FIRST])
    save(tmp_path / "ckpt", FIRST, state)  # parameters, Adam, FAMO, previous losses

    # Only the shapes and dtypes of the target matter; reusing the initial state
    # keeps its static fields, so the jitted step is not compiled again.
    restored = restore(tmp_path / "ckpt", initial)
    assert int(restored.step) == FIRST
    chex.assert_trees_all_equal(_data_of(restored), _data_of(state))
    assert isinstance(restored.famo_state, famo_jax.FAMOState)
    resumed = run(restored, digit_batches[FIRST:])
    # The static fields (apply_fn, tx, FAMO's functions) are rebuilt, not saved.
    chex.assert_trees_all_equal(_data_of(resumed), _data_of(expected))


def _data_of(state):
    fields = ("step", "params", "opt_state", "famo_state", "prev_losses")
    return {name: getattr(state, name) for name in fields}
