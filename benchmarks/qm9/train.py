"""Training every method of :mod:`benchmarks._mtl_bench` on real QM9.

One call of :func:`train_method` trains one :class:`~benchmarks._mtl_bench.Method`
row for ``len(learning_rates) * num_seeds`` runs as one program: the runs are
``jax.vmap``-ed, an epoch is one jitted ``lax.scan`` over the mini-batch steps
(compiled once, ahead of time), and a Python loop over the epochs keeps the
state on the device and reports progress. Seed ``s`` has the same
initialisation and mini-batch order under every method and learning rate.

Per step, as in :mod:`benchmarks._mtl_bench`:

- ``STL``: 11 models per run (``vmap`` over one-hot task weights).
- loss weightings: the gradient of ``weighting.weigh(losses, state)``, then
  ``weighting.update`` (same-batch: the batch's losses recomputed after the
  step, the FAMO authors' protocol; lagged: the previous step's losses;
  ``"step"``: the step's own losses);
- gradient aggregators: per-task gradients of the shared trunk through the
  aggregator, times ``k`` (the authors' sum convention); each head gets its
  own task's gradient (``k`` x the mean). The task gradients come from the
  Gramian engine (``famo_jax.gramian_task_gradients`` with the trunk mask,
  which applies the mask itself) for the rows with ``Method.gram_based`` when
  ``Trainer(task_gradients="engine")`` (the default), else from
  ``famo_jax.task_gradients`` (``jax.jacrev``, the aggregator wrapped in
  ``famo_jax.shared_trunk``); both give the same update.

Training loss: per-task MSE of the standardised targets (the authors'
``--scale-y``). Model selection, online: after every epoch the validation MAE
(in the paper's units) is computed and a run keeps the parameters of its
epoch with the lowest ``sum_k w_k * MAE_val_k``. For multitask rows ``w_k =
1 / (k * B_k)`` with ``B`` the STL validation MAEs, i.e. the lowest
validation Δm% against STL (the authors' rule, with the validation instead of
their test baseline); for STL model ``i`` it is ``w = e_i``, its own task's
validation MAE (also the authors' rule). The test set is evaluated once, with
the selected parameters (and once with the last ones, for reference).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import famo_jax
from benchmarks._mtl_bench import Method, RunContext
from benchmarks.qm9.data import NUM_TARGETS, QM9Molecules
from benchmarks.qm9.model import MPNN, MoleculeArrays, make_graph_batch

# From benchmarks/_mtl_bench.py (copied, not imported: that module is being
# refactored and only Method and method_registry are its stable names).
# Compiles several times faster and runs about 3x slower: for --quick runs.
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def _fixed_weighting(weights: jax.Array) -> famo_jax.LossWeighting:
    """``dot(weights, losses)``: STL trains task i with the one-hot weights e_i."""
    return famo_jax.LossWeighting(
        init=lambda: (),
        weigh=lambda losses, state: jnp.dot(weights, losses),
        update=lambda prev_losses, curr_losses, state: state,
    )


def _select_tree(flag: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


TASK_GRADIENTS = ("engine", "jacrev")


# End of the copied lines.

# The MPNN's parameters: the shared trunk and the 11 linear heads.
SHARED = {"trunk": True, "heads": False}


@dataclasses.dataclass(frozen=True)
class QM9Config:
    """Data, model and training settings shared by every row of one run.

    Attributes:
      num_train, num_val, num_test: prefixes of the fixed split used.
      dim: width of the trunk (node states, GRU, Set2Set, dense layer).
      num_steps: message-passing rounds (the authors: 3).
      edge_hidden: hidden width of the edge network.
      edge_network: ``"factorised"`` or ``"full"`` (see :mod:`benchmarks.qm9.model`).
      epochs, batch_size: passes over the training prefix, molecules per step
        (the last incomplete batch of an epoch is dropped).
      learning_rate: Adam's learning rate for rows without a grid.
      schedule: ``"cosine"`` (decay to 0 over training) or ``"constant"``.
      num_seeds: runs per row (and per learning rate).
      seed: base PRNG seed.
      eval_batch: molecules per evaluation batch.
      compile_options: XLA options (``QUICK_COMPILE_OPTIONS`` for smoke tests).
    """

    num_train: int = 20_000
    num_val: int = 2_000
    num_test: int = 10_000
    dim: int = 32
    num_steps: int = 3
    edge_hidden: int = 32
    edge_network: str = "factorised"
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    num_seeds: int = 5
    seed: int = 0
    eval_batch: int = 500
    compile_options: dict[str, Any] | None = None

    def model(self) -> MPNN:
        return MPNN(NUM_TARGETS, self.dim, self.num_steps, self.edge_hidden, self.edge_network)


class QM9Splits(NamedTuple):
    """The device arrays of one run and the target statistics.

    Attributes:
      train, val, test: :class:`MoleculeArrays` with standardised targets.
      mean, std: ``(11,)`` float64 training-set mean and standard deviation of
        the targets in their units (``target = mean + std * standardised``).
      qm9_index: split name -> QM9 molecule numbers, for the record.
    """

    train: MoleculeArrays
    val: MoleculeArrays
    test: MoleculeArrays
    mean: np.ndarray
    std: np.ndarray
    qm9_index: dict[str, np.ndarray]


def make_splits(molecules: QM9Molecules, cfg: QM9Config) -> QM9Splits:
    """Prefixes of the fixed split, standardised with the training prefix's statistics."""
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    chosen = {}
    for name, size in sizes.items():
        available = molecules.split[name].shape[0]
        if not 1 <= size <= available:
            raise ValueError(f"num_{name} must be in [1, {available}], got {size}.")
        chosen[name] = molecules.split[name][:size]
    y_train = molecules.targets[chosen["train"]]
    mean, std = y_train.mean(axis=0), y_train.std(axis=0, ddof=1)

    def arrays(idx: np.ndarray) -> MoleculeArrays:
        standardised = (molecules.targets[idx] - mean) / std
        return MoleculeArrays(
            atom_type=jnp.asarray(molecules.atom_type[idx], jnp.int32),
            num_hydrogens=jnp.asarray(molecules.num_hydrogens[idx], jnp.int32),
            positions=jnp.asarray(molecules.positions[idx], jnp.float32),
            targets=jnp.asarray(standardised, jnp.float32),
        )

    return QM9Splits(
        train=arrays(chosen["train"]),
        val=arrays(chosen["val"]),
        test=arrays(chosen["test"]),
        mean=mean,
        std=std,
        qm9_index={name: molecules.index[idx] for name, idx in chosen.items()},
    )


class RowResult(NamedTuple):
    """One row over all its runs (``R = len(learning_rates) * num_seeds``, lr-major).

    For STL every array with a task axis holds model ``i``'s task ``i``.

    Attributes:
      learning_rates: ``(R,)`` the learning rate of each run.
      seeds: ``(R,)`` the seed index of each run.
      val_mae: ``(R, epochs, 11)`` validation MAE after each epoch (paper units).
      val_loss: ``(R, epochs, 11)`` validation MSE (standardised targets).
      train_loss: ``(R, epochs, 11)`` mean training loss over each epoch's steps.
      task_weights: ``(R, epochs, 11)`` ``softmax(logits)`` at the end of each
        epoch for states with logits (FAMO), else None.
      best_epoch: ``(R, 11)`` selected epoch (0-based; one per task for STL,
        the same for every task otherwise).
      val_mae_best, test_mae_best: ``(R, 11)`` at the selected epoch.
      test_mae_last: ``(R, 11)`` after the last epoch.
      epoch_seconds: ``(epochs,)`` wall time of each epoch (all runs together,
        validation included).
      compile_seconds: ahead-of-time compilation of the epoch program.
      other_seconds: initialisation and the final evaluations (their
        compilation included).
      task_gradients: aggregators only: ``"engine"`` or ``"jacrev"``, how the
        per-task gradients were computed (None for other rows, and for
        aggregator rows saved before the option existed, which used jacrev).
    """

    learning_rates: np.ndarray
    seeds: np.ndarray
    val_mae: np.ndarray
    val_loss: np.ndarray
    train_loss: np.ndarray
    task_weights: np.ndarray | None
    best_epoch: np.ndarray
    val_mae_best: np.ndarray
    test_mae_best: np.ndarray
    test_mae_last: np.ndarray
    epoch_seconds: np.ndarray
    compile_seconds: float
    other_seconds: float
    task_gradients: str | None = None

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch time, per learning rate (the runs of one lr are ``num_seeds`` seeds)."""
        num_lrs = len(np.unique(self.learning_rates))
        return float(np.median(self.epoch_seconds)) / num_lrs

    def for_lr(self, lr: float) -> RowResult:
        """The runs of one learning rate (``num_seeds`` of them)."""
        keep = np.isclose(self.learning_rates, lr, rtol=1e-6, atol=0.0)
        if not np.any(keep):
            raise ValueError(
                f"no run with learning rate {lr}; have {np.unique(self.learning_rates)}"
            )
        pick = lambda a: None if a is None else a[keep]
        return self._replace(
            learning_rates=self.learning_rates[keep],
            seeds=self.seeds[keep],
            val_mae=self.val_mae[keep],
            val_loss=self.val_loss[keep],
            train_loss=self.train_loss[keep],
            task_weights=pick(self.task_weights),
            best_epoch=self.best_epoch[keep],
            val_mae_best=self.val_mae_best[keep],
            test_mae_best=self.test_mae_best[keep],
            test_mae_last=self.test_mae_last[keep],
        )


def _padded_batches(num: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(num_batches, batch)`` covering ``range(num)`` (0-padded) and their weights."""
    num_batches = -(-num // batch)
    idx = np.zeros(num_batches * batch, np.int32)
    idx[:num] = np.arange(num)
    weight = np.zeros(num_batches * batch, np.float32)
    weight[:num] = 1.0
    return idx.reshape(num_batches, batch), weight.reshape(num_batches, batch)


class Trainer:
    """The programs shared by every row of one run (model, evaluation) and :meth:`train`.

    Compiled once per run and reused by the rows: parameter initialisation
    and the evaluation of a split. Each row compiles its own epoch program.
    """

    def __init__(self, splits: QM9Splits, cfg: QM9Config, task_gradients: str = "engine"):
        if task_gradients not in TASK_GRADIENTS:
            raise ValueError(
                f"task_gradients must be one of {TASK_GRADIENTS}, got {task_gradients!r}."
            )
        self.task_gradients = task_gradients
        if cfg.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}.")
        self.splits = splits
        self.cfg = cfg
        self.model = cfg.model()
        self.num_train = int(splits.train.targets.shape[0])
        self.steps_per_epoch = self.num_train // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size={cfg.batch_size} exceeds the {self.num_train} training molecules."
            )
        self._std = jnp.asarray(splits.std, jnp.float32)
        # Data always enter the programs as arguments: as closure constants XLA
        # would constant-fold the graph construction (minutes of compilation).
        example = jnp.arange(min(cfg.batch_size, self.num_train))
        self._example_graph, _ = jax.jit(make_graph_batch)(splits.train, example)
        # One key / one model per call, looped over in Python: compiled once per
        # run, whatever the number of runs of a row (a vmapped init recompiled
        # for every distinct count, 10-20 s each on 2 shared cores).
        self._init_one = jax.jit(lambda key, graph: self.model.init(key, graph)["params"])
        self._evaluate_one = jax.jit(self.evaluate)

    def gradients_for(self, method: Method) -> str | None:
        """How ``method``'s task gradients are computed: ``"engine"``, ``"jacrev"`` or None."""
        if method.family != "aggregator":
            return None
        if self.task_gradients == "engine" and getattr(method, "gram_based", True):
            return "engine"
        return "jacrev"

    def task_gradient_fn(self, method: Method) -> Callable:
        """``(params, molecules, indices) -> (losses, task gradients)`` for an aggregator row.

        The engine's implicit task gradients (trunk mask applied, heads the mean
        gradient) or ``jax.jacrev``'s stacked ones (see :meth:`gradients_for`).
        """
        if self.gradients_for(method) == "engine":
            return famo_jax.gramian_task_gradients(self.task_losses, is_shared=SHARED)
        return famo_jax.task_gradients(self.task_losses)

    # -- pure functions of one model ------------------------------------------

    def learning_rate_schedule(self, lr: jax.Array) -> optax.ScalarOrSchedule:
        """The run's learning rate ``lr`` (a traced scalar) under the configured schedule."""
        if self.cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(1.0, self.cfg.epochs * self.steps_per_epoch)
            return lambda count: lr * decay(count)
        return lr

    def optimizer(self, lr: jax.Array) -> optax.GradientTransformation:
        """Adam with the run's learning rate ``lr`` (a traced scalar) and the schedule."""
        return optax.adam(self.learning_rate_schedule(lr))

    def predict(self, params, molecules: MoleculeArrays, indices: jax.Array):
        """``(k, B)`` standardised predictions and ``(B, k)`` standardised targets."""
        graph, targets = make_graph_batch(molecules, indices)
        return self.model.apply({"params": params}, graph), targets

    def task_losses(self, params, molecules: MoleculeArrays, indices: jax.Array) -> jax.Array:
        """``(k,)`` per-task MSE of the standardised targets (the training loss)."""
        outputs, targets = self.predict(params, molecules, indices)
        return jnp.mean((outputs - targets.T) ** 2, axis=1)

    def evaluate(self, params, molecules: MoleculeArrays) -> tuple[jax.Array, jax.Array]:
        """``(k,)`` MSE (standardised) and ``(k,)`` MAE (paper units) over a whole split."""
        num = molecules.targets.shape[0]
        batches, weights = _padded_batches(num, min(self.cfg.eval_batch, num))

        def one(args):
            idx, w = args
            outputs, targets = self.predict(params, molecules, idx)
            error = outputs - targets.T  # (k, B)
            return jnp.sum(w * error**2, axis=1), jnp.sum(w * jnp.abs(error), axis=1)

        sq, ab = jax.lax.map(one, (jnp.asarray(batches), jnp.asarray(weights)))
        return sq.sum(0) / num, ab.sum(0) / num * self._std

    def _build(self, method: Method, key: jax.Array, stl_weights: jax.Array | None, lr=None):
        """``(aggregator transform, None)`` or ``(None, loss weighting)``."""
        k = NUM_TARGETS
        if getattr(method, "takes_context", False):
            # The run's schedule, for rows whose settings follow it (IMTL-L, STCH, GradNorm).
            context = RunContext(self.steps_per_epoch, self.learning_rate_schedule(lr))
            build = lambda: method.build(k, key, context)
        else:
            build = lambda: method.build(k, key)
        if method.family == "aggregator":
            # Trunk: the aggregate of the k task gradients, times k; heads: the
            # mean task gradient times k, each head's own task's gradient. The
            # engine applies the trunk mask itself (head_reduction="mean", as
            # shared_trunk's default); the stacked jacrev gradients go through
            # shared_trunk.
            aggregator = build()
            if self.gradients_for(method) == "jacrev":
                aggregator = famo_jax.shared_trunk(aggregator, SHARED)
            transform = optax.chain(aggregator, optax.scale(float(k)))
            return transform, None
        if method.family == "stl":
            return None, _fixed_weighting(stl_weights)
        return None, build()

    def _init_state(self, method, params, run_key, lr, stl_weights):
        k_method = jax.random.split(run_key, 3)[2]
        transform, weighting = self._build(method, k_method, stl_weights, lr)
        state = transform.init(params) if transform is not None else weighting.init()
        if method.reseed is not None:
            state = method.reseed(state, k_method)
        return dict(
            params=params,
            opt_state=self.optimizer(lr).init(params),
            state=state,
            prev_losses=jnp.zeros(NUM_TARGETS, jnp.float32),
            has_prev=jnp.array(False),
            best_params=params,
            best_score=jnp.array(jnp.inf, jnp.float32),
            best_epoch=jnp.array(-1, jnp.int32),
            epoch=jnp.array(0, jnp.int32),
        )

    def _epoch(self, method, carry, data, run_key, epoch_key, lr, stl_weights, selection_weights):
        """One epoch of one run, then the validation MAE and the best-so-far update.

        ``data`` is ``(train, val)`` :class:`MoleculeArrays`.
        """
        k = NUM_TARGETS
        train, val = data
        # The method is rebuilt from the run's key exactly as in _init_state (its
        # randomness lives in its state); epoch_key orders the batches.
        transform, weighting = self._build(method, jax.random.split(run_key, 3)[2], stl_weights, lr)
        optimizer = self.optimizer(lr)
        task_losses = self.task_losses
        value_and_task_grads = self.task_gradient_fn(method)

        def weighting_step(c, batch):
            params, opt_state, state, prev_losses, has_prev = c

            def objective(p):
                losses = task_losses(p, train, batch)
                return weighting.weigh(losses, state), losses

            (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if method.update == "same_batch":
                # The FAMO authors' protocol: one extra forward pass, no gradient.
                state = weighting.update(losses, task_losses(new_params, train, batch), state)
            elif method.update == "lagged":
                # No extra forward pass; the first step has no predecessor.
                state = _select_tree(has_prev, weighting.update(prev_losses, losses, state), state)
            else:
                state = weighting.update(losses, losses, state)
            return (new_params, opt_state, state, losses, jnp.array(True)), losses

        def aggregator_step(c, batch):
            params, opt_state, state, prev_losses, has_prev = c
            losses, task_grads = value_and_task_grads(params, train, batch)
            grads, state = transform.update(task_grads, state, params, losses=losses)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            return (new_params, opt_state, state, losses, jnp.array(True)), losses

        step = aggregator_step if transform is not None else weighting_step
        size = self.steps_per_epoch * self.cfg.batch_size
        order = jax.random.permutation(epoch_key, self.num_train)
        batches = order[:size].reshape(self.steps_per_epoch, self.cfg.batch_size)
        names = ("params", "opt_state", "state", "prev_losses", "has_prev")
        inner, step_losses = jax.lax.scan(step, tuple(carry[n] for n in names), batches)
        new = dict(zip(names, inner, strict=True))
        val_loss, val_mae = self.evaluate(new["params"], val)
        score = jnp.dot(selection_weights, val_mae)
        better = score < carry["best_score"]
        new.update(
            best_params=_select_tree(better, new["params"], carry["best_params"]),
            best_score=jnp.where(better, score, carry["best_score"]),
            best_epoch=jnp.where(better, carry["epoch"], carry["best_epoch"]),
            epoch=carry["epoch"] + 1,
        )
        logits = getattr(new["state"], "logits", None)
        weights = jnp.zeros(k) if logits is None else jax.nn.softmax(logits)
        return new, (val_mae, val_loss, step_losses.mean(axis=0), weights)

    def _evaluate_runs(self, params, molecules: MoleculeArrays) -> np.ndarray:
        """``(runs, k)`` MAE of stacked parameters, one compiled program for any count."""
        num = jax.tree.leaves(params)[0].shape[0]
        runs = [jax.tree.map(lambda a, i=i: a[i], params) for i in range(num)]
        return np.stack([np.asarray(self._evaluate_one(p, molecules)[1]) for p in runs])

    # -- one row ----------------------------------------------------------------

    def train(
        self,
        method: Method,
        learning_rates: Sequence[float],
        selection_weights: np.ndarray | None = None,
        progress: Callable[[int, float, tuple], None] | None = None,
    ) -> RowResult:
        """Trains one row for every learning rate and seed (one vmapped program).

        Args:
          method: a row of ``benchmarks._mtl_bench.method_registry()`` (or built
            the same way).
          learning_rates: Adam learning rates; each gets ``cfg.num_seeds`` runs.
          selection_weights: ``(11,)`` weights of the validation MAEs in the
            selection score (``1 / (k * B_val)``, see the module docstring);
            ignored for STL; None means ``1 / (k * mean |target|)`` on the
            validation set, a scale-free stand-in when there is no STL baseline.
          progress: called after every epoch with ``(epoch, seconds, outputs)``.

        Returns:
          A :class:`RowResult`.
        """
        start_row = time.perf_counter()
        cfg, k = self.cfg, NUM_TARGETS
        stl = method.family == "stl"
        lrs = np.repeat(np.asarray(learning_rates, np.float32), cfg.num_seeds)
        seed_index = np.tile(np.arange(cfg.num_seeds), len(learning_rates))
        run_keys = jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds)[seed_index]
        if selection_weights is None:
            val = np.asarray(self.splits.val.targets) * self.splits.std + self.splits.mean
            selection_weights = 1.0 / (k * np.abs(val).mean(axis=0))
        sel = jnp.asarray(selection_weights, jnp.float32)
        lrs_device = jnp.asarray(lrs)
        num_runs = lrs.size
        # STL: model i of a run trains task i alone and is selected on it alone.
        models = k if stl else 1
        init_keys = jax.vmap(lambda key: jax.random.split(jax.random.split(key, 3)[0], models))(
            run_keys
        )  # (R, models)
        params = [self._init_one(key, self._example_graph) for key in init_keys.reshape(-1)]
        params = jax.tree.map(lambda *a: jnp.stack(a), *params)
        params = jax.tree.map(lambda a: a.reshape(num_runs, models, *a.shape[1:]), params)
        eye = jnp.eye(k)
        if stl:
            init_state = lambda p, key, lr: jax.vmap(
                lambda p1, w: self._init_state(method, p1, key, lr, w)
            )(p, eye)
            epoch = lambda c, data, key, ekey, lr: jax.vmap(
                lambda c1, w: self._epoch(method, c1, data, key, ekey, lr, w, w)
            )(c, eye)
        else:
            params = jax.tree.map(lambda a: a[:, 0], params)
            init_state = lambda p, key, lr: self._init_state(method, p, key, lr, None)
            epoch = lambda c, data, key, ekey, lr: self._epoch(
                method, c, data, key, ekey, lr, None, sel
            )
        # The carry is donated to each epoch: no two leaves may share a buffer
        # (best_params starts as params), hence the copies.
        carry = jax.jit(
            lambda *args: jax.tree.map(lambda a: a.copy(), jax.vmap(init_state)(*args))
        )(params, run_keys, lrs_device)
        jax.block_until_ready(carry)
        init_seconds = time.perf_counter() - start_row
        epoch_keys = jax.vmap(
            lambda key: jax.random.split(jax.random.split(key, 3)[1], cfg.epochs)
        )(run_keys)  # (R, epochs)
        program = jax.jit(jax.vmap(epoch, in_axes=(0, None, 0, 0, 0)), donate_argnums=0)
        data = (self.splits.train, self.splits.val)
        start = time.perf_counter()
        compiled = program.lower(carry, data, run_keys, epoch_keys[:, 0], lrs_device).compile(
            cfg.compile_options
        )
        compile_seconds = time.perf_counter() - start
        history, seconds = [], []
        for e in range(cfg.epochs):
            start = time.perf_counter()
            carry, outputs = compiled(carry, data, run_keys, epoch_keys[:, e], lrs_device)
            outputs = jax.block_until_ready(outputs)
            seconds.append(time.perf_counter() - start)
            history.append(jax.tree.map(np.asarray, outputs))
            if progress is not None:
                progress(e, seconds[-1], history[-1])
        start = time.perf_counter()
        flat = lambda tree: jax.tree.map(lambda a: a.reshape(num_runs * models, *a.shape[2:]), tree)
        unflat = lambda a: np.asarray(a).reshape(num_runs, models, *a.shape[1:])
        best, last = carry["best_params"], carry["params"]
        if not stl:
            best, last = (jax.tree.map(lambda a: a[:, None], t) for t in (best, last))
        val_best, test_best, test_last = (
            self._evaluate_runs(flat(p), split)
            for p, split in (
                (best, self.splits.val),
                (best, self.splits.test),
                (last, self.splits.test),
            )
        )
        val_best, test_best, test_last = map(unflat, (val_best, test_best, test_last))
        final_seconds = time.perf_counter() - start
        best_epoch = np.asarray(carry["best_epoch"]).reshape(num_runs, models)
        val_mae, val_loss, train_loss, weights = (
            # epochs after the run axis (and after the model axis for STL)
            np.stack([h[i] for h in history], axis=2 if stl else 1)
            for i in range(4)
        )
        if stl:
            # (R, models, epochs, k) -> (R, epochs, k) and (R, models, k) -> (R, k):
            # model i's task i.
            diag_epochs = lambda a: np.diagonal(a, axis1=1, axis2=3)
            val_mae, val_loss, train_loss = map(diag_epochs, (val_mae, val_loss, train_loss))
            diag = lambda a: np.diagonal(a, axis1=1, axis2=2)
            val_best, test_best, test_last = map(diag, (val_best, test_best, test_last))
            weights = None
        else:
            val_best, test_best, test_last = (a[:, 0] for a in (val_best, test_best, test_last))
            best_epoch = np.repeat(best_epoch, k, axis=1)
            if not np.any(weights):
                weights = None
        return RowResult(
            learning_rates=lrs,
            seeds=seed_index,
            val_mae=val_mae,
            val_loss=val_loss,
            train_loss=train_loss,
            task_weights=weights,
            best_epoch=best_epoch,
            val_mae_best=val_best,
            test_mae_best=test_best,
            test_mae_last=test_last,
            epoch_seconds=np.asarray(seconds),
            compile_seconds=compile_seconds,
            other_seconds=init_seconds + final_seconds,
            task_gradients=self.gradients_for(method),
        )
