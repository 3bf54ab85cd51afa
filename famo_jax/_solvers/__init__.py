"""Pure-JAX solvers for the small ``k x k`` subproblems of the gradient aggregators.

Every solver is a ``jax.lax.while_loop`` with a fixed iteration cap, so it runs
under ``jit`` and ``vmap``: no scipy, cvxpy or host callbacks at training time.
"""

from famo_jax._solvers._nash_newton import NEWTON_MAX_ITERS as NEWTON_MAX_ITERS
from famo_jax._solvers._nash_newton import nash_bargaining_weights as nash_bargaining_weights
from famo_jax._solvers._nonnegative_qp import dual_cone_weights as dual_cone_weights
from famo_jax._solvers._nonnegative_qp import nonnegative_qp as nonnegative_qp
from famo_jax._solvers._nonnegative_qp import spd_solve_in_xla_ops as spd_solve_in_xla_ops
from famo_jax._solvers._simplex import IPM_MAX_ITERS as IPM_MAX_ITERS
from famo_jax._solvers._simplex import check_gram as check_gram
from famo_jax._solvers._simplex import min_norm_weights as min_norm_weights
from famo_jax._solvers._simplex import simplex_interior_point as simplex_interior_point
from famo_jax._solvers._simplex import unit_scale as unit_scale
from famo_jax._solvers._simplex_projection import project_onto_simplex as project_onto_simplex
from famo_jax._solvers._spd import spd_factor as spd_factor
from famo_jax._solvers._spd import spd_solve as spd_solve
