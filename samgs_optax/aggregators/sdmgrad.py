"""SDMGrad (Xiao et al. 2023): stochastic direction-oriented multi-objective gradient descent."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout
from samgs_optax.aggregators.modo import (
    _check_num_batches,
    cross_matrix,
    project_onto_simplex,
    split_batches,
)
from samgs_optax.gramian import combine, pow2_scale

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def sdmgrad_weights(
    a: jax.Array,
    w: jax.Array,
    *,
    lr: float | jax.Array = 10.0,
    momentum: float | jax.Array = 0.5,
    n_iter: int = 20,
    lambda_: float | jax.Array = 0.3,
    pref_vector: jax.Array | None = None,
    log2_scale: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    r"""SDMGrad's inner solve: ``(combined_weights, new_w)``.

    With :math:`\tilde w` the preference vector (default :math:`1/K`) and
    :math:`\hat A = A / (\bar s^2 + 10^{-8})`, :math:`\bar s` the mean of
    :math:`\sqrt{\max(A_{ii}, 0)}`, ``n_iter`` steps of projected SGD with heavy-ball
    momentum, warm-started at ``w``:

    .. math::

        v \leftarrow \mu v + \hat A (w + \lambda \tilde w),\qquad
        w \leftarrow \Pi_\Delta(w - \eta v)

    (:math:`v = 0` at first), then the weights :math:`(w + \lambda\tilde w)/(1 + \lambda)`.
    ``a`` may be :math:`2^{-t} A` (pass ``log2_scale`` :math:`= t`): the
    :math:`10^{-8}` is absolute (squared gradient units) and is scaled to match.
    """
    k = a.shape[0]
    dtype = a.dtype
    w_tilde = (
        jnp.full([k], 1 / k, dtype) if pref_vector is None else jnp.asarray(pref_vector, dtype)
    )
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0)))
    a = a / (scale * scale + pow2_scale(jnp.asarray(1e-8, dtype), -jnp.asarray(log2_scale)))
    shift = lambda_ * w_tilde

    def step(_, carry):
        w, v = carry
        v = momentum * v + jnp.matmul(a, w + shift, precision=_HIGHEST)
        return project_onto_simplex(w - lr * v), v

    w, _ = jax.lax.fori_loop(0, n_iter, step, (w.astype(dtype), jnp.zeros([k], dtype)))
    return (w + shift) / (1 + lambda_), w


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      w: the inner variable :math:`w` on the simplex, the next warm start; :math:`1/K` at init.
      weights: the task weights applied at the last step, shape (K,).
    """

    shared: PyTree
    w: chex.Array
    weights: chex.Array


def sdmgrad(
    num_tasks: int,
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: chex.Array | None = None,
    num_batches: int = 1,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""SDMGrad: MGDA's weights pulled towards a preference direction, solved stochastically.

    The weights solve :math:`\min_{w\in\Delta} \tfrac12 \|J^\top(w + \lambda\tilde
    w)\|^2` approximately, by ``n_iter`` projected momentum-SGD steps per
    training step on :math:`A = J_1 J_2^\top` (two independent mini-batches:
    an unbiased estimate of the Gramian), warm-started from the previous step
    (:func:`sdmgrad_weights`); the update is
    :math:`u = J_u^\top (w + \lambda\tilde w)/(1 + \lambda)`. Equal to TorchJD's
    ``SDMGradWeighting(lr, momentum, n_iter, lambda_, pref_vector)`` applied to
    :math:`A`, with its weights combining :math:`J_u`. Unlike MoDo, the step is
    scale-free (:math:`A` is normalised by its mean diagonal, up to the absolute
    :math:`10^{-8}`).

    Several batches in one step, as in :func:`~samgs_optax.modo`: with
    ``num_batches=B`` > 1 every leaf has shape (B, K, *param.shape)
    (``jax.tree.map(lambda *g: jnp.stack(g), grads_1, grads_2, grads_3)``);
    ``num_batches=1`` (default): the usual (K, ...) stack and :math:`A = JJ^\top`
    (biased); 2: :math:`A = J_1 J_2^\top`, :math:`J_u = (J_1 + J_2)/2`;
    3: :math:`A = J_1 J_2^\top`, :math:`J_u = J_3` (the paper's
    :math:`\xi, \xi', \zeta`).

    Args:
      num_tasks: K >= 2.
      lr: inner step size, > 0 (default 10.0).
      momentum: inner momentum, in [0, 1) (default 0.5).
      n_iter: inner steps per call, >= 1 (default 20, static).
      lambda_: pull towards the preference direction, >= 0 (default 0.3, the
        authors' experiments, LibMTL and TorchJD).
      pref_vector: (K,) :math:`\tilde w` (default uniform: the mean gradient).
      num_batches: 1, 2 or 3 (static).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`SDMGradState`.

    References:
      Xiao, Ban, Ji, *Direction-oriented Multi-objective Learning: Simple and
      Provable Stochastic Algorithms*, NeurIPS 2023, https://arxiv.org/abs/2305.18409;
      TorchJD's ``SDMGradWeighting``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    num_batches = _check_num_batches(num_batches)
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    _validation.check_interval("momentum", momentum, 0.0, 1.0, closed_high=False)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
    _validation.check_interval("lambda_", lambda_, 0.0, float("inf"), closed_high=True)
    if pref_vector is not None and np.shape(pref_vector) != (num_tasks,):
        raise ValueError(f"pref_vector has shape {np.shape(pref_vector)}, expected ({num_tasks},).")

    def init_fn(params: PyTree) -> SDMGradState:
        scalar = _validation.scalar_dtype(params)
        return SDMGradState(
            shared=resolve_layout(mask, params),
            w=jnp.full([num_tasks], 1 / num_tasks, scalar),
            weights=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(updates: PyTree, state: SDMGradState, params: PyTree = None):
        del params
        s1, s2, shared, heads = split_batches(updates, state.shared, num_tasks, num_batches)
        scalar = state.w.dtype
        a_hat, log2_scale = cross_matrix(s1, s2, scalar)
        weights, w = sdmgrad_weights(
            a_hat,
            state.w,
            lr=lr,
            momentum=momentum,
            n_iter=n_iter,
            lambda_=lambda_,
            pref_vector=pref_vector,
            log2_scale=log2_scale,
        )
        weights = weights.astype(scalar)
        out = merge(combine(shared, weights), heads)
        return out, SDMGradState(shared=state.shared, w=w.astype(scalar), weights=weights)

    return optax.GradientTransformation(init_fn, update_fn)
