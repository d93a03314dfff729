"""IMTL-G (Liu et al. 2021), in the generalised form of Quinton & Rey (2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from samgs_optax.gramian import Mask, gramian_weighting


def imtl_g_weights(g: jax.Array) -> jax.Array:
    r"""IMTL-G weights :math:`w = v / \mathbf 1^\top v`, :math:`v = G^{+} \sqrt{\mathrm{diag}\, G}`.

    :math:`G^+` is the pseudo-inverse with singular values below
    :math:`K \epsilon\, \sigma_{\max}` dropped (``torch.linalg.pinv``'s
    default). :math:`w = 0` when :math:`|\mathbf 1^\top v| < 10^{-12}`.
    """
    k = g.shape[0]
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
    rtol = k * jnp.finfo(g.dtype).eps
    v = jnp.matmul(jnp.linalg.pinv(g, rtol=rtol), d, precision=jax.lax.Precision.HIGHEST)
    total = jnp.sum(v)
    small = jnp.abs(total) < 1e-12
    return jnp.where(small, jnp.zeros_like(v), v / jnp.where(small, 1, total))


def imtl_g(num_tasks: int, *, mask: Mask = None) -> optax.GradientTransformation:
    r"""IMTL-G: the combination whose projections on every task's direction are equal.

    :math:`u = J^\top w` with :math:`\mathbf 1^\top w = 1` and
    :math:`u^\top g_k / \|g_k\|` the same for every k; :math:`w` from
    :func:`imtl_g_weights` (TorchJD's generalisation to linearly dependent
    gradients via the pseudo-inverse). Equal to TorchJD's ``IMTLG()``.

    Args:
      num_tasks: K >= 2.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, *Towards Impartial
      Multi-task Learning*, ICLR 2021; Quinton & Rey, https://arxiv.org/abs/2406.16232
    """
    return gramian_weighting(num_tasks, imtl_g_weights, mask=mask)
