"""Shared by the parity tests of STCH, GLS, IMTL-L, PBI and GO4Align.

Loads the fixtures of ``tests/reference/make_breadth_c_fixtures.py`` and replays
a loss weighting along their loss sequences with the peers' protocol,
``weigh(l_t, state) -> record -> update(l_t, l_{t+1}, state) -> record``, in
one jitted ``lax.scan`` vmapped over the sequences of one configuration (one
compilation per configuration and precision).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

# jax.enable_x64 since JAX 0.7, jax.experimental.enable_x64 before (the same shim
# as main's tests/_compat.py, kept here so that this module stands alone).
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # JAX < 0.7
    from jax.experimental import enable_x64

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "reference" / "fixtures" / "breadth_c"
PRECISIONS = {"f32": jnp.float32, "f64": jnp.float64}


@functools.cache
def load(method: str) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """``(cases, arrays)``: the index (case name -> hyperparameters) and every array."""
    with np.load(FIXTURES / f"{method}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(str(arrays.pop("cases"))), arrays


def configurations(method: str, keys: tuple[str, ...]) -> dict[tuple, list[str]]:
    """The case names grouped by the hyperparameters ``keys`` (one compilation each)."""
    cases, _ = load(method)
    groups = defaultdict(list)
    for name, params in cases.items():
        groups[tuple(params[key] for key in keys)].append(name)
    return dict(groups)


def replay(weighting, losses: np.ndarray, precision: str, record):
    """Runs ``weighting`` along ``losses`` (``(batch, steps + 1, k)``), recording per step.

    ``record(value, grad, state)`` picks what to compare (a pytree of arrays).
    Returns NumPy float64 arrays of shape ``(batch, steps, ...)``. The x64 flag
    is scoped to tracing and running; only NumPy arrays leave.
    """
    with enable_x64(precision == "f64"):
        dtype = PRECISIONS[precision]

        def run(sequence):
            def step(state, pair):
                current, following = pair
                value, grad = jax.value_and_grad(weighting.weigh)(current, state)
                state = weighting.update(current, following, state)
                return state, record(value, grad, state)

            _, records = jax.lax.scan(step, weighting.init(), (sequence[:-1], sequence[1:]))
            return records

        records = jax.jit(jax.vmap(run))(jnp.asarray(losses, dtype))
        return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), records)


def assert_close(ours, reference, rtol, *, floor=1e-6, what=""):
    """Elementwise ``|ours - ref| <= rtol * max(|ref|, floor * max|ref| of its row)``.

    Weights span many orders of magnitude within a step (a task with a 1e-3
    loss next to one with 1e3); entries below ``floor`` times the row's largest
    are compared on that floor instead of on their own size.
    """
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    size = np.abs(reference)
    row = size.max(axis=-1, keepdims=True) if size.ndim else size
    tolerance = rtol * np.maximum(size, floor * row)
    error = np.abs(ours - reference)
    bad = ~(error <= tolerance)
    if np.any(bad):
        index = tuple(int(i[0]) for i in np.nonzero(bad))
        worst = float(np.max(error / np.maximum(tolerance / rtol, 1e-300)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries off, first at {index}: ours "
            f"{ours[index]!r}, reference {reference[index]!r}; worst relative error {worst:.3g}"
        )
