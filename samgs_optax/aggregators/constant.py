"""Constant weighting: a fixed linear combination of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import GramianWeightingState, combine

PyTree = Any


def _check_weights(weights: Any, num_tasks: int) -> None:
    shape = np.shape(weights)
    if shape != (num_tasks,):
        raise ValueError(
            f"weights must be a vector of num_tasks={num_tasks} values, got shape {shape}."
        )
    if not isinstance(weights, jax.core.Tracer):
        values = np.asarray(weights)
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise ValueError(f"weights must be finite numbers, got {weights!r}.")


def constant(
    num_tasks: int,
    *,
    weights: Sequence[float] | jax.Array | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""Constant weighting: :math:`u = \sum_k w_k g_k` with weights fixed at construction.

    The weights never change and do not look at the gradients, so no Gramian is
    computed. Equal to TorchJD's ``Constant(weights)``; with the default
    ``weights=None`` (TorchJD has no default) the weights are :math:`1/K`, i.e.
    TorchJD's ``Mean()``. ``Constant(torch.ones(K))`` is TorchJD's ``Sum()``
    (here also :func:`~samgs_optax.aggregators.linear_scalarization`).

    Size: for K copies of one gradient g the output is :math:`(\sum_k w_k)\, g`;
    :func:`samgs_optax.recipe` multiplies it by K exactly when the weights sum to
    1 (a weighted mean, the default) and leaves it alone otherwise (the weights
    then set the size).

    Args:
      num_tasks: K >= 2.
      weights: K finite numbers (any sign), or ``None`` for :math:`1/K` each.
        An array injected by ``optax.inject_hyperparams`` is accepted (its shape
        is checked, its values are not).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~samgs_optax.gramian.GramianWeightingState` (``weights`` = the
      constant weights, in the params' scalar dtype).

    References:
      TorchJD's ``torchjd.aggregation.Constant`` (Quinton & Rey,
      https://arxiv.org/abs/2406.16232).
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if weights is not None:
        _check_weights(weights, num_tasks)

    def init_fn(params: PyTree) -> GramianWeightingState:
        scalar = _validation.scalar_dtype(params)
        if weights is None:
            w = jnp.full([num_tasks], 1.0 / num_tasks, scalar)
        else:
            w = jnp.asarray(weights).astype(scalar)
        return GramianWeightingState(shared=resolve_layout(mask, params), weights=w)

    def update_fn(updates: PyTree, state: GramianWeightingState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        return merge(combine(shared, state.weights), heads), state

    return optax.GradientTransformation(init_fn, update_fn)


def constant_is_mean(*, weights: Any = None, **_: Any) -> bool:
    """Whether :func:`constant` with these weights is a (weighted) mean: weights summing to 1."""
    if weights is None:
        return True
    return bool(abs(float(np.sum(np.asarray(weights, np.float64))) - 1.0) <= 1e-6)


__all__ = ["constant", "constant_is_mean"]
