"""IMTL-G (Liu et al. 2021), in the generalised form of Quinton & Rey (2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from samgs_optax.gramian import Mask, gramian_weighting


def imtl_g_weights(g: jax.Array) -> jax.Array:
    r"""IMTL-G weights :math:`w = v / \mathbf 1^\top v`, :math:`v = G^{+} \sqrt{\mathrm{diag}\, G}`.

    :math:`G^+` is the pseudo-inverse by SVD with singular values below
    :math:`K \epsilon\, \sigma_{\max}` dropped (as ``torch.linalg.pinv``'s
    default). :math:`w` is invariant to the scale of :math:`G`, which
    is divided by its largest diagonal entry first (no overflow for huge
    gradients). :math:`w = 0` when :math:`\mathbf 1^\top v` is zero up to
    rounding, :math:`|\mathbf 1^\top v| \le 10 K \epsilon \|d\| / \lambda_{\min}`
    (e.g. two exactly opposite gradients); TorchJD's test is the absolute
    :math:`|\mathbf 1^\top v| < 10^{-12}`, which depends on the gradients' scale.
    """
    k = g.shape[0]
    eps = jnp.finfo(g.dtype).eps
    diag = jnp.maximum(jnp.diagonal(g), 0)
    scale = jnp.max(diag)
    g = g / jnp.where(scale > 0, scale, 1)
    d = jnp.sqrt(diag / jnp.where(scale > 0, scale, 1))
    left, sing, right_t = jnp.linalg.svd(g)
    keep = sing > k * eps * jnp.max(sing)
    inv = jnp.where(keep, 1 / jnp.where(keep, sing, 1), 0)
    hp = jax.lax.Precision.HIGHEST
    v = jnp.matmul(right_t.T, inv * jnp.matmul(left.T, d, precision=hp), precision=hp)
    total = jnp.sum(v)
    noise = 10 * k * eps * jnp.linalg.norm(d) * jnp.max(inv)
    small = ~(jnp.abs(total) > noise)
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
