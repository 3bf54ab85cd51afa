"""Task gradients as pytrees of several leaf shapes, and their flat ``(k, m)`` NumPy view.

Shared by the aggregators' reference tests: each method is checked against a
NumPy port of its authors' code on the flattened task gradients, in float64.
Jitted updates are cached so that every (method, options) compiles once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings

import famo_jax

K = 5
PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def from_flat(flat, dtype=np.float32):
    """The pytree of task gradients whose flattened rows are ``flat`` (k, 11)."""
    k = flat.shape[0]
    out, start = {}, 0
    for name, shape in [("bias", ()), ("kernel", (3, 2)), ("block", (2, 1, 2))]:
        size = int(np.prod(shape))
        leaf = jnp.asarray(flat[:, start : start + size].reshape((k,) + shape), dtype)
        out[name] = {"w": leaf} if name == "block" else leaf
        start += size
    return out


M = 11  # parameters in from_flat's pytree


def random_flat(seed, k=K, m=M):
    return np.random.default_rng(seed).standard_normal((k, m))


def as_float32(flat):
    """The float32-rounded values, as float64: what the aggregator actually sees."""
    return np.asarray(np.asarray(flat, np.float32), np.float64)


@functools.cache
def jitted(name, *args, **kwargs):
    """A transformation ``getattr(famo_jax, name)(*args, **kwargs)`` and its jitted update."""
    tx = getattr(famo_jax, name)(*args, **kwargs)
    return tx, jax.jit(tx.update)


def aggregate(name, flat, *args, state=None, **kwargs):
    """Flat output (float64) and new state of one update on the flat task gradients."""
    tx, update = jitted(name, *args, **kwargs)
    state = tx.init(None) if state is None else state
    out, state = update(from_flat(flat), state)
    return flat_output(out), state


def to_float64(tree):
    """The (k, m) float64 rows of a pytree of task gradients."""
    leaves = (tree["bias"], tree["kernel"], tree["block"]["w"])
    k = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(k, -1) for x in leaves], axis=1)


def flat_output(out):
    return np.concatenate(
        [
            np.ravel(np.asarray(x, np.float64))
            for x in (out["bias"], out["kernel"], out["block"]["w"])
        ]
    )
