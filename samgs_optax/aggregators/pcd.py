"""PCD (Varam et al. 2026): Priority-Constrained Descent, a primary objective first."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.aggregators._solvers import nnls_gram
from samgs_optax.gramian import combine, pow2_scale, scaled_gramian

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def pcd_qp_weights(g: jax.Array, tau: float | jax.Array) -> jax.Array:
    r"""Weights :math:`(1, \mu_2, \dots, \mu_K)` of PCD's projection, for a (normalised) Gramian.

    Solves :math:`\min_d \tfrac12\|d - g_1\|^2` subject to
    :math:`g_j^\top d \ge \tau_j \|g_j\|^2` for :math:`j \ge 2`. Its solution is
    :math:`d = g_1 + \sum_{j\ge2} \mu_j g_j` with the multipliers
    :math:`\mu \ge 0` minimising the dual
    :math:`\tfrac12 \mu^\top G_{ss} \mu - b^\top \mu`,
    :math:`b_j = \tau_j G_{jj} - G_{j1}` (:math:`G_{ss}` the Gramian of the
    secondary gradients): a non-negative least squares problem in Gram form,
    solved exactly by :func:`~samgs_optax.aggregators._solvers.nnls_gram`.
    TorchJD solves the same problem with Goldfarb and Idnani's dual active-set
    method; both give the unique minimiser.

    When the constraints cannot all hold (e.g. two exactly opposite secondary
    gradients, :math:`K \ge 3`: the dual is unbounded, the solver meets a
    singular system or stops at a point that violates a constraint), the
    result is :math:`e_1`: the constraints are dropped, as in TorchJD.

    Args:
      g: (K, K) Gramian, the primary objective first.
      tau: scalar or (K - 1,) fractions in [0, 1].
    """
    k = g.shape[0]
    dtype = g.dtype
    e1 = (jnp.arange(k) == 0).astype(dtype)
    gs = g[1:, 1:]
    taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (k - 1,))
    b = taus * jnp.diagonal(gs) - g[1:, 0]
    mu, converged = nnls_gram(gs, -b)
    # The KKT conditions to a tolerance relative to the Gramian's scale (TorchJD's
    # stop test is 1e-9 times the largest diagonal entry; this is looser only by rounding).
    scale = jnp.max(jnp.abs(jnp.diagonal(g)))
    tol = 1e-6 * scale + 8 * k * jnp.finfo(dtype).eps * (_mv(jnp.abs(gs), jnp.abs(mu)) + jnp.abs(b))
    slack = _mv(gs, mu) - b
    ok = converged & jnp.all(jnp.isfinite(mu)) & jnp.all(slack >= -tol)
    mu = jnp.maximum(jnp.where(ok, mu, 0), 0)
    return jnp.where(ok, jnp.concatenate([jnp.ones([1], dtype), mu]), e1)


class PCDState(NamedTuple):
    """State of :func:`pcd`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      count: number of steps taken (int32), for the bias correction.
      sq_norm_ema: (K,) moving average :math:`v` of the squared task norms
        :math:`\\|g_i\\|^2` (before bias correction), up to the power of two
        ``ema_log2``: :math:`v = 2^e\\,` ``sq_norm_ema`` (zeros at init).
      ema_log2: the even int32 exponent :math:`e`; 0 (``sq_norm_ema`` in true
        squared units) unless the gradients were ever out of float range
        (see :func:`~samgs_optax.gramian.scaled_gramian`).
      weights: task weights of the last step, shape (K,) (diagnostic).
    """

    shared: PyTree
    count: chex.Array
    sq_norm_ema: chex.Array
    ema_log2: chex.Array
    weights: chex.Array


def pcd_weights(
    g: jax.Array,
    sq_norm_ema: jax.Array,
    count: jax.Array | int,
    *,
    tau: float | jax.Array = 0.02,
    beta: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    log2_scale: jax.Array | int = 0,
    ema_log2: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""One PCD step on the Gramian: ``(weights, new_sq_norm_ema, new_ema_log2)``.

    With :math:`v \leftarrow \beta v + (1-\beta)\,\mathrm{diag}\,G` (the moving
    average of the squared norms, ``count`` steps before this one),
    :math:`\hat v = v / (1 - \beta^{n})` (:math:`n` = ``count + 1``) and the
    scales :math:`s_i = 1/\sqrt{\hat v_i + \epsilon}` (0 where that is infinite),
    the normalised gradients :math:`\tilde g_i = s_i g_i` give
    :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j`
    (:func:`pcd_qp_weights` on :math:`\tilde G = \mathrm{diag}(s)\, G\,
    \mathrm{diag}(s)`), rescaled to the norm of :math:`g_1`:
    :math:`w = \mu \odot s\, \|g_1\| / \|\tilde d\|`. The update is zero when
    :math:`g_1 = 0` or when :math:`\tilde d` is zero up to rounding
    (:math:`\|\tilde d\|^2 \le 10\epsilon_{mach} (\sum_i |\mu_i| \|\tilde g_i\|)^2`).
    A non-finite Gramian gives NaN weights and leaves the average unchanged.

    Scale: ``g`` may be :math:`2^{-t} G` (:func:`~samgs_optax.gramian.scaled_gramian`,
    ``log2_scale`` :math:`= t`) and the average is carried as
    :math:`v = 2^e\,` ``sq_norm_ema`` (``ema_log2`` :math:`= e`, even), with
    :math:`e` raised to :math:`t` when :math:`t > e` (both 0 while the Gramian is
    in range: then the arithmetic is exactly the plain one), so that squared
    norms beyond the float range neither overflow nor underflow the average.
    """
    k = g.shape[0]
    dtype = g.dtype
    t = jnp.asarray(log2_scale, jnp.int32)
    e_old = jnp.asarray(ema_log2, jnp.int32)
    finite = jnp.all(jnp.isfinite(g))
    g = jnp.where(finite, g, 0)
    sq_hat = jnp.diagonal(g)
    e = jnp.where(jnp.asarray(count) == 0, t, jnp.maximum(e_old, t))
    ema = beta * pow2_scale(sq_norm_ema, e_old - e) + (1 - beta) * pow2_scale(sq_hat, t - e)
    n = jnp.asarray(count, dtype) + 1
    debiased = ema / (1 - jnp.asarray(beta, dtype) ** n)
    root = jnp.sqrt(debiased + pow2_scale(jnp.asarray(eps, dtype), -e))  # sqrt(v^ + eps) 2^(-e/2)
    inv = jnp.where(root > 0, 1 / jnp.where(root > 0, root, 1), 0)
    scales_hat = pow2_scale(inv, (t - e) // 2)  # s * 2^(t/2): s_i s_j G = s^_i s^_j g
    g_norm = g * jnp.outer(scales_hat, scales_hat)
    mu = pcd_qp_weights(g_norm, tau)
    d_sq = jnp.dot(mu, _mv(g_norm, mu), precision=_HIGHEST)
    magnitude = _mv(jnp.abs(mu), jnp.sqrt(jnp.maximum(jnp.diagonal(g_norm), 0))) ** 2
    nonzero = (sq_hat[0] > 0) & (d_sq > 10 * jnp.finfo(dtype).eps * magnitude)
    ratio = jnp.sqrt(sq_hat[0] / jnp.where(nonzero, d_sq, 1))  # ||g_1|| / ||d~||, in units of g
    weights = jnp.where(nonzero, mu * scales_hat * ratio, 0)  # mu s ||g_1|| / ||d~||
    weights = jnp.where(finite, weights, jnp.full([k], jnp.nan, dtype))
    return weights, jnp.where(finite, ema, sq_norm_ema), jnp.where(finite, e, e_old)


def pcd(
    num_tasks: int,
    *,
    tau: float | chex.Array = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""PCD: follows the first task's gradient, guaranteeing every other task some progress.

    Task 0 is the primary objective. With :math:`\tilde g_i = s_i g_i` the
    gradients normalised by a bias-corrected moving average of their squared
    norms (:math:`s_i = 1/\sqrt{\hat v_i + \epsilon}`, decay :math:`\beta`),

    .. math::

        \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2
        \quad\text{s.t.}\quad \tilde g_j^\top d \ge \tau \|\tilde g_j\|^2,\; j \ge 2,

    and the update is :math:`\tilde d` rescaled to :math:`\|g_1\|` (zero if
    :math:`g_1 = 0`; :math:`g_1` itself if the constraints are infeasible).
    Solved exactly on the Gramian (:func:`pcd_weights`). Equal to TorchJD's
    ``PCD(tau, beta, eps)``.

    Args:
      num_tasks: K >= 2.
      tau: the fraction of normalised first-order progress each secondary
        task is guaranteed, in [0, 1]: a scalar or one per secondary task
        (shape (K - 1,)) (default 0.02).
      beta: decay of the squared-norm average, in [0, 1) (default 0.999).
      eps: added to the average before the inverse square root (default 1e-8,
        absolute, in squared gradient units).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PCDState`.

    References:
      Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained
      Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026,
      https://openreview.net/forum?id=HT01yGHLEt; TorchJD's ``PCD``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if isinstance(tau, (list, tuple)) or getattr(tau, "ndim", 0) == 1:
        tau_arr = jnp.asarray(tau)
        if tau_arr.shape != (num_tasks - 1,):
            raise ValueError(
                f"tau must be a scalar or have shape ({num_tasks - 1},), got {tau_arr.shape}."
            )
        if not isinstance(tau_arr, jax.core.Tracer) and not bool(
            jnp.all((tau_arr >= 0) & (tau_arr <= 1))
        ):
            raise ValueError(f"tau must be in [0, 1], got {tau}.")
        tau = tau_arr
    else:
        _validation.check_interval("tau", tau, 0.0, 1.0, closed_high=True)
    _validation.check_interval("beta", beta, 0.0, 1.0, closed_high=False)
    _validation.check_interval("eps", eps, 0.0, float("inf"), closed_high=True)

    def init_fn(params: PyTree) -> PCDState:
        scalar = _validation.scalar_dtype(params)
        return PCDState(
            shared=resolve_layout(mask, params),
            count=jnp.zeros([], jnp.int32),
            sq_norm_ema=jnp.zeros([num_tasks], scalar),
            ema_log2=jnp.zeros([], jnp.int32),
            weights=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(updates: PyTree, state: PCDState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.weights.dtype
        g_hat, log2_scale = scaled_gramian(shared, scalar)
        weights, ema, ema_log2 = pcd_weights(
            g_hat,
            state.sq_norm_ema,
            state.count,
            tau=tau,
            beta=beta,
            eps=eps,
            log2_scale=log2_scale,
            ema_log2=state.ema_log2,
        )
        weights = weights.astype(scalar)
        out = merge(combine(shared, weights), heads)
        new_state = PCDState(
            shared=state.shared,
            count=optax.safe_increment(state.count),
            sq_norm_ema=ema.astype(scalar),
            ema_log2=ema_log2,
            weights=weights,
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
