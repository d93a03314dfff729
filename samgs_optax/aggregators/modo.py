"""MoDo (Chen et al. 2024): stochastic MGDA with task weights updated from two mini-batches."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import combine, pow2_scale, scaled_gramian

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def project_onto_simplex(y: jax.Array) -> jax.Array:
    r"""Euclidean projection of ``y`` (K,) onto the probability simplex.

    :math:`x = \max(y - \theta, 0)` with :math:`\theta = (\sum_{i \le r} y_{(i)} - 1)/r`,
    :math:`y_{(1)} \ge y_{(2)} \ge \dots` sorted, :math:`r` the first index with
    :math:`\theta_r > y_{(r+1)}` (:math:`\theta = (\sum_i y_i - 1)/K` if there is
    none) (Held, Wolfe & Crowder 1974; the same rule as the one TorchJD and the
    MoDo/SDMGrad authors use), computed on :math:`y - \max_i y_i`.
    """
    k = y.shape[0]
    # Shifted by its largest entry (the projection does not change when a constant is added
    # to every entry): exact there, so a huge y keeps its largest entry's 1 - 0 = 1.
    y = y - jnp.max(y)
    ordered = -jnp.sort(-y)
    theta = (jnp.cumsum(ordered) - 1) / jnp.arange(1, k + 1, dtype=y.dtype)
    hit = theta[:-1] > ordered[1:]
    first = jnp.argmax(hit)
    fallback = (jnp.sum(y) - 1) / k
    return jnp.maximum(y - jnp.where(jnp.any(hit), theta[first], fallback), 0)


def _check_num_batches(num_batches: Any) -> int:
    if (
        isinstance(num_batches, bool)
        or not isinstance(num_batches, int)
        or num_batches
        not in (
            1,
            2,
            3,
        )
    ):
        raise ValueError(f"num_batches must be 1, 2 or 3, got {num_batches!r}.")
    return num_batches


def split_batches(
    updates: PyTree, layout: PyTree, num_tasks: int, num_batches: int
) -> tuple[PyTree, PyTree, PyTree, PyTree]:
    """``(shared_1, shared_2, shared_update, heads_update)`` of (B, K, ...)-stacked gradients.

    B = 1: the usual (K, ...) stack, all three the same. B = 2: the weights come
    from batches 1 and 2, the update is their mean. B = 3: the update is batch 3.
    """
    if num_batches == 1:
        shared, heads = split(updates, layout, num_tasks)
        return shared, shared, shared, heads
    for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
        shape = getattr(leaf, "shape", ())
        if len(shape) < 2 or shape[0] != num_batches:
            name = jax.tree_util.keystr(path) or "<root>"
            raise ValueError(
                f"updates leaf {name} has shape {shape}: with num_batches={num_batches} every "
                f"leaf needs a leading batch axis of {num_batches}, then the task axis of "
                f"{num_tasks}."
            )
    parts = [
        split(jax.tree.map(lambda x, b=b: x[b], updates), layout, num_tasks)
        for b in range(num_batches)
    ]
    (s1, h1), (s2, h2) = parts[0], parts[1]
    if num_batches == 3:
        return s1, s2, parts[2][0], parts[2][1]
    mean = lambda a, b: (a + b) / 2  # noqa: E731
    return s1, s2, jax.tree.map(mean, s1, s2), jax.tree.map(mean, h1, h2)


def cross_matrix(first: PyTree, second: PyTree, dtype: Any) -> tuple[jax.Array, jax.Array]:
    r"""``(A_hat, t)``: :math:`A = J_1 J_2^\top = 2^t \hat A` (K x K), summed leaf by leaf.

    Both Jacobians are scaled by a common power of two, :math:`2^{-e}` with
    :math:`2^e` just above their largest entry, so that :math:`\hat A` neither
    under- nor overflows (:math:`t = 2e`). When ``first is second`` this is
    :func:`~samgs_optax.gramian.scaled_gramian` (the Gramian, :math:`t = 0` when in range).
    """
    if first is second:
        return scaled_gramian(first, dtype)
    ones = [x.reshape(x.shape[0], -1).astype(dtype) for x in jax.tree.leaves(first)]
    twos = [x.reshape(x.shape[0], -1).astype(dtype) for x in jax.tree.leaves(second)]
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(m)) for m in ones + twos]))
    usable = jnp.isfinite(big) & (big > 0)
    _, e = jnp.frexp(jnp.where(usable, big, 1))
    info = jnp.finfo(dtype)
    e = jnp.where(usable, jnp.clip(e, int(info.minexp), int(info.maxexp) - 2), 0).astype(jnp.int32)
    parts = [
        jnp.matmul(pow2_scale(a, -e), pow2_scale(b, -e).T, precision=_HIGHEST)
        for a, b in zip(ones, twos, strict=True)
    ]
    return sum(parts[1:], parts[0]), 2 * e


def modo_weights(
    a: jax.Array,
    lam: jax.Array,
    *,
    gamma: float | jax.Array = 0.1,
    rho: float | jax.Array = 0.1,
    log2_scale: jax.Array | int = 0,
) -> jax.Array:
    r"""One MoDo step, :math:`\Pi_\Delta(\lambda - \gamma (A\lambda + \rho\lambda))`.

    ``a`` is :math:`A = J_1 J_2^\top` from two independent mini-batches (an
    unbiased estimate of :math:`G = J J^\top`, so that :math:`A\lambda` is an
    unbiased estimate of the gradient of :math:`\tfrac12\|J^\top\lambda\|^2`),
    or :math:`2^{-t} A` with ``log2_scale`` :math:`= t`. The step is in the true
    units of :math:`A` (not scale-invariant); when :math:`\gamma A\lambda` is
    beyond the dtype's range it saturates (the step lands on a vertex of the
    simplex) instead of turning into NaN. :math:`\Pi_\Delta` is
    :func:`project_onto_simplex`.
    """
    drift = pow2_scale(jnp.matmul(a, lam, precision=_HIGHEST), log2_scale)  # A lambda, saturating
    y = lam - gamma * (drift + rho * lam)
    big = jnp.finfo(y.dtype).max / (4 * y.shape[0])
    return project_onto_simplex(jnp.clip(y, -big, big))


class MoDoState(NamedTuple):
    """State of :func:`modo`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      weights: the task weights :math:`\\lambda` applied at the last step, on the
        simplex, shape (K,); :math:`1/K` at init.
    """

    shared: PyTree
    weights: chex.Array


def modo(
    num_tasks: int,
    *,
    gamma: float = 0.1,
    rho: float = 0.1,
    num_batches: int = 1,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""MoDo: one projected stochastic-gradient step on the MGDA weights per step.

    .. math::

        \lambda \leftarrow
        \Pi_\Delta\big(\lambda - \gamma\,(J_1 J_2^\top \lambda + \rho\lambda)\big),
        \qquad u = J_u^\top \lambda,

    from :math:`\lambda = 1/K`, :math:`\Pi_\Delta` the projection onto the
    simplex (:func:`modo_weights`). :math:`J_1, J_2` are the task Jacobians on
    two **independent** mini-batches, so that :math:`J_1 J_2^\top\lambda` is an
    unbiased estimate of the gradient of :math:`\tfrac12\|J^\top\lambda\|^2`.

    Passing several batches in one step: with ``num_batches=B`` > 1 every leaf
    of the stacked gradients gets one more leading axis, of length B, before
    the task axis: shape (B, K, *param.shape). Build it with
    ``jax.tree.map(lambda *g: jnp.stack(g), grads_1, grads_2)``.

    * ``num_batches=1`` (default): the usual (K, ...) stack; :math:`A = J J^\top`
      is the Gramian of one batch (a biased estimate: usable, but without the
      paper's guarantee) and :math:`J_u = J`.
    * ``num_batches=2``: :math:`A = J_1 J_2^\top`, :math:`J_u = (J_1 + J_2)/2`
      (the paper's eq. 2.9b; the update of the mean of both batches' losses).
    * ``num_batches=3``: :math:`A = J_1 J_2^\top`, :math:`J_u = J_3` (the
      authors' ``three_grads`` and LibMTL's variant).

    Task-specific (masked) leaves get the plain task sum of :math:`J_u`.
    ``gamma`` and ``rho`` are absolute (the step is in the units of
    :math:`A`, squared gradients), as in TorchJD. Equal to TorchJD's
    ``MoDoWeighting(gamma, rho)`` applied to :math:`A`, with its weights combining :math:`J_u`.

    Args:
      num_tasks: K >= 2.
      gamma: step size of the weight update, > 0 (default 0.1).
      rho: :math:`\ell_2` regularisation, >= 0 (default 0.1).
      num_batches: 1, 2 or 3 (static), see above.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MoDoState`.

    Example::

        tx = samgs_optax.modo(3, num_batches=2)
        state = tx.init(params)
        grads = jax.tree.map(lambda *g: jnp.stack(g), jac_1, jac_2)  # (2, K, ...)
        update, state = tx.update(grads, state, params)

    References:
      Chen, Fernando, Ying, Chen, *Three-Way Trade-Off in Multi-Objective
      Learning: Optimization, Generalization and Conflict-Avoidance*, JMLR 2024,
      https://www.jmlr.org/papers/volume25/23-1287/23-1287.pdf; TorchJD's ``MoDoWeighting``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    num_batches = _check_num_batches(num_batches)
    if isinstance(gamma, (int, float)) and not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    _validation.check_interval("rho", rho, 0.0, float("inf"), closed_high=True)

    def init_fn(params: PyTree) -> MoDoState:
        scalar = _validation.scalar_dtype(params)
        return MoDoState(
            shared=resolve_layout(mask, params),
            weights=jnp.full([num_tasks], 1 / num_tasks, scalar),
        )

    def update_fn(updates: PyTree, state: MoDoState, params: PyTree = None):
        del params
        s1, s2, shared, heads = split_batches(updates, state.shared, num_tasks, num_batches)
        scalar = state.weights.dtype
        a_hat, log2_scale = cross_matrix(s1, s2, scalar)
        weights = modo_weights(
            a_hat, state.weights, gamma=gamma, rho=rho, log2_scale=log2_scale
        ).astype(scalar)
        out = merge(combine(shared, weights), heads)
        return out, MoDoState(shared=state.shared, weights=weights)

    return optax.GradientTransformation(init_fn, update_fn)
