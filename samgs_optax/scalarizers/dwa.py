"""Dynamic weight average (DWA, Liu et al. 2019): weights from the last two epochs' loss ratios.

Per epoch by default (the paper, TorchJD); ``window=W`` gives the per-step sliding-window form
of the Nash-MTL, FAMO and SAM-GS authors' trainers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from samgs_optax.scalarizers._base import (
    InitFn,
    ScalarizeFn,
    ScalarizeResult,
    check_losses,
    check_positive,
    num_tasks_checked,
    state_dtype,
    value_and_weights,
)


class DWAState(NamedTuple):
    """State of :func:`dwa`.

    Attributes:
      loss_sum: (K,) sum of the current epoch's losses so far (detached).
      num_batches: int32, the number of ``scalarize`` calls in the current epoch.
      averages: (2, K) the average losses of the two last finished epochs,
        older first (meaningful once ``num_averages`` says so).
      num_averages: int32 in {0, 1, 2}, how many finished epochs ``averages`` holds.
    """

    loss_sum: chex.Array
    num_batches: chex.Array
    averages: chex.Array
    num_averages: chex.Array


class DWAWindowState(NamedTuple):
    """State of :func:`dwa` with ``window=W`` (the per-step form).

    Attributes:
      costs: (2W, K) the last 2W losses (detached), oldest first; starts as ones.
      num_steps: int32, the number of ``scalarize`` calls so far.
    """

    costs: chex.Array
    num_steps: chex.Array


class DWAScalarizer(NamedTuple):
    """:func:`dwa`'s functions: ``init`` and ``scalarize`` as in
    :class:`~samgs_optax.scalarizers.Scalarizer`, and ``end_epoch(state) -> state``,
    to call once at the end of every epoch (it closes the epoch's average)."""

    init: InitFn
    scalarize: ScalarizeFn
    end_epoch: Callable[[DWAState], DWAState]


def dwa(num_tasks: int, *, temperature: float = 2.0, window: int | None = None) -> DWAScalarizer:
    r"""Dynamic weight average: :math:`\sum_k \lambda_k L_k` with

    .. math::

      \lambda_k = \frac{K \exp(r_k / T)}{\sum_i \exp(r_i / T)}, \qquad
      r_k = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},

    :math:`\bar L(t)` being the losses averaged over the calls of epoch
    :math:`t`. The weights (detached; they depend on past epochs only) sum to K,
    and are all 1 until two epochs have ended. Every ``scalarize`` call adds the
    (detached) losses to the epoch's sum; ``end_epoch(state)``, called once per
    epoch, turns the sum into that epoch's average and keeps the last two (an
    epoch without calls changes nothing).

    Equals TorchJD's ``scalarization.DWA(temperature)`` (its ``step()`` is
    ``end_epoch``).

    **Per-step form** (``window=W``), the ``DynamicWeightAverage`` of the
    Nash-MTL, FAMO and SAM-GS authors' trainers (their ``iteration_window``,
    25 in their configs): the state keeps the last :math:`2W` loss vectors in a
    first-in first-out buffer that starts filled with ones. Every call first
    pushes the current (detached) losses, then, from the :math:`(W+2)`-th call
    on (their ``running_iterations > W``), uses

    .. math::

      r_k = \frac{\text{mean of the newest } W \text{ entries of task } k}
                 {\text{mean of the oldest } W \text{ entries of task } k}

    in the same :math:`\lambda`; before that the weights are 1. The total is
    still :math:`\sum_k \lambda_k L_k` (their trainers take the mean over
    tasks, :math:`\frac1K` of it: divide if you want their scale).
    ``end_epoch`` returns the state unchanged.

    Args:
      num_tasks: K >= 2.
      temperature: :math:`T > 0` (the paper: 2); larger is more uniform.
      window: ``None`` (default): the per-epoch form above. An int
        :math:`W \ge 1`: the per-step sliding-window form.

    State: :class:`DWAState` ``(loss_sum, num_batches, averages, num_averages)``;
    with ``window``, :class:`DWAWindowState` ``(costs, num_steps)``.

    Reference:
      Liu, Johns, Davison, *End-to-End Multi-Task Learning with Attention*,
      CVPR 2019, https://arxiv.org/abs/1803.10704
    """
    num_tasks = num_tasks_checked(num_tasks)
    check_positive("temperature", temperature)
    if window is not None:
        return _windowed(num_tasks, temperature, window)

    def init_fn(losses: chex.ArrayLike | None = None) -> DWAState:
        dtype = state_dtype(losses, num_tasks)
        return DWAState(
            loss_sum=jnp.zeros([num_tasks], dtype),
            num_batches=jnp.zeros([], jnp.int32),
            averages=jnp.ones([2, num_tasks], dtype),
            num_averages=jnp.zeros([], jnp.int32),
        )

    def scalarize_fn(losses: chex.Array, state: DWAState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        older, newer = state.averages[0], state.averages[1]
        rates = (newer / older).astype(losses.dtype)
        balanced = num_tasks * jax.nn.softmax(rates / temperature)
        w = jax.lax.stop_gradient(jnp.where(state.num_averages >= 2, balanced, 1.0))
        total, weights = value_and_weights(lambda v: jnp.sum(w * v), losses)
        new_state = state._replace(
            loss_sum=state.loss_sum + jax.lax.stop_gradient(losses).astype(state.loss_sum.dtype),
            num_batches=state.num_batches + 1,
        )
        return total, (weights, new_state)

    def end_epoch_fn(state: DWAState) -> DWAState:
        ended = state.num_batches > 0
        average = state.loss_sum / jnp.maximum(state.num_batches, 1).astype(state.loss_sum.dtype)
        rolled = jnp.stack([state.averages[1], average])
        return DWAState(
            loss_sum=jnp.zeros_like(state.loss_sum),
            num_batches=jnp.zeros_like(state.num_batches),
            averages=jnp.where(ended, rolled, state.averages),
            num_averages=jnp.where(
                ended, jnp.minimum(state.num_averages + 1, 2), state.num_averages
            ),
        )

    return DWAScalarizer(init_fn, scalarize_fn, end_epoch_fn)


def _windowed(num_tasks: int, temperature: float, window: int) -> DWAScalarizer:
    """:func:`dwa`'s per-step sliding-window form (see its docstring)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}.")

    def init_fn(losses: chex.ArrayLike | None = None) -> DWAWindowState:
        dtype = state_dtype(losses, num_tasks)
        return DWAWindowState(
            costs=jnp.ones([2 * window, num_tasks], dtype), num_steps=jnp.zeros([], jnp.int32)
        )

    def scalarize_fn(losses: chex.Array, state: DWAWindowState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        current = jax.lax.stop_gradient(losses).astype(state.costs.dtype)
        costs = jnp.concatenate([state.costs[1:], current[None]], axis=0)
        rates = (jnp.mean(costs[window:], axis=0) / jnp.mean(costs[:window], axis=0)).astype(
            losses.dtype
        )
        balanced = num_tasks * jax.nn.softmax(rates / temperature)
        w = jax.lax.stop_gradient(jnp.where(state.num_steps > window, balanced, 1.0))
        total, weights = value_and_weights(lambda v: jnp.sum(w * v), losses)
        return total, (weights, DWAWindowState(costs=costs, num_steps=state.num_steps + 1))

    return DWAScalarizer(init_fn, scalarize_fn, lambda state: state)


__all__ = ["DWAScalarizer", "DWAState", "DWAWindowState", "dwa"]
