"""Shared machinery of the multitask benchmarks (MultiDigits, synthetic loss scales).

A benchmark is a :class:`Benchmark`: fixed train/validation/test arrays and a
task kind (10-way classification, binary classification or regression). Every
method trains the same small shared-trunk Flax model (an MLP trunk and one
linear head per task) with Adam, for the same number of epochs and the same
mini-batches, and several seeds run as one program (``jax.vmap`` over seeds of
a jitted ``lax.scan`` over epochs of a ``lax.scan`` over steps).

Methods (:func:`method_registry`):

- ``STL``: one model per task (``jax.vmap`` over the tasks too).
- Loss weightings (``LS``, ``SI``, ``RLW``, ``DWA``, ``UW``, ``GLS``, ``STCH``,
  ``IMTL-L``, ``PBI``, ``GO4Align``, ``FAMO``): the model takes the gradient of
  ``weighting.weigh(losses, state)``; the state is advanced by
  ``weighting.update(prev, curr, state)`` after the model step.
  ``FAMO`` uses the authors' *same-batch* update (the batch's losses re-computed
  after the step: one extra forward pass); ``FAMO-lagged`` calls
  ``update(losses[t-1], losses[t])`` with the losses it computed anyway.
- Gradient aggregators (``MGDA``, ``PCGrad``, ``CAGrad``, ``IMTL-G``,
  ``Nash-MTL``): the aggregator combines the per-task gradients of the shared
  trunk; each task head receives its own task's gradient. The trunk's task
  gradients come from the Gramian engine (``famo_jax.gramian_task_gradients``:
  the Gram matrix from the layers' inputs and per-task output cotangents, no
  stacked gradients; ``TrainConfig.task_gradients="engine"``, the default) or
  from ``famo_jax.task_gradients`` (``jax.jacrev``, ``"jacrev"``); both give
  the same update up to rounding. The rows that need the stacked gradients
  (``Method.gram_based=False``: DB-MTL, ExcessMTL, GradNorm, MoCo) always use
  ``jax.jacrev``.
            )

After every epoch the model is evaluated on the validation and test sets. The
reported test metrics are those of the epoch with the lowest mean validation
*log* loss (a scale-free model-selection rule, the same for every method; for
STL each task's model is selected on its own validation loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from famo_jax.metrics import delta_m, mean_rank

KINDS = ("multiclass", "binary", "regression")
# Compiles several times faster and runs about 3x slower: for --quick runs.
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


class Benchmark(NamedTuple):
    """A multitask data set with a fixed train/validation/test split.

    Attributes:
      name: short name used in tables and file names.
      task_names: one name per task (``k`` names).
      kind: ``"multiclass"`` (integer labels in ``[0, num_classes)``),
        ``"binary"`` (labels in {0, 1}) or ``"regression"`` (float targets).
      num_classes: classes per task for ``"multiclass"``, else 1 (one output).
      x_train, x_val, x_test: ``(n, d)`` float32 inputs.
      y_train, y_val, y_test: ``(n, k)`` int32 labels or float32 targets.
      description: one paragraph on how the data were made.
    """

    name: str
    task_names: tuple[str, ...]
    kind: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def metric_name(self) -> str:
        return "MAE" if self.kind == "regression" else "accuracy (%)"

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "regression"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model and training settings shared by every method of one benchmark run."""

    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    # "cosine": the learning rate decays from learning_rate to 0 over training
    # (optax.cosine_decay_schedule); "constant": no decay.
    schedule: str = "cosine"
    num_seeds: int = 3
    seed: int = 0
    zero_init_heads: bool = False
    # How the aggregator rows get the trunk's task gradients: "engine"
    # (famo_jax.gramian_task_gradients) or "jacrev" (famo_jax.task_gradients).
    task_gradients: str = "engine"
    # XLA options for compiling the training program (QUICK_COMPILE_OPTIONS
    # for --quick runs).
    compile_options: dict[str, Any] | None = None


# ----------------------------------------------------------------------------
# Model.


class TaskHeads(nn.Module):
    """``num_tasks`` independent linear heads, stored stacked on a leading axis."""

    num_tasks: int
    num_outputs: int
    zero_init: bool = False

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        # Head i owns kernel[i] and bias[i] only, so task i's loss has a zero
        # gradient with respect to every other head.
        init = (
            nn.initializers.zeros
            if self.zero_init
            else nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        )
        kernel = self.param("kernel", init, (self.num_tasks, features.shape[-1], self.num_outputs))
        bias = self.param("bias", nn.initializers.zeros, (self.num_tasks, self.num_outputs))
        return jnp.einsum("bf,kfo->kbo", features, kernel) + bias[:, None, :]


class Trunk(nn.Module):
    """The shared MLP trunk."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return x


class SharedTrunkNet(nn.Module):
    """A shared trunk and one head per task; outputs have shape ``(k, batch, out)``.

    The parameters are ``{"trunk": ..., "heads": ...}``, so the shared part is
    the ``"trunk"`` subtree.
    """

    hidden: tuple[int, ...]
    num_tasks: int
    num_outputs: int
    zero_init_heads: bool = False

    def setup(self):
        self.trunk = Trunk(self.hidden)
        self.heads = TaskHeads(self.num_tasks, self.num_outputs, self.zero_init_heads)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.heads(self.trunk(x))


# The shared part of SharedTrunkNet's parameters (an is_shared prefix tree).
SHARED = {"trunk": True, "heads": False}


def task_losses_and_metrics(kind: str, outputs: jax.Array, labels: jax.Array):
    """Per-task mean losses and metrics, both of shape ``(k,)``.

    Args:
      kind: one of :data:`KINDS`.
      outputs: ``(k, n, out)`` model outputs.
      labels: ``(n, k)`` labels or targets.

    Returns:
      ``(losses, metrics)``: cross-entropy / binary cross-entropy / squared
      error, and accuracy in % / accuracy in % / absolute error.
    """
    labels = labels.T
    if kind == "multiclass":
        losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
        metrics = 100.0 * (jnp.argmax(outputs, -1) == labels)
    elif kind == "binary":
        logits = outputs[..., 0]
        losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
        metrics = 100.0 * ((logits > 0) == (labels > 0))
    elif kind == "regression":
        error = outputs[..., 0] - labels
        losses = error**2
        metrics = jnp.abs(error)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return losses.mean(axis=1), metrics.mean(axis=1)


# ----------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of a benchmark table.

    Attributes:
      name: the row label.
      family: ``"stl"``, ``"weighting"`` (a :class:`famo_jax.LossWeighting`) or
        ``"aggregator"`` (an optax transformation of stacked task gradients).
      build: ``(num_tasks, key) -> LossWeighting | GradientTransformation`` (None
        for STL). It is called inside the traced training run with a key that
        differs between seeds, for methods that draw random numbers.
      update: for weightings, how ``update(prev, curr, state)`` is called after
        the model step on losses ``l_t``: ``"same_batch"`` passes ``(l_t, the
        batch's losses re-computed after the step)`` (one extra forward pass, the
        FAMO authors' protocol); ``"lagged"`` passes ``(l_{t-1}, l_t)`` (no extra
        forward pass; skipped at the first step); ``"step"`` passes ``(l_t,
        l_t)``, for methods whose ``update`` only reads ``prev`` (the losses the
        step was computed from: DWA, UW) or no losses at all (LS, SI, RLW).
      reseed: ``(state, key) -> state`` that makes a method's random state
        depend on the seed, for methods with a PRNG key in their state (so the
        vmapped seeds are independent runs); None for the others.
      min_tasks: the fewest tasks the method accepts (Krum with one Byzantine
        task needs 4, TrimmedMean 3): on a benchmark with fewer, its row is left
        out (and the run says so).
      takes_context: whether ``build`` takes a third argument, the run's
        :class:`RunContext` (for methods whose settings follow the training
        schedule: epochs counted in steps, the model's learning rate).
      note: how the row's settings depart from the method's defaults or from
        its authors' protocol; printed under the tables.
      gram_based: aggregators only: it takes the Gramian engine's implicit task
        gradients (``famo_jax.aggregation.ImplicitTaskGradients``); False for
        those that need the stacked gradients (their rows use ``jax.jacrev``
        whatever ``TrainConfig.task_gradients`` says).
    """

    name: str
    family: str
    build: Callable[..., Any] | None = None
    update: str = "step"
    reseed: Callable[[Any, jax.Array], Any] | None = None
    min_tasks: int = 1
    takes_context: bool = False
    note: str = ""
    gram_based: bool = True


class RunContext(NamedTuple):
    """What a :class:`Method` with ``takes_context`` is built with.

    Attributes:
      steps_per_epoch: model steps per epoch.
      learning_rate: the model's learning rate (a float or an optax schedule),
        for methods whose reference trains its own parameters with the model's
        optimizer (LibMTL's IMTL-L and GradNorm).
    """

    steps_per_epoch: int
    learning_rate: optax.ScalarOrSchedule


def _last_dense_layer(tree: Any) -> Any:
    """True for the leaves of the trunk's last ``Dense_i`` (GradNorm's last shared layer)."""
    path_of = lambda path: [getattr(entry, "key", None) for entry in path]
    paths = [path_of(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    dense = [int(n[len("Dense_") :]) for p in paths for n in p if str(n).startswith("Dense_")]
    last = f"Dense_{max(dense)}" if dense else None
    return jax.tree_util.tree_map_with_path(lambda p, _: last in path_of(p), tree)


def _go4align_groups(num_tasks: int) -> int:
    """About sqrt(k) groups, at least 2 (so that the grouping acts), at most k."""
    return min(num_tasks, max(2, round(math.sqrt(num_tasks))))


def _replace_key(state: Any, key: jax.Array) -> Any:
    """Puts a raw uint32 key derived from ``key`` into a state's ``key`` field."""
    return state._replace(key=jax.random.key_data(key).astype(state.key.dtype))


def method_registry(gamma: float = 0.001, famo_lr: float = 0.025) -> dict[str, Method]:
    """Every method of the comparison, keyed by row label (in table order).

    FAMO uses the authors' supervised-benchmark hyperparameters: logits
    learning rate ``famo_lr`` (0.025) and decay ``gamma`` (0.001). The other
    methods use their famo_jax defaults (CAGrad ``c=0.4``, DWA ``T=2`` over
    25-step windows, UW log-variance lr 0.025), except where a row's ``note``
    says otherwise.
    """
    fj = famo_jax
    famo_build = lambda k, key: fj.famo(k, learning_rate=famo_lr, gamma=gamma)
    single_batch = (
        "the single-batch fallback (the weights from this batch's Gram matrix; the "
        "authors draw two more batches for an unbiased cross-Gram)"
    )
    candidates = [
        Method("STL", "stl"),
        Method("LS", "weighting", lambda k, key: fj.linear_scalarization(k)),
        Method("SI", "weighting", lambda k, key: fj.scale_invariant(k)),
        Method(
            "RLW",
            "weighting",
            lambda k, key: fj.random_loss_weighting(k),
            reseed=_replace_key,
        ),
        Method("DWA", "weighting", lambda k, key: fj.dwa(k)),
        Method("UW", "weighting", lambda k, key: fj.uncertainty_weighting(k)),
        # Loss weightings of LibMTL, LibMOON and GO4Align (issue 14).
        Method("GLS", "weighting", lambda k, key: fj.gls(k)),
        Method(
            "GO4Align",
            "weighting",
            lambda k, key: fj.go4align(k, _go4align_groups(k)),
            note="num_groups = min(k, max(2, round(sqrt(k)))) (the authors give no default)",
        ),
        Method(
            "IMTL-L",
            "weighting",
            lambda k, key, ctx: fj.imtl_l(k, learning_rate=ctx.learning_rate),
            takes_context=True,
            note="log-scales trained at the model's learning rate (LibMTL trains them "
            "with the model's optimizer)",
        ),
        Method("PBI", "weighting", lambda k, key: fj.pbi(k)),
        Method(
            "STCH",
            "weighting",
            lambda k, key, ctx: fj.stch(
                k, warmup_steps=4 * ctx.steps_per_epoch, nadir_steps=ctx.steps_per_epoch
            ),
            takes_context=True,
            note="the reference's schedule: 4 warm-up epochs, then the nadir over 1 epoch",
        ),
        Method("MGDA", "aggregator", lambda k, key: fj.mgda()),
        # The task orders are drawn from a key that differs between seeds.
        Method("PCGrad", "aggregator", lambda k, key: fj.pcgrad(key=key)),
        Method("CAGrad", "aggregator", lambda k, key: fj.cagrad(c=0.4)),
        Method("IMTL-G", "aggregator", lambda k, key: fj.imtl_g()),
        Method("Nash-MTL", "aggregator", lambda k, key: fj.nash_mtl(k)),
        # Aggregators of LibMTL and TorchJD (issue 14).
        # DB-MTL, ExcessMTL, MoCo (O(k m) states) and GradNorm on one layer need the
        # stacked task gradients.
        Method("DB-MTL", "aggregator", lambda k, key: fj.db_mtl(k), gram_based=False),
        Method("ExcessMTL", "aggregator", lambda k, key: fj.excess_mtl(k), gram_based=False),
        Method(
            "GradNorm",
            "aggregator",
            lambda k, key, ctx: fj.gradnorm(
                k,
                learning_rate=ctx.learning_rate,
                last_shared_layer=_last_dense_layer,
                warmup_steps=ctx.steps_per_epoch,
            ),
            takes_context=True,
            gram_based=False,
            note="the paper's last shared layer (the trunk's last Dense), reference "
            "losses over the first epoch (LibMTL's), weights trained with Adam at the "
            "model's learning rate (LibMTL: the model's optimizer)",
        ),
        # As PCGrad's: the task orders are drawn from a key that differs between seeds.
        Method("GradVac", "aggregator", lambda k, key: fj.gradvac(k, key=key)),
        Method("MoCo", "aggregator", lambda k, key: fj.moco(k), gram_based=False),
        Method("MoDo", "aggregator", lambda k, key: fj.modo(k), note=single_batch),
        Method("SDMGrad", "aggregator", lambda k, key: fj.sdmgrad(k), note=single_batch),
        # TorchJD's aggregators and FairGrad (issue 14, breadth_a), defaults as in TorchJD.
        Method("UPGrad", "aggregator", lambda k, key: fj.upgrad()),
        Method("DualProj", "aggregator", lambda k, key: fj.dualproj()),
        Method("Aligned-MTL", "aggregator", lambda k, key: fj.aligned_mtl()),
        Method("ConFIG", "aggregator", lambda k, key: fj.con_fig()),
        Method("FairGrad", "aggregator", lambda k, key: fj.fairgrad(alpha=1.0)),
        Method("Krum", "aggregator", lambda k, key: fj.krum(n_byzantine=1), min_tasks=4),
        Method(
            "TrimmedMean",
            "aggregator",
            lambda k, key: fj.trimmed_mean(1),
            min_tasks=3,
            gram_based=False,
        ),
        Method(
            "CR-MOGM (UPGrad)",
            "aggregator",
            lambda k, key: fj.cr_mogm(k, fj.aggregation.upgrad_weights),
        ),
        Method("FAMO", "weighting", famo_build, "same_batch"),
        Method("FAMO-lagged", "weighting", famo_build, "lagged"),
        # robust_famo with its defaults (nothing to tune: see docs/which_famo.md).
        Method("FAMO-robust", "weighting", lambda k, key: fj.robust_famo(k), "same_batch"),
        Method("FAMO-robust-lagged", "weighting", lambda k, key: fj.robust_famo(k), "lagged"),
    ]
    return {m.name: m for m in candidates}


def famo_gamma_variants(gamma: float, famo_lr: float = 0.025) -> dict[str, Method]:
    """FAMO same-batch and lagged with a given ``gamma`` (the ablation rows)."""
    build = lambda k, key: famo_jax.famo(k, learning_rate=famo_lr, gamma=gamma)
    same = f"FAMO (γ={gamma:g})"
    lagged = f"FAMO-lagged (γ={gamma:g})"
    return {
        same: Method(same, "weighting", build, "same_batch"),
        lagged: Method(lagged, "weighting", build, "lagged"),
    }


# ----------------------------------------------------------------------------
# Training.


class RunResult(NamedTuple):
    """Outputs of one method over all seeds (numpy arrays, seeds first)."""

    val_losses: np.ndarray  # (seeds, epochs, k) validation losses after each epoch
    val_metrics: np.ndarray  # (seeds, epochs, k)
    test_metrics: np.ndarray  # (seeds, epochs, k)
    train_losses: np.ndarray  # (seeds, k) full training-set losses after the last epoch
    task_weights: np.ndarray | None  # (seeds, epochs, k) softmax(logits) if the state has logits
    selected_epoch: np.ndarray  # (seeds, k) epoch selected on validation, per task
    seconds: float  # wall time of the compiled run, all seeds (compile excluded)
    compile_seconds: float


def _fixed_weighting(weights: jax.Array) -> famo_jax.LossWeighting:
    """``dot(weights, losses)``: STL trains task i with the one-hot weights e_i."""
    return famo_jax.LossWeighting(
        init=lambda: (),
        weigh=lambda losses, state: jnp.dot(weights, losses),
        update=lambda prev_losses, curr_losses, state: state,
    )


def _select_tree(flag: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _model_learning_rate(cfg: TrainConfig, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """The configured (cosine or constant) learning rate."""
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return cfg.learning_rate
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}.")


def _model_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with the configured learning rate."""
    return optax.adam(_model_learning_rate(cfg, steps_per_epoch))


def weighting_step(weighting, update: str, task_losses, model_opt, x_train, y_train):
    """``step(carry, batch)`` of a loss weighting (or of STL's fixed one-hot weights).

    ``carry`` is ``(params, opt_state, state, prev_losses, has_prev)``; see
    :class:`Method` for the three ways ``update`` is called.
    """

    def step(carry, batch):
        params, opt_state, state, prev_losses, has_prev = carry
        x, y = x_train[batch], y_train[batch]

        def objective(p):
            losses = task_losses(p, x, y)
            return weighting.weigh(losses, state), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = model_opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if update == "same_batch":
            # The FAMO authors' protocol: one extra forward pass, no gradient.
            state = weighting.update(losses, task_losses(new_params, x, y), state)
        elif update == "lagged":
            # No extra forward pass; the first step has no predecessor.
            state = _select_tree(has_prev, weighting.update(prev_losses, losses, state), state)
        else:
            state = weighting.update(losses, losses, state)
        return (new_params, opt_state, state, losses, jnp.array(True)), None

    return step


TASK_GRADIENTS = ("engine", "jacrev")


def aggregator_step(transform, task_losses, model_opt, x_train, y_train, task_gradients):
    """``step(carry, batch)`` of an aggregator over the trunk's per-task gradients.

    ``task_gradients="engine"``: ``transform`` takes the Gramian engine's
    implicit task gradients, whose non-shared leaves (the heads) already hold
    the mean gradient; ``"jacrev"``: the stacked ``jax.jacrev`` gradients of
    every leaf (``transform`` wraps the aggregator in ``shared_trunk``).
    """
    if task_gradients == "engine":
        value_and_task_grads = famo_jax.gramian_task_gradients(task_losses, is_shared=SHARED)
    else:
        value_and_task_grads = famo_jax.task_gradients(task_losses)

    def step(carry, batch):
        params, opt_state, state, prev_losses, has_prev = carry
        x, y = x_train[batch], y_train[batch]
        losses, task_grads = value_and_task_grads(params, x, y)
        grads, state = transform.update(task_grads, state, params, losses=losses)
        updates, opt_state = model_opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return (new_params, opt_state, state, losses, jnp.array(True)), None

    return step


def _make_run(bench: Benchmark, method: Method, cfg: TrainConfig):
    """Returns ``run(key, stl_weights) -> outputs`` for one seed (and one STL task)."""
    if cfg.task_gradients not in TASK_GRADIENTS:
        raise ValueError(
            f"task_gradients must be one of {TASK_GRADIENTS}, got {cfg.task_gradients!r}."
        )
    k = bench.num_tasks
    model = SharedTrunkNet(cfg.hidden, k, bench.num_classes, cfg.zero_init_heads)
    x_train, y_train = jnp.asarray(bench.x_train), jnp.asarray(bench.y_train)
    x_val, y_val = jnp.asarray(bench.x_val), jnp.asarray(bench.y_val)
    x_test, y_test = jnp.asarray(bench.x_test), jnp.asarray(bench.y_test)
    num_train = x_train.shape[0]
    steps_per_epoch = num_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {num_train} training examples.")
    model_opt = _model_optimizer(cfg, steps_per_epoch)
    context = RunContext(steps_per_epoch, _model_learning_rate(cfg, steps_per_epoch))

    def build(k_method):
        if method.takes_context:
            return method.build(k, k_method, context)
        return method.build(k, k_method)

    def evaluate(params, x, y):
        return task_losses_and_metrics(bench.kind, model.apply({"params": params}, x), y)

    def task_losses(params, x, y):
        return evaluate(params, x, y)[0]

    def method_step_and_state(params, k_method, stl_weights):
        if method.family == "aggregator":
            # Trunk: the aggregate of the k task gradients, times k (the authors'
            # sum convention); heads: the mean of the task gradients times k, which
            # is each head's own task's gradient. The engine applies the trunk mask
            # itself; the stacked gradients go through shared_trunk.
            gradients = (
                "engine" if cfg.task_gradients == "engine" and method.gram_based else "jacrev"
            )
            aggregator = build(k_method)
            if gradients == "jacrev":
                aggregator = famo_jax.shared_trunk(aggregator, SHARED)
            transform = optax.chain(aggregator, optax.scale(float(k)))
            step = aggregator_step(transform, task_losses, model_opt, x_train, y_train, gradients)
            return step, transform.init(params)
        if method.family == "stl":
            weighting = _fixed_weighting(stl_weights)
        else:
            weighting = build(k_method)
        step = weighting_step(weighting, method.update, task_losses, model_opt, x_train, y_train)
        return step, weighting.init()

    def run(key: jax.Array, stl_weights: jax.Array):
        k_init, k_data, k_method = jax.random.split(key, 3)
        params = model.init(k_init, x_train[:1])["params"]
        step, method_state = method_step_and_state(params, k_method, stl_weights)
        if method.reseed is not None:
            method_state = method.reseed(method_state, k_method)

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, num_train)
            batches = order[: steps_per_epoch * cfg.batch_size].reshape(
                steps_per_epoch, cfg.batch_size
            )
            carry, _ = jax.lax.scan(step, carry, batches)
            params, state = carry[0], carry[2]
            val_losses, val_metrics = evaluate(params, x_val, y_val)
            _, test_metrics = evaluate(params, x_test, y_test)
            logits = getattr(state, "logits", None)
            weights = jnp.zeros(k) if logits is None else jax.nn.softmax(logits)
            return carry, (val_losses, val_metrics, test_metrics, weights)

        carry = (
            params,
            model_opt.init(params),
            method_state,
            jnp.zeros(k, jnp.float32),
            jnp.array(False),
        )
        carry, history = jax.lax.scan(epoch, carry, jax.random.split(k_data, cfg.epochs))
        train_losses = task_losses(carry[0], x_train, y_train)
        return history, train_losses

    return run


def train_method(bench: Benchmark, method: Method, cfg: TrainConfig) -> RunResult:
    """Trains ``method`` on ``bench`` for ``cfg.num_seeds`` seeds in one jitted program.

    The program is compiled ahead of time, so ``seconds`` measures training
    only. Seeds differ in initialisation and mini-batch order; seed ``s`` gets
    the same initialisation and batches under every method.
    """
    k = bench.num_tasks
    run = _make_run(bench, method, cfg)
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds)
    if method.family == "stl":
        # One model per task: vmap over the one-hot task weights, then keep
        # task i's metrics from model i.
        per_seed = lambda key: jax.vmap(run, in_axes=(None, 0))(key, jnp.eye(k))
    else:
        per_seed = lambda key: run(key, jnp.zeros(k))
    program = jax.jit(jax.vmap(per_seed))
    start = time.perf_counter()
    compiled = program.lower(keys).compile(cfg.compile_options)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(keys))
    seconds = time.perf_counter() - start
    (val_losses, val_metrics, test_metrics, weights), train_losses = jax.tree.map(
        np.asarray, outputs
    )
    if method.family == "stl":
        # (seeds, model, epochs, k) -> (seeds, epochs, k): model i's task i.
        diag = lambda a: np.diagonal(a, axis1=1, axis2=3)
        val_losses, val_metrics, test_metrics = map(diag, (val_losses, val_metrics, test_metrics))
        train_losses = np.diagonal(train_losses, axis1=1, axis2=2)
        weights = None
        # Each task's model is selected on its own validation loss.
        selected = np.argmin(val_losses, axis=1)
    else:
        if not np.any(weights):
            weights = None
        # One epoch per run: the lowest mean validation log loss.
        score = np.mean(np.log(np.maximum(val_losses, 1e-30)), axis=-1)
        selected = np.repeat(np.argmin(score, axis=1)[:, None], k, axis=1)
    return RunResult(
        val_losses=val_losses,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        train_losses=train_losses,
        task_weights=weights,
        selected_epoch=selected,
        seconds=seconds,
        compile_seconds=compile_seconds,
    )


def selected_test_metrics(result: RunResult) -> np.ndarray:
    """``(seeds, k)`` test metrics at each run's selected epoch."""
    seeds = np.arange(result.test_metrics.shape[0])[:, None]
    tasks = np.arange(result.test_metrics.shape[2])[None, :]
    return result.test_metrics[seeds, result.selected_epoch, tasks]


# ----------------------------------------------------------------------------
# Metrics and reporting.


@dataclasses.dataclass
class Summary:
    """Per-method numbers of one benchmark, ready for the tables."""

    bench: Benchmark
    cfg: TrainConfig
    results: dict[str, RunResult]
    gamma: float
    famo_lr: float

    def test_metrics(self, name: str) -> np.ndarray:
        return selected_test_metrics(self.results[name])

    @property
    def baseline(self) -> np.ndarray:
        return self.test_metrics("STL").mean(axis=0)

    def delta_m_per_seed(self, name: str) -> np.ndarray:
        per_seed = self.test_metrics(name)
        hib = np.full(self.bench.num_tasks, self.bench.higher_is_better)
        return np.asarray(delta_m(per_seed, self.baseline, hib))


def _fmt(value: float, kind: str) -> str:
    if kind == "regression":
        if value == 0 or not math.isfinite(value):
            return f"{value:.3g}"
        digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
        return f"{value:.{digits}f}"
    return f"{value:.2f}"


def _stderr(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


def main_table(summary: Summary, rows: Sequence[str]) -> str:
    """Markdown: per-task test metric (mean over seeds), MR, delta_m% ± s.e., time."""
    bench = summary.bench
    hib = np.full(bench.num_tasks, bench.higher_is_better)
    ranked = [name for name in rows if name != "STL"]
    means = np.stack([summary.test_metrics(name).mean(axis=0) for name in ranked])
    ranks = dict(zip(ranked, np.asarray(mean_rank(means, hib)), strict=True))
    ls_seconds = summary.results["LS"].seconds if "LS" in summary.results else None
    arrow = "↑" if bench.higher_is_better else "↓"
    header = (
        ["Method"]
        + [f"{t} {arrow}" for t in bench.task_names]
        + ["MR ↓", "Δm% ↓ (± s.e.)", "train s (× LS)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in rows:
        result = summary.results[name]
        metric = summary.test_metrics(name).mean(axis=0)
        cells = [name] + [_fmt(v, bench.kind) for v in metric]
        if name == "STL":
            cells += ["", ""]
        else:
            dm = summary.delta_m_per_seed(name)
            cells += [f"{ranks[name]:.2f}", f"{dm.mean():+.2f} ± {_stderr(dm):.2f}"]
        time_cell = f"{result.seconds:.1f}"
        if ls_seconds:
            time_cell += f" ({result.seconds / ls_seconds:.2f}×)"
        cells.append(time_cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def famo_table(summary: Summary, rows: Sequence[str]) -> str:
    """Markdown: FAMO variants: delta_m, final training losses, spread of the task weights.

    ``train loss / same-batch`` is the geometric mean over tasks (and the mean
    over seeds) of the final full-training-set loss of a row divided by that of
    ``FAMO`` (same-batch, default gamma) of the same seed.
    """
    reference = summary.results["FAMO"].train_losses
    header = [
        "Variant",
        "update",
        "γ",
        "Δm% ↓ (± s.e.)",
        "train loss / FAMO same-batch (geo. mean over tasks)",
        "worst task ratio",
        "max z / min z (last epoch)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in rows:
        result = summary.results[name]
        dm = summary.delta_m_per_seed(name)
        ratio = result.train_losses / reference
        geo = float(np.exp(np.mean(np.log(ratio))))
        worst = float(np.max(np.exp(np.mean(np.log(ratio), axis=0))))
        if result.task_weights is not None:
            z = result.task_weights[:, -1, :]
            spread = float(np.mean(z.max(axis=-1) / z.min(axis=-1)))
            spread_cell = f"{spread:.2f}"
        else:
            spread_cell = ""
        mode, gamma = _famo_mode_and_gamma(name, summary.gamma)
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    mode,
                    gamma,
                    f"{dm.mean():+.2f} ± {_stderr(dm):.2f}",
                    f"{geo:.3f}",
                    f"{worst:.3f}",
                    spread_cell,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _famo_mode_and_gamma(name: str, default_gamma: float) -> tuple[str, str]:
    mode = "lagged" if "lagged" in name else "same-batch"
    if "robust" in name:  # robust_famo has no coupled decay gamma
        return mode, "—"
    if "γ=" in name:
        return mode, f"{float(name.split('γ=')[1].rstrip(')')):g}"
    return mode, f"{default_gamma:g}"


def train_loss_table(summary: Summary) -> str:
    """Markdown: final training loss per task, FAMO same-batch vs lagged (and LS)."""
    bench = summary.bench
    rows = [name for name in ("LS", "FAMO", "FAMO-lagged") if name in summary.results]
    header = ["Method"] + list(bench.task_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in rows:
        losses = summary.results[name].train_losses.mean(axis=0)
        lines.append("| " + " | ".join([name] + [f"{v:.3g}" for v in losses]) + " |")
    if "FAMO" in summary.results and "FAMO-lagged" in summary.results:
        ratio = summary.results["FAMO-lagged"].train_losses / summary.results["FAMO"].train_losses
        geo = np.exp(np.mean(np.log(ratio), axis=0))
        lines.append("| " + " | ".join(["lagged / same-batch"] + [f"{v:.2f}" for v in geo]) + " |")
    return "\n".join(lines)


def _method_notes(summary: Summary) -> list[str]:
    """The ``note`` of every row that has one, as sentences."""
    registry = method_registry(summary.gamma, summary.famo_lr)
    notes = [
        f"{name}: {registry[name].note}."
        for name in summary.results
        if name in registry and registry[name].note
    ]
    return (["Row settings:", *notes]) if notes else []


def settings_text(summary: Summary, command: str) -> str:
    """A paragraph stating every setting that the numbers depend on."""
    cfg = summary.cfg
    bench = summary.bench
    parts = [
        f"Command: `{command}`.",
        f"Split: {len(bench.x_train)} train / {len(bench.x_val)} validation / "
        f"{len(bench.x_test)} test examples, {bench.num_tasks} tasks ({bench.kind}).",
        f"Model: MLP trunk {list(cfg.hidden)} (ReLU) + one linear head per task.",
        f"Adam lr {cfg.learning_rate:g} ({cfg.schedule} schedule), batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs, {cfg.num_seeds} seeds (tables: mean "
        "over seeds; s.e. = standard error over seeds); test metrics at the epoch "
        "with the lowest mean validation log loss.",
        f"FAMO: logits lr {summary.famo_lr:g}, **γ = {summary.gamma:g}** unless "
        "stated; FAMO = same-batch update (the authors'), FAMO-lagged = "
        "`update(losses[t-1], losses[t])`.",
        "Aggregators act on the shared trunk (sum convention: k × the aggregate); "
        "each head gets its own task's gradient; the trunk's task gradients from "
        + (
            "the Gramian engine (`gramian_task_gradients`) for the Gram-based rows, "
            "`jax.jacrev` for DB-MTL, ExcessMTL, GradNorm and MoCo."
            if cfg.task_gradients == "engine"
            else "`jax.jacrev` (`task_gradients`)."
        ),
        "Δm% against STL (lower is better); MR = mean rank among the rows other "
        "than STL (ties share the average rank).",
        *_method_notes(summary),
        "Training time: wall seconds of the jitted, seed-vmapped run (all "
        f"{cfg.num_seeds} seeds together; STL = all {bench.num_tasks} single-task "
        f"models), compile excluded; {platform.machine()}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores, jax "
        f"{jax.__version__}.",
    ]
    return " ".join(parts)


def run_benchmark(
    bench: Benchmark,
    cfg: TrainConfig,
    method_names: Sequence[str] | None = None,
    gamma: float = 0.001,
    famo_lr: float = 0.025,
    ablation_gammas: Sequence[float] = (0.0,),
    log: Callable[[str], None] = print,
) -> Summary:
    """Trains every requested method (plus the FAMO gamma ablation rows)."""
    registry = method_registry(gamma, famo_lr)
    if method_names is None:
        method_names = list(registry)
    missing = [name for name in method_names if name not in registry]
    if missing:
        raise ValueError(f"unknown methods {missing}; known: {list(registry)}.")
    methods = {name: registry[name] for name in method_names}
    if "STL" not in methods:
        raise ValueError("STL is required: it is the baseline of delta_m.")
    if "FAMO" in methods:
        for g in ablation_gammas:
            if g != gamma:
                methods.update(famo_gamma_variants(g, famo_lr))
    results = {}
    for name, method in methods.items():
        if len(bench.task_names) < method.min_tasks:
            log(f"  {bench.name:<16} {name:<24} left out: needs {method.min_tasks} tasks")
            continue
        result = train_method(bench, method, cfg)
        results[name] = result
        log(
            f"  {bench.name:<16} {name:<24} train {result.seconds:6.1f} s "
            f"(compile {result.compile_seconds:4.1f} s)"
        )
    return Summary(bench, cfg, results, gamma, famo_lr)


def report(summary: Summary, command: str, title: str) -> str:
    """All tables of one benchmark as a markdown section."""
    names = list(summary.results)
    main_rows = [n for n in names if "γ=" not in n]
    famo_rows = [n for n in names if n.startswith("FAMO")]
    parts = [
        f"### {title}",
        "",
        summary.bench.description,
        "",
        settings_text(summary, command),
        "",
        f"Test {summary.bench.metric_name} per task:",
        "",
        main_table(summary, main_rows),
    ]
    if "FAMO" in summary.results:
        parts += [
            "",
            "FAMO variants (same-batch vs lagged update, and γ):",
            "",
            famo_table(summary, famo_rows),
            "",
            "Final full-training-set loss per task (mean over seeds):",
            "",
            train_loss_table(summary),
        ]
    return "\n".join(parts)


class RunClock:
    """Wall and CPU time of a whole benchmark run, and the machine's load."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def summary(self) -> str:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return (
            f"Whole run (data, compilation and training of every row): {wall:.0f} s wall, "
            f"{cpu:.0f} s CPU (user + system, all threads) on {os.cpu_count()} cores; "
            f"load average {self.load:.1f} when it started (values well above the core "
            "count mean a shared machine, whose wall times are inflated)."
        )


def add_common_arguments(parser: argparse.ArgumentParser, docs_path: str) -> None:
    """The command-line flags both benchmark scripts share."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny data, model and training, no γ-ablation rows (seconds; for tests)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="rows (default: all)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="Adam's peak learning rate")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=0.001, help="FAMO's decay γ")
    parser.add_argument(
        "--ablation-gammas",
        type=float,
        nargs="*",
        default=None,
        help="extra FAMO rows with these γ (default: 0; none with --quick)",
    )
    parser.add_argument(
        "--gradients",
        choices=TASK_GRADIENTS,
        default="engine",
        help="how the aggregator rows get the trunk's task gradients: the Gramian engine "
        "(gramian_task_gradients, default) or jax.jacrev (task_gradients)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"directory for the markdown tables (default: write nothing; the committed "
        f"ones are {os.path.normpath(docs_path)})",
    )


def ablation_gammas(args: argparse.Namespace) -> tuple[float, ...]:
    if args.ablation_gammas is not None:
        return tuple(args.ablation_gammas)
    return () if args.quick else (0.0,)


def write_markdown(args: argparse.Namespace, docs_path: str, heading: str, text: str) -> None:
    """Writes ``text`` under ``heading`` into ``--out`` (nothing without it).

    The file is named like the committed one (``docs_path``); a run writes over
    committed files only when asked, with ``--out docs/benchmarks``.
    """
    if args.out is None:
        return
    os.makedirs(args.out, exist_ok=True)
    output = os.path.join(args.out, os.path.basename(docs_path))
    label = " (--quick: a smoke test, not results)" if args.quick else ""
    with open(output, "w") as f:
        f.write(f"## {heading}{label}\n\n{text}")
    print(f"wrote {os.path.normpath(output)}")
