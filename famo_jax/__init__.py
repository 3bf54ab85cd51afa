"""famo_jax: balanced multitask optimization in JAX and optax.

Loss weightings (O(1) in the number of tasks) share the
``init() / weigh(losses, state) / update(prev_losses, curr_losses, state)``
protocol of :class:`LossWeighting`; FAMO is the headline member. Gradient
aggregators (O(k)) are optax transformations over per-task gradients stacked on
a leading axis.
"""

from famo_jax._base import LossWeighting, loss_weights
from famo_jax._famo import FamoState, check_famo_losses, famo

__version__ = "0.1.0"

__all__ = [
    "FamoState",
    "LossWeighting",
    "check_famo_losses",
    "famo",
    "loss_weights",
]
