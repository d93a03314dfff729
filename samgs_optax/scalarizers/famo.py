"""FAMO (Liu et al. 2023): balanced loss decrease from the loss values alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax.scalarizers._base import (
    InitFn,
    ScalarizeFn,
    ScalarizeResult,
    check_losses,
    check_positive,
    check_vector,
    num_tasks_checked,
    state_dtype,
    value_and_weights,
)

EPSILON = 1e-8  # added to L - b before the logarithm, as the authors and TorchJD


class FAMOState(NamedTuple):
    """State of :func:`famo`.

    Attributes:
      logits: (K,) the task-weighting logits :math:`w` (:math:`z = \\mathrm{softmax}(w)`).
      prev_losses: (K,) the losses of the last ``scalarize`` call (detached),
        which the next ``update`` compares against.
      has_prev: bool, whether ``scalarize`` has been called (``update`` is a
        no-op before).
      opt_state: the state of the logits' Adam (with L2 weight decay).
    """

    logits: chex.Array
    prev_losses: chex.Array
    has_prev: chex.Array
    opt_state: optax.OptState


class FAMOScalarizer(NamedTuple):
    """:func:`famo`'s functions: ``init`` and ``scalarize`` as in
    :class:`~samgs_optax.scalarizers.Scalarizer`, and ``update(state, new_losses)
    -> state``, to call after the model step with the losses recomputed on the
    same batch."""

    init: InitFn
    scalarize: ScalarizeFn
    update: Callable[[FAMOState, chex.Array], FAMOState]


def famo(
    num_tasks: int,
    *,
    min_losses: chex.ArrayLike | None = None,
    lr: float = 0.025,
    weight_decay: float = 1e-3,
) -> FAMOScalarizer:
    r"""FAMO: fast adaptive multitask optimisation.

    ``scalarize`` returns

    .. math::

      \text{total} = \sum_k \frac{z_k}{c} \log(L_k - b_k + \epsilon), \qquad
      z = \mathrm{softmax}(w), \qquad
      c = \sum_k \frac{z_k}{L_k - b_k + \epsilon},

    with :math:`z` and :math:`c` detached, so the weights
    :math:`z_k / (c\,(L_k - b_k + \epsilon))` are positive and sum to 1 (the
    model's update is a convex combination of the task gradients).
    :math:`\epsilon = 10^{-8}`; the losses must stay above :math:`b`
    (not checked).

    The logits :math:`w` are not learned through that total: after the model
    step, ``update(state, new_losses)`` (``new_losses`` recomputed on the same
    batch) takes one Adam step (``lr``, L2 ``weight_decay`` added to the
    gradient, betas (0.9, 0.999), eps 1e-8, as ``torch.optim.Adam``) on
    :math:`w` along

    .. math::

      \nabla_w = J_{\mathrm{softmax}}(w)^\top \delta, \qquad
      \delta_k = \log(L_k^{\text{before}} - b_k + \epsilon)
                - \log(L_k^{\text{after}} - b_k + \epsilon),

    where :math:`L^{\text{before}}` are the losses of the last ``scalarize``
    call (kept in the state). Called before any ``scalarize``, ``update``
    changes nothing (TorchJD raises).

    Equals TorchJD's ``scalarization.FAMO(K, min_losses, lr, weight_decay)``
    (``forward`` then ``update``), itself adapted from the authors' code.

    Args:
      num_tasks: K >= 2.
      min_losses: the (K,) lower bounds :math:`b` (default 0).
      lr: the logits' Adam learning rate (the paper: 0.025).
      weight_decay: L2 coefficient on the logits (the paper's Algorithm 2 and
        TorchJD: 1e-3; the authors' code uses 1e-5).

    State: :class:`FAMOState` ``(logits, prev_losses, has_prev, opt_state)``.

    Reference:
      Liu, Feng, Stone, Liu, *FAMO: Fast Adaptive Multitask Optimization*,
      NeurIPS 2023, https://arxiv.org/abs/2306.03792
    """
    num_tasks = num_tasks_checked(num_tasks)
    check_positive("lr", lr, strict=False)
    check_positive("weight_decay", weight_decay, strict=False)
    bounds = check_vector("min_losses", min_losses, num_tasks)
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.scale_by_adam(), optax.scale(-lr)
    )

    def shifted(losses: jax.Array) -> jax.Array:
        b = 0.0 if bounds is None else bounds.astype(losses.dtype)
        return losses - b + EPSILON

    def init_fn(losses: chex.ArrayLike | None = None) -> FAMOState:
        dtype = state_dtype(losses, num_tasks)
        logits = jnp.zeros([num_tasks], dtype)
        return FAMOState(
            logits=logits,
            prev_losses=jnp.ones([num_tasks], dtype),
            has_prev=jnp.zeros([], bool),
            opt_state=optimizer.init(logits),
        )

    def scalarize_fn(losses: chex.Array, state: FAMOState) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        z = jax.lax.stop_gradient(jax.nn.softmax(state.logits)).astype(losses.dtype)

        def total_fn(v: jax.Array) -> jax.Array:
            d = shifted(v)
            c = jax.lax.stop_gradient(jnp.sum(z / d))
            return jnp.sum(z / c * jnp.log(d))

        total, weights = value_and_weights(total_fn, losses)
        new_state = state._replace(
            prev_losses=jax.lax.stop_gradient(losses).astype(state.prev_losses.dtype),
            has_prev=jnp.ones([], bool),
        )
        return total, (weights, new_state)

    def update_fn(state: FAMOState, new_losses: chex.Array) -> FAMOState:
        new_losses = jax.lax.stop_gradient(check_losses(new_losses, num_tasks))
        dtype = state.logits.dtype
        delta = jnp.log(shifted(state.prev_losses)) - jnp.log(shifted(new_losses.astype(dtype)))
        _, vjp = jax.vjp(jax.nn.softmax, state.logits)
        (grad,) = vjp(delta)
        step, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        logits = optax.apply_updates(state.logits, step)
        keep = state.has_prev
        return FAMOState(
            logits=jnp.where(keep, logits, state.logits),
            prev_losses=state.prev_losses,
            has_prev=state.has_prev,
            opt_state=jax.tree.map(
                lambda new, old: jnp.where(keep, new, old), opt_state, state.opt_state
            ),
        )

    return FAMOScalarizer(init_fn, scalarize_fn, update_fn)


__all__ = ["EPSILON", "FAMOScalarizer", "FAMOState", "famo"]
