"""famo_jax: balanced multitask optimization in JAX and optax.

Loss weightings (O(1) in the number of tasks) share the
``init() / weigh(losses, state) / update(prev_losses, curr_losses, state)``
protocol of :class:`LossWeighting`; FAMO is the headline member. Gradient
aggregators (O(k)) are optax transformations over per-task gradients stacked on
a leading axis.
"""

from famo_jax import metrics, problems
from famo_jax._accumulation import linearize_weigh
from famo_jax._base import LossWeighting, loss_weights
from famo_jax._cagrad import cagrad
from famo_jax._dwa import DwaState, dwa
from famo_jax._famo import FamoState, check_famo_losses, famo
from famo_jax._graddrop import GradDropState, graddrop
from famo_jax._imtl import imtl_g
from famo_jax._mgda import mgda
from famo_jax._nash_mtl import NashMTLState, nash_mtl
from famo_jax._pcgrad import PCGradState, pcgrad
from famo_jax._rlw import RlwState, random_loss_weighting
from famo_jax._scalarization import linear_scalarization, scale_invariant
from famo_jax._task_gradients import shared_trunk, task_gradients
from famo_jax._uncertainty import UncertaintyState, uncertainty_weighting

__version__ = "0.1.0"

__all__ = [
    "DwaState",
    "FamoState",
    "GradDropState",
    "LossWeighting",
    "NashMTLState",
    "PCGradState",
    "RlwState",
    "UncertaintyState",
    "cagrad",
    "check_famo_losses",
    "dwa",
    "famo",
    "graddrop",
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
]
