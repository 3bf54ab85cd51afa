"""Replaying the LibMTL and TorchJD fixtures of ``tests/reference/make_breadth_b_fixtures.py``.

The fixtures store, per case, the peer's inputs (task gradients as flat
``(k, 19)`` rows, losses) and outputs over ``STEPS`` steps with the state
carried. Here the flat rows become the pytree whose leaves flatten in the
fixture's parameter order, each method is run over the same steps, and its
flat outputs and states are compared with the peer's.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "reference" / "fixtures" / "breadth_b"
# (layer, leaf, shape), in the order of the fixture's flat rows and of the pytree's leaves.
LAYOUT = (
    ("layer1", "bias", (3,)),
    ("layer1", "kernel", (3, 2)),
    ("layer2", "w", (4,)),
    ("layer3", "bias", (2,)),
    ("layer3", "kernel", (2, 1, 2)),
)
NUM_PARAMS = sum(int(np.prod(shape)) for _, _, shape in LAYOUT)


@functools.cache
def load(peer: str, method: str):
    """``(configs, cases)``: config name -> hyperparameters, and
    ``(config, case) -> {array name -> array}`` for every stored case."""
    cases: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    with np.load(FIXTURES / f"{peer}_{method}.npz") as data:
        meta = json.loads(str(data["meta"]))
        for name in data.files:
            if name == "meta":
                continue
            config, case, array = name.split("__")
            cases.setdefault((config, case), {})[array] = data[name]
    return meta["configs"], cases


def case_names(peer: str, method: str, config: str) -> list[str]:
    return sorted(case for c, case in load(peer, method)[1] if c == config)


def to_tree(flat, dtype):
    """The pytree of ``flat``'s rows (``(..., 19)``), leaves of shape ``(..., *shape)``."""
    flat = np.asarray(flat)
    tree, start = {}, 0
    for layer, leaf, shape in LAYOUT:
        size = int(np.prod(shape))
        values = flat[..., start : start + size].reshape(flat.shape[:-1] + shape)
        tree.setdefault(layer, {})[leaf] = jnp.asarray(values, dtype)
        start += size
    return tree


def params(dtype=jnp.float32):
    return to_tree(np.zeros(NUM_PARAMS), dtype)


def to_flat(tree) -> np.ndarray:
    """The float64 flat rows of a pytree (leading axes kept)."""
    leaves = jax.tree.leaves(tree)
    lead = np.shape(leaves[0])[: np.ndim(leaves[0]) - len(LAYOUT[0][2])]
    return np.concatenate(
        [np.asarray(leaf, np.float64).reshape(lead + (-1,)) for leaf in leaves], axis=-1
    )


def as_dtype(state, dtype):
    """``state`` with its floating leaves cast to ``dtype`` (a float64 state in x64 mode)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )


def initial_state(tx, dtype):
    """``tx.init`` with its floating leaves in ``dtype``; uniform simplex weights
    (a ``weights`` field, float32 ``1/k`` at init) are recomputed in ``dtype``, so
    that a float64 replay does not start from float32-rounded ``1/k``."""
    state = as_dtype(tx.init(params(dtype)), dtype)
    if "weights" in getattr(state, "_fields", ()):
        k = state.weights.shape[0]
        state = state._replace(weights=jnp.full((k,), 1.0 / k, dtype))
    return state


def replay(tx, update, steps, dtype, state=None):
    """Runs ``update`` (jitted ``tx.update``) over ``steps``: dicts of the update's
    arguments ``grads`` (flat rows) and keyword arguments; returns the outputs
    (flat, float64) and the states after every step. ``state``: the initial
    state (default :func:`initial_state`)."""
    state = initial_state(tx, dtype) if state is None else state
    outputs, states = [], []
    for step in steps:
        step = dict(step)
        grads = to_tree(step.pop("grads"), dtype)
        out, state = update(grads, state, **step)
        outputs.append(to_flat(out))
        states.append(state)
    return np.stack(outputs), states


def step_scales(grads) -> np.ndarray:
    """``(STEPS,)``: the largest task-gradient entry of every step (every batch)."""
    grads = np.abs(np.asarray(grads, np.float64))
    return grads.reshape(grads.shape[0], -1).max(axis=1)


def assert_steps_close(actual, expected, rtol, scales, what=""):
    """Every step's vector equal to the reference within ``rtol`` of the step's scale.

    The scale of step ``t`` is the largest of ``scales[t]`` (the inputs' largest
    entry, from :func:`step_scales`) and the reference's largest entry, so that a
    rounding-size difference in an entry that cancels (or an output that is
    zero, as for exactly opposite gradients) does not count as a relative
    error of 1.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    for t in range(expected.shape[0]):
        scale = max(np.max(np.abs(expected[t])), scales[t])
        np.testing.assert_allclose(
            actual[t], expected[t], rtol=rtol, atol=rtol * scale, err_msg=f"{what} step {t}"
        )


def max_relative_error(actual, expected, scales) -> float:
    """The largest step-wise error relative to the step's scale (see assert_steps_close)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    errors = [
        np.max(np.abs(a - e)) / max(np.max(np.abs(e)), scale, np.finfo(float).tiny)
        for a, e, scale in zip(actual, expected, scales, strict=True)
    ]
    return float(max(errors))


def three_batch_steps(arrays, method: str, dtype, *, batches: bool = True) -> list[dict]:
    """The update arguments of MoDo and SDMGrad for every step of a fixture case.

    The peers' three batches per step are ``grads[t, 0..2]``. SDMGrad combines
    batch 0 and solves its weights from ``G_1 G_2^T``; MoDo combines batch 2 and
    updates its weights with ``G_0 G_1^T``. In the ``same_batch`` cases the three
    are equal and the single-batch fallback (no ``weight_batches``) is used.
    """
    direction, pair = (0, (1, 2)) if method == "sdmgrad" else (2, (0, 1))
    steps = []
    for grads in arrays["grads"]:
        step = {"grads": grads[direction]}
        if batches:
            step["weight_batches"] = tuple(to_tree(grads[b], dtype) for b in pair)
        steps.append(step)
    return steps
