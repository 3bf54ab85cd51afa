"""Loss weightings: O(1) methods that turn the task losses into one scalar loss.

Every loss weighting is a :class:`LossWeighting`, three pure functions
``init() / weigh(losses, state) / update(prev_losses, curr_losses, state)``:
the model takes one backward pass of ``weigh``, whatever the number of tasks.
"""

from famo_jax.weighting._accumulation import linearize_weigh as linearize_weigh
from famo_jax.weighting._base import LossWeighting as LossWeighting
from famo_jax.weighting._base import loss_weights as loss_weights
from famo_jax.weighting._base import stateless as stateless
from famo_jax.weighting._dwa import DWAState as DWAState
from famo_jax.weighting._dwa import dwa as dwa
from famo_jax.weighting._famo import FAMOState as FAMOState
from famo_jax.weighting._famo import check_famo_losses as check_famo_losses
from famo_jax.weighting._famo import famo as famo
from famo_jax.weighting._famo import reference_adam as reference_adam
from famo_jax.weighting._gls import gls as gls
from famo_jax.weighting._go4align import GO4AlignState as GO4AlignState
from famo_jax.weighting._go4align import go4align as go4align
from famo_jax.weighting._go4align import go4align_groups as go4align_groups
from famo_jax.weighting._imtl_l import IMTLLState as IMTLLState
from famo_jax.weighting._imtl_l import imtl_l as imtl_l
from famo_jax.weighting._linear_scalarization import linear_scalarization as linear_scalarization
from famo_jax.weighting._optax import WeightingTransformState as WeightingTransformState
from famo_jax.weighting._optax import as_optax as as_optax
from famo_jax.weighting._optax import weighting_state as weighting_state
from famo_jax.weighting._pbi import pbi as pbi
from famo_jax.weighting._pbi import pbi_scalarization as pbi_scalarization
from famo_jax.weighting._random_loss_weighting import RLWState as RLWState
from famo_jax.weighting._random_loss_weighting import random_loss_weighting as random_loss_weighting
from famo_jax.weighting._scale_invariant import scale_invariant as scale_invariant
from famo_jax.weighting._stch import STCHState as STCHState
from famo_jax.weighting._stch import stch as stch
from famo_jax.weighting._uncertainty_weighting import (
    UncertaintyWeightingState as UncertaintyWeightingState,
)
from famo_jax.weighting._uncertainty_weighting import uncertainty_weighting as uncertainty_weighting
