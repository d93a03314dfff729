"""Random loss weighting (RLW, Lin et al. 2022): fresh random weights on every call."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from samgs_optax._validation import initial_key
from samgs_optax.scalarizers._base import (
    Scalarizer,
    ScalarizeResult,
    check_losses,
    check_vector,
    num_tasks_checked,
    value_and_weights,
)


class RandomState(NamedTuple):
    """State of :func:`random`: the PRNG key of the next draw."""

    key: chex.PRNGKey


def random(num_tasks: int, *, seed: int = 0, key: chex.PRNGKey | None = None) -> Scalarizer:
    r"""Random loss weighting: :math:`\sum_k \lambda_k L_k`, :math:`\lambda = \mathrm{softmax}(z)`.

    Every call draws :math:`z \sim \mathcal N(0, I_K)` (in the losses' dtype)
    from the key kept in the state, so the weights are positive, sum to 1 and
    are new at every step (Algorithm 2 of the paper: the normal draw followed by
    a softmax). The weights do not depend on the losses. ``scalarize(losses,
    state, noise=z)`` uses the given :math:`z` instead and leaves the state
    as it is (to replay draws made elsewhere).

    Equals TorchJD's ``scalarization.Random`` (``torch.randn`` then ``softmax``),
    with draws from JAX's PRNG instead of torch's.

    Args:
      num_tasks: K >= 2.
      seed: seed of the key kept in the state (ignored if ``key`` is given).
      key: a ``jax.random`` key to start from; the state carries it, so a run
        resumed from a checkpoint continues the same stream.

    State: :class:`RandomState` ``(key)``.

    Reference:
      Lin, Ye, Xu, Shi, Zhang, *Reasonable Effectiveness of Random Weighting: A
      Litmus Test for Multi-Task Learning*, TMLR 2022,
      https://arxiv.org/abs/2111.10603
    """
    num_tasks = num_tasks_checked(num_tasks)
    start = initial_key(seed, key)

    def init_fn(losses: chex.ArrayLike | None = None) -> RandomState:
        if losses is not None:
            check_losses(losses, num_tasks)
        return RandomState(key=start)

    def scalarize_fn(
        losses: chex.Array, state: RandomState, *, noise: chex.Array | None = None
    ) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        if noise is None:
            next_key, draw = jax.random.split(state.key)
            noise = jax.random.normal(draw, [num_tasks], losses.dtype)
            state = RandomState(key=next_key)
        else:
            noise = check_vector("noise", noise, num_tasks).astype(losses.dtype)
        w = jax.nn.softmax(jax.lax.stop_gradient(noise))
        total, weights = value_and_weights(lambda v: jnp.sum(w * v), losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


__all__ = ["RandomState", "random"]
