"""Property tests of FAMO (hypothesis; few examples, derandomized for reproducible CI).

Properties: the task weights and the loss weights lie on the simplex; FAMO's
update is invariant to scaling any task's losses by a positive constant (with
``min_losses = 0`` and ``eps = 0``, or ``eps`` negligible next to the losses);
``weigh``, ``loss_weights`` and ``update`` are equivariant under a permutation of
the tasks; jitted and eager calls agree.

Precision. ``weigh`` and the loss weights are compared in float32 to within a
few ulps. The default optimizer divides by ``sqrt(vhat) + 1e-8``, so a rounding
difference ``d`` in a near-zero logits gradient can change an Adam step by up to
``lr * d / 1e-8``: in float32 (``d ~ 1e-7``) that is not small, in float64
(``d ~ 1e-15``) it is ``~2.5e-9``. The update properties with the default
optimizer therefore run in float64 (logits and losses) with tolerance 1e-8; the
float32 versions use plain gradient descent on the logits (``optax.sgd(1.0)``),
which exposes FAMO's logits gradient itself, with tolerances of a few ulps of
the log losses.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import famo_jax
from tests._compat import enable_x64

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
TASK_COUNTS = (1, 2, 3, 5)


@st.composite
def problems(draw, min_tasks=1):
    """``(prev_losses, curr_losses, logits)``: losses in [e^-5, e^5], log changes in [-1/2, 1/2]."""
    k = draw(st.sampled_from([n for n in TASK_COUNTS if n >= min_tasks]))
    elements = functools.partial(st.floats, allow_nan=False, allow_infinity=False)
    log_prev = draw(hnp.arrays(np.float64, k, elements=elements(-5.0, 5.0)))
    change = draw(hnp.arrays(np.float64, k, elements=elements(-0.5, 0.5)))
    logits = draw(hnp.arrays(np.float64, k, elements=elements(-3.0, 3.0)))
    return np.exp(log_prev), np.exp(log_prev - change), logits


def state_with(weighting, logits, dtype=jnp.float32):
    return weighting.init()._replace(logits=jnp.asarray(logits, dtype))


def two_updates(weighting, prev, curr, state):
    """Two updates, so that the optimizer's moments are not at their initial values."""
    state = weighting.update(prev, curr, state)
    return weighting.update(curr, prev * curr / (prev + curr), state)


@SETTINGS
@given(problems())
def test_task_and_loss_weights_lie_on_the_simplex(problem):
    prev, curr, logits = problem
    k = len(prev)
    min_losses = 0.5 * np.minimum(prev, curr)
    weighting = famo_jax.famo(k, min_losses=min_losses)
    initial = state_with(weighting, logits)
    ulps = (k + 2) * 2.0**-23
    for state in (initial, weighting.update(prev, curr, initial)):
        z = state.task_weights
        assert float(jnp.min(z)) > 0.0
        np.testing.assert_allclose(float(jnp.sum(z)), 1.0, atol=ulps)
        weights = famo_jax.loss_weights(weighting, jnp.asarray(curr, jnp.float32), state)
        assert float(jnp.min(weights)) >= 0.0
        np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, atol=ulps)
        # FAMO's loss weights: w_i proportional to z_i / (l_i - m_i + eps).
        expected = np.asarray(z, np.float64) / (curr - min_losses + 1e-8)
        np.testing.assert_allclose(weights, expected / expected.sum(), rtol=1e-5)


@SETTINGS
@given(problems(), st.data())
def test_update_is_invariant_to_scaling_each_tasks_losses(problem, data):
    prev, curr, logits = problem
    k = len(prev)
    scales = 10.0 ** data.draw(hnp.arrays(np.float64, k, elements=st.floats(-3.0, 3.0)))
    # eps = 0: exact invariance. float32 with FAMO's own gradient (sgd): the log losses
    # (|log| <= 12) are rounded to ~1e-6, so allow 1e-5.
    weighting = famo_jax.famo(k, eps=0.0, optimizer=optax.sgd(1.0))
    state = state_with(weighting, logits)
    chex.assert_trees_all_close(
        two_updates(weighting, prev * scales, curr * scales, state),
        two_updates(weighting, prev, curr, state),
        atol=1e-5,
    )
    # eps = 0 with the default optimizer, in float64.
    with enable_x64(True):
        weighting = famo_jax.famo(k, eps=0.0, logits_dtype=jnp.float64)
        state = state_with(weighting, logits, jnp.float64)
        chex.assert_trees_all_close(
            two_updates(weighting, prev * scales, curr * scales, state),
            two_updates(weighting, prev, curr, state),
            atol=1e-8,
        )
    # Default eps = 1e-8, losses >= 1e-3 after scaling: eps shifts each log loss by at most
    # 1e-5, so each logits gradient entry by at most 4e-5 per update.
    unit = 1.0 / min(prev.min(), curr.min())
    weighting = famo_jax.famo(k, optimizer=optax.sgd(1.0))
    state = state_with(weighting, logits)
    chex.assert_trees_all_close(
        two_updates(weighting, prev * unit * scales, curr * unit * scales, state),
        two_updates(weighting, prev * unit, curr * unit, state),
        atol=1e-4,
    )


@SETTINGS
@given(problems(min_tasks=2), st.randoms(use_true_random=False))
def test_permutation_equivariance(problem, rng):
    prev, curr, logits = problem
    k = len(prev)
    perm = np.array(rng.sample(range(k), k))
    min_losses = 0.5 * np.minimum(prev, curr)

    def permuted(tree):
        return jax.tree.map(lambda a: a[perm] if np.ndim(a) == 1 else a, tree)

    weighting = famo_jax.famo(k, min_losses=min_losses)
    permuted_weighting = famo_jax.famo(k, min_losses=min_losses[perm])
    state = state_with(weighting, logits)
    losses = jnp.asarray(curr, jnp.float32)
    np.testing.assert_allclose(
        permuted_weighting.weigh(losses[perm], permuted(state)),
        weighting.weigh(losses, state),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        famo_jax.loss_weights(permuted_weighting, losses[perm], permuted(state)),
        famo_jax.loss_weights(weighting, losses, state)[perm],
        rtol=1e-6,
    )
    with enable_x64(True):
        weighting = famo_jax.famo(k, min_losses=min_losses, logits_dtype=jnp.float64)
        permuted_weighting = famo_jax.famo(k, min_losses=min_losses[perm], logits_dtype=jnp.float64)
        state = state_with(weighting, logits, jnp.float64)
        chex.assert_trees_all_close(
            two_updates(permuted_weighting, prev[perm], curr[perm], permuted(state)),
            permuted(two_updates(weighting, prev, curr, state)),
            atol=1e-8,
        )
