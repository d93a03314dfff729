"""Shared test helpers: random stacked-gradient sequences, tree flattening, example loading."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

if "PYTEST_XDIST_WORKER" in os.environ:  # several test processes share one GPU: no JAX process
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # may take 75% of it

import jax
import numpy as np
import optax
import pytest

import samgs_optax
from samgs_optax.aggregators import aggregator_spec

# A pytree of several leaves with different shapes (D = 18 + 20 + 4 + 1 = 43).
LEAF_SHAPES = {"conv": (3, 3, 2), "dense": {"w": (5, 4), "b": (4,)}, "scale": ()}


def make_params(dtype=np.float32, shapes=LEAF_SHAPES):
    return jax.tree.map(
        lambda s: np.zeros(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def flatten_stacked(tree, num_tasks):
    """(K, D) matrix of a stacked tree, leaves in jax.tree.leaves order."""
    leaves = [np.asarray(x, np.float64).reshape(num_tasks, -1) for x in jax.tree.leaves(tree)]
    return np.concatenate(leaves, axis=1)


def flatten(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def unflatten_stacked(matrix, params, dtype):
    """Stacked tree (leading axis K) with the structure of params from a (K, D) matrix."""
    leaves, treedef = jax.tree.flatten(params)
    out, start = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        out.append(matrix[:, start : start + size].reshape(-1, *leaf.shape).astype(dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def task_gradient_sequence(rng, num_tasks, dim, steps):
    """Random (K, D) gradients that alternate between similar and very different magnitudes.

    Half the steps draw task scales within a factor 2 of each other, the other
    half across eight orders of magnitude, so that SAM-GS switches branches.
    """
    seq = []
    for _ in range(steps):
        if rng.random() < 0.5:
            scales = rng.uniform(1.0, 2.0, size=num_tasks)
        else:
            scales = 10.0 ** rng.uniform(-4, 4, size=num_tasks)
        directions = rng.normal(size=(num_tasks, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        seq.append(scales[:, None] * directions)
    return seq


def relative_error(got, want):
    """max |got - want| / max |want| (norm-wise, robust to cancellation)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    return np.max(np.abs(got - want)) / (scale if scale > 0 else 1.0)


def with_task_losses(tx, task_losses):
    """``tx`` whose update passes these per-task losses unless the call gives its own.

    Generic tests run every registered method through the same calls; the
    loss-aware ones (``AggregatorSpec.needs_losses``) get fixed losses this way.
    """
    inner = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, **extra_args):
        extra_args.setdefault("task_losses", task_losses)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def make_aggregator(name, num_tasks, **options):
    """``samgs_optax.AGGREGATORS[name](num_tasks, **options)``; a loss-aware method
    gets equal per-task losses of 1 (so permutation and scale properties hold)."""
    tx = samgs_optax.AGGREGATORS[name](num_tasks, **options)
    if aggregator_spec(name).needs_losses:
        tx = with_task_losses(tx, np.ones(num_tasks, np.float32))
    return tx


@pytest.fixture
def rng():
    return np.random.default_rng(0)


PAPER_EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "paper"


def load_paper_module(name: str):
    """``examples/paper/{name}.py`` imported as module ``paper_{name}`` (registered in
    ``sys.modules``, so the examples' own ``paper_*`` imports resolve to the same object)."""
    spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER_EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
