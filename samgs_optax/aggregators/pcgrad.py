"""PCGrad (Yu et al. 2020): project conflicting gradients, in random order."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import combine, scaled_gramian

PyTree = Any


def pcgrad_weights(g: jax.Array, perms: jax.Array) -> jax.Array:
    r"""PCGrad weights for given task orders.

    For each task i, starting from :math:`g_i^{PC} = g_i`, for j along
    ``perms[i]`` (a permutation of the K tasks; j = i is skipped): if
    :math:`g_i^{PC} \cdot g_j < 0`, :math:`g_i^{PC} \leftarrow g_i^{PC} -
    \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j` (always against the original
    :math:`g_j`). The update is :math:`\sum_i g_i^{PC} = J^\top w`; this tracks
    the coefficients :math:`w` on the Gramian, as TorchJD's ``PCGradWeighting``.
    They are invariant to the scale of :math:`G` (ratios of its entries only).

    Args:
      g: (K, K) Gramian.
      perms: (K, K) integer array, row i the order in which task i is projected.
    """
    k = g.shape[0]

    def one(i, perm):
        def step(t, coeffs):
            j = perm[t]
            inner = jnp.matmul(g[j], coeffs, precision=jax.lax.Precision.HIGHEST)
            project = (j != i) & (inner < 0)
            diag = g[j, j]
            delta = jnp.where(project, -inner / jnp.where(diag > 0, diag, 1), 0)
            return coeffs.at[j].add(delta)

        return jax.lax.fori_loop(0, k, step, (jnp.arange(k) == i).astype(g.dtype))

    return jnp.sum(jax.vmap(one)(jnp.arange(k), perms), axis=0)


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      weights: task weights of the last step, shape (K,) (diagnostic).
      key: PRNG key for the next step's random task orders.
    """

    shared: PyTree
    weights: chex.Array
    key: chex.PRNGKey


def pcgrad(
    num_tasks: int,
    *,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""PCGrad: removes, in random order, the components of each gradient that conflict with others.

    Each step draws, for every task i, a random order of the other tasks and
    projects :math:`g_i` onto the normal plane of each :math:`g_j` it
    conflicts with (negative inner product); the update is the sum of the
    projected gradients (:func:`pcgrad_weights`). Done on the Gramian, so the
    model is never flattened. Same semantics as TorchJD's ``PCGrad()`` (random
    orders drawn from a JAX key instead of ``torch.randperm``).

    Args:
      num_tasks: K >= 2.
      seed: seed of the PRNG key kept in the state (ignored if ``key`` is given).
      key: a ``jax.random`` key to start from. The state carries the key, so
        runs are reproducible and resuming from a checkpoint continues the stream.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Yu, Kumar, Gupta, Levine, Hausman, Finn, *Gradient Surgery for Multi-Task
      Learning*, NeurIPS 2020, https://arxiv.org/abs/2001.06782
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    start = _validation.initial_key(seed, key)

    def init_fn(params: PyTree) -> PCGradState:
        scalar = _validation.scalar_dtype(params)
        return PCGradState(
            shared=resolve_layout(mask, params),
            weights=jnp.zeros([num_tasks], scalar),
            key=start,
        )

    def update_fn(updates: PyTree, state: PCGradState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        next_key, draw = jax.random.split(state.key)
        keys = jax.random.split(draw, num_tasks)
        perms = jax.vmap(lambda kk: jax.random.permutation(kk, num_tasks))(keys)
        scalar = state.weights.dtype
        g_hat, _ = scaled_gramian(shared, scalar)  # the weights are scale-invariant
        weights = pcgrad_weights(g_hat, perms).astype(scalar)
        out = merge(combine(shared, weights), heads)
        return out, PCGradState(shared=state.shared, weights=weights, key=next_key)

    return optax.GradientTransformation(init_fn, update_fn)
