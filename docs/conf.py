"""Sphinx configuration of the famo_jax documentation (MyST markdown pages).

Build: ``python -m sphinx -W --keep-going -b html docs OUTDIR`` (``tools/check``
does it in a temporary directory). Nothing is written into ``docs/``: the API
pages document each object with autodoc next to an autosummary table, so no
autosummary stub files are generated.
"""

from __future__ import annotations

import collections
import importlib
import inspect

import famo_jax

project = "famo_jax"
author = "famo_jax developers"
copyright = "famo_jax developers"
release = famo_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"famo_jax {release}"

# Links such as [Invalid losses](getting_started.md#invalid-losses) work here
# and on GitHub, which slugs headings the same way.
myst_heading_anchors = 3

autosummary_generate = False
autodoc_member_order = "bysource"
# The docstrings give every argument's type and shape in words; the annotations
# (ArrayLike unions, optax schedules) would expand into unreadable signatures.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_attr_annotations = False

# Every cross reference must resolve, except to the libraries famo_jax builds on
# (no intersphinx: the build needs no network).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|jaxlib|optax|flax|nnx|np|numpy|chex|orbax)(\..*)?"),
    (r"py:.*", r"(ArrayLike|DTypeLike|Array|PRNGKeyArray|OptState|ScalarOrSchedule)"),
    (r"py:.*", r"(Any|Callable|Sequence|Protocol|NamedTuple|tuple|typing\..*)"),
    (r"py:.*", r"(collections\.abc\..*|_base\..*|.*\.State|State|TaskGradients)"),
]

# The modules of the API reference: each public name must appear in it.
API_MODULES = [
    "famo_jax",
    "famo_jax.weighting",
    "famo_jax.aggregation",
    "famo_jax.metrics",
    "famo_jax.problems",
    "famo_jax.nnx",
]


def import_object(fullname: str):
    """The object that the dotted ``fullname`` names (a module, or an attribute of one).

    Raises:
      LookupError: if there is none.
    """
    parts = fullname.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                value = getattr(value, attr)
        except AttributeError:
            break
        return value
    raise LookupError(fullname)


def documented_names(env) -> dict[int, list[str]]:
    """``id(object) -> the full names under which the API reference documents it``."""
    names = collections.defaultdict(list)
    for fullname, entry in env.domains["py"].objects.items():
        if entry.aliased:  # the :canonical: (private) location of a documented name
            continue
        try:
            names[id(import_object(fullname))].append(fullname)
        except LookupError:
            pass
    return names


def public_names(module) -> list[str]:
    """The names a user imports from ``module``: ``__all__``, else what it defines or re-exports."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        defined_in = getattr(value, "__name__", "") if inspect.ismodule(value) else None
        defined_in = defined_in or getattr(value, "__module__", None) or ""
        if defined_in.startswith("famo_jax"):
            names.append(name)
    return names


def skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by their class's ``Attributes:`` section."""
    if type(obj).__name__ == "_tuplegetter" or (
        isinstance(obj, property) and (obj.__doc__ or "").startswith("Alias for field number")
    ):
        return True
    return None


def check_api_reference_is_complete(app, env):
    """Warns (an error with ``-W``) for a public name that the API reference does not document."""
    documented = documented_names(env)
    missing = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            value = getattr(module, name)
            if f"{module_name}.{name}" in env.domains["py"].objects:
                continue
            # A re-export is documented once, under the name users are shown.
            if not inspect.ismodule(value) and documented.get(id(value)):
                continue
            missing.append(f"{module_name}.{name}")
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "public names missing from the API reference (docs/api/): %s", ", ".join(missing)
        )


def resolve_reexported(app, env, node, contnode):
    """Resolves a reference to any name of a documented object to its documentation.

    A re-export is documented once (``famo_jax.cagrad``), but docstrings inside
    a subpackage refer to it by the names that they see there (``cagrad`` or
    ``famo_jax.aggregation.cagrad``), and a docstring documented as
    ``famo_jax.pbi`` may name ``pbi_scalarization`` of its own subpackage. The
    reference is tried in its context (module, class), as written, and then in
    each module of the API reference, where it must name one object only. A
    reference that names no documented object stays unresolved (a warning).
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    context = [node.get("py:module"), node.get("py:class")]
    candidates = [target]
    for depth in range(len(context), 0, -1):
        prefix = ".".join(part for part in context[:depth] if part)
        if prefix:
            candidates.insert(0, f"{prefix}.{target}")
    in_api_modules = set()
    for module_name in API_MODULES:
        try:
            in_api_modules.add(id(import_object(f"{module_name}.{target}")))
        except LookupError:
            pass
    if len(in_api_modules) == 1:
        candidates.extend(f"{module_name}.{target}" for module_name in API_MODULES)
    for candidate in candidates:
        try:
            value = import_object(candidate)
        except LookupError:
            continue
        names = documented_names(env).get(id(value))
        if not names:
            continue
        # Prefer the object's own name over an alias (FAMOState over FamoState).
        names.sort(key=lambda name: name.rpartition(".")[2] != getattr(value, "__name__", ""))
        return env.domains["py"].resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], names[0], node, contnode
        )
    return None


def promote_generated_headings(app, docname, source):
    """Starts the generated ``docs/benchmarks/*.md`` pages at H1.

    The benchmark scripts write their tables from H2 down (so that they can be
    appended to other markdown); a page's first heading is its title, so the
    headings of such a file move up one level here, outside code blocks.
    """
    if not docname.startswith("benchmarks/"):
        return
    lines = source[0].split("\n")
    fence = False
    levels = []
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            levels.append((number, len(line) - len(line.lstrip("#"))))
    if not levels or levels[0][1] == 1:
        return
    shift = levels[0][1] - 1
    for number, level in levels:
        lines[number] = lines[number][min(shift, level - 1) :]
    source[0] = "\n".join(lines)


def setup(app):
    """Connects the hooks above."""
    app.connect("source-read", promote_generated_headings)
    app.connect("autodoc-skip-member", skip_namedtuple_fields)
    app.connect("missing-reference", resolve_reexported)
    app.connect("env-check-consistency", check_api_reference_is_complete)
