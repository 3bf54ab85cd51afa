"""The README's Python example runs, as a reader would paste it, and its links lead somewhere."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
RELATIVE_LINK = re.compile(r"\]\((?!https?://)([^)#\s]+)(?:#([^)\s]*))?\)")
HEADING = re.compile(r"^#+ (.*)$", re.MULTILINE)


def heading_anchors(markdown):
    """The anchors GitHub (and the docs site) give the headings: lowercase, hyphens for spaces."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in HEADING.findall(markdown)
    }


def test_readme_has_a_python_example():
    assert len(PYTHON_BLOCK.findall(README.read_text())) >= 1


def test_readme_python_examples_run_and_print_what_the_text_says():
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for number, block in enumerate(PYTHON_BLOCK.findall(README.read_text())):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    output = printed.getvalue()
    # The training loop balances the tasks: the loss weights fall with the loss
    # scales (1e-2, 1, 1e2), near (1, 6e-5, 5e-9), and no update was skipped.
    weights = namespace["famo_jax"].loss_weights(
        namespace["weighting"], namespace["losses"], namespace["famo_state"]
    )
    assert weights[0] > weights[1] > weights[2]
    assert 0.99 < float(weights[0]) and 1e-5 < float(weights[1]) < 1e-3
    assert 1e-10 < float(weights[2]) < 1e-7
    assert "updates / skipped: 500 0" in output


def test_readme_relative_links_point_to_files_of_the_repository():
    links = RELATIVE_LINK.findall(README.read_text())
    assert any(path.startswith("docs/") for path, _ in links)
    missing = [path for path, _ in links if not (ROOT / path).exists()]
    assert not missing, missing
    for path, anchor in links:
        if anchor:
            assert anchor in heading_anchors((ROOT / path).read_text()), f"{path}#{anchor}"
