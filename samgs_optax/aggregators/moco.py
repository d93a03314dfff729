"""MoCo (Fernando et al. 2023): tracked task gradients weighted by a stochastic MGDA step."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split, task_zeros
from samgs_optax.aggregators._losses import check_task_losses
from samgs_optax.aggregators.modo import project_onto_simplex
from samgs_optax.gramian import pow2_scale, scaled_gramian
from samgs_optax.similarity import task_norms

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST

NORM_EPS = 1e-8
"""Added to each task gradient's norm before dividing by it (LibMTL's constant)."""


class MoCoState(NamedTuple):
    """State of :func:`moco`.

    Attributes:
      count: number of steps taken, ``t`` (int32).
      y: the tracking variables :math:`y_i`: the shared parameters' tree with a
        leading task axis of length K (zeros at init); task-specific leaves hold
        ``MaskedNode()``.
      weights: the task weights :math:`\\lambda` of the last step, on the
        simplex, shape (K,); :math:`1/K` at init.
    """

    count: chex.Array
    y: PyTree
    weights: chex.Array


def moco_weights(
    gram: jax.Array,
    weights: jax.Array,
    *,
    gamma: float | jax.Array,
    rho: float | jax.Array = 0.0,
    log2_scale: jax.Array | int = 0,
    lambda_update: Literal["softmax", "projection"] = "softmax",
) -> jax.Array:
    r"""One MoCo step on the task weights, from the Gramian of the tracking variables.

    :math:`\lambda \leftarrow \sigma(\lambda - \gamma\,(Y Y^\top + \rho I)\,\lambda)`
    with :math:`\sigma` the softmax (LibMTL) or the Euclidean projection onto the
    simplex (``lambda_update="projection"``, the paper). ``gamma`` is the step of
    this iteration (already decayed). ``gram`` may be :math:`2^{-t} Y Y^\top`
    (:func:`~samgs_optax.gramian.scaled_gramian`, ``log2_scale`` :math:`= t`);
    an argument beyond the float range saturates (clipped to
    :math:`\pm` ``finfo.max`` :math:`/ 4K`) rather than turning into NaN.
    """
    k = weights.shape[0]
    dtype = gram.dtype
    weights = weights.astype(dtype)
    pull = pow2_scale(jnp.matmul(gram, weights, precision=_HIGHEST), log2_scale)
    z = weights - gamma * (pull + rho * weights)
    big = float(jnp.finfo(dtype).max) / (4 * k)
    z = jnp.clip(z, -big, big)
    if lambda_update == "softmax":
        return jax.nn.softmax(z)
    return project_onto_simplex(z)


def moco(
    num_tasks: int,
    *,
    beta: float | chex.Array = 0.5,
    beta_sigma: float | chex.Array = 0.5,
    gamma: float | chex.Array = 0.1,
    gamma_sigma: float | chex.Array = 0.5,
    rho: float | chex.Array = 0.0,
    normalize: bool = True,
    lambda_update: Literal["softmax", "projection"] = "softmax",
    mask: Mask = None,
    m_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MoCo: tracks each task's gradient and weights the tracks by a stochastic MGDA step.

    Needs the per-task losses: ``tx.update(grads, state, params, task_losses=losses)``.
    At step :math:`t = 1, 2, \dots` (LibMTL's ``MoCo``, its defaults):

    .. math::

        \tilde g_i &= \frac{g_i}{\|g_i\| + 10^{-8}}\, L_i \\
        y_i &\leftarrow y_i - \beta t^{-\sigma_\beta}\,(y_i - \tilde g_i) \\
        \lambda &\leftarrow \operatorname{softmax}\!\big(\lambda - \gamma t^{-\sigma_\gamma}
            (Y Y^\top + \rho I)\, \lambda\big) \\
        u &= \textstyle\sum_i \lambda_i\, y_i

    with :math:`y_i = 0` and :math:`\lambda = 1/K` at init; the norms
    :math:`\|g_i\|` and the Gramian :math:`Y Y^\top` are summed leaf by leaf over
    the shared leaves (the model is never flattened), the Gramian at the
    highest matmul precision. Task-specific leaves (``mask``) get the plain sum
    over tasks, as in LibMTL, where each head receives its own loss's gradient.

    Differences from the paper (Algorithm 1 of Fernando et al.), which LibMTL
    follows in the structure of :math:`y` and :math:`\lambda`: the paper tracks
    the raw gradients (``normalize=False``; LibMTL's normalisation by the norm
    and scaling by the loss comes from the authors' code), steps
    :math:`\lambda` by a projection onto the simplex
    (``lambda_update="projection"``) rather than a softmax, and projects each
    :math:`y_i` onto a bounded set, which neither LibMTL nor this
    implementation does.

    Edge cases: a zero gradient gives :math:`\tilde g_i = 0`; a zero loss
    likewise. The output follows the losses, not the gradients' scale
    (normalised), so gradients from ~1e-30 to ~1e30 in float32 give finite
    updates (the norms are :func:`~samgs_optax.similarity.task_norms` with
    ``rescale=True``). The 1e-8 is absolute: for :math:`\|g_i\| \lesssim 10^{-8}`
    :math:`\tilde g_i` is shorter than :math:`L_i`, as in LibMTL.

    Args:
      num_tasks: K >= 2.
      beta: step of the tracking variables, in [0, 1] (default 0.5).
      beta_sigma: decay exponent of ``beta`` (:math:`\beta t^{-\sigma}`), >= 0 (default 0.5).
      gamma: step of the task weights, >= 0 (default 0.1).
      gamma_sigma: decay exponent of ``gamma``, >= 0 (default 0.5).
      rho: l2 regularisation of the weights' step, >= 0 (default 0).
      normalize: LibMTL's :math:`\tilde g_i` (default True); False tracks the raw
        gradients (the paper) and needs no losses.
      lambda_update: ``"softmax"`` (LibMTL, default) or ``"projection"`` onto the
        simplex (the paper).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.
      m_dtype: optional dtype (e.g. ``jnp.bfloat16``) in which to store ``y``;
        the arithmetic is done in at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`MoCoState`;
      its update takes ``task_losses=`` (a (K,) array). Float options may be
      injected with :func:`samgs_optax.inject_hyperparams`.

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, *Mitigating Gradient Bias
      in Multi-objective Learning: A Provably Convergent Approach*, ICLR 2023,
      https://openreview.net/forum?id=dLAYGdKTi2; LibMTL's ``MoCo``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    inf = float("inf")
    _validation.check_interval("beta", beta, 0.0, 1.0, closed_high=True)
    _validation.check_interval("beta_sigma", beta_sigma, 0.0, inf, closed_high=True)
    _validation.check_interval("gamma", gamma, 0.0, inf, closed_high=True)
    _validation.check_interval("gamma_sigma", gamma_sigma, 0.0, inf, closed_high=True)
    _validation.check_interval("rho", rho, 0.0, inf, closed_high=True)
    if lambda_update not in ("softmax", "projection"):
        raise ValueError(f"lambda_update must be 'softmax' or 'projection', got {lambda_update!r}.")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}.")

    def init_fn(params: PyTree) -> MoCoState:
        layout = resolve_layout(mask, params)
        scalar = _validation.scalar_dtype(params)
        return MoCoState(
            count=jnp.zeros([], jnp.int32),
            y=task_zeros(params, layout, num_tasks, m_dtype),
            weights=jnp.full([num_tasks], 1 / num_tasks, scalar),
        )

    def update_fn(
        updates: PyTree,
        state: MoCoState,
        params: PyTree = None,
        *,
        task_losses: chex.Array | None = None,
        **extra_args: Any,
    ):
        del params, extra_args
        g, heads = split(updates, state.y, num_tasks)
        scalar = state.weights.dtype
        count = optax.safe_increment(state.count)
        t = count.astype(scalar)
        step_y = beta * t ** (-jnp.asarray(beta_sigma, scalar))
        step_w = gamma * t ** (-jnp.asarray(gamma_sigma, scalar))
        if normalize:
            losses = check_task_losses("moco", task_losses, num_tasks, scalar)
            norms = task_norms(g, scalar, rescale=True)
            inv = 1 / (norms + NORM_EPS)  # g~_i = g_i / (||g_i|| + 1e-8) * L_i
        else:
            losses = inv = jnp.ones([num_tasks], scalar)

        def track(gl: jax.Array, yl: jax.Array) -> jax.Array:
            dtype = jnp.promote_types(jnp.promote_types(gl.dtype, yl.dtype), scalar)
            shape = (num_tasks,) + (1,) * (gl.ndim - 1)
            # divided first, then times the loss (as LibMTL): |g_i / (||g_i|| + 1e-8)| <= 1
            target = gl.astype(dtype) * inv.astype(dtype).reshape(shape)
            target = target * losses.astype(dtype).reshape(shape)
            y = yl.astype(dtype)
            return y - step_y.astype(dtype) * (y - target)  # y <- y - beta_t (y - g~)

        y = jax.tree.map(track, g, state.y)
        gram, log2_scale = scaled_gramian(y, scalar)
        weights = moco_weights(
            gram,
            state.weights,
            gamma=step_w,
            rho=rho,
            log2_scale=log2_scale,
            lambda_update=lambda_update,
        ).astype(scalar)

        def output(yl: jax.Array, gl: jax.Array) -> jax.Array:
            out = jnp.tensordot(weights.astype(yl.dtype), yl, axes=1, precision=_HIGHEST)
            return out.astype(gl.dtype)

        out = merge(jax.tree.map(output, y, g), heads)
        stored = jax.tree.map(lambda new, old: new.astype(old.dtype), y, state.y)
        return out, MoCoState(count=count, y=stored, weights=weights)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
