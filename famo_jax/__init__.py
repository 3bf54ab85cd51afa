"""famo_jax: balanced multitask optimization in JAX and optax.

Two families of methods, one subpackage each:

- :mod:`famo_jax.weighting`: loss weightings (O(1) in the number of tasks),
  which share the ``init() / weigh(losses, state) / update(prev_losses,
  curr_losses, state)`` protocol of :class:`LossWeighting`; FAMO is the
  headline member.
- :mod:`famo_jax.aggregation`: gradient aggregators (O(k)), optax
  transformations over per-task gradients stacked on a leading axis.

Every public name of both is re-exported here; :mod:`famo_jax.metrics` and
:mod:`famo_jax.problems` hold the evaluation metrics and the paper's toy problem.
"""

from famo_jax import aggregation as aggregation
from famo_jax import metrics as metrics
from famo_jax import problems as problems
from famo_jax import weighting as weighting
from famo_jax.aggregation import GradDropState as GradDropState
from famo_jax.aggregation import NashMTLState as NashMTLState
from famo_jax.aggregation import PCGradState as PCGradState
from famo_jax.aggregation import cagrad as cagrad
from famo_jax.aggregation import graddrop as graddrop
from famo_jax.aggregation import gramian_plan as gramian_plan
from famo_jax.aggregation import gramian_task_gradients as gramian_task_gradients
from famo_jax.aggregation import imtl_g as imtl_g
from famo_jax.aggregation import mgda as mgda
from famo_jax.aggregation import nash_mtl as nash_mtl
from famo_jax.aggregation import pcgrad as pcgrad
from famo_jax.aggregation import shared_trunk as shared_trunk
from famo_jax.aggregation import task_gradients as task_gradients
from famo_jax.weighting import DWAState as DWAState
from famo_jax.weighting import FAMOState as FAMOState
from famo_jax.weighting import LossWeighting as LossWeighting
from famo_jax.weighting import RLWState as RLWState
from famo_jax.weighting import UncertaintyWeightingState as UncertaintyWeightingState
from famo_jax.weighting import check_famo_losses as check_famo_losses
from famo_jax.weighting import dwa as dwa
from famo_jax.weighting import famo as famo
from famo_jax.weighting import linear_scalarization as linear_scalarization
from famo_jax.weighting import linearize_weigh as linearize_weigh
from famo_jax.weighting import loss_weights as loss_weights
from famo_jax.weighting import random_loss_weighting as random_loss_weighting
from famo_jax.weighting import scale_invariant as scale_invariant
from famo_jax.weighting import uncertainty_weighting as uncertainty_weighting

# The names of the states before 0.2, kept so that existing code keeps working.
FamoState = FAMOState
DwaState = DWAState
RlwState = RLWState
UncertaintyState = UncertaintyWeightingState

__version__ = "0.2.0.dev0"

__all__ = [
    "DWAState",
    "DwaState",
    "FAMOState",
    "FamoState",
    "GradDropState",
    "LossWeighting",
    "NashMTLState",
    "PCGradState",
    "RLWState",
    "RlwState",
    "UncertaintyState",
    "UncertaintyWeightingState",
    "aggregation",
    "cagrad",
    "check_famo_losses",
    "dwa",
    "famo",
    "graddrop",
    "gramian_plan",
    "gramian_task_gradients",
    "imtl_g",
    "linear_scalarization",
    "linearize_weigh",
    "loss_weights",
    "metrics",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "problems",
    "random_loss_weighting",
    "scale_invariant",
    "shared_trunk",
    "task_gradients",
    "uncertainty_weighting",
    "weighting",
]
