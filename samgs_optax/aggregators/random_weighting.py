"""Random loss weighting (RLW, Lin et al. 2022) applied to the task gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import combine

PyTree = Any


def random_weighting_weights(draw: jax.Array) -> jax.Array:
    r"""RLW weights from one standard normal draw: :math:`w = \operatorname{softmax}(z)`.

    :math:`w_k = e^{z_k} / \sum_j e^{z_j}`, positive and summing to 1 (computed
    stably, shifted by :math:`\max_k z_k`). ``draw`` is the (K,) vector :math:`z`;
    the weights do not depend on the gradients.
    """
    return jax.nn.softmax(draw)


class RandomWeightingState(NamedTuple):
    """State of :func:`random_weighting`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      weights: task weights of the last step, shape (K,) (diagnostic).
      key: PRNG key for the next step's draw.
    """

    shared: PyTree
    weights: chex.Array
    key: chex.PRNGKey


def random_weighting(
    num_tasks: int,
    *,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""Random weighting: :math:`u = \sum_k w_k g_k` with fresh random weights every step.

    Each step draws :math:`z \sim \mathcal N(0, I_K)` and uses
    :math:`w = \operatorname{softmax}(z)` (:func:`random_weighting_weights`), so
    the update is a random convex combination of the task gradients (a mean
    for K copies of one gradient; :func:`samgs_optax.recipe` multiplies it by K).
    It needs no Gramian. Same semantics as TorchJD's ``Random()`` (Algorithm 2
    of Lin et al. with the normal distribution; :math:`z` drawn from a JAX key,
    in the params' scalar dtype, instead of ``torch.randn``).

    Args:
      num_tasks: K >= 2.
      seed: seed of the PRNG key kept in the state (ignored if ``key`` is given).
      key: a ``jax.random`` key to start from. The state carries the key, so
        runs are reproducible and resuming from a checkpoint continues the stream.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`RandomWeightingState`.

    References:
      Lin, Ye, Xu, Shi, Zhang, Kwok, *Reasonable Effectiveness of Random
      Weighting: A Litmus Test for Multi-Task Learning*, TMLR 2022,
      https://arxiv.org/abs/2111.10603; TorchJD's ``torchjd.aggregation.Random``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    start = _validation.initial_key(seed, key)

    def init_fn(params: PyTree) -> RandomWeightingState:
        scalar = _validation.scalar_dtype(params)
        return RandomWeightingState(
            shared=resolve_layout(mask, params),
            weights=jnp.zeros([num_tasks], scalar),
            key=start,
        )

    def update_fn(updates: PyTree, state: RandomWeightingState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        next_key, draw_key = jax.random.split(state.key)
        draw = jax.random.normal(draw_key, [num_tasks], state.weights.dtype)
        weights = random_weighting_weights(draw)
        out = merge(combine(shared, weights), heads)
        return out, RandomWeightingState(shared=state.shared, weights=weights, key=next_key)

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["RandomWeightingState", "random_weighting", "random_weighting_weights"]
