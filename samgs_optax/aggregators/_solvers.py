"""Small exact solvers on a K x K Gramian, in JAX (no host round-trip, jittable).

* :func:`nnls_gram`: non-negative least squares in Gram form,
  :math:`\\min_{x \\ge 0} \\tfrac12 x^\\top Q x + q^\\top x`, by the
  Lawson-Hanson active-set method. Exact up to rounding once the active set is
  found (finite termination), used by UPGrad, DualProj (projections onto the
  dual cone) and MGDA (min-norm point of the convex hull).
* :func:`cagrad_path`: the CAGrad dual, solved exactly by following the
  piecewise-linear solution path of a parametric NNLS (a homotopy).
* :func:`bargaining`: the Nash-MTL bargaining solution
  :math:`G\\alpha = 1/\\alpha`, by damped Newton on a self-concordant function.

All loops are ``lax.while_loop`` with a static iteration cap and a convergence flag.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def _masked_solve(q_mat: jax.Array, rhs: jax.Array, free: jax.Array) -> jax.Array:
    """Solves ``Q[F, F] x[F] = rhs[F]`` with ``x = 0`` off ``F`` (fixed shapes, no gather)."""
    eye = jnp.eye(q_mat.shape[0], dtype=q_mat.dtype)
    m = jnp.where(free[:, None] & free[None, :], q_mat, eye)
    x = jnp.linalg.solve(m, jnp.where(free, rhs, 0))
    return jnp.where(free, x, 0)


def nnls_gram(
    q_mat: jax.Array, q_vec: jax.Array, *, max_iter: int | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""Solves :math:`\min_{x \ge 0} \tfrac12 x^\top Q x + q^\top x` for PSD ``Q`` (K, K).

    Lawson & Hanson's NNLS active-set algorithm (1974, ch. 23) written on the
    Gram matrix (as in Bro & De Jong's FNNLS). Starting from :math:`x = 0` with
    every index at its bound, it repeatedly frees the index with the most
    negative gradient, solves the equality-constrained problem on the free set
    and, when that solution leaves the orthant, steps back to the boundary and
    re-fixes the blocking indices. It stops when the gradient
    :math:`\nabla = Qx + q` is non-negative on the fixed set up to its rounding
    error bound :math:`4 K \epsilon (|Q|\,|x| + |q|)_i` (entry by entry), so the
    result satisfies the KKT conditions :math:`x \ge 0`, :math:`\nabla \ge 0`,
    :math:`x_i \nabla_i = 0` to machine precision; it is exact, not iterative.

    Args:
      q_mat: (K, K) symmetric PSD matrix; the free blocks met along the way
        must be non-singular (true when ``Q`` is positive definite).
      q_vec: (K,) linear term.
      max_iter: cap on iterations (default ``5K + 10``; each one solves a K x K
        system). Lawson-Hanson needs about twice the final number of free indices.

    Returns:
      ``(x, converged)``.
    """
    k = q_mat.shape[0]
    dtype = q_mat.dtype
    eps = jnp.finfo(dtype).eps
    cap = 5 * k + 10 if max_iter is None else max_iter
    abs_q = jnp.abs(q_mat)
    idx = jnp.arange(k, dtype=jnp.int32)

    def cond(st):
        it, _, _, done, _ = st
        return (it < cap) & ~done

    def body(st):
        it, x, free, _, last = st
        s = _masked_solve(q_mat, -q_vec, free)
        feasible = jnp.all(jnp.where(free, s > 0, True))

        # Feasible: accept s, then free the index with the most negative gradient.
        # Rounding error bound of each gradient entry, row by row.
        tol = 4 * k * eps * (_mv(abs_q, jnp.abs(s)) + jnp.abs(q_vec))
        neg_grad = jnp.where(free, -jnp.inf, -(_mv(q_mat, s) + q_vec) - tol)
        j = jnp.argmax(neg_grad).astype(jnp.int32)
        add = neg_grad[j] > 0
        free_a = free | ((idx == j) & add)

        # Infeasible: move from x towards s until an index hits zero; fix it.
        denom = x - s
        ratio = jnp.where(free & (s <= 0), jnp.where(denom > 0, x / denom, 0), jnp.inf)
        i = jnp.argmin(ratio).astype(jnp.int32)
        alpha = jnp.clip(ratio[i], 0, 1)
        x_b = x + alpha * (s - x)
        drop = free & ((x_b <= 0) | (idx == i))
        x_b = jnp.where(drop, 0, x_b)
        stuck = (i == last) & (alpha <= 0)  # the index just freed cannot move: converged

        x_new = jnp.where(feasible, s, x_b)
        free_new = jnp.where(feasible, free_a, free & ~drop)
        done = jnp.where(feasible, ~add, stuck)
        last_new = jnp.where(feasible, jnp.where(add, j, -1), last)
        return it + 1, x_new, free_new, done, last_new

    init = (
        jnp.zeros([], jnp.int32),
        jnp.zeros([k], dtype),
        jnp.zeros([k], jnp.bool_),
        jnp.zeros([], jnp.bool_),
        jnp.full([], -1, jnp.int32),
    )
    _, x, _, done, _ = jax.lax.while_loop(cond, body, init)
    return x, done


def project_dual_cone(g_mat: jax.Array, u: jax.Array) -> jax.Array:
    r"""Weights of the projection of :math:`J^\top u` onto the dual cone of the rows of :math:`J`.

    By Proposition 1 of Quinton & Rey (2024) this is
    :math:`\arg\min_{v \ge u} v^\top G v`; with :math:`v = u + x` it is the NNLS
    :math:`\min_{x\ge0} \tfrac12 x^\top G x + (Gu)^\top x`.
    """
    x, _ = nnls_gram(g_mat, _mv(g_mat, u))
    return u + x


def min_norm_weights(g_mat: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Exact simplex weights :math:`w` of the min-norm point of the convex hull of the :math:`g_k`.

    Solves :math:`\min_{w \ge 0, \mathbf 1^\top w = 1} w^\top G w` through its
    least-distance-programming form (Lawson & Hanson 1974, ch. 23): with
    :math:`\hat G = G / \bar d` (:math:`\bar d` the mean diagonal), the NNLS
    :math:`\min_{u \ge 0} \tfrac12 u^\top (\hat G + \mathbf 1 \mathbf 1^\top) u - \mathbf 1^\top u`
    has the KKT conditions :math:`\hat G u = (1 - \sigma)\mathbf 1 + \mu`,
    :math:`\mu \ge 0`, :math:`\mu^\top u = 0`, :math:`\sigma = \mathbf 1^\top u`,
    so :math:`w = u / \sigma` satisfies the simplex KKT conditions
    :math:`G w \ge (w^\top G w) \mathbf 1` with equality on the support of
    :math:`w`, i.e. it is optimal, including when 0 is in the hull
    (:math:`\sigma = 1`). Mixing :math:`\mathbf 1 \mathbf 1^\top` into the
    matrix costs accuracy in float32 (up to ~1e-4 relative on the min-norm
    point at K = 10), so the support found this way is then "polished": the
    equality-constrained problem on that face,
    :math:`\begin{bmatrix} G_{FF} & \mathbf 1 \\ \mathbf 1^\top & 0 \end{bmatrix}
    \begin{bmatrix} w_F \\ -\lambda \end{bmatrix} = \begin{bmatrix} 0 \\ 1 \end{bmatrix}`,
    is solved directly, and its solution is kept when it is strictly positive
    on the face (otherwise the NNLS weights are returned). In the NNLS a ridge
    of :math:`K\epsilon` on the diagonal keeps the free blocks invertible when
    gradients are affinely dependent; the polishing step has no ridge.

    Returns:
      ``(w, converged)``; all-zero gradients give uniform weights.
    """
    k = g_mat.shape[0]
    dtype = g_mat.dtype
    scale = jnp.trace(g_mat) / k
    zero = ~(scale > 0)
    ridge = k * jnp.finfo(dtype).eps * jnp.eye(k, dtype=dtype)
    g_hat = g_mat / jnp.where(zero, 1, scale)
    ones = jnp.ones([k], dtype)
    u, done = nnls_gram(g_hat + jnp.outer(ones, ones) + ridge, -ones)
    total = jnp.sum(u)
    w = jnp.where(zero | ~(total > 0), ones / k, u / jnp.where(total > 0, total, 1))
    return _polish_on_face(g_hat, w), done


def _polish_on_face(g_hat: jax.Array, w: jax.Array) -> jax.Array:
    """Min of ``w^T G w`` on the face ``{w >= 0, sum w = 1, w_i = 0 off supp(w)}``, if interior."""
    k = g_hat.shape[0]
    dtype = g_hat.dtype
    face = w > 0
    border = face.astype(dtype)
    top = jnp.where(face[:, None] & face[None, :], g_hat, jnp.eye(k, dtype=dtype))
    kkt = jnp.block([[top, border[:, None]], [border[None, :], jnp.zeros((1, 1), dtype)]])
    rhs = jnp.zeros([k + 1], dtype).at[k].set(1)
    sol = jnp.linalg.solve(kkt, rhs)
    polished = jnp.where(face, sol[:k], 0)
    ok = jnp.all(jnp.where(face, polished > 0, True)) & jnp.all(jnp.isfinite(polished))
    return jnp.where(ok, polished, w)


def _face_point(
    g_mat: jax.Array, b: jax.Array, radius: jax.Array, face: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""On a face ``F``, the path :math:`y_F(\lambda) = \lambda p - q` and its end point.

    :math:`p = G_{FF}^{-1} \mathbf 1`, :math:`q = G_{FF}^{-1} b_F`; the end
    point is the larger root of :math:`y(\lambda)^\top G\, y(\lambda) = r^2`.
    Returns ``(p, q, lambda_end, y_end)``.
    """
    ones = jnp.ones_like(b)
    p = _masked_solve(g_mat, ones, face)
    q = _masked_solve(g_mat, b, face)
    gp, gq = _mv(g_mat, p), _mv(g_mat, q)
    a2, b2, c2 = _mv(p, gp), _mv(p, gq), _mv(q, gq)
    disc = jnp.maximum(b2 * b2 - a2 * (c2 - radius * radius), 0)
    lam = (b2 + jnp.sqrt(disc)) / jnp.where(a2 > 0, a2, 1)
    return p, q, lam, lam * p - q


def cagrad_path(
    g_mat: jax.Array, c: float | jax.Array, *, max_iter: int | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""Exact solution of the CAGrad subproblem on a Gramian, as scaled weights ``y``.

    CAGrad (Liu et al. 2021) looks for :math:`d = g_0 + J^\top y` maximising
    :math:`\min_i g_i^\top d` over the ball :math:`\|d - g_0\| \le r`, with
    :math:`g_0 = J^\top e` the mean gradient (:math:`e = \mathbf 1/K`) and
    :math:`r = c \|g_0\|`. Its KKT conditions are

    .. math::

      y \ge 0, \quad \mu = G(e + y) - \lambda \mathbf 1 \ge 0, \quad y^\top \mu = 0,
      \quad y^\top G y = r^2,

    i.e. :math:`y(\lambda)` solves the NNLS
    :math:`\min_{y\ge0} \tfrac12 y^\top G y + (Ge - \lambda \mathbf 1)^\top y`
    (the projection of :math:`g_0` onto :math:`\{d : Jd \ge \lambda\}`) and
    :math:`\lambda` is the largest level whose projection stays within the
    ball. :math:`y(\lambda)` is piecewise linear and :math:`y^\top G y`
    non-decreasing in :math:`\lambda`, so the solver follows that path exactly
    from :math:`\lambda_0 = \min_i (Ge)_i` (where :math:`y = 0`), one breakpoint
    per iteration (an index entering or leaving the support), until the ball's
    boundary is reached on the current piece (a quadratic in :math:`\lambda`).
    The dual weights of Liu et al. are :math:`w = y / \mathbf 1^\top y` and
    :math:`y = (r / \|J^\top w\|)\, w`. Solves along the path use a ridge of
    :math:`\epsilon\,\operatorname{tr} G`; the last piece is then re-solved
    without it.

    Args:
      g_mat: (K, K) Gramian.
      c: radius factor :math:`c \ge 0`.
      max_iter: cap on breakpoints (default ``4K + 10``).

    Returns:
      ``(y, converged)``.
    """
    k = g_mat.shape[0]
    dtype = g_mat.dtype
    cap = 4 * k + 10 if max_iter is None else max_iter
    e = jnp.full([k], 1.0 / k, dtype)
    b = _mv(g_mat, e)
    radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(_mv(e, b), 0))
    ridge = jnp.finfo(dtype).eps * jnp.maximum(jnp.trace(g_mat), jnp.finfo(dtype).tiny)
    g_reg = g_mat + ridge * jnp.eye(k, dtype=dtype)
    idx = jnp.arange(k, dtype=jnp.int32)

    def cond(st):
        it, _, _, done, _ = st
        return (it < cap) & ~done

    def body(st):
        it, face, lam, _, last = st
        p, q, lam_end, _ = _face_point(g_reg, b, radius, face)
        # y_i = lam p_i - q_i leaves (hits 0) where p_i < 0.
        leave = jnp.where(face & (p < 0) & (idx != last), q / jnp.where(p < 0, p, -1), jnp.inf)
        # mu_j = lam a_j - c_j of an index off the face hits 0 where a_j < 0.
        a = _mv(g_reg, p) - 1
        cj = _mv(g_reg, q) - b
        enter = jnp.where(~face & (a < 0) & (idx != last), cj / jnp.where(a < 0, a, -1), jnp.inf)
        leave = jnp.where(leave >= lam, leave, jnp.inf)
        enter = jnp.where(enter >= lam, enter, jnp.inf)
        i, j = jnp.argmin(leave).astype(jnp.int32), jnp.argmin(enter).astype(jnp.int32)
        lam_event = jnp.minimum(leave[i], enter[j])
        finish = lam_end <= lam_event
        is_leave = leave[i] <= enter[j]
        moved = jnp.where(is_leave, i, j)
        new_face = jnp.where(finish, face, face ^ (idx == moved))
        new_lam = jnp.where(finish, jnp.maximum(lam_end, lam), lam_event)
        return it + 1, new_face, new_lam, finish, jnp.where(finish, last, moved)

    i0 = jnp.argmin(b).astype(jnp.int32)
    init = (jnp.zeros([], jnp.int32), idx == i0, b[i0], jnp.zeros([], jnp.bool_), i0)
    _, face, _, done, _ = jax.lax.while_loop(cond, body, init)
    _, _, _, y_reg = _face_point(g_reg, b, radius, face)
    _, _, _, y_exact = _face_point(g_mat, b, radius, face)
    ok = jnp.all(jnp.where(face, y_exact >= 0, True)) & jnp.all(jnp.isfinite(y_exact))
    y = jnp.where(ok, y_exact, jnp.maximum(y_reg, 0))
    return jnp.where(face, y, 0), done


def bargaining_residual(g_mat: jax.Array, alpha: jax.Array) -> jax.Array:
    r""":math:`\max_i |\alpha_i (G\alpha)_i - 1|`, zero exactly at the Nash bargaining solution."""
    return jnp.max(jnp.abs(alpha * _mv(g_mat, alpha) - 1))


def bargaining(
    g_mat: jax.Array, alpha0: jax.Array, *, max_iter: int = 20, tol: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
    r"""Solves :math:`G\alpha = 1/\alpha`, :math:`\alpha > 0` (Nash-MTL's bargaining solution).

    The equation is the stationarity condition of the strictly convex,
    self-concordant function :math:`F(\alpha) = \tfrac12 \alpha^\top G \alpha
    - \sum_i \log \alpha_i` (:math:`\nabla F = G\alpha - 1/\alpha`,
    :math:`\nabla^2 F = G + \operatorname{diag}(1/\alpha^2)`, positive
    definite), so it is solved by Newton's method: full steps once the Newton
    decrement :math:`\lambda < 1/4` (they stay in the domain and converge
    quadratically); before that, a line search that evaluates :math:`F` at the
    damped step :math:`1/(1 + \lambda)` (always in the domain and decreasing
    :math:`F`, Nesterov & Nemirovski) and at :math:`2^{-m}` times the largest
    step keeping :math:`\alpha > 0`, :math:`m = 0..11`, and takes the best.
    Convergence is global and then
    quadratic. The start is the better (lower :math:`F`) of ``alpha0`` and
    :math:`1/\sqrt{\operatorname{diag} G}` (exact for orthogonal gradients),
    each first rescaled along its ray to the minimiser of :math:`F` there,
    :math:`t = \sqrt{K / \alpha^\top G \alpha}`. Stops when
    :func:`bargaining_residual` :math:`\le` ``tol`` or after ``max_iter`` Newton steps.

    When no solution exists (some :math:`v \ge 0,\ v \ne 0` with :math:`Gv = 0`:
    a zero gradient, or 0 in the convex hull of a subset of gradients) :math:`F`
    is unbounded below and the iterates grow along :math:`v`; they stay finite
    because the number of steps is capped.

    Returns:
      ``(alpha, residual)``.
    """
    k = g_mat.shape[0]
    dtype = g_mat.dtype

    def objective(alpha):
        return 0.5 * _mv(alpha, _mv(g_mat, alpha)) - jnp.sum(jnp.log(alpha))

    def on_ray(alpha):
        alpha = jnp.where(jnp.isfinite(alpha) & (alpha > 0), alpha, 1).astype(dtype)
        quad = _mv(alpha, _mv(g_mat, alpha))
        return alpha * jnp.where(quad > 0, jnp.sqrt(k / jnp.where(quad > 0, quad, 1)), 1)

    diag = jnp.diagonal(g_mat)
    warm = on_ray(alpha0)
    fresh = on_ray(1 / jnp.sqrt(jnp.where(diag > 0, diag, 1)))
    start = jnp.where(objective(fresh) < objective(warm), fresh, warm)
    fractions = 2.0 ** -jnp.arange(12, dtype=dtype)

    def cond(st):
        it, _, res = st
        return (it < max_iter) & (res > tol)

    def body(st):
        it, alpha, _ = st
        grad = _mv(g_mat, alpha) - 1 / alpha
        hess = g_mat + jnp.diag(1 / (alpha * alpha))
        step = -jnp.linalg.solve(hess, grad)
        decrement = jnp.sqrt(jnp.maximum(-_mv(grad, step), 0))
        to_boundary = jnp.min(jnp.where(step < 0, -alpha / jnp.where(step < 0, step, -1), jnp.inf))
        longest = jnp.minimum(1.0, 0.99 * to_boundary)
        sizes = jnp.concatenate([(1 / (1 + decrement))[None], longest * fractions])
        trials = alpha[None, :] + sizes[:, None] * step[None, :]
        values = jax.vmap(objective)(jnp.where(trials > 0, trials, 1))
        values = jnp.where(jnp.all(trials > 0, axis=1) & jnp.isfinite(values), values, jnp.inf)
        best = jnp.argmin(values)
        searched = jnp.where(values[best] <= objective(alpha), trials[best], alpha)
        # Near the solution (decrement < 1/4) the full step is safe and converges
        # quadratically, while F is too flat there to compare values in float32.
        new = jnp.where(decrement < 0.25, alpha + step, searched)
        new = jnp.where(jnp.all(jnp.isfinite(new) & (new > 0)), new, alpha)
        return it + 1, new, bargaining_residual(g_mat, new)

    init = (jnp.zeros([], jnp.int32), start, bargaining_residual(g_mat, start))
    _, alpha, res = jax.lax.while_loop(cond, body, init)
    return alpha, res


def canonical_order(g_mat: jax.Array) -> jax.Array:
    """A task order that depends on the tasks, not on the order they come in.

    The permutation sorting the tasks by squared norm :math:`G_{kk}`, ties broken by the
    row sums :math:`\\sum_j G_{kj}`. Solving on ``G[p][:, p]`` and scattering the weights
    back makes a solver's result independent of the order of the tasks: a permuted input
    gives a bit-identical canonical problem (up to ties in both keys), where a solver
    run in the given order rounds differently (active-set pivots, summation order).
    """
    return jnp.lexsort((jnp.sum(g_mat, axis=1), jnp.diagonal(g_mat)))


def in_canonical_order(solve: Callable[[jax.Array], jax.Array], g_mat: jax.Array) -> jax.Array:
    """``solve(G)`` computed on the Gramian in :func:`canonical_order`, weights returned in the
    given order: the same weights (bit for bit) for any order of the tasks."""
    perm = canonical_order(g_mat)
    return solve(g_mat[perm][:, perm])[jnp.argsort(perm)]
