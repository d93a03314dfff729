"""Nash-MTL (Navon et al. 2022): multi-task learning as a bargaining game."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.aggregators._solvers import bargaining, bargaining_residual
from samgs_optax.gramian import combine, pow2_scale, scaled_gramian

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      count: number of steps taken (int32).
      alpha: the last bargaining solution :math:`\\alpha` (before the norm
        clip), reused between solves and as the next warm start; starts at ones.
      weights: task weights applied at the last step (after the clip), shape (K,).
      residual: :math:`\\max_i |\\alpha_i (G\\alpha)_i - 1|` at the last solve (diagnostic).
    """

    shared: PyTree
    count: chex.Array
    alpha: chex.Array
    weights: chex.Array
    residual: chex.Array


def nash_mtl_weights(
    g: jax.Array,
    alpha0: jax.Array,
    *,
    optim_niter: int = 20,
    tol: float = 1e-5,
    log2_scale: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    r"""Solves :math:`G\alpha = 1/\alpha` for the Gramian ``g``, warm-started at ``alpha0``.

    Solved on :math:`\hat G = G / \|G\|_F` (as the authors normalise) by
    :func:`~samgs_optax.aggregators._solvers.bargaining`, then mapped back:
    :math:`\alpha = \hat\alpha / \sqrt{\|G\|_F}` solves the original equation.
    Returns ``(alpha, residual)`` with the residual measured on :math:`\hat G`
    (the equation is scale-free: :math:`\alpha_i (G\alpha)_i = \hat\alpha_i (\hat G\hat\alpha)_i`).
    An all-zero Gramian returns ``alpha0`` unchanged.

    :math:`\alpha` is in inverse gradient units (it scales as :math:`1/\sqrt c`
    when :math:`G` scales as :math:`c`). For a scaled Gramian ``g``
    :math:`= 2^{-t} G` (:func:`~samgs_optax.gramian.scaled_gramian`, :math:`t`
    even) pass ``log2_scale`` :math:`= t`: ``alpha0`` and the result are then
    those of the true :math:`G`, :math:`\alpha = 2^{-t/2} \alpha_{\hat G}`.
    """
    half = jnp.asarray(log2_scale, jnp.int32) // 2
    big = jnp.max(jnp.abs(g))
    big = jnp.where(big > 0, big, 1)
    norm = big * jnp.sqrt(jnp.sum(jnp.square(g / big)))  # ||G||_F without overflow
    zero = ~(norm > 0)
    safe = jnp.where(zero, 1, norm)
    start = pow2_scale(alpha0, half) * jnp.sqrt(safe)
    alpha_hat, res = bargaining(g / safe, start, max_iter=optim_niter, tol=tol)
    alpha = jnp.where(zero, alpha0, pow2_scale(alpha_hat / jnp.sqrt(safe), -half))
    return alpha, jnp.where(zero, jnp.inf, res)


def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    tol: float = 1e-5,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""Nash-MTL: weights from the Nash bargaining solution of the tasks.

    The update is :math:`u = J^\top \alpha` with :math:`\alpha > 0` solving
    :math:`G \alpha = 1/\alpha`, i.e. :math:`g_i^\top u = 1/\alpha_i` for every
    task (each task's gain is inversely proportional to its weight), the
    unique Nash bargaining solution when the gradients are linearly independent
    (Navon et al., Theorem 5.4). Then, as in the authors' code,
    :math:`\|u\| = \sqrt K` is clipped to ``max_norm``.

    Stateful like the authors' ``NashMTL``: :math:`\alpha` is kept in the state,
    re-solved every ``update_weights_every`` steps (reused, with the current
    gradients, in between) and the previous :math:`\alpha` is the warm start.
    The authors solve with a sequence of convex programs (cvxpy/ECOS,
    ``optim_niter`` of them, with a stop test on :math:`\|\hat G\alpha - 1/\alpha\|
    < 10^{-3}`); here it is solved in JAX by Newton's method on a
    self-concordant function (:func:`~samgs_optax.aggregators._solvers.bargaining`),
    with at most ``optim_niter`` Newton steps (about 10 reach float32
    precision from a cold start), stopping once
    :math:`\max_i |\alpha_i (G\alpha)_i - 1| \le` ``tol``.

    Scale: for gradients :math:`c J`, :math:`\alpha` scales as :math:`1/c`, so the
    unclipped update :math:`J^\top\alpha` (of norm :math:`\sqrt K`) does not
    depend on :math:`c`, and the clip compares the true norm with ``max_norm``.
    The Gramian comes from :func:`~samgs_optax.gramian.scaled_gramian`, so this
    holds also when :math:`G` would under- or overflow in float32; ``state.alpha``
    is in the true units (as long as :math:`1/\|g_k\|` is representable).

    Args:
      num_tasks: K >= 2.
      max_norm: clip of the update's (shared) norm; 0 disables it (default 1.0).
      update_weights_every: re-solve every this many steps (default 1).
      optim_niter: maximum Newton steps per solve (default 20).
      tol: stopping tolerance on the bargaining residual
        :math:`\max_i |\alpha_i (G\alpha)_i - 1|` (default 1e-5). In float32
        the residual reached is ~1e-7 at K = 2 and 1e-7 to 3e-5 at K = 10
        (it grows with the Gramian's condition number); when ``tol`` is below
        that floor the solver simply runs ``optim_niter`` steps.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`NashMTLState`. With
      ``optax.inject_hyperparams`` pass ``static_args=("num_tasks",
      "update_weights_every", "optim_niter")``; ``max_norm`` and ``tol`` may be injected.

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, *Multi-Task
      Learning as a Bargaining Game*, ICML 2022, https://arxiv.org/abs/2202.01017
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("max_norm", max_norm, 0.0, float("inf"), closed_high=True)
    for name, value in (
        ("update_weights_every", update_weights_every),
        ("optim_niter", optim_niter),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    _validation.check_interval("tol", tol, 0.0, float("inf"), closed_high=True)

    def init_fn(params: PyTree) -> NashMTLState:
        scalar = _validation.scalar_dtype(params)
        return NashMTLState(
            shared=resolve_layout(mask, params),
            count=jnp.zeros([], jnp.int32),
            alpha=jnp.ones([num_tasks], scalar),
            weights=jnp.zeros([num_tasks], scalar),
            residual=jnp.full([], jnp.inf, scalar),
        )

    def update_fn(updates: PyTree, state: NashMTLState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.alpha.dtype
        g, log2_scale = scaled_gramian(shared, scalar)  # G = 2^t g
        half = log2_scale // 2
        solve = state.count % update_weights_every == 0
        alpha, res = jax.lax.cond(
            solve,
            lambda: nash_mtl_weights(
                g, state.alpha, optim_niter=optim_niter, tol=tol, log2_scale=log2_scale
            ),
            lambda: (state.alpha, bargaining_residual(g, pow2_scale(state.alpha, half))),
        )
        beta = pow2_scale(alpha, half)  # alpha in units of g: alpha' G alpha = beta' g beta
        quad = jnp.matmul(beta, jnp.matmul(g, beta, precision=_HIGHEST), precision=_HIGHEST)
        norm = jnp.sqrt(jnp.maximum(quad, 0))  # ||J^T alpha||
        clip = (max_norm > 0) & (norm > max_norm)
        weights = jnp.where(clip, alpha * (max_norm / jnp.where(clip, norm, 1)), alpha)
        out = merge(combine(shared, weights), heads)
        new_state = NashMTLState(
            shared=state.shared,
            count=optax.safe_increment(state.count),
            alpha=alpha,
            weights=weights,
            residual=res,
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
