r"""Gradient aggregators: O(k) methods that combine every task's gradient into one.

An aggregator is an optax transformation whose input is the per-task gradients
stacked on a leading axis of size ``k`` (from :func:`task_gradients`) and whose
output is one gradient. Most are :func:`gram_weighted`: a
:class:`GramWeighting` picks weights :math:`w` from the ``k x k`` Gram matrix
of the task gradients, and the output is :math:`\sum_i w_i g_i`. The weights
functions (``mgda_weights``, ``cagrad_weights``, ...) are public, pure and
jit-able.
"""

from famo_jax.aggregation._aligned_mtl import aligned_mtl as aligned_mtl
from famo_jax.aggregation._aligned_mtl import aligned_mtl_weights as aligned_mtl_weights
from famo_jax.aggregation._base import GramWeighting as GramWeighting
from famo_jax.aggregation._base import ImplicitTaskGradients as ImplicitTaskGradients
from famo_jax.aggregation._base import combine as combine
from famo_jax.aggregation._base import gram_matrix as gram_matrix
from famo_jax.aggregation._base import gram_weighted as gram_weighted
from famo_jax.aggregation._base import num_tasks_of as num_tasks_of
from famo_jax.aggregation._base import stateless as stateless
from famo_jax.aggregation._cagrad import cagrad as cagrad
from famo_jax.aggregation._cagrad import cagrad_weights as cagrad_weights
from famo_jax.aggregation._con_fig import con_fig as con_fig
from famo_jax.aggregation._con_fig import con_fig_weights as con_fig_weights
from famo_jax.aggregation._cr_mogm import CRMOGMState as CRMOGMState
from famo_jax.aggregation._cr_mogm import cr_mogm as cr_mogm
from famo_jax.aggregation._db_mtl import DBMTLState as DBMTLState
from famo_jax.aggregation._db_mtl import db_mtl as db_mtl
from famo_jax.aggregation._dualproj import dualproj as dualproj
from famo_jax.aggregation._dualproj import dualproj_weights as dualproj_weights
from famo_jax.aggregation._excess_mtl import ExcessMTLState as ExcessMTLState
from famo_jax.aggregation._excess_mtl import excess_mtl as excess_mtl
from famo_jax.aggregation._fairgrad import fairgrad as fairgrad
from famo_jax.aggregation._fairgrad import fairgrad_weights as fairgrad_weights
from famo_jax.aggregation._graddrop import GradDropState as GradDropState
from famo_jax.aggregation._graddrop import graddrop as graddrop
from famo_jax.aggregation._gradnorm import GradNormState as GradNormState
from famo_jax.aggregation._gradnorm import gradnorm as gradnorm
from famo_jax.aggregation._gradnorm import gradnorm_logits_gradient as gradnorm_logits_gradient
from famo_jax.aggregation._gradvac import GradVacState as GradVacState
from famo_jax.aggregation._gradvac import gradvac as gradvac
from famo_jax.aggregation._gradvac import gradvac_orders as gradvac_orders
from famo_jax.aggregation._gradvac import gradvac_weights as gradvac_weights
from famo_jax.aggregation._gramian import gramian_plan as gramian_plan
from famo_jax.aggregation._gramian import gramian_task_gradients as gramian_task_gradients
from famo_jax.aggregation._imtl_g import imtl_g as imtl_g
from famo_jax.aggregation._imtl_g import imtl_g_weights as imtl_g_weights
from famo_jax.aggregation._krum import krum as krum
from famo_jax.aggregation._krum import krum_weights as krum_weights
from famo_jax.aggregation._mgda import mgda as mgda
from famo_jax.aggregation._mgda import mgda_weights as mgda_weights
from famo_jax.aggregation._moco import MoCoState as MoCoState
from famo_jax.aggregation._moco import moco as moco
from famo_jax.aggregation._modo import MoDoState as MoDoState
from famo_jax.aggregation._modo import modo as modo
from famo_jax.aggregation._modo import modo_weights as modo_weights
from famo_jax.aggregation._nash_mtl import NashMTLState as NashMTLState
from famo_jax.aggregation._nash_mtl import nash_mtl as nash_mtl
from famo_jax.aggregation._nash_mtl import nash_mtl_weights as nash_mtl_weights
from famo_jax.aggregation._pcgrad import PCGradState as PCGradState
from famo_jax.aggregation._pcgrad import pcgrad as pcgrad
from famo_jax.aggregation._pcgrad import pcgrad_weights as pcgrad_weights
from famo_jax.aggregation._sdmgrad import SDMGradState as SDMGradState
from famo_jax.aggregation._sdmgrad import sdmgrad as sdmgrad
from famo_jax.aggregation._sdmgrad import sdmgrad_weights as sdmgrad_weights
from famo_jax.aggregation._shared_trunk import shared_trunk as shared_trunk
from famo_jax.aggregation._task_gradients import task_gradients as task_gradients
from famo_jax.aggregation._trimmed_mean import trimmed_mean as trimmed_mean
from famo_jax.aggregation._upgrad import upgrad as upgrad
from famo_jax.aggregation._upgrad import upgrad_weights as upgrad_weights
