"""Scalarizers with per-task parameters learned with the model: :func:`uw` and :func:`imtl_l`.

Their state *is* their parameters. Put it in the tree you differentiate and
step with your optimizer, next to the model's parameters::

    uw = samgs_optax.scalarizers.uw(K)
    params = {"net": net_params, "uw": uw.init()}

    def loss_fn(params, batch):
        total, (weights, _) = uw.scalarize(task_losses(params["net"], batch), params["uw"])
        return total, weights

    grads = jax.grad(loss_fn, has_aux=True)(params, batch)[0]  # grads["uw"].log_var too

``scalarize`` returns the state it was given (it changes nothing by itself).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from samgs_optax.scalarizers._base import (
    Scalarizer,
    ScalarizeResult,
    check_losses,
    num_tasks_checked,
    state_dtype,
    value_and_weights,
)


class UWState(NamedTuple):
    """State (and learnable parameters) of :func:`uw`: the log-variances :math:`s`, shape (K,)."""

    log_var: chex.Array


class IMTLLState(NamedTuple):
    """State (and learnable parameters) of :func:`imtl_l`: the log-scales :math:`s`, shape (K,)."""

    log_scale: chex.Array


def uw(num_tasks: int, *, init_log_var: float = 0.0) -> Scalarizer:
    r"""Uncertainty weighting (UW): :math:`\sum_k \tfrac12 e^{-s_k} L_k + \tfrac12 s_k`.

    :math:`s_k = \log \sigma_k^2` is a learned log-variance per task, kept in
    the state, which you differentiate and optimise jointly with the model (see
    the module docstring). Its gradient is :math:`\tfrac12 (1 - e^{-s_k} L_k)`,
    zero at :math:`s_k = \log L_k`. The weights of the losses are
    :math:`\tfrac12 e^{-s_k}`. Nothing is detached.

    Equals TorchJD's ``scalarization.UW(K)``, whose ``log_var`` parameter the
    user passes to the optimizer.

    Args:
      num_tasks: K >= 2.
      init_log_var: the initial :math:`s_k` (TorchJD and the paper: 0, uniform
        weights 1/2; LibMTL starts at -0.5).

    State: :class:`UWState` ``(log_var)``, learnable.

    Reference:
      Kendall, Gal, Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
      Losses for Scene Geometry and Semantics*, CVPR 2018,
      https://arxiv.org/abs/1705.07115
    """
    num_tasks = num_tasks_checked(num_tasks)

    def init_fn(losses: chex.ArrayLike | None = None) -> UWState:
        dtype = state_dtype(losses, num_tasks)
        return UWState(log_var=jnp.full([num_tasks], init_log_var, dtype))

    def scalarize_fn(losses: chex.Array, state: UWState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        s = state.log_var

        def total_fn(v: jax.Array) -> jax.Array:
            return jnp.sum(0.5 * jnp.exp(-s) * v + 0.5 * s)

        total, weights = value_and_weights(total_fn, losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


def imtl_l(num_tasks: int, *, init_log_scale: float = 0.0) -> Scalarizer:
    r"""IMTL-L, the loss-balancing half of IMTL: :math:`\sum_k e^{s_k} L_k - s_k`.

    :math:`s_k` is a learned log-scale per task, kept in the state, which you
    differentiate and optimise jointly with the model (see the module
    docstring). Its gradient is :math:`e^{s_k} L_k - 1`, zero when the scaled
    loss :math:`e^{s_k} L_k` is 1: every task's scaled loss is driven to the
    same value. The weights of the losses are :math:`e^{s_k}`. Nothing is
    detached. It is :math:`2\,\mathrm{UW}` at :math:`s = -s_{UW}`.

    Equals TorchJD's ``scalarization.IMTLL(K)``.

    Args:
      num_tasks: K >= 2.
      init_log_scale: the initial :math:`s_k` (TorchJD: 0, the plain sum).

    State: :class:`IMTLLState` ``(log_scale)``, learnable.

    Reference:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, *Towards Impartial
      Multi-task Learning*, ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr
    """
    num_tasks = num_tasks_checked(num_tasks)

    def init_fn(losses: chex.ArrayLike | None = None) -> IMTLLState:
        dtype = state_dtype(losses, num_tasks)
        return IMTLLState(log_scale=jnp.full([num_tasks], init_log_scale, dtype))

    def scalarize_fn(losses: chex.Array, state: IMTLLState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        s = state.log_scale

        def total_fn(v: jax.Array) -> jax.Array:
            return jnp.sum(jnp.exp(s) * v - s)

        total, weights = value_and_weights(total_fn, losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


__all__ = ["IMTLLState", "UWState", "imtl_l", "uw"]
