"""The installed distribution and the package agree on what they are."""

import importlib.metadata

import famo_jax


def test_the_distribution_version_is_the_package_version():
    # pyproject.toml and famo_jax.__version__ are written by hand: a release that
    # bumps one must bump the other.
    assert importlib.metadata.version("famo_jax") == famo_jax.__version__
