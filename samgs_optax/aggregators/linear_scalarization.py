"""Linear scalarisation: the plain sum (or mean) of the task gradients."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import GramianWeightingState, combine


def linear_scalarization(
    num_tasks: int, *, reduction: Literal["sum", "mean"] = "sum", mask: Mask = None
) -> optax.GradientTransformation:
    r"""Linear scalarisation (LS): :math:`u = \sum_k g_k` (or :math:`\frac1K \sum_k g_k`).

    The gradient of the summed (or averaged) loss, the usual baseline. It needs
    no Gramian.

    Args:
      num_tasks: K >= 2.
      reduction: ``"sum"`` (default, TorchJD's ``Sum``) or ``"mean"`` (TorchJD's ``Mean``).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`: shared leaves
        get the sum (or mean), task-specific leaves the plain sum (as in every
        aggregator of this package).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~samgs_optax.gramian.GramianWeightingState` (weights all 1 or 1/K).
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    value = 1.0 if reduction == "sum" else 1.0 / num_tasks

    def init_fn(params):
        scalar = _validation.scalar_dtype(params)
        return GramianWeightingState(
            shared=resolve_layout(mask, params), weights=jnp.full([num_tasks], value, scalar)
        )

    def update_fn(updates, state, params=None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        out = merge(combine(shared, state.weights), heads)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["linear_scalarization"]
