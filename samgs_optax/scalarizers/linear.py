"""Fixed linear scalarizations: :func:`mean`, :func:`sum` and :func:`constant`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax.scalarizers._base import (
    Scalarizer,
    ScalarizeResult,
    check_losses,
    check_vector,
    num_tasks_checked,
    value_and_weights,
)


def _fixed(num_tasks: int, weights_of) -> Scalarizer:
    """A stateless scalarizer ``sum_k w_k L_k`` with ``w = weights_of(dtype)``."""

    def init_fn(losses: chex.ArrayLike | None = None) -> optax.EmptyState:
        if losses is not None:
            check_losses(losses, num_tasks)
        return optax.EmptyState()

    def scalarize_fn(losses: chex.Array, state: optax.EmptyState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        w = weights_of(losses.dtype)
        total, weights = value_and_weights(lambda v: jnp.sum(w * v), losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


def mean(num_tasks: int) -> Scalarizer:
    r"""The mean of the task losses, :math:`\frac1K \sum_k L_k` (weights :math:`1/K`).

    Stateless (``optax.EmptyState``). Equals TorchJD's ``scalarization.Mean``.
    """
    num_tasks = num_tasks_checked(num_tasks)
    return _fixed(num_tasks, lambda dtype: jnp.full([num_tasks], 1.0 / num_tasks, dtype))


def sum(num_tasks: int) -> Scalarizer:  # noqa: A001 - the method's name
    r"""The sum of the task losses, :math:`\sum_k L_k` (weights 1): linear scalarization.

    Stateless (``optax.EmptyState``). Equals TorchJD's ``scalarization.Sum``.
    """
    num_tasks = num_tasks_checked(num_tasks)
    return _fixed(num_tasks, lambda dtype: jnp.ones([num_tasks], dtype))


def constant(num_tasks: int, *, weights: chex.ArrayLike) -> Scalarizer:
    r"""Fixed weights chosen by the user: :math:`\sum_k w_k L_k`.

    Stateless (``optax.EmptyState``). Equals TorchJD's
    ``scalarization.Constant(weights)``.

    Args:
      num_tasks: K >= 2.
      weights: the (K,) weights :math:`w` (any sign). Cast to the losses' dtype.
    """
    num_tasks = num_tasks_checked(num_tasks)
    w = check_vector("weights", weights, num_tasks)
    return _fixed(num_tasks, lambda dtype: jnp.asarray(jax.lax.stop_gradient(w), dtype))


__all__ = ["constant", "mean", "sum"]
