"""Checks shared by every transform that consumes stacked per-task gradients.

All checks run on static information (shapes, dtypes, tree structure), so they
raise the same clear errors with or without ``jax.jit``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def check_num_tasks(num_tasks: Any) -> int:
    """Returns ``num_tasks`` if it is a Python int >= 2, else raises."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral):
        raise TypeError(
            f"num_tasks must be a Python int, got {type(num_tasks).__name__} "
            f"{num_tasks!r}. Use samgs_optax.inject_hyperparams, or pass "
            "static_args=('num_tasks', 'mask') to optax.inject_hyperparams, so that it is "
            "not turned into an array."
        )
    if num_tasks < 2:
        raise ValueError(f"num_tasks must be >= 2, got {num_tasks}.")
    return int(num_tasks)


def check_interval(name: str, value: Any, low: float, high: float, closed_high: bool) -> None:
    """Validates a Python number against [low, high] or [low, high).

    Arrays (e.g. hyperparameters injected by ``optax.inject_hyperparams``) may be
    traced, so they are left unchecked.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}.")


def check_stacked(updates: PyTree, num_tasks: int, what: str = "updates") -> None:
    """Checks that every leaf is floating with a leading task axis of ``num_tasks``."""
    leaves = jax.tree_util.tree_leaves_with_path(updates)
    if not leaves:
        raise ValueError(f"{what} has no leaves.")
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path) or "<root>"
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"{what} leaf {name} is not an array: {type(leaf).__name__}.")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what} leaf {name} has dtype {dtype}; per-task gradients must be floating."
            )
        if len(shape) == 0 or shape[0] != num_tasks:
            raise ValueError(
                f"{what} leaf {name} has shape {tuple(shape)}; expected a leading task "
                f"axis of length num_tasks={num_tasks} (stacked per-task gradients, "
                "e.g. from samgs_optax.value_and_jacrev)."
            )


def check_same_structure(updates: PyTree, reference: PyTree, is_leaf=None) -> None:
    """Raises if ``updates`` does not have the tree structure of ``reference``."""
    got = jax.tree_util.tree_structure(updates)
    want = jax.tree_util.tree_structure(reference, is_leaf=is_leaf)
    if got != want:
        raise ValueError(
            "The gradient tree does not match the tree the optimizer state was "
            f"initialised with.\n  gradients: {got}\n  state:     {want}"
        )


def initial_key(seed: Any, key: Any) -> jax.Array:
    """The PRNG key a random method starts from: ``key`` if given, else ``PRNGKey(seed)``."""
    if key is not None:
        return jnp.asarray(key)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int (or pass key=), got {seed!r}.")
    return jax.random.PRNGKey(seed)


def scalar_dtype(params: PyTree) -> jnp.dtype:
    """Dtype for scalar statistics: the params' dtype, at least float32."""
    dtypes = [jnp.asarray(p).dtype for p in jax.tree_util.tree_leaves(params)]
    floating = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    base = jnp.result_type(*floating) if floating else jnp.float32
    return jnp.promote_types(base, jnp.float32)
