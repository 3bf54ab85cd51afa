"""The documentation's Python examples run: every page's blocks in order, one namespace per page.

Each page is read as a reader would paste it: its ```python blocks run one
after the other in a fresh namespace. The checks below make the examples
meaningful: what a page's text says the code shows is asserted on the
namespace and on what the blocks printed. The Sphinx build itself (warnings as
errors) is run by ``tools/check``.
"""

import contextlib
import io
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def pages_with_python():
    return sorted(
        path.relative_to(DOCS).as_posix()
        for path in DOCS.rglob("*.md")
        if PYTHON_BLOCK.search(path.read_text())
    )


def run_page(page):
    namespace: dict = {"__name__": f"docs.{page}"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for number, block in enumerate(PYTHON_BLOCK.findall((DOCS / page).read_text())):
            exec(compile(block, f"docs/{page} python block {number}", "exec"), namespace)
    return namespace, printed.getvalue()


def check_getting_started(ns, output):
    famo_jax = ns["famo_jax"]
    # The training loop balances the tasks: the loss weights fall with the loss
    # scales (1e-2, 1, 1e2) and no update was skipped.
    weights = famo_jax.loss_weights(ns["weighting"], ns["losses"], ns["famo_state"])
    assert weights[0] > weights[1] > weights[2]
    assert "updates / skipped: 500 0" in output
    # Lagged: the first update (NaN predecessor) is skipped, the others applied.
    assert "lagged updates / skipped: 2 1" in output
    # Invalid losses: NaN weights, and apply_if_finite skips the NaN step.
    assert "loss weights: [nan nan nan]" in output
    assert int(ns["safe_state"].notfinite_count) == 1
    assert "losses[0] = inf is not finite" in output
    # Low precision: no signal in bfloat16, weight to the stalled task in float32.
    assert "bfloat16 losses -> logits [0. 0.]" in output
    float32_logits = ns["state"].logits  # the loop's last dtype
    assert ns["dtype"] == jnp.float32 and float32_logits[1] > float32_logits[0]


def check_methods(ns, output):
    # The aggregator trained: finite losses, the mean loss fell.
    final = ns["task_losses"](ns["params"], ns["x"], ns["y"])
    assert np.all(np.isfinite(final))
    assert float(final.mean()) < float(ns["first_losses"].mean())
    assert "task losses after 20 CAGrad steps" in output


def check_flax_optax(ns, output):
    famo_jax = ns["famo_jax"]
    # as_optax is the lagged mode: 300 steps, the first update skipped.
    assert "updates / skipped: 299 1" in output
    # Runtime hyperparameters: gamma and min_losses set in the optimizer state,
    # FAMO's learning rate set apart from the model's.
    state = famo_jax.weighting_state(ns["opt_state"])
    assert float(state.opt_state.hyperparams["gamma"]) == 0.0
    np.testing.assert_array_equal(state.min_losses, [0.0, -1.0, 0.0])
    assert float(ns["injected_state"].hyperparams["learning_rate"]) == pytest.approx(1e-2)
    famo_lr = famo_jax.weighting_state(ns["injected_state"]).opt_state.hyperparams
    assert float(famo_lr["learning_rate"]) == pytest.approx(0.05)
    # MultiSteps: 40 micro-batches, every 4: 10 FAMO updates, the first skipped.
    assert "accumulated updates / skipped: 9 1" in output
    # linearize_weigh: the accumulated gradient is the big batch's.
    assert float(max(jax.tree.leaves(ns["differences"]))) < 1e-5
    # The checkpoint restores the whole optimizer state, FAMO's included.
    chex.assert_trees_all_equal(ns["restored"]["opt_state"], ns["opt_state"])
    # NNX: the state was updated in place, once per step.
    assert "NNX updates: 50" in output
    assert not np.allclose(ns["nnx_weighting"].task_weights, 1 / 3)


def check_data_parallel(ns, output):
    # The sharded step equals the single-device step on the global batch.
    assert max(jax.tree.leaves(ns["difference"])) < 1e-5
    assert int(ns["sharded"][2].num_updates) == 10
    # More than one host: feeding each process's rows gives the same run.
    assert max(jax.tree.leaves(ns["job_difference"])) == 0.0
    assert int(ns["job"][2].num_updates) == 10


def check_reproducing(ns, output):
    assert "FAMO on NYU-v2: delta_m = -4.0996%" in output


PAGE_CHECKS = {
    "data_parallel.md": check_data_parallel,
    "flax_optax.md": check_flax_optax,
    "getting_started.md": check_getting_started,
    "methods.md": check_methods,
    "reproducing.md": check_reproducing,
}


def test_the_pages_with_checks_have_python_examples():
    assert set(PAGE_CHECKS) <= set(pages_with_python())


@pytest.mark.parametrize("page", pages_with_python())
def test_python_examples_run_and_show_what_the_page_says(page):
    namespace, output = run_page(page)
    if page in PAGE_CHECKS:
        PAGE_CHECKS[page](namespace, output)
