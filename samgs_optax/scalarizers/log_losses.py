"""Scalarizations of the log-losses: :func:`scale_invariant` and :func:`geometric_mean` (GLS)."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax.scalarizers._base import (
    Scalarizer,
    ScalarizeResult,
    check_losses,
    num_tasks_checked,
    value_and_weights,
)


def _stateless(num_tasks: int, total_fn: Callable[[jax.Array], jax.Array]) -> Scalarizer:
    def init_fn(losses: chex.ArrayLike | None = None) -> optax.EmptyState:
        if losses is not None:
            check_losses(losses, num_tasks)
        return optax.EmptyState()

    def scalarize_fn(losses: chex.Array, state: optax.EmptyState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        total, weights = value_and_weights(total_fn, losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


def scale_invariant(num_tasks: int) -> Scalarizer:
    r"""Scale-invariant loss (SI): :math:`\sum_k \log L_k` (weights :math:`1 / L_k`).

    Multiplying a task's loss by a constant only shifts the total, so every
    task's gradient enters as :math:`\nabla L_k / L_k`. The losses must be
    strictly positive (a zero gives :math:`-\infty`, a negative one NaN;
    nothing is checked, to stay jit-friendly). Stateless. Nothing is detached:
    the weights come from differentiating the logarithm.

    TorchJD has no class for it; it is the ``"si"`` baseline of the SAM-GS
    authors' trainer (as in the Nash-MTL and FAMO code they build on):
    ``torch.sum(torch.log(losses))``.

    Reference:
      Navon et al., *Multi-Task Learning as a Bargaining Game* (Nash-MTL),
      ICML 2022, https://arxiv.org/abs/2202.01017 (the SI baseline), and the
      SAM-GS authors' code, https://github.com/ThomBors/samgs
    """
    num_tasks = num_tasks_checked(num_tasks)
    return _stateless(num_tasks, lambda v: jnp.sum(jnp.log(v)))


def geometric_mean(num_tasks: int) -> Scalarizer:
    r"""Geometric loss strategy (GLS): :math:`\big(\prod_k L_k\big)^{1/K} = \exp\big(\frac1K
    \sum_k \log L_k\big)`.

    The weights are :math:`\partial\,\text{total}/\partial L_k = \text{total} /
    (K L_k)`: the SI direction rescaled by the current geometric mean. Nothing
    is detached. The losses must be non-negative: TorchJD raises on a negative
    one; here (jit-friendly) a negative loss gives NaN and a zero gives a total
    of 0 with infinite or NaN weights. Stateless.

    Equals TorchJD's ``scalarization.GeometricMean``.

    Reference:
      Chennupati, Sistu, Yogamani, Rawashdeh, *MultiNet++: Multi-Stream Feature
      Aggregation and Geometric Loss Strategy for Multi-Task Learning*, CVPR
      Workshops 2019, https://arxiv.org/abs/1904.08492
    """
    num_tasks = num_tasks_checked(num_tasks)
    return _stateless(num_tasks, lambda v: jnp.exp(jnp.mean(jnp.log(v))))


__all__ = ["geometric_mean", "scale_invariant"]
