"""Shared and task-specific leaves, and sums over the leading task axis.

Every aggregator receives stacked per-task gradients: each leaf has a leading
task axis of length K. A ``mask`` (as in ``optax.masked``) marks the shared
leaves; the others (task heads) skip the aggregation and receive the plain sum
over tasks. The *layout* kept in each transform's state is the params' tree with
``MaskedNode()`` on head leaves, so ``update`` knows the split without params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from optax.transforms import MaskedNode

from samgs_optax import _validation
from samgs_optax.masks import INJECT_HINT, Mask, resolve_mask

PyTree = Any


def is_masked(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def resolve_layout(mask: Mask, params: PyTree) -> PyTree:
    """Tree like ``params``: a scalar ``True`` on shared leaves, ``MaskedNode()`` on heads.

    ``mask`` takes every form :func:`samgs_optax.masks.resolve_mask` accepts. The
    layout is kept in the transform's state so that ``update`` knows which leaves
    are shared without needing ``params``; ``MaskedNode`` has no leaves, so the
    layout survives ``jax.jit``.
    """
    flags = resolve_mask(mask, params)
    if not any(jax.tree.leaves(flags)):
        # A single False is what a callable mask turns into under optax.inject_hyperparams.
        single = mask is not None and not callable(mask) and len(jax.tree.leaves(mask)) <= 1
        hint = f" {INJECT_HINT}" if single else ""
        raise ValueError(f"mask selects no shared leaf: at least one leaf must be shared.{hint}")
    return jax.tree.map(lambda s: jnp.ones([], jnp.bool_) if s else MaskedNode(), flags)


def task_zeros(params: PyTree, layout: PyTree, num_tasks: int, dtype: Any = None) -> PyTree:
    """Per-task zeros (a leading axis of length K) on the shared leaves, ``MaskedNode()`` on heads.

    The initial per-task moments of SAM-GS, MoCo's tracks and DB-MTL's buffer; ``dtype``
    (e.g. ``m_dtype``) defaults to each parameter's. ``zeros_like`` keeps the parameter's
    sharding (eagerly, and under jit on a mesh with explicit axes) and the broadcast adds an
    unsharded task axis, so the moments are laid out like the stacked gradients instead of
    landing whole on the default device.
    """

    def zeros(p: Any, flag: Any) -> Any:
        if is_masked(flag):
            return MaskedNode()
        p = jnp.asarray(p)
        z = jnp.zeros_like(p, dtype=dtype or p.dtype)
        return jnp.broadcast_to(z[None], (num_tasks, *z.shape))

    return jax.tree.map(zeros, params, layout, is_leaf=is_masked)


def split(updates: PyTree, layout: PyTree, num_tasks: int) -> tuple[PyTree, PyTree]:
    """Validates stacked ``updates``, splits them into (shared, heads), MaskedNode if absent."""
    _validation.check_same_structure(updates, layout, is_leaf=is_masked)
    _validation.check_stacked(updates, num_tasks)
    shared = jax.tree.map(
        lambda s, u: MaskedNode() if is_masked(s) else u, layout, updates, is_leaf=is_masked
    )
    heads = jax.tree.map(
        lambda s, u: u if is_masked(s) else MaskedNode(), layout, updates, is_leaf=is_masked
    )
    return shared, heads


def merge(shared_out: PyTree, heads: PyTree) -> PyTree:
    """Merges the aggregated shared leaves with the plain task sum of the head leaves."""
    return jax.tree.map(
        lambda s, hd: task_sum(hd) if is_masked(s) else s,
        shared_out,
        heads,
        is_leaf=is_masked,
    )


def task_sum(x: jax.Array) -> jax.Array:
    """sum_k x_k over the leading task axis, accumulated in >= float32 as jnp.sum does."""
    acc = (
        jnp.promote_types(x.dtype, jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x.dtype
    )
    return sum_over_tasks(lambda k: x[k].astype(acc), x.shape[0]).astype(x.dtype)


TASK_GROUP = 8  # tasks summed per pass over memory when K > 2 * TASK_GROUP


def sum_over_tasks(term: Callable[[Any], jax.Array], num_tasks: int) -> jax.Array:
    """term(0) + term(1) + ... + term(K-1), as elementwise adds (performance only).

    ``jnp.sum(x, axis=0)`` over the leading task axis is lowered by XLA:CPU to a
    library reduction that runs ~15x slower than memory speed; written out, the K
    terms fuse into one elementwise pass that reads each input once. Beyond 16
    tasks that pass reads more concurrent streams than the CPU prefetches well, so
    the terms are summed 8 at a time, one pass per group, in a ``fori_loop`` that
    accumulates in place (``benchmarks/bench_update.py``). Only the order of the
    additions differs from ``jnp.sum``.
    """

    def group(start, size):
        total = term(start)
        for j in range(1, size):
            total = total + term(start + j)
        return total

    if num_tasks <= 2 * TASK_GROUP:
        return group(0, num_tasks)
    full = num_tasks // TASK_GROUP
    total = jax.lax.fori_loop(
        1, full, lambda i, acc: acc + group(i * TASK_GROUP, TASK_GROUP), group(0, TASK_GROUP)
    )
    rest = num_tasks - full * TASK_GROUP
    return total + group(full * TASK_GROUP, rest) if rest else total
