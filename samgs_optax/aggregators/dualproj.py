"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax.aggregators._solvers import in_canonical_order, project_dual_cone
from samgs_optax.gramian import Mask, gramian_weighting, normalize_gramian, regularize_gramian


def dualproj_weights(
    g: jax.Array,
    *,
    norm_eps: float | jax.Array = 1e-4,
    reg_eps: float | jax.Array = 1e-4,
    log2_scale: jax.Array | int = 0,
) -> jax.Array:
    r"""DualProj weights :math:`w = \arg\min_{v \ge \mathbf 1/K} v^\top \tilde G v`.

    :math:`\tilde G` and ``log2_scale`` as in
    :func:`~samgs_optax.aggregators.upgrad.upgrad_weights`, solved in the same canonical
    task order (weights independent of the order of the tasks).
    """
    k = g.shape[0]
    mean = jnp.full([k], 1.0 / k, g.dtype)

    def solve(gc: jax.Array) -> jax.Array:
        g_tilde = regularize_gramian(normalize_gramian(gc, norm_eps, log2_scale), reg_eps)
        return project_dual_cone(g_tilde, mean)

    return in_canonical_order(solve, g)


def dualproj(
    num_tasks: int,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""DualProj: projects the mean gradient onto the dual cone of the task gradients.

    :math:`u = \pi_J(\frac1K \sum_k g_k)`, the closest vector to the mean
    gradient that conflicts with no task (Equation 11 of GEM, Lopez-Paz &
    Ranzato 2017). Equal to TorchJD's ``DualProj()``.

    Args:
      num_tasks: K >= 2.
      norm_eps: threshold on the true (absolute) trace of the Gramian, below
        which the update is the mean gradient (TorchJD default 1e-4).
      reg_eps: ridge added to the normalised Gramian (TorchJD default 1e-4).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*,
      NeurIPS 2017; Quinton & Rey, https://arxiv.org/abs/2406.16232
    """
    _validation.check_interval("norm_eps", norm_eps, 0.0, float("inf"), closed_high=True)
    _validation.check_interval("reg_eps", reg_eps, 0.0, float("inf"), closed_high=True)
    return gramian_weighting(
        num_tasks,
        lambda g, t: dualproj_weights(g, norm_eps=norm_eps, reg_eps=reg_eps, log2_scale=t),
        mask=mask,
        with_scale=True,
    )
