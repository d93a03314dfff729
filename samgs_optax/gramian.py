"""The shared core of the Gramian-based aggregators.

Most multi-task aggregators only need the K x K Gramian of the task gradients,
:math:`G = J J^\\top` with :math:`G_{ij} = \\langle g_i, g_j \\rangle`, turn it
into K task weights :math:`w`, and return :math:`J^\\top w = \\sum_k w_k g_k`
(TorchJD's "Gramian weighting" design). This module computes :math:`G` once
per step, leaf by leaf (the model is never concatenated into one vector),
combines the task gradients with the weights, and wraps a weighting function
into an ``optax.GradientTransformation`` with the same conventions as
:func:`samgs_optax.samgs` (stacked inputs, optional ``mask`` of shared leaves,
task-specific leaves receiving the plain sum over tasks).

Range. The entries of :math:`G` are squares of the gradients' scale, so in
float32 they underflow for gradients below ~1e-19 and overflow above ~1e19
(XLA on CPU flushes the underflowed products to zero, GPUs keep them as
subnormals with a few bits of precision). The aggregators therefore use
:func:`scaled_gramian`, which returns :math:`\\hat G = 2^{-t} G` for an even
integer :math:`t` chosen so that :math:`\\hat G` is in float32's safe range
(:math:`t = 0`, and :math:`\\hat G` bit-identical to :func:`gramian`, whenever
:math:`G` already is), and carry :math:`t` to the few weightings that are not
scale-invariant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split

PyTree = Any
WeightingFn = Callable[..., jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _matrices(stacked: PyTree, dtype: Any) -> list[jax.Array]:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("gramian needs at least one leaf.")
    return [leaf.reshape(leaf.shape[0], -1).astype(dtype) for leaf in leaves]


def _gram(matrices: list[jax.Array]) -> jax.Array:
    parts = [jnp.matmul(m, m.T, precision=_HIGHEST) for m in matrices]
    return sum(parts[1:], parts[0])


def gramian(stacked: PyTree, dtype: Any = jnp.float32) -> jax.Array:
    r"""Gramian of the task gradients, :math:`G_{ij} = \langle g_i, g_j \rangle`, shape (K, K).

    Summed leaf by leaf: :math:`G = \sum_\ell M_\ell M_\ell^\top` with
    :math:`M_\ell` leaf :math:`\ell` reshaped to (K, -1). Accumulated in
    ``dtype`` at the highest matmul precision. ``MaskedNode`` leaves are skipped.

    Range: the entries are products of gradient entries, so in float32 this is
    accurate only while the largest squared task norm lies in
    :func:`gramian_range` (gradient norms ~7e-12 to ~4e9 at D = 10^8):
    smaller products underflow (to zero on CPU, to imprecise subnormals on
    GPU) and larger ones overflow to ``inf``. :func:`scaled_gramian` has no
    such limit; the aggregators use it.
    """
    return _gram(_matrices(stacked, dtype))


def gramian_range(num_columns: int, dtype: Any = jnp.float32) -> tuple[float, float]:
    r"""The window ``(lo, hi)`` of :math:`\max_k G_{kk}` inside which :func:`gramian` is trusted.

    ``hi`` is :math:`\sqrt{\text{max}}` (:math:`2^{64}` in float32): entries
    (bounded by :math:`\max_k G_{kk}` by Cauchy-Schwarz), traces and any product
    of two entries stay finite. ``lo`` is the smallest power of two
    :math:`\ge 4 D\, \text{tiny} / \epsilon` (:math:`D` = ``num_columns``,
    :math:`D \cdot 2^{-101}` in float32): each entry is a sum of at most
    :math:`D` products accumulated in about :math:`2D` roundings, and flushing a
    subnormal product or partial sum to zero changes it by less than
    :math:`\text{tiny}` (float32's smallest normal number, :math:`2^{-126}`), so
    above ``lo`` everything a device flushes (or keeps as a subnormal) adds up to
    less than half an ulp of :math:`\max_k G_{kk}`: below the float32 rounding
    of the Gramian itself, and below every tolerance of the solvers, which all
    work relative to the Gramian's scale.
    """
    info = jnp.finfo(dtype)
    tiny, eps = float(info.tiny), float(info.eps)
    lo = 2.0 ** math.ceil(math.log2(4 * max(num_columns, 1) * tiny / eps))
    hi = 2.0 ** (int(info.maxexp) // 2)
    return lo, hi


def pow2_scale(x: jax.Array, n: jax.Array | int) -> jax.Array:
    r""":math:`x \cdot 2^n` for an integer :math:`n`, exact while the result is a normal number.

    Done as two multiplications by exact powers of two (each built from its bit
    pattern), so that :math:`|n|` up to about twice the exponent range works
    and an out-of-range result saturates monotonically (to 0 or inf) instead
    of turning into NaN. ``n = 0`` returns ``x`` unchanged (a multiplication by 1).
    """
    x = jnp.asarray(x)
    n = jnp.asarray(n, jnp.int32)
    half = n // 2
    return x * _pow2(half, x.dtype) * _pow2(n - half, x.dtype)


def _pow2(n: jax.Array, dtype: Any) -> jax.Array:
    """Exact 2**n (n clipped to the normal exponent range of dtype), from its bit pattern."""
    info = jnp.finfo(dtype)
    bias = int(info.maxexp) - 1
    int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[np.dtype(dtype).itemsize]
    n = jnp.clip(n, 1 - bias, bias).astype(int_type)
    return jax.lax.bitcast_convert_type((n + bias) << int(info.nmant), dtype)


def scaled_gramian(stacked: PyTree, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    r"""The Gramian up to an exact power of two: ``(G_hat, t)`` with :math:`G = 2^t \hat G`.

    First computes :func:`gramian` as usual (one pass over the gradients). When
    :math:`\max_k G_{kk}` lies in :func:`gramian_range` and :math:`G` is finite,
    that is the answer, with :math:`t = 0` (``G_hat`` is bit-identical to
    :func:`gramian`). Otherwise (gradients so small that the products underflow,
    so large that they overflow, or all zero) it is recomputed under
    ``jax.lax.cond`` from the leaves scaled by :math:`2^{-e}`, with
    :math:`2^{e}` the power of two just above the largest :math:`|g|` over all
    leaves and tasks (one pass for the maximum, one for the scaled Gramian).
    Powers of two are exact, so :math:`\hat G` is the Gramian of a Jacobian
    whose largest entry lies in [0.5, 1) (for normal float32 entries):
    :math:`\max_k \hat G_{kk}` is then between 0.25 and :math:`D`, well inside
    the window, and :math:`t = 2e`.

    Why this also removes the NaN that Nash-MTL returned on a GPU for gradients
    ~1e-20 (measured on an H100; the fix is not re-run there): GPUs keep
    subnormal products (cuBLAS) where XLA:CPU flushes them to zero, so there the
    plain Gramian was a matrix of ~1e-40 subnormals with only a few significant
    bits, not the Gramian of any Jacobian to float32 precision, which the
    solvers (written for Gramians known to working precision) are not made
    for. Here the solvers only ever see a Gramian whose scale is in the window
    above, i.e. the same problem as for normal-range gradients; the entries
    that may still be subnormal there are smaller than half an ulp of the
    largest one, so whether a device keeps or flushes them changes nothing
    beyond rounding.

    Cost: nothing extra when :math:`G` is in range (a K x K test and a
    ``cond``); two more passes over the gradients when it is not. Under
    ``jax.vmap`` the ``cond`` becomes a ``select`` and both branches run.

    Limits: one common scale for all tasks, so a task whose squared norm is
    below ``tiny`` times the largest one (a norm ratio beyond ~1e19) still
    counts as zero; non-finite gradients give a non-finite ``G_hat`` (and
    :math:`t = 0`), as :func:`gramian` does. Entries below float32's
    smallest normal number (1.2e-38) are flushed to zero on CPU before any
    scaling can help.

    Returns:
      ``(G_hat, t)``: the (K, K) matrix in ``dtype`` and an int32 scalar
      (even; 0 whenever :math:`G` is in range).
    """
    matrices = _matrices(stacked, dtype)
    g = _gram(matrices)
    lo, hi = gramian_range(sum(m.shape[1] for m in matrices), dtype)
    top = jnp.max(jnp.diagonal(g))
    in_range = (top >= lo) & (top <= hi) & jnp.all(jnp.isfinite(g))

    # The in-range G is selected outside the cond rather than returned by it, so
    # that XLA fuses it into the solvers exactly as before: bit-identical results.
    def as_is():
        return jnp.zeros_like(g), jnp.zeros([], jnp.int32)

    def rescaled():
        big = jnp.max(jnp.stack([jnp.max(jnp.abs(m)) for m in matrices]))
        usable = jnp.isfinite(big) & (big > 0)
        _, e = jnp.frexp(jnp.where(usable, big, 1))  # big = f 2^e, f in [0.5, 1)
        info = jnp.finfo(dtype)
        e = jnp.where(usable, jnp.clip(e, int(info.minexp), int(info.maxexp) - 2), 0)
        e = e.astype(jnp.int32)
        factor = _pow2(-e, dtype)
        return _gram([m * factor for m in matrices]), 2 * e

    g_rescaled, log2_scale = jax.lax.cond(in_range, as_is, rescaled)
    return jnp.where(in_range, g, g_rescaled), log2_scale


def combine(stacked: PyTree, weights: jax.Array) -> PyTree:
    r"""Weighted sum over the leading task axis, :math:`\sum_k w_k g_k`, leaf by leaf.

    Computed in the weights' dtype (at least float32) and cast back to each
    leaf's dtype.
    """

    def one(leaf: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(leaf.dtype, weights.dtype)
        out = jnp.tensordot(weights.astype(dtype), leaf.astype(dtype), axes=1, precision=_HIGHEST)
        return out.astype(leaf.dtype)

    return jax.tree.map(one, stacked)


def normalize_gramian(
    g: jax.Array, eps: float | jax.Array, log2_scale: jax.Array | int = 0
) -> jax.Array:
    r"""TorchJD's normalisation: :math:`G / \operatorname{tr} G`, or zeros if the trace is < eps.

    :math:`\operatorname{tr} G = \|J\|_F^2`, so this is the Gramian of the
    Frobenius-normalised Jacobian. Note that ``eps`` is absolute (in squared
    gradient units), as in TorchJD. For a scaled Gramian ``g`` :math:`= 2^{-t} G`
    (:func:`scaled_gramian`) pass ``log2_scale`` :math:`= t`: the test is then
    made on the true trace, :math:`2^t \operatorname{tr} \hat G <` ``eps``, and
    the result (scale-free) is the same.
    """
    trace = jnp.trace(g)
    small = trace < pow2_scale(jnp.asarray(eps, g.dtype), -jnp.asarray(log2_scale))
    return jnp.where(small, jnp.zeros_like(g), g / jnp.where(small, 1, trace))


def regularize_gramian(g: jax.Array, eps: float | jax.Array) -> jax.Array:
    """Adds ``eps`` to the diagonal (TorchJD's ``regularize``)."""
    return g + eps * jnp.eye(g.shape[0], dtype=g.dtype)


# --------------------------------------------------------------------------------------
# Stateless Gramian weighting as an optax transform.


class GramianWeightingState(NamedTuple):
    """State of a stateless Gramian-weighting aggregator.

    Attributes:
      shared: the params' tree, a scalar ``True`` on shared leaves and
        ``MaskedNode()`` on task-specific leaves (set by ``mask`` at init).
      weights: the task weights ``w`` of the last step, shape (K,) (diagnostic);
        the shared update was ``sum_k w_k g_k``.
    """

    shared: PyTree
    weights: chex.Array


def gramian_weighting(
    num_tasks: int,
    weighting: WeightingFn,
    *,
    mask: Mask = None,
    with_scale: bool = False,
    pow2_weights: bool = False,
) -> optax.GradientTransformation:
    r"""Turns a weighting :math:`G \mapsto w` into an aggregator :math:`J^\top w`.

    ``update`` takes stacked per-task gradients (leading task axis of length
    ``num_tasks`` on every leaf), computes the Gramian of the shared leaves once,
    leaf by leaf, calls ``weighting`` on it (a jittable function returning K
    weights) and returns :math:`\sum_k w_k g_k` on shared leaves and the plain
    sum :math:`\sum_k g_k` on task-specific leaves.

    The Gramian comes from :func:`scaled_gramian`: ``weighting`` receives
    :math:`\hat G = 2^{-t} G`, which is :math:`G` itself (:math:`t = 0`) unless
    :math:`G` would under- or overflow in its dtype. A weighting invariant to
    the scale of :math:`G` (:math:`w(cG) = w(G)`) needs nothing more; one that is
    not (absolute thresholds, weights in gradient units) sets
    ``with_scale=True`` and is called as ``weighting(G_hat, t)``. Weights that
    may themselves leave the float range (FairGrad's grow as :math:`G^{-1/\alpha}`)
    are returned as a mantissa and a power of two, ``(m, e)`` with :math:`w = 2^e m`
    (``pow2_weights=True``): the update is then :math:`2^e \sum_k m_k g_k`, the
    power of two applied last, so that it stays finite whenever it is representable.

    Args:
      num_tasks: K >= 2.
      weighting: function from the (K, K) Gramian (float32 or wider) to (K,)
        weights; with ``with_scale=True``, from ``(G_hat, t)`` (``t`` an int32 scalar).
      mask: optional pytree of bools (or callable of params returning one):
        True leaves are shared and aggregated, False leaves (task heads) get
        the plain sum over tasks and are left out of the Gramian. ``None``: all shared.
      with_scale: pass the exponent ``t`` of :func:`scaled_gramian` to ``weighting``.
      pow2_weights: ``weighting`` returns ``(mantissa, exponent)`` (an int32 scalar
        exponent) instead of the weights.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`GramianWeightingState`.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)

    def init_fn(params: PyTree) -> GramianWeightingState:
        scalar = _validation.scalar_dtype(params)
        return GramianWeightingState(
            shared=resolve_layout(mask, params), weights=jnp.zeros([num_tasks], scalar)
        )

    def update_fn(updates: PyTree, state: GramianWeightingState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.weights.dtype
        g_hat, log2_scale = scaled_gramian(shared, scalar)
        result = weighting(g_hat, log2_scale) if with_scale else weighting(g_hat)
        if pow2_weights:
            mantissa, exponent = result
            combined = jax.tree.map(lambda x: pow2_scale(x, exponent), combine(shared, mantissa))
            weights = pow2_scale(mantissa, exponent).astype(scalar)
        else:
            weights = result.astype(scalar)
            combined = combine(shared, weights)
        return merge(combined, heads), GramianWeightingState(shared=state.shared, weights=weights)

    return optax.GradientTransformation(init_fn, update_fn)
