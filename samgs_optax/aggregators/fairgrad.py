"""FairGrad (Ban & Ji, 2024): alpha-fair resource allocation between the tasks."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask
from samgs_optax.gramian import gramian_weighting, pow2_scale

PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def fairgrad_residual(g: jax.Array, w: jax.Array, alpha: float | jax.Array) -> jax.Array:
    r""":math:`\|G w - w^{-1/\alpha}\|_2`, zero exactly at the FairGrad weights.

    The quantity TorchJD's least squares minimises (squared).
    """
    return jnp.linalg.norm(_mv(g, w) - w ** (-1 / jnp.asarray(alpha, g.dtype)))


def fairgrad_solve(
    g: jax.Array, alpha: float | jax.Array, *, max_iter: int = 50
) -> tuple[jax.Array, jax.Array]:
    r"""Solves :math:`G w = w^{-1/\alpha}`, :math:`w > 0`, for :math:`\alpha > 0`.

    The equation is the stationarity condition of the convex function

    .. math::

      F(w) = \tfrac12 w^\top G w - \sum_i \phi(w_i), \qquad
      \phi(x) = \frac{x^{q} - 1}{q}\ (q = 1 - 1/\alpha \neq 0), \quad \phi(x) = \log x\ (q = 0),

    (:math:`\phi' = x^{-1/\alpha}`, :math:`\phi'' < 0`), with Hessian
    :math:`G + \operatorname{diag}(\tfrac1\alpha w^{-1/\alpha - 1})`, positive
    definite on :math:`w > 0`. It is solved by Newton's method with a line search
    on :math:`F`: at each step the candidates are the damped step
    :math:`1/(1 + \lambda)` (:math:`\lambda` the Newton decrement) and
    :math:`2^{-m}` times the longest step keeping :math:`w > 0`,
    :math:`m = 0..11`; the one with the lowest :math:`F` is taken, and once
    :math:`\lambda < 1/4` the full step (quadratic convergence; :math:`F` is too
    flat there to compare values in float32). For :math:`\alpha = 1` this is
    Nash-MTL's :math:`G w = 1/w` (:func:`~samgs_optax.aggregators._solvers.bargaining`).

    Start: the better (lower :math:`F`) of :math:`w_i = G_{ii}^{-\alpha/(1+\alpha)}`
    (exact for orthogonal gradients) and the uniform vector, each moved along
    its ray to the minimiser of :math:`F` there, :math:`t^{1 + 1/\alpha} =
    \sum_i w_i^{q} / w^\top G w`. ``max_iter`` Newton steps are run (a
    ``fori_loop``: a fixed count, jit- and vmap-friendly) and the iterate with
    the smallest :func:`fairgrad_residual` is returned.

    The Newton systems are solved by Cholesky with a ridge
    :math:`\epsilon \operatorname{tr} G` (it changes the steps, not the root), and a
    start on a ray where :math:`w^\top G w` is at rounding level is not rescaled.
    When no solution exists (some :math:`v \ge 0,\ v \ne 0` with :math:`Gv = 0`:
    a zero gradient, or 0 in the convex hull of some gradients) the iterates
    grow along :math:`v`; they stay finite because the number of steps is capped.

    Returns:
      ``(w, residual)``.
    """
    k = g.shape[0]
    dtype = g.dtype
    alpha = jnp.asarray(alpha, dtype)
    expo = -1 / alpha  # phi'(x) = x^expo
    q = 1 + expo

    def phi(x):
        logx = jnp.log(x)
        small = jnp.abs(q) < jnp.finfo(dtype).eps
        return jnp.where(small, logx, jnp.expm1(q * logx) / jnp.where(small, 1, q))

    def objective(w):
        return 0.5 * _mv(w, _mv(g, w)) - jnp.sum(phi(w))

    def residual(w):
        return fairgrad_residual(g, w, alpha)

    def on_ray(w):
        w = jnp.where(jnp.isfinite(w) & (w > 0), w, 1).astype(dtype)
        quad = _mv(w, _mv(g, w))
        power = jnp.sum(w**q)
        # w^T G w at rounding level: w is (nearly) a null direction, F has no minimum on the ray.
        flat = ~(quad > k * jnp.finfo(dtype).eps * jnp.trace(g) * _mv(w, w))
        t = jnp.where(flat, 1, (power / jnp.where(flat, 1, quad)) ** (alpha / (1 + alpha)))
        return w * jnp.where(jnp.isfinite(t) & (t > 0), t, 1)

    diag = jnp.diagonal(g)
    orthogonal = on_ray(jnp.where(diag > 0, diag, 1) ** (-alpha / (1 + alpha)))
    uniform = on_ray(jnp.full([k], 1.0 / k, dtype))
    start = jnp.where(objective(orthogonal) < objective(uniform), orthogonal, uniform)
    fractions = 2.0 ** -jnp.arange(12, dtype=dtype)
    # A ridge of eps tr(G) keeps the Cholesky factorisation of the Hessian finite when the
    # iterates grow along a null direction of G (no solution); it changes steps, not the root.
    ridge = jnp.finfo(dtype).eps * jnp.trace(g)

    def body(_, st):
        w, best, best_res = st
        grad = _mv(g, w) - w**expo
        hess = g + jnp.diag(-expo * w ** (expo - 1) + ridge)
        step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hess), grad)
        decrement = jnp.sqrt(jnp.maximum(-_mv(grad, step), 0))
        to_boundary = jnp.min(jnp.where(step < 0, -w / jnp.where(step < 0, step, -1), jnp.inf))
        longest = jnp.minimum(1.0, 0.99 * to_boundary)
        sizes = jnp.concatenate([(1 / (1 + decrement))[None], longest * fractions])
        trials = w[None, :] + sizes[:, None] * step[None, :]
        values = jax.vmap(objective)(jnp.where(trials > 0, trials, 1))
        values = jnp.where(jnp.all(trials > 0, axis=1) & jnp.isfinite(values), values, jnp.inf)
        pick = jnp.argmin(values)
        searched = jnp.where(values[pick] <= objective(w), trials[pick], w)
        new = jnp.where(decrement < 0.25, w + step, searched)
        new = jnp.where(jnp.all(jnp.isfinite(new) & (new > 0)), new, w)
        res = residual(new)
        better = res < best_res
        return new, jnp.where(better, new, best), jnp.where(better, res, best_res)

    init = (start, start, residual(start))
    _, w, res = jax.lax.fori_loop(0, max_iter, body, init)
    return w, res


def fairgrad_weights(
    g: jax.Array,
    *,
    alpha: float | jax.Array = 2.0,
    log2_scale: jax.Array | int = 0,
    max_iter: int = 50,
) -> jax.Array:
    r"""FairGrad weights: :math:`w > 0` solving :math:`G w = w^{-1/\alpha}` (1/K if alpha = 0).

    Solved exactly (to rounding) by :func:`fairgrad_solve`. The weights carry
    gradient units: for a scaled Gramian ``g`` :math:`= \hat G = 2^{-t} G`
    (:func:`~samgs_optax.gramian.scaled_gramian`) pass ``log2_scale``
    :math:`= t`; the equation is solved on :math:`\hat G` and
    :math:`w = 2^{-t\alpha/(1+\alpha)}\, \hat w` (substituting
    :math:`w = s \hat w` turns :math:`2^t \hat G w = w^{-1/\alpha}` into
    :math:`\hat G \hat w = \hat w^{-1/\alpha}` for that :math:`s`). A zero Gramian
    (all gradients zero) gives :math:`w = 0`.

    Null directions: the component of :math:`w` along the eigenvectors of
    :math:`G` whose eigenvalues are below :math:`K \epsilon \lambda_{\max}` is
    dropped (as a pseudo-inverse drops them). For an exact null vector
    :math:`v` (:math:`Gv = 0`, so :math:`J^\top v = 0`) this leaves the update
    unchanged, but where no solution exists (:math:`v \ge 0`: two opposite
    gradients, 0 in the convex hull) the weights diverge along :math:`v` and
    would otherwise turn into rounding noise :math:`\sim \epsilon \|w\| \|g\|` in
    :math:`J^\top w` (two opposite gradients: 0 here; TorchJD's SciPy solve gives
    equal huge weights, hence 0 too, by symmetry). For Gramians that are singular
    only to working precision (condition number beyond :math:`1/(K\epsilon)`) the
    update is then as uncertain as the Gramian itself. So the returned weights are
    positive except where :math:`G` is singular to working precision.
    """
    mantissa, exponent = _split_weights(g, alpha, log2_scale, max_iter)
    return pow2_scale(mantissa, exponent)


def _split_weights(
    g: jax.Array, alpha: float | jax.Array, log2_scale: jax.Array | int, max_iter: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`fairgrad_weights` as ``(m, e)``, w = m 2^e with m in G_hat's range (no overflow)."""
    k = g.shape[0]
    dtype = g.dtype
    alpha = jnp.asarray(alpha, dtype)
    fair = alpha > 0
    safe_alpha = jnp.where(fair, alpha, 1)
    w_hat, _ = fairgrad_solve(g, safe_alpha, max_iter=max_iter)
    # Components along the null space of G do not change the exact update (G v = 0 means
    # J^T v = 0) but would add rounding noise |w| eps |g| to it where the weights diverge.
    evals, evecs = jnp.linalg.eigh(g)
    null = evals <= k * jnp.finfo(dtype).eps * jnp.max(jnp.abs(evals))
    w_hat = w_hat - _mv(evecs, jnp.where(null, _mv(evecs.T, w_hat), 0))
    exponent = -jnp.asarray(log2_scale, dtype) * safe_alpha / (1 + safe_alpha)
    whole = jnp.floor(exponent)
    mantissa = w_hat * jnp.exp2(exponent - whole)
    zero = ~(jnp.max(jnp.abs(g)) > 0)
    mantissa = jnp.where(zero, jnp.zeros_like(mantissa), mantissa)
    mantissa = jnp.where(fair, mantissa, jnp.full([k], 1.0 / k, dtype))
    return mantissa, jnp.where(fair, whole, 0).astype(jnp.int32)


def fairgrad(
    num_tasks: int,
    *,
    alpha: float = 2.0,
    max_iter: int = 50,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""FairGrad: the update whose per-task improvement rates are :math:`\alpha`-fair.

    Ban & Ji's step (their Eq. 4): :math:`u = J^\top w` with :math:`w > 0` solving

    .. math::

      G w = w^{-1/\alpha}, \quad\text{i.e.}\quad g_i^\top u = w_i^{-1/\alpha}\ \ \forall i,

    the optimality condition of the :math:`\alpha`-fair allocation
    :math:`\max_u \sum_i (g_i^\top u)^{1-\alpha}/(1-\alpha)` (:math:`\log` for
    :math:`\alpha = 1`) over a ball. :math:`\alpha = 0` is linear scalarisation
    with weights :math:`1/K` (TorchJD's special case, kept), :math:`\alpha = 1`
    is proportional fairness (Nash-MTL's :math:`G\alpha = 1/\alpha`),
    :math:`\alpha \to \infty` max-min fairness. Equal to TorchJD's
    ``FairGrad(alpha)``, which solves the equation with SciPy's bounded least
    squares from :math:`1/K`; here it is solved by a damped Newton method in JAX
    (:func:`fairgrad_weights`), whose residual is never larger than SciPy's
    on the golden cases (``tests/test_aggregators_golden.py``).

    Size: for :math:`\alpha > 0` the output does not follow :math:`\|g\|` (K copies
    of g give :math:`K^{1/(1+\alpha)} \|g\|^{(1-\alpha)/(1+\alpha)}\, \hat g`), so
    :func:`samgs_optax.recipe` does not multiply it by K; for :math:`\alpha = 0`
    it is the mean and is multiplied.

    Args:
      num_tasks: K >= 2.
      alpha: :math:`\alpha \ge 0` (TorchJD has no default; 2.0 is what the authors'
        run scripts use for CelebA and QM9). May be an array (traced under
        ``optax.inject_hyperparams``).
      max_iter: Newton steps (fixed count; default 50).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    Returns:
      An ``optax.GradientTransformation`` with state
      :class:`~samgs_optax.gramian.GramianWeightingState`; its ``weights`` are in
      true units (:math:`w \propto \|g\|^{-2\alpha/(1+\alpha)}`), so they may
      saturate in float32 for gradients far from 1 (~1e-30), while the update,
      combined with a mantissa and a power of two, stays finite.

    References:
      Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024,
      https://arxiv.org/abs/2402.15638; TorchJD's ``torchjd.aggregation.FairGrad``.
    """
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if not alpha >= 0 or alpha == float("inf"):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}.")
    num_tasks = _validation.check_num_tasks(num_tasks)

    def weighting(g_hat: jax.Array, log2_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _split_weights(g_hat, alpha, log2_scale, max_iter)

    return gramian_weighting(num_tasks, weighting, mask=mask, with_scale=True, pow2_weights=True)


def fairgrad_is_mean(*, alpha: float = 2.0, **_: object) -> bool:
    """Whether :func:`fairgrad` with this alpha is mean-sized (alpha = 0: the mean)."""
    return float(alpha) == 0.0


__all__ = [
    "fairgrad",
    "fairgrad_is_mean",
    "fairgrad_residual",
    "fairgrad_solve",
    "fairgrad_weights",
]
