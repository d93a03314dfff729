"""Aligned-MTL (Senushkin et al. 2023): align the principal components of the task gradients."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from samgs_optax.gramian import Mask, gramian_weighting

ScaleMode = Literal["min", "median", "rmse"]


def aligned_mtl_weights(g: jax.Array, *, scale_mode: ScaleMode = "min") -> jax.Array:
    r"""Aligned-MTL weights :math:`w = B \mathbf 1 / K`.

    :math:`B = \sqrt{\sigma}\, V \Lambda^{-1/2} V^\top` with
    :math:`G = V \Lambda V^\top` restricted to eigenvalues above
    :math:`\lambda_{\max} K \epsilon` (the numerical rank r); :math:`\sigma` is
    the smallest kept eigenvalue (``"min"``), their lower median
    (``"median"``, as ``torch.median``) or their mean (``"rmse"``). Rank 0
    gives :math:`B = I`. The eigendecomposition of the PSD Gramian is taken
    from its SVD (singular values = eigenvalues), which is about 4x more
    accurate than ``eigh`` in float32 here.
    """
    k = g.shape[0]
    top = jnp.max(jnp.diagonal(g))
    g = g / jnp.where(top > 0, top, 1)  # B is scale-invariant; avoids overflow
    vec, lam, _ = jnp.linalg.svd(g)  # descending singular values = eigenvalues (PSD)
    vec, lam = vec[:, ::-1], lam[::-1]  # ascending
    tol = jnp.max(lam) * k * jnp.finfo(g.dtype).eps
    keep = lam > tol
    rank = jnp.sum(keep)
    safe = jnp.where(keep, lam, 1)
    inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(safe), 0)
    if scale_mode == "min":
        scale = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale_mode == "median":
        # The kept eigenvalues are the r largest: ascending positions k-r .. k-1.
        scale = lam[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
    elif scale_mode == "rmse":
        scale = jnp.sum(jnp.where(keep, lam, 0)) / jnp.maximum(rank, 1)
    else:
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
    e = jnp.full([k], 1.0 / k, g.dtype)
    hp = jax.lax.Precision.HIGHEST
    balanced = jnp.sqrt(jnp.where(rank > 0, scale, 1)) * jnp.matmul(
        vec, inv_sqrt * jnp.matmul(vec.T, e, precision=hp), precision=hp
    )
    return jnp.where(rank > 0, balanced, e)


def aligned_mtl(
    num_tasks: int, *, scale_mode: ScaleMode = "min", mask: Mask = None
) -> optax.GradientTransformation:
    r"""Aligned-MTL: makes the task gradients' principal components equal before averaging.

    Whitens the Jacobian, :math:`\hat J = B J` with :math:`B` from the
    eigendecomposition of the Gramian so that :math:`\hat J \hat J^\top` is
    :math:`\sigma` times a projector (all singular values equal to
    :math:`\sqrt\sigma`), and returns the mean of the aligned gradients,
    :math:`u = J^\top B \mathbf 1 / K`. Equal to TorchJD's ``AlignedMTL()``
    (``scale_mode="min"``, mean preference vector).

    Args:
      num_tasks: K >= 2.
      scale_mode: ``"min"`` (default; the smallest singular value, as in the
        paper), ``"median"``, or ``"rmse"`` (the mean eigenvalue, as in the
        original code).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Senushkin, Patakin, Kuznetsov, Konushin, *Independent Component Alignment
      for Multi-Task Learning*, CVPR 2023.
    """
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
    return gramian_weighting(
        num_tasks, lambda g: aligned_mtl_weights(g, scale_mode=scale_mode), mask=mask
    )
