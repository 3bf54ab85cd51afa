"""famo_jax: balanced multitask optimization in JAX and optax.

Two families of methods, one subpackage each:

- :mod:`famo_jax.weighting`: loss weightings (O(1) in the number of tasks),
  which share the ``init() / weigh(losses, state) / update(prev_losses,
  curr_losses, state)`` protocol of :class:`LossWeighting`; FAMO is the
  headline member.
- :mod:`famo_jax.aggregation`: gradient aggregators (O(k)), optax
  transformations over per-task gradients stacked on a leading axis.

Their methods, states and helpers are re-exported here (the building blocks of
new methods, such as :func:`famo_jax.aggregation.gram_weighted`, stay in their
subpackage); :mod:`famo_jax.metrics` and :mod:`famo_jax.problems` hold the
evaluation metrics and the paper's toy problem.
"""

from famo_jax import aggregation as aggregation
from famo_jax import metrics as metrics
from famo_jax import problems as problems
from famo_jax import weighting as weighting
from famo_jax.aggregation import CRMOGMState as CRMOGMState
from famo_jax.aggregation import DBMTLState as DBMTLState
from famo_jax.aggregation import ExcessMTLState as ExcessMTLState
from famo_jax.aggregation import GradDropState as GradDropState
from famo_jax.aggregation import GradNormState as GradNormState
from famo_jax.aggregation import GradVacState as GradVacState
from famo_jax.aggregation import MoCoState as MoCoState
from famo_jax.aggregation import MoDoState as MoDoState
from famo_jax.aggregation import NashMTLState as NashMTLState
from famo_jax.aggregation import PCGradState as PCGradState
from famo_jax.aggregation import SDMGradState as SDMGradState
from famo_jax.aggregation import aligned_mtl as aligned_mtl
from famo_jax.aggregation import cagrad as cagrad
from famo_jax.aggregation import con_fig as con_fig
from famo_jax.aggregation import cr_mogm as cr_mogm
from famo_jax.aggregation import db_mtl as db_mtl
from famo_jax.aggregation import dualproj as dualproj
from famo_jax.aggregation import excess_mtl as excess_mtl
from famo_jax.aggregation import fairgrad as fairgrad
from famo_jax.aggregation import graddrop as graddrop
from famo_jax.aggregation import gradnorm as gradnorm
from famo_jax.aggregation import gradvac as gradvac
from famo_jax.aggregation import gramian_plan as gramian_plan
from famo_jax.aggregation import gramian_task_gradients as gramian_task_gradients
from famo_jax.aggregation import imtl_g as imtl_g
from famo_jax.aggregation import krum as krum
from famo_jax.aggregation import mgda as mgda
from famo_jax.aggregation import moco as moco
from famo_jax.aggregation import modo as modo
from famo_jax.aggregation import nash_mtl as nash_mtl
from famo_jax.aggregation import pcgrad as pcgrad
from famo_jax.aggregation import sdmgrad as sdmgrad
from famo_jax.aggregation import shared_trunk as shared_trunk
from famo_jax.aggregation import task_gradients as task_gradients
from famo_jax.aggregation import trimmed_mean as trimmed_mean
from famo_jax.aggregation import upgrad as upgrad
from famo_jax.weighting import DWAState as DWAState
from famo_jax.weighting import FAMOState as FAMOState
from famo_jax.weighting import GO4AlignState as GO4AlignState
from famo_jax.weighting import IMTLLState as IMTLLState
from famo_jax.weighting import LossWeighting as LossWeighting
from famo_jax.weighting import RLWState as RLWState
from famo_jax.weighting import STCHState as STCHState
from famo_jax.weighting import UncertaintyWeightingState as UncertaintyWeightingState
from famo_jax.weighting import WeightingTransformState as WeightingTransformState
from famo_jax.weighting import as_optax as as_optax
from famo_jax.weighting import check_famo_losses as check_famo_losses
from famo_jax.weighting import dwa as dwa
from famo_jax.weighting import famo as famo
from famo_jax.weighting import gls as gls
from famo_jax.weighting import go4align as go4align
from famo_jax.weighting import imtl_l as imtl_l
from famo_jax.weighting import linear_scalarization as linear_scalarization
from famo_jax.weighting import linearize_weigh as linearize_weigh
from famo_jax.weighting import loss_weights as loss_weights
from famo_jax.weighting import pbi as pbi
from famo_jax.weighting import random_loss_weighting as random_loss_weighting
from famo_jax.weighting import scale_invariant as scale_invariant
from famo_jax.weighting import stch as stch
from famo_jax.weighting import uncertainty_weighting as uncertainty_weighting
from famo_jax.weighting import weighting_state as weighting_state

# The names of the states before 0.2, kept so that existing code keeps working.
FamoState = FAMOState
DwaState = DWAState
RlwState = RLWState
UncertaintyState = UncertaintyWeightingState

__version__ = "0.2.0.dev0"

__all__ = [
    "CRMOGMState",
    "DBMTLState",
    "DWAState",
    "DwaState",
    "ExcessMTLState",
    "FAMOState",
    "FamoState",
    "GO4AlignState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "IMTLLState",
    "LossWeighting",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "PCGradState",
    "RLWState",
    "RlwState",
    "SDMGradState",
    "STCHState",
    "UncertaintyState",
    "UncertaintyWeightingState",
    "WeightingTransformState",
    "aggregation",
    "aligned_mtl",
    "as_optax",
    "cagrad",
    "check_famo_losses",
    "con_fig",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "gls",
    "go4align",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gramian_plan",
    "gramian_task_gradients",
    "imtl_g",
    "imtl_l",
    "krum",
    "linear_scalarization",
    "linearize_weigh",
    "loss_weights",
    "metrics",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pbi",
    "pcgrad",
    "problems",
    "random_loss_weighting",
    "scale_invariant",
    "sdmgrad",
    "shared_trunk",
    "stch",
    "task_gradients",
    "trimmed_mean",
    "uncertainty_weighting",
    "upgrad",
    "weighting",
    "weighting_state",
]
