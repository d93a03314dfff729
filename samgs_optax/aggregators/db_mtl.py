"""DB-MTL (Lin et al. 2023): log-loss gradients, averaged, rescaled to the largest one's norm."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, is_masked, merge, resolve_layout, split, task_zeros
from samgs_optax.aggregators._losses import check_task_losses
from samgs_optax.similarity import task_norms

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST

LOG_EPS = 1e-8
"""Added to each loss inside the log, and to each buffer norm in the ratio (LibMTL's constant)."""


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl`.

    Attributes:
      count: number of steps taken, ``t`` (int32).
      buffer: the averaged log-loss gradients :math:`b_i`: the shared
        parameters' tree with a leading task axis of length K (zeros at init);
        task-specific leaves hold ``MaskedNode()``.
      weights: the scales :math:`\\alpha_i` of the last step, shape (K,) (diagnostic).
    """

    count: chex.Array
    buffer: PyTree
    weights: chex.Array


def db_mtl_weights(norms: jax.Array) -> jax.Array:
    r""":math:`\alpha_i = \max_j n_j / (n_i + 10^{-8})` from the buffer norms :math:`n_i`."""
    return jnp.max(norms) / (norms + LOG_EPS)


def db_mtl(
    num_tasks: int,
    *,
    beta: float | chex.Array = 0.9,
    beta_sigma: float | chex.Array = 0.0,
    heads: Literal["sum", "log"] = "sum",
    mask: Mask = None,
    m_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL: balances the losses' scales by a log, the gradients' by the largest norm.

    Needs the per-task losses: ``tx.update(grads, state, params, task_losses=losses)``,
    with ``grads`` the stacked gradients of the raw losses :math:`L_i`. At step
    :math:`t = 1, 2, \dots` (LibMTL's ``DB_MTL``, its defaults):

    .. math::

        g'_i &= \nabla \log(L_i + 10^{-8}) = \frac{g_i}{L_i + 10^{-8}} \\
        b_i &\leftarrow g'_i + \beta t^{-\sigma}\,(b_i - g'_i) \\
        \alpha_i &= \frac{\max_j \|b_j\|}{\|b_i\| + 10^{-8}} \\
        u &= \textstyle\sum_i \alpha_i\, b_i

    with :math:`b_i = 0` at init (no bias correction: the first step's buffer is
    :math:`(1 - \beta) g'_i`). With the default :math:`\sigma = 0` the buffer is
    an exponential moving average of decay :math:`\beta`. Norms are summed leaf
    by leaf over the shared leaves (:func:`~samgs_optax.similarity.task_norms`
    with ``rescale=True``: exact for any representable norm), the model is
    never flattened.

    Losses: must be >= 0 (they are the argument of a log). A zero loss gives
    :math:`g'_i = 10^8 g_i`, as LibMTL's :math:`\log(0 + 10^{-8})`; a loss of
    exactly :math:`-10^{-8}` divides by zero, and negative losses give a
    meaningless (sign-flipped) :math:`g'_i` where LibMTL's log gives NaN.

    Edge cases: a zero gradient leaves :math:`b_i` decaying (zero at the first
    step: it adds nothing); all-zero gradients give a zero update. The update is
    computed as :math:`\max_j \|b_j\| \sum_i b_i / (\|b_i\| + 10^{-8})`, the same
    sum without forming :math:`\alpha_i` (at most :math:`10^8 \max_j \|b_j\|`, which
    overflows float32 for norms above ~3e30: then ``state.weights`` holds ``inf``
    while the update stays finite). The 1e-8 in :math:`\alpha` is absolute: for
    buffer norms :math:`\lesssim 10^{-8}` (tiny gradients over their losses) the
    small tasks are scaled up less than to the largest norm, as in LibMTL.

    Task-specific leaves: ``heads="sum"`` (default, the library's convention
    for every aggregator) gives them the plain sum over tasks of the raw-loss
    gradients; ``heads="log"`` gives them :math:`\sum_i g_i / (L_i + 10^{-8})`,
    the log-loss gradients, which is what LibMTL (and the paper's loss-scale
    balancing) applies to task-specific parameters.

    Difference from the paper (Lin et al., Algorithm 1): the paper writes the
    moving average with a constant :math:`\beta`; LibMTL lets it decay as
    :math:`\beta t^{-\sigma}` with :math:`\sigma = 0` by default, i.e. the same.

    Args:
      num_tasks: K >= 2.
      beta: weight of the previous buffer, in [0, 1] (default 0.9, LibMTL's ``DB_beta``).
      beta_sigma: decay exponent of ``beta``, >= 0 (default 0, LibMTL's ``DB_beta_sigma``).
      heads: ``"sum"`` (default) or ``"log"``: what task-specific leaves receive.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.
      m_dtype: optional dtype (e.g. ``jnp.bfloat16``) in which to store the
        buffer; the arithmetic is done in at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`DBMTLState`;
      its update takes ``task_losses=`` (a (K,) array). ``beta`` and
      ``beta_sigma`` may be injected with :func:`samgs_optax.inject_hyperparams`.

    References:
      Lin, Ye, Xu, Shi, Zhang, Kwok, *Dual-Balancing for Multi-Task Learning*,
      2023, https://arxiv.org/abs/2308.12029; LibMTL's ``DB_MTL``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("beta", beta, 0.0, 1.0, closed_high=True)
    _validation.check_interval("beta_sigma", beta_sigma, 0.0, float("inf"), closed_high=True)
    if heads not in ("sum", "log"):
        raise ValueError(f"heads must be 'sum' or 'log', got {heads!r}.")

    def init_fn(params: PyTree) -> DBMTLState:
        layout = resolve_layout(mask, params)
        scalar = _validation.scalar_dtype(params)
        return DBMTLState(
            count=jnp.zeros([], jnp.int32),
            buffer=task_zeros(params, layout, num_tasks, m_dtype),
            weights=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(
        updates: PyTree,
        state: DBMTLState,
        params: PyTree = None,
        *,
        task_losses: chex.Array | None = None,
        **extra_args: Any,
    ):
        del params, extra_args
        g, head_grads = split(updates, state.buffer, num_tasks)
        scalar = state.weights.dtype
        losses = check_task_losses("db_mtl", task_losses, num_tasks, scalar)
        count = optax.safe_increment(state.count)
        decay = beta * count.astype(scalar) ** (-jnp.asarray(beta_sigma, scalar))
        inv = 1 / (losses + LOG_EPS)  # g'_i = g_i / (L_i + 1e-8)

        def average(gl: jax.Array, bl: jax.Array) -> jax.Array:
            dtype = jnp.promote_types(jnp.promote_types(gl.dtype, bl.dtype), scalar)
            c = inv.astype(dtype).reshape((num_tasks,) + (1,) * (gl.ndim - 1))
            log_grad = c * gl.astype(dtype)
            return log_grad + decay.astype(dtype) * (bl.astype(dtype) - log_grad)

        buffer = jax.tree.map(average, g, state.buffer)
        norms = task_norms(buffer, scalar, rescale=True)
        weights = db_mtl_weights(norms).astype(scalar)
        # u = max_j ||b_j|| * sum_i b_i / (||b_i|| + 1e-8): alpha_i b_i without forming alpha_i,
        # which overflows (alpha_i b_i = inf * 0) for a zero task beside norms above ~1e30.
        top = jnp.max(norms)
        unit = 1 / (norms + LOG_EPS)

        def output(bl: jax.Array, gl: jax.Array) -> jax.Array:
            out = jnp.tensordot(unit.astype(bl.dtype), bl, axes=1, precision=_HIGHEST)
            return (top.astype(bl.dtype) * out).astype(gl.dtype)

        shared_out = jax.tree.map(output, buffer, g)
        if heads == "log":
            out = jax.tree.map(
                lambda s, hd: _weighted_sum(hd, inv) if is_masked(s) else s,
                shared_out,
                head_grads,
                is_leaf=is_masked,
            )
        else:
            out = merge(shared_out, head_grads)
        stored = jax.tree.map(lambda new, old: new.astype(old.dtype), buffer, state.buffer)
        return out, DBMTLState(count=count, buffer=stored, weights=weights)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _weighted_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum_k w_k x_k in at least float32, cast back to x's dtype."""
    dtype = jnp.promote_types(x.dtype, w.dtype)
    out = jnp.tensordot(w.astype(dtype), x.astype(dtype), axes=1, precision=_HIGHEST)
    return out.astype(x.dtype)
