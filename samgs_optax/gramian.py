"""The shared core of the Gramian-based aggregators.

Most multi-task aggregators only need the K x K Gramian of the task gradients,
:math:`G = J J^\\top` with :math:`G_{ij} = \\langle g_i, g_j \\rangle`, turn it
into K task weights :math:`w`, and return :math:`J^\\top w = \\sum_k w_k g_k`
(TorchJD's "Gramian weighting" design). This module computes :math:`G` once
per step, leaf by leaf (the model is never concatenated into one vector),
combines the task gradients with the weights, and wraps a weighting function
into an ``optax.GradientTransformation`` with the same conventions as
:func:`samgs_optax.samgs` (stacked inputs, optional ``mask`` of shared leaves,
task-specific leaves receiving the plain sum over tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split

PyTree = Any
WeightingFn = Callable[[jax.Array], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def gramian(stacked: PyTree, dtype: Any = jnp.float32) -> jax.Array:
    r"""Gramian of the task gradients, :math:`G_{ij} = \langle g_i, g_j \rangle`, shape (K, K).

    Summed leaf by leaf: :math:`G = \sum_\ell M_\ell M_\ell^\top` with
    :math:`M_\ell` leaf :math:`\ell` reshaped to (K, -1). Accumulated in
    ``dtype`` at the highest matmul precision. ``MaskedNode`` leaves are skipped.
    """
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("gramian needs at least one leaf.")
    parts = []
    for leaf in leaves:
        m = leaf.reshape(leaf.shape[0], -1).astype(dtype)
        parts.append(jnp.matmul(m, m.T, precision=_HIGHEST))
    return sum(parts[1:], parts[0])


def combine(stacked: PyTree, weights: jax.Array) -> PyTree:
    r"""Weighted sum over the leading task axis, :math:`\sum_k w_k g_k`, leaf by leaf.

    Computed in the weights' dtype (at least float32) and cast back to each
    leaf's dtype.
    """

    def one(leaf: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(leaf.dtype, weights.dtype)
        out = jnp.tensordot(weights.astype(dtype), leaf.astype(dtype), axes=1, precision=_HIGHEST)
        return out.astype(leaf.dtype)

    return jax.tree.map(one, stacked)


def normalize_gramian(g: jax.Array, eps: float | jax.Array) -> jax.Array:
    r"""TorchJD's normalisation: :math:`G / \operatorname{tr} G`, or zeros if the trace is < eps.

    :math:`\operatorname{tr} G = \|J\|_F^2`, so this is the Gramian of the
    Frobenius-normalised Jacobian. Note that ``eps`` is absolute (in squared
    gradient units), as in TorchJD.
    """
    trace = jnp.trace(g)
    small = trace < eps
    return jnp.where(small, jnp.zeros_like(g), g / jnp.where(small, 1, trace))


def regularize_gramian(g: jax.Array, eps: float | jax.Array) -> jax.Array:
    """Adds ``eps`` to the diagonal (TorchJD's ``regularize``)."""
    return g + eps * jnp.eye(g.shape[0], dtype=g.dtype)


# --------------------------------------------------------------------------------------
# Stateless Gramian weighting as an optax transform.


class GramianWeightingState(NamedTuple):
    """State of a stateless Gramian-weighting aggregator.

    Attributes:
      shared: the params' tree, a scalar ``True`` on shared leaves and
        ``MaskedNode()`` on task-specific leaves (set by ``mask`` at init).
      weights: the task weights ``w`` of the last step, shape (K,) (diagnostic);
        the shared update was ``sum_k w_k g_k``.
    """

    shared: PyTree
    weights: chex.Array


def gramian_weighting(
    num_tasks: int, weighting: WeightingFn, *, mask: Mask = None
) -> optax.GradientTransformation:
    r"""Turns a weighting :math:`G \mapsto w` into an aggregator :math:`J^\top w`.

    ``update`` takes stacked per-task gradients (leading task axis of length
    ``num_tasks`` on every leaf), computes the Gramian of the shared leaves once,
    leaf by leaf, calls ``weighting(G)`` (a jittable function of a (K, K) array
    returning K weights) and returns :math:`\sum_k w_k g_k` on shared leaves and
    the plain sum :math:`\sum_k g_k` on task-specific leaves.

    Args:
      num_tasks: K >= 2.
      weighting: function from the (K, K) Gramian (float32 or wider) to (K,) weights.
      mask: optional pytree of bools (or callable of params returning one):
        True leaves are shared and aggregated, False leaves (task heads) get
        the plain sum over tasks and are left out of the Gramian. ``None``: all shared.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`GramianWeightingState`.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)

    def init_fn(params: PyTree) -> GramianWeightingState:
        scalar = _validation.scalar_dtype(params)
        return GramianWeightingState(
            shared=resolve_layout(mask, params), weights=jnp.zeros([num_tasks], scalar)
        )

    def update_fn(updates: PyTree, state: GramianWeightingState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.weights.dtype
        weights = weighting(gramian(shared, scalar)).astype(scalar)
        out = merge(combine(shared, weights), heads)
        return out, GramianWeightingState(shared=state.shared, weights=weights)

    return optax.GradientTransformation(init_fn, update_fn)
