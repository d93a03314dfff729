"""Per-task gradient norms and the gradient magnitude similarity of SAM-GS."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def task_norms(stacked: PyTree, dtype: Any = jnp.float32) -> jax.Array:
    """Global L2 norm of each task's gradient, ``n_k = ||g_k||_2``, shape (K,).

    Summed leaf by leaf over every leaf of ``stacked`` (each with a leading task
    axis); the model is never concatenated into one vector. Squares are
    accumulated in ``dtype``.
    """
    sq = [
        jnp.sum(jnp.square(x.astype(dtype)), axis=tuple(range(1, x.ndim)))
        for x in jax.tree.leaves(stacked)
    ]
    return jnp.sqrt(sum(sq[1:], sq[0]))


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
