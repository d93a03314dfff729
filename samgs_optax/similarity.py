"""Per-task gradient norms and the gradient magnitude similarity of SAM-GS."""

from __future__ import annotations

import math
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
    representable: a task whose sum of squares :math:`s_k` lies outside
    :func:`~samgs_optax.gramian.gramian_range` (including exact zeros, which a
    flushed tiny task cannot be told apart from) is recomputed under
    ``jax.lax.cond``: one pass for the per-task maxima :math:`m_k = 2^{e_k} f`,
    :math:`f \in [0.5, 1)`; if some flagged task has :math:`m_k > 0`, one more
    for :math:`\hat s_k = \sum (g_k 2^{-e_k})^2` and :math:`n_k = 2^{e_k}
    \sqrt{\hat s_k}` (powers of two are exact). Tasks in range keep the
    first pass's value bit for bit. Cost when every task is in range: a K-element
    test and the ``lax.cond``, a few microseconds (a SAM-GS step took 0.99x to 1.03x
    the same step with plain norms on 2 CPU cores; ``docs/performance.md``); one pass more
    when a task is exactly zero, two when one is tiny or huge (under ``jax.vmap``
    both branches run). Per task, so unlike the Gramian's common scale even a task
    1e-30 times smaller than the others keeps its norm. Entries below 1.2e-38
    are flushed on CPU before any scaling can help.
    """
    leaves = [x.astype(dtype) for x in jax.tree.leaves(stacked)]

    def sum_squares(xs):
        sq = [jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in xs]
        return sum(sq[1:], sq[0])

    sq = sum_squares(leaves)
    if not rescale:
        return jnp.sqrt(sq)

    lo, hi = gramian_range(sum(math.prod(x.shape[1:]) for x in leaves), dtype)
    info = jnp.finfo(dtype)

    def out_of_range(sq):
        return ~((sq >= lo) & (sq <= hi))  # NaN is flagged too

    def rescaled(sq):
        flagged = out_of_range(sq)
        big = jnp.max(
            jnp.stack([jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim))) for x in leaves]), 0
        )
        usable = flagged & jnp.isfinite(big) & (big > 0)
        _, e = jnp.frexp(jnp.where(usable, big, 1))  # big = f 2^e, f in [0.5, 1)
        e = jnp.where(usable, jnp.clip(e, int(info.minexp), int(info.maxexp) - 2), 0)
        e = e.astype(jnp.int32)

        def scaled_sum():
            factor = pow2_scale(jnp.ones_like(sq), -e)
            return sum_squares([x * factor.reshape((-1,) + (1,) * (x.ndim - 1)) for x in leaves])

        # Exactly-zero tasks (m_k = 0) need no second pass.
        sq_hat = jax.lax.cond(jnp.any(usable), scaled_sum, lambda: sq)
        rescaled_norms = pow2_scale(jnp.sqrt(jnp.where(usable, sq_hat, sq)), e)
        return jnp.where(flagged, rescaled_norms, jnp.sqrt(sq))

    # The common case (every task in range) adds one K-element test and the cond.
    return jax.lax.cond(jnp.any(out_of_range(sq)), rescaled, jnp.sqrt, sq)


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
