"""The README's Python examples run, in order, in one namespace, as a reader would paste them."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCK.findall(README.read_text())) >= 4


def test_readme_python_examples_run_and_print_what_the_text_says():
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for number, block in enumerate(PYTHON_BLOCK.findall(README.read_text())):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    output = printed.getvalue()
    # The training loop balances the tasks: the loss weights fall with the loss
    # scales (1e-2, 1, 1e2) and no update was skipped.
    weights = namespace["famo_jax"].loss_weights(
        namespace["weighting"], namespace["losses"], namespace["famo_state"]
    )
    assert weights[0] > weights[1] > weights[2]
    assert "updates / skipped: 500 0" in output
    # The checkify example names the offending task.
    assert "losses[0] = inf is not finite" in output
