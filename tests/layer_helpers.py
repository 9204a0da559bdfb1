"""Helpers shared by the Flax and Haiku layer tests: a test image and float32 comparisons of
arrays and of whole parameter trees (same structure, leaf by leaf, named on failure)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from conftest import assert_close

C = 4  # channels of the test images
KEY = jax.random.PRNGKey(0)


def image(shape=(2, 6, 5, C), seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * 1.5 + 0.3


def close(a, b, scale=10, err_msg=""):
    assert_close(a, b, "float32", scale, err_msg)


def trees_close(a, b, scale=10):
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                            jax.tree.structure(b))
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        close(u, v, scale, err_msg=jax.tree_util.keystr(path))


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def weighted_sum(y):
    """A scalar loss that weighs every output element differently (so that gradients see
    every element) and is non-linear (so that they depend on the output values)."""
    return jnp.sum(jnp.sin(y) * jnp.linspace(-1, 1, y.size).reshape(y.shape))
