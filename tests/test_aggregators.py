"""The gradient aggregators against independent NumPy implementations of the authors' methods.

Each aggregator is checked against a NumPy port of the authors' code or paper (on
the flattened task gradients, in float64), then on the laws that hold for it, its
options, degenerate and non-finite inputs. The shared conformance checks (jit
without retracing, vmap over states, optax.chain, zero and 1e15 gradients) are in
``test_conformance.py``.

Task gradients are pytrees with leaves of several shapes; jitted updates are
cached so that every (method, shape, dtype) compiles once.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

import famo_jax
from famo_jax import aggregation
from famo_jax.aggregation._cagrad import _dual_weights as cagrad_dual_weights

K = 5
C = 0.4
PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)

# ---------------------------------------------------------------------------
# Task gradients as pytrees, and their flat (k, m) NumPy view.


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


# ---------------------------------------------------------------------------
# CAGrad: the authors' ``cagrad`` function (Cranial-XIX/CAGrad and FAMO repositories),
# ported to NumPy with their grads as columns: GG = grads^T grads.


def authors_cagrad(grads, alpha=C, rescale=1, ftol=None):
    """Returns ``(g, w, objective)`` as their code computes them (grads: (m, k))."""
    n_tasks = grads.shape[1]
    gg = grads.T @ grads
    g0_norm = np.sqrt(gg.mean() + 1e-8)
    x_start = np.ones(n_tasks) / n_tasks
    bnds = tuple((0, 1) for _ in x_start)
    cons = {"type": "eq", "fun": lambda x: 1 - sum(x)}
    b = x_start.copy()
    c = alpha * g0_norm + 1e-8

    def objfn(x):
        return (
            x.reshape(1, n_tasks).dot(gg).dot(b.reshape(n_tasks, 1))
            + c * np.sqrt(x.reshape(1, n_tasks).dot(gg).dot(x.reshape(n_tasks, 1)) + 1e-8)
        ).sum()

    options = {} if ftol is None else {"ftol": ftol, "maxiter": 1000}
    res = scipy.optimize.minimize(objfn, x_start, bounds=bnds, constraints=cons, options=options)
    return cagrad_from_weights(grads, res.x, alpha, rescale), res.x, objfn(res.x)


def cagrad_from_weights(grads, w, alpha=C, rescale=1):
    """The authors' g from the dual weights w (their code after ``minimize``)."""
    gg = grads.T @ grads
    c = alpha * np.sqrt(gg.mean() + 1e-8) + 1e-8
    gw = grads @ w
    lmbda = c / (np.linalg.norm(gw) + 1e-8)
    g = grads.mean(axis=1) + lmbda * gw
    return {0: g, 1: g / (1 + alpha**2), 2: g / (1 + alpha)}[rescale]


@jax.jit
def cagrad_dual(task_grads):
    """The dual weights from the same Gram matrix as the aggregator's."""
    return cagrad_dual_weights(aggregation.gram_matrix(task_grads), C)


def cagrad_inputs(seed):
    return random_flat(seed) * np.array([1.0, 0.3, 3.0, 1.0, 0.1])[:, None]


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_equals_the_authors_g_in_float64(rescale):
    # Their code run to convergence (a tight SLSQP tolerance) gives our output.
    for seed in range(3):
        flat = cagrad_inputs(seed)
        with jax.enable_x64(True):
            tx, update = jitted("cagrad", c=C, rescale=rescale)
            out, _ = update(from_flat(flat, np.float64), tx.init(None))
            out = flat_output(out)
        reference, _, _ = authors_cagrad(flat.T, rescale=rescale, ftol=1e-15)
        np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7 * np.abs(reference).max())


def test_cagrad_equals_the_authors_g_in_float32():
    for seed in range(3):
        flat = cagrad_inputs(seed)
        grads = as_float32(flat).T
        out, _ = aggregate("cagrad", flat, c=C, rescale=1)
        # float32 determines the dual weights (a flat minimum) to ~1e-4, hence g.
        reference, _, _ = authors_cagrad(grads, ftol=1e-15)
        assert np.linalg.norm(out - reference) <= 1e-4 * np.linalg.norm(reference)
        # Their formula applied to our dual weights gives our output to float32 precision.
        w = np.asarray(cagrad_dual(from_flat(flat)), np.float64)
        np.testing.assert_allclose(out, cagrad_from_weights(grads, w), rtol=2e-5, atol=1e-6)
        # Their default call (SLSQP, ftol 1e-6) does not solve the dual better than we
        # do, up to float32 rounding of the objective (~1e-7 of the Gram's scale).
        _, _, their_value = authors_cagrad(grads)
        gram = grads.T @ grads
        b, cc = gram.mean(axis=1), C * np.sqrt(gram.mean() + 1e-8) + 1e-8
        our_value = float(b @ w + cc * np.sqrt(w @ gram @ w + 1e-8))
        scale = np.mean(np.diag(gram))
        assert our_value <= their_value + 1e-6 * scale, (our_value, their_value)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), conflict=st.floats(0.0, 3.0))
def test_cagrad_maximises_the_worst_improvement_in_a_ball_around_the_mean(seed, conflict):
    # CAGrad's primal: d maximises min_i <g_i, d> over |d - g0| <= c |g0| (rescale=0
    # returns d itself). g0 is in the ball, so d does at least as well as the mean.
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal((K, M))
    flat[1] -= conflict * flat[0]
    grads = as_float32(flat)
    out, _ = aggregate("cagrad", flat, c=C, rescale=0)
    mean = grads.mean(axis=0)
    scale = np.sum(grads**2)
    assert np.linalg.norm(out - mean) <= C * np.linalg.norm(mean) * (1 + 1e-4) + 1e-6
    assert np.min(grads @ out) >= np.min(grads @ mean) - 1e-5 * scale


def test_cagrad_rescale_and_c_zero():
    flat = random_flat(10)
    out0, _ = aggregate("cagrad", flat, c=C, rescale=0)
    out1, _ = aggregate("cagrad", flat, c=C, rescale=1)
    out2, _ = aggregate("cagrad", flat, c=C, rescale=2)
    np.testing.assert_allclose(out1 * (1 + C**2), out0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2 * (1 + C), out0, rtol=1e-5, atol=1e-6)
    # Equal gradients: (1 + c) v / r, the mean exactly for rescale=2.
    equal = np.tile(flat[:1], (K, 1))
    v = as_float32(flat[0])
    np.testing.assert_allclose(aggregate("cagrad", equal, c=C, rescale=2)[0], v, rtol=1e-5)
    np.testing.assert_allclose(
        aggregate("cagrad", equal, c=C, rescale=1)[0], (1 + C) / (1 + C**2) * v, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"c": -0.1}, ValueError),
        ({"c": float("nan")}, ValueError),
        ({"c": "0.4"}, TypeError),
        ({"rescale": 3}, ValueError),
        ({"rescale": 1.0}, TypeError),
    ],
)
def test_cagrad_rejects_bad_hyperparameters(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        famo_jax.cagrad(**kwargs)


# ---------------------------------------------------------------------------
# MGDA: the exact min-norm point (support enumeration) of the normalised gradients.


def exact_min_norm_weights(gram):
    k = gram.shape[0]
    best, best_w = np.inf, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            sub = gram[np.ix_(support, support)]
            kkt = np.block([[sub, -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(sol >= -1e-12):
                w = np.zeros(k)
                w[list(support)] = np.clip(sol, 0, None) / np.clip(sol, 0, None).sum()
                if w @ gram @ w < best:
                    best, best_w = w @ gram @ w, w
    return best_w


def sener_koltun_mgda(grads, losses, normalization):
    """Their ``gradient_normalizers`` + min-norm weights, applied to the raw gradients."""
    norms = np.linalg.norm(grads, axis=1)
    normalizers = {
        "none": np.ones(len(grads)),
        "l2": norms,
        "loss": losses,
        "loss+": losses * norms,
    }[normalization]
    normalized = grads / normalizers[:, None]
    w = exact_min_norm_weights(normalized @ normalized.T)
    return w @ grads


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_equals_the_min_norm_element(normalization):
    # Sum convention and the losses as an extra argument, through optax.chain.
    tx = optax.chain(famo_jax.mgda(normalization), optax.scale(K))
    update = jax.jit(tx.update)
    for seed in range(3):
        flat = random_flat(seed) * np.array([1.0, 10.0, 0.1, 1.0, 3.0])[:, None]
        flat[2] -= flat[0]  # some conflict
        losses = np.exp(np.random.default_rng(seed).standard_normal(K)).astype(np.float32)
        out, _ = update(from_flat(flat), tx.init(None), None, losses=jnp.asarray(losses))
        grads = as_float32(flat)
        reference = K * sener_koltun_mgda(grads, losses.astype(np.float64), normalization)
        # The weights come from float32 Gram matrices with condition numbers up to
        # 1e5, so they are exact to about 1e-5 (the objective is exact to rounding)
        # and their error reaches the output through the raw gradients:
        # |d - d_ref| <= K |w - w_ref|_1 max_i |g_i|. Which digits go depends on the
        # CPU's kernels: an AMD EPYC reached |w - w_ref|_1 ~ 5e-6; 5e-5 is allowed.
        np.testing.assert_allclose(
            flat_output(out), reference, rtol=1e-4, atol=5e-5 * K * np.abs(grads).max()
        )
        if normalization == "none":  # the output is the min-norm point itself
            np.testing.assert_allclose(
                np.linalg.norm(flat_output(out)), np.linalg.norm(reference), rtol=1e-5
            )


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    common=st.floats(0.05, 2.0),
    num_dims=st.sampled_from([2, 3, M]),
)
def test_mgda_direction_does_not_conflict_with_any_task(seed, common, num_dims):
    # The task gradients share a direction v with <v, g_i> > 0 (so a non-conflicting
    # direction exists), also with more tasks than dimensions; the min-norm point d
    # then satisfies <d, g_i> >= |d|^2 > 0 for every task.
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(num_dims)
    v /= np.linalg.norm(v)
    noise = rng.standard_normal((K, num_dims))
    noise -= np.outer(noise @ v, v)  # orthogonal to v
    flat = np.zeros((K, M))
    flat[:, :num_dims] = (common + rng.uniform(0, 1, (K, 1))) * v + noise
    grads = as_float32(flat)
    out, _ = aggregate("mgda", flat)
    tolerance = 1e-5 * np.max(np.sum(grads**2, axis=1))
    assert np.linalg.norm(out) > 0
    assert np.all(grads @ out >= out @ out - tolerance), (grads @ out, out @ out)


def test_mgda_is_zero_at_a_pareto_stationary_point():
    flat = random_flat(4)
    flat[1] = -2.0 * flat[0]  # the hull contains zero
    out, _ = aggregate("mgda", flat)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_mgda_checks_its_options_and_losses():
    with pytest.raises(ValueError, match="normalization"):
        famo_jax.mgda("norm")
    tx = famo_jax.mgda("loss")
    grads = from_flat(random_flat(0))
    with pytest.raises(ValueError, match="losses"):
        tx.update(grads, tx.init(None))
    with pytest.raises(ValueError, match="shape"):
        tx.update(grads, tx.init(None), losses=jnp.ones(K + 1))


# ---------------------------------------------------------------------------
# PCGrad: the vector-space algorithm of the paper, for every possible task order.


def pcgrad_vector_space(grads, orders):
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].copy()
        for j in order:
            inner = g @ grads[j]
            if inner < 0:
                g = g - inner / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return np.mean(projected, axis=0)


def all_pcgrad_outputs(grads):
    k = len(grads)
    per_task = [list(itertools.permutations([j for j in range(k) if j != i])) for i in range(k)]
    return np.array([pcgrad_vector_space(grads, orders) for orders in itertools.product(*per_task)])


def test_pcgrad_is_the_projection_algorithm_in_a_random_order():
    # Three tasks: each projects on the two others in one of two orders, so there
    # are 8 possible outputs; every update must be one of them, and both orders of
    # some task must occur over the updates.
    tx, update = jitted("pcgrad", seed=0)
    state = tx.init(None)
    seen = set()
    for seed in range(12):
        flat = random_flat(seed, k=3)
        flat[1] -= 1.5 * flat[0]
        flat[2] -= 0.7 * flat[1]
        grads = as_float32(flat)
        out, state = update(from_flat(flat), state)
        candidates = all_pcgrad_outputs(grads)
        distances = np.abs(candidates - flat_output(out)).max(axis=1)
        assert distances.min() <= 1e-5 * np.abs(candidates).max(), distances
        seen.add(tuple(np.round(candidates[np.argmin(distances)] - candidates[0], 4)))
    assert len(seen) > 1


def test_pcgrad_runs_are_reproducible_and_depend_on_the_seed():
    flat = random_flat(0, k=3)
    flat[1] -= 1.5 * flat[0]
    flat[2] -= 0.7 * flat[1]

    def run(tx, update):
        state, outs = tx.init(None), []
        for _ in range(8):
            out, state = update(from_flat(flat), state)
            outs.append(flat_output(out))
        return np.array(outs), state

    tx0, update0 = jitted("pcgrad", seed=0)
    first, state = run(tx0, update0)
    again, _ = run(tx0, update0)
    np.testing.assert_array_equal(first, again)
    assert state.key.shape == (2,) and not np.array_equal(state.key, tx0.init(None).key)
    keyed = famo_jax.pcgrad(key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(keyed.init(None).key, tx0.init(None).key)
    other, _ = run(*jitted("pcgrad", seed=1))
    assert not np.allclose(first, other)  # some update used a different order


def test_pcgrad_without_conflicts_is_the_mean():
    flat = np.abs(random_flat(2, k=3))  # all inner products positive
    out, _ = aggregate("pcgrad", flat, seed=0)
    np.testing.assert_allclose(out, as_float32(flat).mean(axis=0), rtol=1e-6)


# ---------------------------------------------------------------------------
# IMTL-G: the authors' closed form (FAMO / Nash-MTL repositories).


def authors_imtl_g(grads):
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    unit = grads / norms
    d = grads[0] - grads[1:]
    u = unit[0] - unit[1:]
    alpha_ = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
    alpha = np.r_[1 - alpha_.sum(), alpha_]
    return alpha @ grads


def test_imtl_g_equals_the_authors_closed_form():
    for seed in range(4):
        flat = random_flat(seed) * np.array([1.0, 5.0, 0.2, 1.0, 2.0])[:, None]
        grads = as_float32(flat)
        out, _ = aggregate("imtl_g", flat)
        reference = authors_imtl_g(grads)
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
        # Its defining property: equal projections on every task direction.
        projections = grads @ out / np.linalg.norm(grads, axis=1)
        np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_imtl_g_leaves_out_zero_gradients():
    flat = random_flat(7)
    flat[3] = 0.0
    grads = as_float32(flat)
    out, _ = aggregate("imtl_g", flat)
    active = np.delete(grads, 3, axis=0)
    np.testing.assert_allclose(out, authors_imtl_g(active), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Nash-MTL: alpha with (A / |A|_F) alpha = 1 / alpha, by scipy; output sum_i alpha_i g_i.


def nash_alpha(grads):
    gram = grads @ grads.T
    gram = gram / np.linalg.norm(gram)

    def phi(y):  # log-parametrised, alpha = exp(y)
        alpha = np.exp(y)
        return 0.5 * alpha @ gram @ alpha - np.sum(y)

    result = scipy.optimize.minimize(
        phi,
        np.zeros(len(gram)),
        jac=lambda y: np.exp(y) * (gram @ np.exp(y)) - 1.0,
        method="BFGS",
        options={"gtol": 1e-10},
    )
    return np.exp(result.x)


def test_nash_mtl_equals_the_bargaining_solution_in_the_authors_units():
    tx = optax.chain(famo_jax.nash_mtl(num_tasks=K), optax.scale(K))  # sum convention
    update = jax.jit(tx.update)
    state = tx.init(None)
    for seed in range(3):
        flat = random_flat(seed) * np.array([1.0, 0.5, 2.0, 1.0, 4.0])[:, None]
        grads = as_float32(flat)
        out, state = update(from_flat(flat), state)
        alpha = nash_alpha(grads)
        np.testing.assert_allclose(np.asarray(state[0].alpha), alpha, rtol=1e-4)
        reference = alpha @ grads
        np.testing.assert_allclose(
            flat_output(out), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max()
        )
        # The bargaining property: alpha_i <g_i, d> is the same for every task.
        inner = alpha * (grads @ reference)
        np.testing.assert_allclose(inner, inner[0], rtol=1e-3)
    assert int(state[0].num_updates) == 3 and int(state[0].num_skipped) == 0


def test_nash_mtl_keeps_the_previous_weights_when_there_is_no_solution():
    tx, update = jitted("nash_mtl", num_tasks=K)
    good = random_flat(1)
    out, state = update(from_flat(good), tx.init(None))
    previous = np.asarray(state.alpha)
    bad = random_flat(2)
    bad[1] = -bad[0]  # exactly opposite: no direction improves every task
    out, state = update(from_flat(bad), state)
    np.testing.assert_array_equal(state.alpha, previous)
    assert int(state.num_skipped) == 1 and int(state.num_updates) == 1
    np.testing.assert_allclose(flat_output(out), previous @ as_float32(bad) / K, rtol=1e-5)


def test_nash_mtl_updates_the_weights_every_few_steps():
    tx = famo_jax.nash_mtl(num_tasks=K, update_weights_every=3)
    chex.clear_trace_counter()
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))  # one trace for both branches
    state = tx.init(None)
    alphas = []
    for step in range(7):
        flat = random_flat(100 + step)
        out, new_state = update(from_flat(flat), state)
        if step % 3:  # weights reused: output from the previous weights
            np.testing.assert_array_equal(new_state.alpha, state.alpha)
            np.testing.assert_allclose(
                flat_output(out), np.asarray(state.alpha) @ as_float32(flat) / K, rtol=1e-5
            )
        else:
            np.testing.assert_allclose(new_state.alpha, nash_alpha(as_float32(flat)), rtol=1e-4)
        alphas.append(np.asarray(new_state.alpha))
        state = new_state
    assert int(state.num_updates) + int(state.num_skipped) == 7
    assert len({a.tobytes() for a in alphas}) == 3  # recomputed at steps 0, 3 and 6


def test_nash_mtl_without_num_tasks_and_its_options():
    flat = random_flat(5)
    with_k, state_k = aggregate("nash_mtl", flat, num_tasks=K)
    without, state = aggregate("nash_mtl", flat)
    assert state.alpha.shape == (0,) and state_k.alpha.shape == (K,)
    np.testing.assert_allclose(without, with_k, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="num_tasks"):
        famo_jax.nash_mtl(update_weights_every=2)
    with pytest.raises(ValueError, match="update_weights_every"):
        famo_jax.nash_mtl(num_tasks=2, update_weights_every=0)
    with pytest.raises(TypeError, match="max_iters"):
        famo_jax.nash_mtl(max_iters=1.5)
    tx = famo_jax.nash_mtl(num_tasks=K + 1)
    with pytest.raises(ValueError, match="num_tasks"):
        tx.update(from_flat(flat), tx.init(None))


# ---------------------------------------------------------------------------
# GradDrop: Algorithm 1 of the paper on parameter gradients (as the authors' port).

SIGN_GRADS = np.array([[3.0, 1.0, -1.0, 2.0], [-1.0, -3.0, 1.0, 1.0]])
PURITY = np.array([0.75, 0.25, 0.5, 1.0])  # 0.5 * (1 + sum / sum |.|) per entry


@functools.cache
def graddrop_over_keys(num_keys, **kwargs):
    tx = famo_jax.graddrop(**kwargs)
    keys = jax.random.split(jax.random.PRNGKey(0), num_keys)
    states = famo_jax.GradDropState(key=keys)
    run = jax.jit(jax.vmap(lambda state: tx.update(jnp.asarray(SIGN_GRADS, jnp.float32), state)))
    return run, states


def test_graddrop_keeps_one_sign_per_entry_with_the_sign_purity_as_probability():
    run, states = graddrop_over_keys(4000)
    out, new_states = run(states)
    out = np.asarray(out, np.float64)
    positive = np.where(SIGN_GRADS > 0, SIGN_GRADS, 0).sum(axis=0) / 2
    negative = np.where(SIGN_GRADS < 0, SIGN_GRADS, 0).sum(axis=0) / 2
    picked_positive = out == positive
    assert np.all(picked_positive | (out == negative))
    # P(keep the positive ones) = purity, within 4.5 standard deviations.
    frequency = picked_positive.mean(axis=0)
    spread = 4.5 * np.sqrt(PURITY * (1 - PURITY) / len(out)) + 1e-12
    assert np.all(np.abs(frequency - PURITY) <= spread), frequency
    assert not np.array_equal(new_states.key, states.key)


def test_graddrop_agreeing_entries_leaks_and_scale():
    flat = random_flat(3)
    flat[:, :4] = np.abs(flat[:, :4])  # entries 0-3: every task agrees
    flat[:, 4:6] = -np.abs(flat[:, 4:6])
    grads = as_float32(flat)
    out, state = aggregate("graddrop", flat, seed=0)
    np.testing.assert_allclose(out[:6], grads.mean(axis=0)[:6], rtol=1e-6)
    # The sign purity is scale-free (no epsilon): the same key drops the same entries.
    tiny, _ = aggregate("graddrop", 1e-20 * flat, seed=0)
    np.testing.assert_allclose(tiny, 1e-20 * out, rtol=1e-5)
    # leak = 1 is the mean; per-task leaks.
    np.testing.assert_allclose(
        aggregate("graddrop", flat, leak=1.0)[0], grads.mean(axis=0), rtol=1e-6
    )
    # Task 0 fully leaks: where its entry was dropped, g_0 / k comes back.
    leaky, _ = aggregate("graddrop", flat, leak=(1.0, 0.0, 0.0, 0.0, 0.0), seed=0)
    restored = ~np.isclose(leaky, out, rtol=1e-6, atol=0)
    assert np.any(restored)
    np.testing.assert_allclose((leaky - out)[restored], grads[0][restored] / K, rtol=1e-4)


def test_graddrop_rejects_bad_leaks():
    with pytest.raises(ValueError, match="leak"):
        famo_jax.graddrop(leak=1.5)
    with pytest.raises(ValueError, match="leak"):
        famo_jax.graddrop(leak=[[0.1]])
    tx = famo_jax.graddrop(leak=(0.0, 0.5))
    with pytest.raises(ValueError, match="leak"):
        tx.update(from_flat(random_flat(0)), tx.init(None))


# ---------------------------------------------------------------------------
# All aggregators: one task, non-finite gradients, bfloat16 values, task order.

ALL = {
    "cagrad": {"c": C, "rescale": 2},
    "mgda": {},
    "pcgrad": {"seed": 0},
    "imtl_g": {},
    "nash_mtl": {"num_tasks": K},
    "graddrop": {"seed": 0},
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_one_task_gives_its_gradient(name):
    kwargs = dict(ALL[name], num_tasks=1) if name == "nash_mtl" else ALL[name]
    flat = random_flat(0, k=1)
    out, _ = aggregate(name, flat, **kwargs)
    np.testing.assert_allclose(out, as_float32(flat[0]), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_non_finite_gradients_give_a_non_finite_output_and_keep_the_state(name):
    tx, update = jitted(name, **ALL[name])
    flat = random_flat(6)
    _, state = update(from_flat(flat), tx.init(None))
    finite_out, finite_state = update(from_flat(flat), state)
    broken = flat.copy()
    broken[2, 4] = np.nan
    out, new_state = update(from_flat(broken), state)
    assert not np.all(np.isfinite(flat_output(out)))
    if name == "nash_mtl":  # the warm start is kept, the step counts as a fallback
        np.testing.assert_array_equal(new_state.alpha, state.alpha)
        assert int(new_state.num_skipped) == int(state.num_skipped) + 1
    else:  # keys advance exactly as on a finite step
        chex.assert_trees_all_equal(new_state, finite_state)
    assert np.all(np.isfinite(flat_output(finite_out)))


def test_apply_if_finite_skips_a_step_with_non_finite_task_gradients():
    tx = famo_jax.nash_mtl(num_tasks=K)
    chain = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
    flat = random_flat(6)
    broken = flat.copy()
    broken[2, 4] = np.inf
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), from_flat(flat))
    updates, chain_state = jax.jit(chain.update)(from_flat(broken), chain.init(params), params)
    assert int(chain_state[1].notfinite_count) == 1
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_array_equal(chain_state[0].alpha, np.ones(K))  # warm start intact
    assert int(chain_state[0].num_skipped) == 1


@pytest.mark.parametrize("name", sorted(ALL))
def test_bfloat16_gradients_keep_their_dtype_and_weights_in_float32(name):
    tx, update = jitted(name, **ALL[name])
    flat = random_flat(8)
    low = from_flat(flat, jnp.bfloat16)
    out, _ = update(low, tx.init(None))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
    if name == "graddrop":  # each entry: the positive or the negative part of the mean
        rounded = to_float64(low)
        positive = np.where(rounded > 0, rounded, 0).sum(axis=0) / K
        negative = np.where(rounded < 0, rounded, 0).sum(axis=0) / K
        result = flat_output(out)
        assert np.all(
            np.isclose(result, positive, rtol=1e-2) | np.isclose(result, negative, rtol=1e-2)
        )
    else:  # close to the float32 result (the inputs differ by bfloat16 rounding)
        reference, _ = update(from_flat(flat), tx.init(None))
        np.testing.assert_allclose(
            flat_output(out), flat_output(reference), rtol=3e-2, atol=3e-2 * np.abs(flat).max()
        )


@pytest.mark.parametrize("name", sorted(set(ALL) - {"pcgrad"}))
def test_outputs_do_not_depend_on_the_task_order(name):
    tx, update = jitted(name, **ALL[name])
    flat = random_flat(9) * np.array([1.0, 3.0, 0.3, 1.0, 2.0])[:, None]
    flat[1] -= flat[0]
    out, _ = update(from_flat(flat), tx.init(None))
    for permutation in ([4, 3, 2, 1, 0], [1, 2, 0, 4, 3]):
        permuted, _ = update(from_flat(flat[permutation]), tx.init(None))
        np.testing.assert_allclose(flat_output(permuted), flat_output(out), rtol=1e-4, atol=1e-6)
