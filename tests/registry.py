"""The one registry of methods under test: every loss weighting and every aggregator.

The shared conformance suite (``tests/test_conformance.py``) runs every entry
through the same checks; the checkpoint and data-parallel tests take their
methods from here too. A new method gets one :class:`Case` here (and its own
test file only for reference parity and behaviour specific to it).

A case says how to build the method for ``k`` tasks and which laws hold for
it; the suite derives everything else (jit without retracing, vmap, dtypes,
optax.chain, faults, checkpoints) from the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import famo_jax

WEIGHTING = "weighting"
AGGREGATOR = "aggregator"


@dataclasses.dataclass(frozen=True)
class Case:
    """One method under test.

    Attributes:
      name: the test id (the public factory's name, or the factory's name plus
        the variant).
      family: ``WEIGHTING`` (a ``famo_jax.LossWeighting``) or ``AGGREGATOR``
        (an optax transformation over stacked task gradients).
      build: ``num_tasks -> method``, the configuration under test.
      task_order_invariant: permuting the tasks permutes the weights (False for
        methods that draw random numbers per task, or depend on the order).
      equal_gradients_factor: aggregators only: the output for ``k`` equal task
        gradients ``v`` is ``factor * v`` (1: the mean scale convention); None
        when the method has no such law (a single task's output is then only
        compared in direction).
      gram_based: aggregators only: it accepts
        ``famo_jax.aggregation.ImplicitTaskGradients`` and gives the same update.
      needs_losses: aggregators only: ``update`` needs ``losses=`` (an extra
        argument, forwarded by ``optax.chain``).
      axis_name: weightings only: the factory takes ``axis_name`` for data
        parallelism (``build_with_axis_name`` builds it).
      build_with_axis_name: ``(num_tasks, axis_name) -> method``, for the
        data-parallel checks.
      log_losses: weightings only: it takes logs of the losses, so losses at or
        below zero (``min_losses``, default 0) are invalid, like non-finite ones.
      single_task_is_its_gradient: aggregators only: for ``k = 1`` the output is
        the task gradient (times ``equal_gradients_factor`` when set). False for
        methods whose output is on another scale by design (MoCo tracks
        loss-scaled unit gradients, DB-MTL averages log-loss gradients, FairGrad
        gives ``|g|^(-2 alpha / (1 + alpha)) g``): their
        single-task output is then checked to be a positive multiple of the
        gradient.
      build_for_laws: a variant used by the property tests (of weightings and of
        aggregators) where the default configuration would hide an exact law
        behind optimizer noise (FAMO with SGD on its logits, say); default
        ``build``.
      non_negative_weights: weightings only: the effective task weights are
        never negative. False for methods that may push a task's loss *up* by
        design (PBI's penalty pulls the losses onto a preference ray); their
        training check then asks that the method's own objective decreases,
        instead of every task's loss.
      min_tasks: aggregators only: the fewest tasks the method accepts (Krum
        needs ``n_byzantine + 3``, TrimmedMean ``2 trim_number + 1``); with
        fewer, ``update`` raises a ValueError at trace time.
    """

    name: str
    family: str
    build: Callable[[int], Any]
    task_order_invariant: bool = True
    equal_gradients_factor: float | None = 1.0
    gram_based: bool = True
    needs_losses: bool = False
    axis_name: bool = False
    build_with_axis_name: Callable[[int, Any], Any] | None = None
    log_losses: bool = False
    single_task_is_its_gradient: bool = True
    build_for_laws: Callable[[int], Any] | None = None
    non_negative_weights: bool = True
    min_tasks: int = 1

    def __str__(self) -> str:
        return self.name

    def make(self, num_tasks: int) -> Any:
        return self.build(num_tasks)

    def make_for_laws(self, num_tasks: int) -> Any:
        return (self.build_for_laws or self.build)(num_tasks)


# ---------------------------------------------------------------------------
# Loss weightings.

WEIGHTINGS: tuple[Case, ...] = (
    Case(
        "famo",
        WEIGHTING,
        lambda k: famo_jax.famo(k),
        axis_name=True,
        build_with_axis_name=lambda k, axis: famo_jax.famo(k, axis_name=axis),
        log_losses=True,
        # Plain SGD on the logits: the laws are exact in exact arithmetic, and
        # Adam would magnify rounding where the logits' gradient nearly cancels.
        build_for_laws=lambda k: famo_jax.famo(k, optimizer=optax.sgd(0.5)),
    ),
    Case("linear_scalarization", WEIGHTING, famo_jax.linear_scalarization),
    Case("scale_invariant", WEIGHTING, famo_jax.scale_invariant, log_losses=True),
    Case(
        "random_loss_weighting",
        WEIGHTING,
        lambda k: famo_jax.random_loss_weighting(k, seed=0),
        # Its weights are i.i.d. in law, not per realisation.
        task_order_invariant=False,
    ),
    # A short window so that the dynamic phase (after window + 1 steps) is exercised.
    Case("dwa", WEIGHTING, lambda k: famo_jax.dwa(k, window=2)),
    Case("uncertainty_weighting", WEIGHTING, famo_jax.uncertainty_weighting),
    # --- loss weightings of the peers (issue 14) ---
    Case("gls", WEIGHTING, famo_jax.gls, log_losses=True),
    # Short phases, so that the smooth Tchebycheff phase (after 3 valid updates) is
    # exercised by the suite's 4-step checks.
    Case(
        "stch",
        WEIGHTING,
        lambda k: famo_jax.stch(k, warmup_steps=1, nadir_steps=2),
        log_losses=True,
    ),
    Case("imtl_l", WEIGHTING, famo_jax.imtl_l),
    # A learning rate at which the scales move visibly within the suite's steps.
    Case("imtl_l_lr0.1", WEIGHTING, lambda k: famo_jax.imtl_l(k, learning_rate=0.1)),
    # PBI pulls the losses onto its preference ray: a task below it gets a negative
    # weight, and its loss may rise by design.
    Case("pbi", WEIGHTING, famo_jax.pbi, non_negative_weights=False),
    Case(
        "pbi_preference",
        WEIGHTING,
        lambda k: famo_jax.pbi(k, preference=range(1, k + 1), theta=5.0, ideal=0.01),
        non_negative_weights=False,
        # The preference is given per task, so permuting the tasks changes the problem.
        task_order_invariant=False,
    ),
    Case(
        "go4align",
        WEIGHTING,
        lambda k: famo_jax.go4align(k, num_groups=min(2, k)),
        log_losses=True,
    ),
    Case("go4align_one_group", WEIGHTING, lambda k: famo_jax.go4align(k, 1), log_losses=True),
)


# ---------------------------------------------------------------------------
# Gradient aggregators.

AGGREGATORS: tuple[Case, ...] = (
    # Equal task gradients v give (1 + c) / (1 + c^2) v with the authors' default
    # rescale=1 (documented; rescale=2 gives the mean).
    Case("cagrad", AGGREGATOR, lambda k: famo_jax.cagrad(), equal_gradients_factor=1.4 / 1.16),
    Case("cagrad_rescale2", AGGREGATOR, lambda k: famo_jax.cagrad(rescale=2)),
    Case("mgda", AGGREGATOR, lambda k: famo_jax.mgda()),
    Case("mgda_loss+", AGGREGATOR, lambda k: famo_jax.mgda("loss+"), needs_losses=True),
    # PCGrad projects in a random task order by design.
    Case("pcgrad", AGGREGATOR, lambda k: famo_jax.pcgrad(seed=0), task_order_invariant=False),
    Case("imtl_g", AGGREGATOR, lambda k: famo_jax.imtl_g()),
    # Nash-MTL in the authors' units has an update of fixed norm 1 / sqrt(k):
    # equal task gradients v give v / (sqrt(k) |v|), not a fixed multiple of v.
    Case(
        "nash_mtl",
        AGGREGATOR,
        lambda k: famo_jax.nash_mtl(num_tasks=k),
        equal_gradients_factor=None,
    ),
    Case(
        "nash_mtl_every3",
        AGGREGATOR,
        lambda k: famo_jax.nash_mtl(num_tasks=k, update_weights_every=3),
        equal_gradients_factor=None,
    ),
    Case(
        "nash_mtl_normalize_gram",
        AGGREGATOR,
        lambda k: famo_jax.nash_mtl(num_tasks=k, normalize_gram=True),
    ),
    # Not Gram-based: it needs every task gradient entry by entry.
    Case("graddrop", AGGREGATOR, lambda k: famo_jax.graddrop(seed=0), gram_based=False),
    # --- aggregators of the peers (issue 14) ---
    # GradVac visits the other tasks in a random order by design.
    Case("gradvac", AGGREGATOR, lambda k: famo_jax.gradvac(k), task_order_invariant=False),
    # One Gram matrix per leaf: needs the stacked gradients.
    Case(
        "gradvac_all_matrix",
        AGGREGATOR,
        lambda k: famo_jax.gradvac(k, granularity="all_matrix"),
        task_order_invariant=False,
        gram_based=False,
    ),
    # The corrections on the stacked gradients themselves (LibMTL's algorithm).
    Case(
        "gradvac_vectors",
        AGGREGATOR,
        lambda k: famo_jax.gradvac(k, algorithm="vectors"),
        task_order_invariant=False,
        gram_based=False,
    ),
    # The single-batch fallback (no weight_batches). LibMTL's inner step (5) is
    # beyond the heavy-ball's stability limit for unit-normalised Gram matrices,
    # so the inner iterates bounce between faces of the simplex and amplify the
    # rounding of a permuted sum (1e-7) to 2e-3 in the output; the laws are
    # checked with a step the inner iteration converges with.
    Case(
        "sdmgrad",
        AGGREGATOR,
        lambda k: famo_jax.sdmgrad(k),
        build_for_laws=lambda k: famo_jax.sdmgrad(k, learning_rate=0.5),
    ),
    Case("modo", AGGREGATOR, lambda k: famo_jax.modo(k)),
    Case("modo_gamma0.1", AGGREGATOR, lambda k: famo_jax.modo(k, gamma=0.1)),
    # O(k m) state (tracked gradients); the output is a convex combination of
    # loss-scaled unit gradients, not on the gradients' scale.
    Case(
        "moco",
        AGGREGATOR,
        lambda k: famo_jax.moco(k),
        equal_gradients_factor=None,
        gram_based=False,
        needs_losses=True,
        single_task_is_its_gradient=False,
    ),
    # O(k m) state (squared-gradient sums).
    Case("excess_mtl", AGGREGATOR, lambda k: famo_jax.excess_mtl(k), gram_based=False),
    Case(
        "excess_mtl_step1",
        AGGREGATOR,
        lambda k: famo_jax.excess_mtl(k, robust_step_size=1.0),
        gram_based=False,
    ),
    # O(k m) state (averaged log-loss gradients), on the log-loss gradients' scale.
    Case(
        "db_mtl",
        AGGREGATOR,
        lambda k: famo_jax.db_mtl(k),
        equal_gradients_factor=None,
        gram_based=False,
        needs_losses=True,
        single_task_is_its_gradient=False,
    ),
    # Norms over every aggregated leaf (LibMTL's choice): Gram-based.
    Case("gradnorm", AGGREGATOR, lambda k: famo_jax.gradnorm(k), needs_losses=True),
    # The paper's last shared layer (here the leaf named "w" or "trunk"), after a
    # one-step warm-up, with a larger step so that the weights move.
    Case(
        "gradnorm_last_layer",
        AGGREGATOR,
        lambda k: famo_jax.gradnorm(
            k,
            learning_rate=0.05,
            warmup_steps=1,
            last_shared_layer=lambda tree: jax.tree_util.tree_map_with_path(
                lambda path, _: path[-1].key in ("w", "trunk"), tree
            ),
        ),
        gram_based=False,
        needs_losses=True,
    ),
    # --- breadth_a: TorchJD's dual-cone, robust and FairGrad aggregators ---
    Case("upgrad", AGGREGATOR, lambda k: famo_jax.upgrad()),
    # The exact projection: no trace threshold, no ridge.
    Case("upgrad_exact", AGGREGATOR, lambda k: famo_jax.upgrad(norm_eps=0.0, reg_eps=0.0)),
    Case("dualproj", AGGREGATOR, lambda k: famo_jax.dualproj()),
    Case("aligned_mtl", AGGREGATOR, lambda k: famo_jax.aligned_mtl()),
    Case("aligned_mtl_median", AGGREGATOR, lambda k: famo_jax.aligned_mtl(scale_mode="median")),
    Case("con_fig", AGGREGATOR, lambda k: famo_jax.con_fig()),
    # With k - n_byzantine - 2 = 1 neighbour, mutual nearest neighbours tie and the
    # tie goes to the lower task index.
    Case(
        "krum",
        AGGREGATOR,
        lambda k: famo_jax.krum(n_byzantine=0),
        min_tasks=3,
        task_order_invariant=False,
    ),
    # Multi-Krum selects both members of the closest pair: no tie to break.
    Case(
        "multi_krum", AGGREGATOR, lambda k: famo_jax.krum(n_byzantine=0, n_selected=2), min_tasks=3
    ),
    # Not Gram-based: it sorts every entry.
    Case(
        "trimmed_mean",
        AGGREGATOR,
        lambda k: famo_jax.trimmed_mean(1),
        gram_based=False,
        min_tasks=3,
    ),
    # FairGrad's output is not homogeneous in the gradients: no equal-gradients law.
    Case(
        "fairgrad",
        AGGREGATOR,
        lambda k: famo_jax.fairgrad(alpha=1.0),
        equal_gradients_factor=None,
        single_task_is_its_gradient=False,
    ),
    Case(
        "fairgrad_alpha2",
        AGGREGATOR,
        lambda k: famo_jax.fairgrad(alpha=2.0),
        equal_gradients_factor=None,
        single_task_is_its_gradient=False,
    ),
    Case(
        "cr_mogm_upgrad",
        AGGREGATOR,
        lambda k: famo_jax.cr_mogm(k, famo_jax.aggregation.upgrad_weights),
    ),
    Case(
        "cr_mogm_mgda_alpha0.5",
        AGGREGATOR,
        lambda k: famo_jax.cr_mogm(k, famo_jax.aggregation.mgda_weights, alpha=0.5),
    ),
)

ALL: tuple[Case, ...] = WEIGHTINGS + AGGREGATORS
BY_NAME: dict[str, Case] = {case.name: case for case in ALL}
assert len(BY_NAME) == len(ALL), "duplicate case names"
