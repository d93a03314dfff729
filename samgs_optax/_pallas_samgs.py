r"""SAM-GS's fused moments-and-output pass as a Pallas kernel (private).

One leaf at a time, with the stacked gradient ``g`` and the moments ``m`` seen
as (K, n) matrices (a free, contiguous reshape), the kernel computes

.. math::

  m'_k &= \beta_1 m_k + (1 - \beta_1) g_k \qquad (k = 1..K,\ \text{elementwise}) \\
  u &= \sum_k g_k \odot (a_k + c\,|m'_k|)

reading ``g`` and ``m`` once and writing ``m'`` (K, n) and ``u`` (n,) once: the
:math:`3Kn + n` floats that a step must move after its norms pass. The
coefficients come from the XLA side of :func:`samgs_optax.samgs` (the norms
need a full read of ``g`` first): :math:`a_k = \bar n / n_k,\ c = 0` when
equalising, :math:`a_k = 0,\ c = (1-\beta_1^t)^{-1} \hat h^{-1/2}` otherwise.

The arithmetic is that of the XLA path (``samgs._ema`` and ``samgs._combine``):
the moments in ``promote(g, m, float32)``, the weights :math:`a_k + c|m'_k|` in
``a``'s dtype, the terms in ``promote(g, a)``, the task sum in the same
association order (left to right; beyond 16 tasks, groups of 8 summed left to
right, then the groups), ``m'`` cast to its storage dtype only after ``u`` has
used it. Results agree to rounding (bit for bit on CPU in
interpret mode; a compiler may contract a multiply-add into an FMA, one
rounding fewer, on GPU).

Kernel shape, kept simple so that the Triton backend can lower it: a 1-D grid
over blocks of ``T`` columns (``T`` a power of two, ``BLOCK`` or the next power
of two above n if smaller); each program loads one (T,) row of ``g`` and of
``m`` per task (1-D, power-of-two tensors), accumulates in at least float32 and
masks the last block when ``T`` does not divide n. The K tasks are a static
Python loop (unrolled). ``m`` is updated in place (aliased) when its dtype does
not change. Untested on a GPU: this module has only been run in interpret mode
on CPU (``interpret=True``), where it is for testing only (slow).

``jax.experimental.pallas`` is imported by this module only, and this module
only when ``implementation="pallas"`` is asked for, so the library imports
where Pallas is unavailable.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from samgs_optax._layout import TASK_GROUP

BLOCK = 1024
"""Columns per program (a power of two). Tune on the GPU (``bench_update.py --pallas-block``)."""

NUM_WARPS: int | None = None
"""Triton warps per program; None leaves Triton's default (4)."""


def moments_and_output(
    g: jax.Array,
    m: jax.Array,
    a: jax.Array,
    c: jax.Array,
    b1: Any,
    m_dtype: Any | None = None,
    *,
    interpret: bool = False,
    block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""One leaf's new moments and update: ``(m', u)``, shaped like ``m`` and ``g[0]``.

    Args:
      g: stacked gradient, shape (K, ...).
      m: first moments, same shape, any floating dtype (e.g. bfloat16).
      a: (K,) per-task weights :math:`a_k`.
      c: scalar momentum coefficient :math:`c`.
      b1: :math:`\beta_1`, a Python float or a scalar array (may be traced).
      m_dtype: storage dtype of ``m'``; None keeps ``promote(g, m, float32)``.
      interpret: run the kernel in Pallas' interpreter (CPU, tests).
      block: columns per program, a power of two (default :data:`BLOCK`).
    """
    k = g.shape[0]
    n = math.prod(g.shape[1:])
    ema_dtype = jnp.promote_types(jnp.promote_types(g.dtype, m.dtype), jnp.float32)
    m_out_dtype = jnp.dtype(m_dtype or ema_dtype)
    t = _block_size(n, block or BLOCK)
    coef = _coefficients(a, c, b1, ema_dtype)
    kernel = _kernel(k, n, t, ema_dtype, a.dtype)
    row_spec = pl.BlockSpec((k, t), lambda i: (0, i))
    call = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((k, n), m_out_dtype),
            jax.ShapeDtypeStruct((n,), g.dtype),
        ),
        grid=(pl.cdiv(n, t),),
        in_specs=[pl.BlockSpec(coef.shape, lambda i: (0,)), row_spec, row_spec],
        out_specs=(row_spec, pl.BlockSpec((t,), lambda i: (i,))),
        input_output_aliases={2: 0} if m.dtype == m_out_dtype else {},
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS),
        name="samgs_moments_and_output",
    )
    m_new, u = call(coef, g.reshape(k, n), m.reshape(k, n))
    return m_new.reshape(m.shape), u.reshape(g.shape[1:])


def _block_size(n: int, block: int) -> int:
    """The power of two T: ``block``, or the smallest power of two >= n if that is less."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}.")
    return min(block, pl.next_power_of_2(max(n, 1)))


def _coefficients(a: jax.Array, c: Any, b1: Any, ema_dtype: Any) -> jax.Array:
    """[a_0..a_{K-1}, c, b1, 1 - b1], zero-padded to a power-of-two length.

    ``1 - b1`` is formed as ``samgs._ema`` forms it (in Python for a Python float,
    in the array's dtype for an array), then rounded to the moments' dtype like it.
    """
    k = a.shape[0]
    dtype = jnp.promote_types(ema_dtype, a.dtype)
    scalars = [jnp.asarray(c, a.dtype), jnp.asarray(b1, ema_dtype), jnp.asarray(1 - b1, ema_dtype)]
    values = jnp.concatenate([a.astype(dtype), jnp.stack([x.astype(dtype) for x in scalars])])
    return jnp.pad(values, (0, pl.next_power_of_2(k + 3) - (k + 3)))


def _kernel(k: int, n: int, t: int, ema_dtype: Any, weight_dtype: Any):
    """The kernel body for K tasks, n columns, blocks of t (all static)."""
    ragged = n % t != 0

    def kernel(coef_ref, g_ref, m_ref, m_out_ref, u_ref):
        if ragged:
            cols = pl.program_id(0) * t + jnp.arange(t, dtype=jnp.int32)
            mask = cols < n
        else:
            mask = None

        def load(ref):
            return plt.load(ref, mask=mask, other=0) if ragged else ref[...]

        def store(ref, value):
            if ragged:
                plt.store(ref, value, mask=mask)
            else:
                ref[...] = value

        c = coef_ref[k].astype(weight_dtype)
        decay = coef_ref[k + 1].astype(ema_dtype)
        rest = coef_ref[k + 2].astype(ema_dtype)

        def term(j):
            row = jnp.int32(j)  # an array index: masked loads reject a Python int (jax 0.10)
            g_j = load(g_ref.at[row])
            m_j = decay * load(m_ref.at[row]).astype(ema_dtype) + rest * g_j.astype(ema_dtype)
            store(m_out_ref.at[row], m_j.astype(m_out_ref.dtype))
            weight = coef_ref[j].astype(weight_dtype) + c * jnp.abs(m_j.astype(weight_dtype))
            return g_j * weight  # in promote(g, a), as samgs._combine

        store(u_ref, _task_sum(term, k).astype(u_ref.dtype))

    return kernel


def _task_sum(term, k: int):
    """term(0) + ... + term(K-1) in ``_layout.sum_over_tasks``'s association order.

    Left to right for K <= 16; beyond, each group of 8 (and the remainder) left to
    right, the groups added to the running total in order. Each term is formed just
    before it is added, so only two partial sums stay live.
    """

    def group(start: int, size: int):
        total = term(start)
        for j in range(start + 1, start + size):
            total = total + term(j)
        return total

    if k <= 2 * TASK_GROUP:
        return group(0, k)
    starts = list(range(0, k - k % TASK_GROUP, TASK_GROUP))
    total = group(0, TASK_GROUP)
    for start in starts[1:]:
        total = total + group(start, TASK_GROUP)
    if k % TASK_GROUP:
        total = total + group(starts[-1] + TASK_GROUP, k % TASK_GROUP)
    return total
