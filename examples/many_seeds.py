"""Many seeds in one program: ``jax.vmap`` over a whole FAMO training run.

Everything a run carries (model parameters, model optimizer state, FAMO state)
is a pytree and every FAMO function is pure, so a training run written for one
seed becomes a run over ``S`` seeds by vmapping it over a batch of PRNG keys:
each seed gets its own initialisation, its own minibatches and its own FAMO
logits, and XLA compiles one program that advances all of them at once.

The recipe::

    def train(key):                              # one seed, start to end
        init_key, data_key = jax.random.split(key)
        state = init_train_state(init_key)        # params, opt_state, famo_state
        step = lambda s, t: train_step(s, jax.random.fold_in(data_key, t))
        return jax.lax.scan(step, state, jnp.arange(num_steps))

    states, losses = jax.jit(jax.vmap(train))(jax.random.split(key, num_seeds))

Run: ``python examples/many_seeds.py --seeds 16`` prints the spread of the
final task losses and FAMO weights across seeds.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax


class TrainState(NamedTuple):
    """Everything one seed's run carries."""

    params: Any  # the model's parameter pytree
    opt_state: optax.OptState  # the model optimizer's state
    famo_state: famo_jax.FAMOState  # FAMO's logits and logits-optimizer state


class Config(NamedTuple):
    """Sizes and hyperparameters shared by every seed."""

    num_tasks: int = 3
    input_dim: int = 8
    hidden: int = 16
    batch_size: int = 32
    learning_rate: float = 1e-2
    famo_gamma: float = 0.001


def task_losses(params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-task mean squared errors of a tanh trunk with one linear head per task."""
    features = jnp.tanh(x @ params["trunk"] + params["trunk_bias"])
    return jnp.mean((features @ params["heads"] - y) ** 2, axis=0)


def sample_batch(key: jax.Array, config: Config) -> tuple[jax.Array, jax.Array]:
    """A fresh minibatch of one fixed teacher; targets scaled 0.1 to 10 per task."""
    teacher = jax.random.normal(jax.random.key(1234), (config.input_dim, config.num_tasks))
    x = jax.random.normal(key, (config.batch_size, config.input_dim))
    scales = jnp.logspace(-1.0, 1.0, config.num_tasks)
    return x, jnp.sin(x @ teacher / np.sqrt(config.input_dim)) * scales


def make_train(config: Config, num_steps: int) -> Callable[[jax.Array], tuple[TrainState, Any]]:
    """Returns ``train(key) -> (final TrainState, per-step task losses)`` for one seed."""
    weighting = famo_jax.famo(config.num_tasks, gamma=config.famo_gamma)
    optimizer = optax.adam(config.learning_rate)

    def init_train_state(key: jax.Array) -> TrainState:
        k1, k2 = jax.random.split(key)
        params = {
            "trunk": jax.random.normal(k1, (config.input_dim, config.hidden))
            / np.sqrt(config.input_dim),
            "trunk_bias": jnp.zeros((config.hidden,)),
            "heads": jax.random.normal(k2, (config.hidden, config.num_tasks))
            / np.sqrt(config.hidden),
        }
        return TrainState(params, optimizer.init(params), weighting.init())

    def train_step(state: TrainState, key: jax.Array) -> tuple[TrainState, jax.Array]:
        x, y = sample_batch(key, config)

        def objective(params):
            losses = task_losses(params, x, y)
            return weighting.weigh(losses, state.famo_state), losses

        grads, losses = jax.grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Same-batch FAMO update, as in the authors' code.
        famo_state = weighting.update(losses, task_losses(params, x, y), state.famo_state)
        return TrainState(params, opt_state, famo_state), losses

    def train(key: jax.Array) -> tuple[TrainState, jax.Array]:
        init_key, data_key = jax.random.split(key)
        state = init_train_state(init_key)
        step = lambda s, t: train_step(s, jax.random.fold_in(data_key, t))
        return jax.lax.scan(step, state, jnp.arange(num_steps))

    return train


def train_many_seeds(keys: jax.Array, config: Config, num_steps: int):
    """All seeds in one compiled program: ``vmap`` of the one-seed run over ``keys``.

    Args:
      keys: shape ``(num_seeds,)`` PRNG keys, one per seed.
      config: the settings shared by every seed.
      num_steps: training steps per seed.

    Returns:
      The final :class:`TrainState` with a leading seed axis on every leaf, and
      the per-step task losses, shape ``(num_seeds, num_steps, num_tasks)``.
    """
    return _compiled(config, num_steps, vmapped=True)(keys)


def train_one_seed(key: jax.Array, config: Config, num_steps: int):
    """One seed on its own: what :func:`train_many_seeds` must reproduce for each seed."""
    return _compiled(config, num_steps, vmapped=False)(key)


@functools.lru_cache(maxsize=8)
def _compiled(config: Config, num_steps: int, vmapped: bool):
    # One jitted function per setting, so repeated calls reuse the compilation.
    train = make_train(config, num_steps)
    return jax.jit(jax.vmap(train) if vmapped else train)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    config = Config()
    keys = jax.random.split(jax.random.key(0), args.seeds)
    states, losses = train_many_seeds(keys, config, args.steps)
    final = np.asarray(losses[:, -1])
    weights = np.asarray(states.famo_state.task_weights)
    print(f"{args.seeds} seeds x {args.steps} steps in one program")
    print("final task losses, mean +- std over seeds:", _mean_std(final))
    print("final FAMO task weights, mean +- std over seeds:", _mean_std(weights))
    return states, losses


def _mean_std(values: np.ndarray) -> str:
    pairs = zip(values.mean(0), values.std(0), strict=True)
    return "  ".join(f"{m:.4f}+-{s:.4f}" for m, s in pairs)


if __name__ == "__main__":
    main()
