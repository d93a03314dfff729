"""ConFIG (Liu et al. 2024): the conflict-free direction with equal cosines to every task."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samgs_optax import _validation
from samgs_optax.gramian import Mask, gramian_weighting

_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def con_fig_weights(g: jax.Array, pref_vector: jax.Array | None = None) -> jax.Array:
    r"""ConFIG weights :math:`c` with :math:`u = J^\top c`, from the Gramian only.

    With :math:`n_k = \|g_k\| = \sqrt{G_{kk}}`, the unit gradients
    :math:`U = D^{-1} J` (:math:`D = \operatorname{diag}(n)`, a zero row for a
    zero gradient), their Gramian :math:`C = D^{-1} G D^{-1}` (the cosines)
    and the preference vector :math:`p` (default :math:`\mathbf 1`), ConFIG's
    direction is :math:`b = U^{+} p = U^\top C^{+} p` (the identity
    :math:`U^+ = U^\top (U U^\top)^+`), i.e. :math:`b = J^\top D^{-1} v` with
    :math:`v = C^{+} p`, of norm :math:`\|b\|^2 = v^\top C v`. The update is
    :math:`u = (\sum_k g_k^\top \hat b)\, \hat b` with :math:`\hat b = b/\|b\|`:

    .. math::

      c = D^{-1} v \; \frac{\mathbf 1^\top G D^{-1} v}{v^\top C v}.

    :math:`c` is invariant to the scale of :math:`G` (each factor :math:`n_k`
    cancels), so :math:`u` is homogeneous of degree 1 in :math:`J`.

    Pseudo-inverse: from the SVD of :math:`C`, dropping singular values below
    :math:`K \epsilon\, \sigma_{\max}`. (TorchJD takes ``torch.linalg.pinv`` of
    the K x D matrix :math:`U` with its default cutoff
    :math:`\max(K, D)\, \epsilon` relative on the singular values of :math:`U`,
    which depends on the model size D; for :math:`D \ge 1/\epsilon` (8.4e6
    parameters in float32) it drops every singular value and returns 0.)
    :math:`b = 0` (e.g. two exactly opposite gradients, where :math:`p` is
    orthogonal to the range of :math:`C`) gives :math:`c = 0`, as TorchJD's
    ``normalize`` (which leaves a zero vector at zero).
    """
    k = g.shape[0]
    dtype = g.dtype
    eps = jnp.finfo(dtype).eps
    p = jnp.ones([k], dtype) if pref_vector is None else jnp.asarray(pref_vector, dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
    inv_n = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 0)
    cos = g * inv_n[:, None] * inv_n[None, :]
    left, sing, right_t = jnp.linalg.svd(cos)
    keep = sing > k * eps * jnp.max(sing)
    inv = jnp.where(keep, 1 / jnp.where(keep, sing, 1), 0)
    v = _mv(right_t.T, inv * _mv(left.T, p))
    scaled = inv_n * v  # D^{-1} v
    b_sq = _mv(v, _mv(cos, v))  # ||b||^2
    length = jnp.sum(_mv(g, scaled))  # ||b|| * sum_k g_k^T b_hat
    ok = b_sq > jnp.finfo(dtype).tiny
    return jnp.where(ok, scaled * (length / jnp.where(ok, b_sq, 1)), 0)


def con_fig(
    num_tasks: int,
    *,
    pref_vector: Sequence[float] | jax.Array | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""ConFIG: the direction with equal cosines to every task, as long as the sum of projections.

    Equation 2 of Liu et al.: with :math:`\hat g_k = g_k / \|g_k\|`,
    :math:`b = [\hat g_1, \dots, \hat g_K]^{\top +}\, p` solves
    :math:`\hat g_k^\top b = p_k` for all k (the minimum-norm solution; with the
    default :math:`p = \mathbf 1`, equal cosines), so for positive :math:`p` it
    conflicts with no task; the update is

    .. math::

      u = \Big(\sum_k g_k^\top \hat b\Big)\, \hat b, \qquad \hat b = b / \|b\|.

    Computed from the Gramian only (:func:`con_fig_weights`, the model is never
    flattened). Equal to TorchJD's ``ConFIG(pref_vector)`` (TorchJD 0.18 always
    uses the pseudo-inverse; the authors' ``use_least_square`` switch is not in
    TorchJD, and for full-rank unit gradients both give the same minimum-norm
    :math:`b`). Stateless: the momentum variant (M-ConFIG) is not included.

    Size: K copies of one gradient g give :math:`K g` (a sum):
    :func:`samgs_optax.recipe` does not multiply it by K.

    Args:
      num_tasks: K >= 2.
      pref_vector: the K preference values :math:`p` (default all ones, TorchJD's
        ``SumWeighting``); an array injected by ``optax.inject_hyperparams`` is
        accepted (shape checked, values not).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    Returns:
      An ``optax.GradientTransformation`` with state
      :class:`~samgs_optax.gramian.GramianWeightingState`.

    References:
      Liu, Chu, Thuerey, *ConFIG: Towards Conflict-free Training of Physics
      Informed Neural Networks*, ICLR 2025, https://arxiv.org/abs/2408.11104;
      TorchJD's ``torchjd.aggregation.ConFIG``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if pref_vector is not None:
        shape = np.shape(pref_vector)
        if shape != (num_tasks,):
            raise ValueError(
                f"pref_vector must be a vector of num_tasks={num_tasks} values, got shape {shape}."
            )
        if not isinstance(pref_vector, jax.core.Tracer):
            if not np.all(np.isfinite(np.asarray(pref_vector, np.float64))):
                raise ValueError(f"pref_vector must be finite, got {pref_vector!r}.")
    return gramian_weighting(num_tasks, lambda g: con_fig_weights(g, pref_vector), mask=mask)


__all__ = ["con_fig", "con_fig_weights"]
