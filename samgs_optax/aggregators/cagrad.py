"""CAGrad (Liu et al. 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax.aggregators._solvers import cagrad_path
from samgs_optax.gramian import Mask, gramian_weighting, normalize_gramian


def cagrad_weights(
    g: jax.Array,
    *,
    c: float | jax.Array = 0.5,
    norm_eps: float | jax.Array = 1e-4,
    rescale: Literal[0, 1, 2] = 0,
    log2_scale: jax.Array | int = 0,
) -> jax.Array:
    r"""CAGrad weights :math:`e + (r / \|J^\top w\|)\, w` on the trace-normalised Gramian.

    :math:`e = \mathbf 1/K`, :math:`r = c\,\|J^\top e\|`, :math:`w` the dual
    optimum :math:`\arg\min_{w\in\Delta} w^\top G e + r \|J^\top w\|`, all on
    :math:`G/\operatorname{tr} G` (TorchJD's ``normalize``). As in TorchJD, the
    weights are 0 when :math:`\|J^\top w\| < \epsilon_n` there (approximately
    Pareto-stationary), and also when :math:`\operatorname{tr} G < \epsilon_n`.
    ``rescale`` 1 divides by :math:`1 + c^2`, 2 by :math:`1 + c` (Liu et al.'s code).
    Only the trace test depends on the scale of :math:`G` (the dual-norm test
    is on :math:`G/\operatorname{tr} G`); for a scaled Gramian ``g``
    :math:`= 2^{-t} G` pass ``log2_scale`` :math:`= t` (see
    :func:`~samgs_optax.gramian.normalize_gramian`).
    """
    k = g.shape[0]
    g_n = normalize_gramian(g, norm_eps, log2_scale)
    y, _ = cagrad_path(g_n, c)
    e = jnp.full([k], 1.0 / k, g.dtype)
    total = jnp.sum(y)
    hp = jax.lax.Precision.HIGHEST
    vertex = (jnp.arange(k) == jnp.argmin(jnp.matmul(g_n, e, precision=hp))).astype(g.dtype)
    w = jnp.where(total > 0, y / jnp.where(total > 0, total, 1), vertex)
    rho = jnp.sqrt(jnp.maximum(jnp.matmul(w, jnp.matmul(g_n, w, precision=hp), precision=hp), 0))
    weights = jnp.where(rho >= norm_eps, e + y, 0)
    if rescale == 1:
        weights = weights / (1 + jnp.asarray(c, g.dtype) ** 2)
    elif rescale == 2:
        weights = weights / (1 + jnp.asarray(c, g.dtype))
    return weights


def cagrad(
    num_tasks: int,
    *,
    c: float = 0.5,
    norm_eps: float = 1e-4,
    rescale: Literal[0, 1, 2] = 0,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""CAGrad: the direction in a ball around the mean gradient that best helps the worst task.

    .. math::

      u = \arg\max_{d:\, \|d - g_0\| \le c \|g_0\|} \ \min_k g_k^\top d,
      \qquad g_0 = \tfrac1K \textstyle\sum_k g_k,

    computed through its dual on the Gramian and solved exactly by
    :func:`~samgs_optax.aggregators._solvers.cagrad_path` (TorchJD and the
    authors call a generic solver: cvxpy/Clarabel, scipy SLSQP). :math:`c = 0`
    gives the mean gradient. Equal to TorchJD's ``CAGrad(c)``.

    Args:
      num_tasks: K >= 2.
      c: radius of the ball relative to :math:`\|g_0\|`, :math:`c \ge 0`. TorchJD
        has no default; 0.5 is what the SAM-GS authors' configurations use
        (``alpha: 0.5``), Liu et al. use 0.4 on NYU-v2 and CityScapes.
      norm_eps: threshold on the true (absolute) trace of the Gramian and on the
        dual norm on the trace-normalised Gramian, below which the update is 0
        (TorchJD default 1e-4).
      rescale: 0 (default, as TorchJD), 1 to divide by :math:`1+c^2`, 2 by :math:`1+c`.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` (state
      :class:`~samgs_optax.gramian.GramianWeightingState`). With
      ``optax.inject_hyperparams`` pass ``static_args=("num_tasks", "rescale")``;
      ``c`` and ``norm_eps`` may then be injected or scheduled.

    References:
      Liu, Liu, Jin, Stone, Liu, *Conflict-Averse Gradient Descent for
      Multi-task Learning*, NeurIPS 2021, https://arxiv.org/abs/2110.14048
    """
    _validation.check_interval("c", c, 0.0, float("inf"), closed_high=True)
    _validation.check_interval("norm_eps", norm_eps, 0.0, float("inf"), closed_high=True)
    if rescale not in (0, 1, 2):
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}.")
    return gramian_weighting(
        num_tasks,
        lambda g, t: cagrad_weights(g, c=c, norm_eps=norm_eps, rescale=rescale, log2_scale=t),
        mask=mask,
        with_scale=True,
    )
