"""UPGrad (Quinton & Rey, 2024): average of each gradient projected onto the dual cone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax.aggregators._solvers import in_canonical_order, project_dual_cone
from samgs_optax.gramian import Mask, gramian_weighting, normalize_gramian, regularize_gramian


def upgrad_weights(
    g: jax.Array,
    *,
    norm_eps: float | jax.Array = 1e-4,
    reg_eps: float | jax.Array = 1e-4,
    log2_scale: jax.Array | int = 0,
) -> jax.Array:
    r"""UPGrad weights :math:`w = \sum_i \arg\min_{v \ge e_i/K} v^\top \tilde G v`.

    :math:`\tilde G = G / \operatorname{tr} G + \epsilon_r I` (zeros plus
    :math:`\epsilon_r I` when :math:`\operatorname{tr} G < \epsilon_n`), exactly
    as TorchJD's default ``QuadprogProjector``; each projection is an exact
    NNLS solve (:func:`~samgs_optax.aggregators._solvers.nnls_gram`).

    The weights depend on the scale of :math:`G` only through the absolute
    test :math:`\operatorname{tr} G < \epsilon_n`; for a scaled Gramian
    ``g`` :math:`= 2^{-t} G` (:func:`~samgs_optax.gramian.scaled_gramian`) pass
    ``log2_scale`` :math:`= t` and the test is made on the true trace. The projections are
    solved in :func:`~samgs_optax.aggregators._solvers.canonical_order`, so the weights do
    not depend on the order of the tasks (to the last bit, barring ties).
    """
    k = g.shape[0]
    rows = jnp.eye(k, dtype=g.dtype) / k

    def solve(gc: jax.Array) -> jax.Array:
        g_tilde = regularize_gramian(normalize_gramian(gc, norm_eps, log2_scale), reg_eps)
        return jnp.sum(jax.vmap(lambda u: project_dual_cone(g_tilde, u))(rows), axis=0)

    return in_canonical_order(solve, g)


def upgrad(
    num_tasks: int,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""UPGrad: projects each task gradient onto the dual cone of all of them, then averages.

    With :math:`\pi_J(x) = \arg\min_{y:\, Jy \ge 0} \|y - x\|` the projection
    onto the dual cone :math:`\{y : g_k^\top y \ge 0\ \forall k\}`, the update
    is :math:`\frac1K \sum_i \pi_J(g_i) = J^\top w` with :math:`w` from
    :func:`upgrad_weights` (Proposition 1 of the paper turns each projection
    into a K-dimensional quadratic program on the Gramian). It never conflicts
    with any task (:math:`g_k^\top u \ge 0`). Equal to TorchJD's ``UPGrad()``.

    Args:
      num_tasks: K >= 2.
      norm_eps: the Gramian is divided by its trace unless the trace is below
        this (absolute) value, in which case it is replaced by zeros and the
        update is the mean gradient (TorchJD default 1e-4). The trace is the
        true :math:`\sum_k \|g_k\|^2`, also when it under- or overflows float32.
      reg_eps: added to the normalised Gramian's diagonal (TorchJD default 1e-4).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
      https://arxiv.org/abs/2406.16232
    """
    _validation.check_interval("norm_eps", norm_eps, 0.0, float("inf"), closed_high=True)
    _validation.check_interval("reg_eps", reg_eps, 0.0, float("inf"), closed_high=True)
    return gramian_weighting(
        num_tasks,
        lambda g, t: upgrad_weights(g, norm_eps=norm_eps, reg_eps=reg_eps, log2_scale=t),
        mask=mask,
        with_scale=True,
    )
