"""DB-MTL against LibMTL's own code (the authors').

Fixtures: ``tests/reference/make_breadth_b_fixtures.py`` (LibMTL at 4336804,
float64), six steps per case with the gradient buffer carried, k in 2, 3, 5, 10
and 24, random, conflicting, scaled and degenerate inputs. Bounds, relative to
each step's largest entry: float32 1e-5 (seen 4.3e-7), float64 1e-10 (seen
9.2e-16).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import famo_jax
from famo_jax import aggregation
from tests.aggregation import _breadth_b_fixtures as fixtures


@functools.cache
def jitted(k, beta, beta_sigma):
    tx = famo_jax.db_mtl(k, beta=beta, beta_sigma=beta_sigma)
    return tx, jax.jit(tx.update)


def check(config, dtype, rtol):
    configs, cases = fixtures.load("libmtl", "db_mtl")
    for case in fixtures.case_names("libmtl", "db_mtl", config):
        arrays = cases[(config, case)]
        k = arrays["grads"].shape[1]
        tx, update = jitted(k, **configs[config])
        steps = [
            {"grads": g, "losses": jnp.asarray(losses, dtype)}
            for g, losses in zip(arrays["grads"], arrays["losses"], strict=True)
        ]
        outputs, states = fixtures.replay(tx, update, steps, dtype)
        # The log-loss gradients' scale: the inputs divided by their losses.
        scales = fixtures.step_scales(arrays["grads"] / arrays["losses"][:, :, None])
        # LibMTL sums the rescaled buffers: k times the mean.
        fixtures.assert_steps_close(k * outputs, arrays["output"], rtol, scales, case)
        buffers = np.stack([fixtures.to_flat(s.grad_buffer) for s in states])
        for t in range(len(states)):
            np.testing.assert_allclose(
                buffers[t],
                arrays["grad_buffer"][t],
                rtol=rtol,
                atol=rtol * np.abs(arrays["grad_buffer"][t]).max(),
                err_msg=case,
            )


def test_db_mtl_matches_libmtl_in_float32():
    check("default", jnp.float32, 1e-5)


@pytest.mark.parametrize("config", ["default", "beta0.5_sigma0.5"])
def test_db_mtl_matches_libmtl_in_float64(config):
    with jax.enable_x64(True):
        check(config, jnp.float64, 1e-10)


def test_db_mtl_first_update_is_the_rescaled_log_loss_gradients():
    grads = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    losses = jnp.array([2.0, 0.5])
    tx = famo_jax.db_mtl(2, beta=0.9)
    out, state = tx.update(grads, tx.init(jnp.zeros(2)), losses=losses)
    # (1 - beta) g_i / l_i: norms 0.15 and 0.2, both rescaled to 0.2; mean of the two.
    np.testing.assert_allclose(out, [0.1, 0.1], rtol=1e-5)
    np.testing.assert_allclose(state.grad_buffer, [[0.15, 0.0], [0.0, 0.2]], rtol=1e-5)


def test_db_mtl_skips_losses_it_cannot_take_the_log_of():
    tx = famo_jax.db_mtl(2)
    state = tx.init(jnp.zeros(2))
    for bad in (-1.0, jnp.nan, jnp.inf):
        out, new_state = tx.update(jnp.eye(2), state, losses=jnp.array([1.0, bad]))
        assert not np.any(np.isfinite(np.asarray(out)))
        assert int(new_state.num_skipped) == 1
        np.testing.assert_array_equal(new_state.grad_buffer, state.grad_buffer)


def test_db_mtl_rejects_what_it_cannot_use():
    tx = famo_jax.db_mtl(2)
    implicit = aggregation.ImplicitTaskGradients(gram=jnp.eye(2), combine=lambda w: w)
    with pytest.raises(TypeError, match="ImplicitTaskGradients"):
        tx.update(implicit, tx.init(jnp.zeros(2)), losses=jnp.ones(2))
    with pytest.raises(ValueError, match="needs the task losses"):
        tx.update(jnp.eye(2), tx.init(jnp.zeros(2)))
