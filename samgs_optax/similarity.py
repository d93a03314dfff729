"""Per-task gradient norms and the gradient magnitude similarity of SAM-GS."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from samgs_optax.gramian import gramian_range, pow2_scale

PyTree = Any


def task_norms(stacked: PyTree, dtype: Any = jnp.float32, *, rescale: bool = False) -> jax.Array:
    r"""Global L2 norm of each task's gradient, ``n_k = ||g_k||_2``, shape (K,).

    Summed leaf by leaf over every leaf of ``stacked`` (each with a leading task
    axis); the model is never concatenated into one vector. Squares are
    accumulated in ``dtype``: one pass over the gradients.

    Range: with the default ``rescale=False`` a squared norm outside ``dtype``'s
    range is lost. In float32 a task whose squared norm is below the smallest
    normal number (~1.2e-38, i.e. a norm below ~1.1e-19) comes out as 0 on CPU
    (XLA flushes subnormals to zero; a GPU keeps a few bits), and a norm above
    ~1.8e19 as ``inf``.

    ``rescale=True`` makes every norm exact to rounding whenever it is
    representable, in the same single pass: with :math:`e` half the exponent range
    (64 in float32), one variadic reduction per leaf accumulates
    :math:`s_k = \sum g^2`, :math:`s^-_k = \sum (2^{-e} g)^2` and
    :math:`s^+_k = \sum (2^{e} g)^2` (powers of two are exact), and each task takes
    :math:`\sqrt{s_k}` when :math:`s_k` lies in
    :func:`~samgs_optax.gramian.gramian_range`, :math:`2^{e}\sqrt{s^-_k}` when it
    overflowed, :math:`2^{-e}\sqrt{s^+_k}` when it underflowed (or is zero). No
    branch and no extra read of the gradients (the two scaled sums ride in the
    same loop); tasks in range get the plain norm to rounding. Per task, so
    unlike the Gramian's common scale even a task 1e-30 times smaller than the
    others keeps its norm. Entries below 1.2e-38 are flushed on CPU before any
    scaling can help. (An earlier ``lax.cond`` fallback cost a K x D buffer
    inside a jitted training step: ``docs/performance.md``.)

    Accuracy: XLA:CPU runs a variadic reduction as one sequential loop, so each leaf
    is summed in blocks (:func:`_blocked_sums`): the largest axis that is not
    explicitly sharded first, 4096 entries at a time, then the partial sums. No
    loop adds more than ~8192 terms (a single float32 loop stops growing past 2^24
    equal terms). Explicitly sharded axes are never reshaped, so only the K sums
    cross devices; under auto (GSPMD) sharding a blocked axis that happens to be
    sharded costs some data movement, not accuracy. Leaves under 8192 entries per
    task are summed in one reduction.
    """
    leaves = [x.astype(dtype) for x in jax.tree.leaves(stacked)]

    def sum_squares(xs):
        sq = [jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in xs]
        return sum(sq[1:], sq[0])

    if not rescale:
        return jnp.sqrt(sum_squares(leaves))

    # Two more sums of squares of the same leaves, scaled by 2^-e and 2^e (e = half the
    # exponent range: 64 in float32), in one variadic reduction per leaf with the plain
    # one (one read of g): together they cover every representable norm.
    info = jnp.finfo(dtype)
    e = int(info.maxexp) // 2
    lo, hi = gramian_range(sum(math.prod(x.shape[1:]) for x in leaves), dtype)
    scale_down, scale_up = jnp.asarray(2.0**-e, dtype), jnp.asarray(2.0**e, dtype)

    zero = jnp.zeros((), dtype)

    def add3(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    def three_sums(x):
        xd, xu = x * scale_down, x * scale_up
        return _blocked_sums((x * x, xd * xd, xu * xu), _sharded_axes(x), (zero,) * 3, add3)

    per_leaf = [three_sums(x) for x in leaves]
    sq, down, up = (sum(s[i] for s in per_leaf[1:]) + per_leaf[0][i] for i in range(3))
    in_range = (sq >= lo) & (sq <= hi)
    too_big = ~in_range & ~(sq < lo)  # overflow (inf) or NaN
    return jnp.where(
        in_range,
        jnp.sqrt(sq),
        jnp.where(
            too_big,
            pow2_scale(jnp.sqrt(down), e),
            pow2_scale(jnp.sqrt(up), -e),
        ),
    )


_BLOCK = 4096
"""Entries per block in :func:`task_norms`' blocked sums (no loop adds more than 2 x _BLOCK)."""


def _sharded_axes(x: jax.Array) -> tuple[bool, ...]:
    """Per axis of ``x``: sharded in its type (explicit sharding), so not to be reshaped."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
    spec = tuple(spec) + (None,) * (x.ndim - len(spec))
    return tuple(axis is not None for axis in spec[: x.ndim])


def _blocked_sums(parts: tuple, sharded: tuple[bool, ...], zeros: tuple, add: Callable) -> tuple:
    """Sums of ``parts`` (same shapes, leading task axis kept) over every other axis.

    XLA:CPU runs a variadic reduction as one sequential loop, and a float32 sum of many
    terms in one loop loses digits (it stops growing past 2^24 terms of one size). So the
    largest axis not sharded is summed first, in blocks of :data:`_BLOCK` entries when it is
    longer, and the partial sums recursively: no loop adds more than about 2 x _BLOCK terms.
    Sharded axes are never reshaped and are summed last, so only the K sums cross devices.
    """
    shape = parts[0].shape
    free = [a for a in range(1, len(shape)) if not sharded[a]]
    if math.prod(shape[1:]) < 2 * _BLOCK or not free:
        return jax.lax.reduce(parts, zeros, add, tuple(range(1, len(shape))))
    axis = max(free, key=lambda a: (shape[a], a))
    n = shape[axis]
    if n < 2 * _BLOCK:  # sum the whole axis, then what is left
        kept = sharded[:axis] + sharded[axis + 1 :]
        return _blocked_sums(jax.lax.reduce(parts, zeros, add, (axis,)), kept, zeros, add)
    full = n // _BLOCK * _BLOCK
    blocks = shape[:axis] + (full // _BLOCK, _BLOCK) + shape[axis + 1 :]
    main = tuple(jax.lax.slice_in_dim(p, 0, full, axis=axis).reshape(blocks) for p in parts)
    block_sums = jax.lax.reduce(main, zeros, add, (axis + 1,))  # the axis now counts blocks
    sums = _blocked_sums(block_sums, sharded, zeros, add)
    if full == n:
        return sums
    tail = tuple(jax.lax.slice_in_dim(p, full, n, axis=axis) for p in parts)
    return add(sums, _blocked_sums(tail, sharded, zeros, add))


def pairwise_similarity(norms: jax.Array) -> jax.Array:
    r"""Matrix of :math:`\psi_{ij} = 2 n_i n_j / (n_i^2 + n_j^2)`, shape (K, K).

    Computed as :math:`2r/(1+r^2)` with :math:`r = \min/\max` of the pair, which
    neither overflows nor underflows. :math:`\psi(0, 0) = 1` (equal
    magnitudes) and :math:`\psi(0, x) = 0` for :math:`x > 0`.
    """
    lo = jnp.minimum(norms[:, None], norms[None, :])
    hi = jnp.maximum(norms[:, None], norms[None, :])
    r = lo / jnp.where(hi > 0, hi, 1)
    return jnp.where(hi > 0, 2 * r / (1 + r * r), 1)


def magnitude_similarity(norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and minimum of ``psi_ij`` over the K(K-1)/2 pairs i < j."""
    k = norms.shape[0]
    rows, cols = jnp.triu_indices(k, 1)
    pairs = pairwise_similarity(norms)[rows, cols]
    return jnp.mean(pairs), jnp.min(pairs)
