"""The exact solvers behind the aggregators, certified by independent NumPy/SciPy checks.

* NNLS (UPGrad, DualProj, MGDA) against ``scipy.optimize.nnls``.
* MGDA: KKT conditions of the min-norm problem, at sizes beyond face enumeration
  and with rank-deficient Jacobians (0 possibly in the hull).
* CAGrad: primal feasibility and a zero duality gap.
* Nash-MTL: the bargaining condition and agreement with ``scipy.optimize.root``.

Each solver is compiled once per size, on a batch of problems (``jax.vmap``);
the small sizes are covered by the TorchJD goldens (``test_aggregators_golden.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from samgs_optax.aggregators import cagrad_weights, mgda_weights, nash_mtl_weights
from samgs_optax.aggregators._solvers import bargaining_residual, nnls_gram

BATCH = 12


def _jacobians(seed: int, k: int, d: int, batch: int = BATCH) -> np.ndarray:
    """Random (batch, k, d) Jacobians with conflicts and norms spread over two decades."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(batch, k, d))
    j[:, 1:] -= rng.uniform(0, 2, size=(batch, k - 1, 1)) * j[:, :1]  # pull against task 0
    j /= np.linalg.norm(j, axis=-1, keepdims=True)
    return j * 10 ** rng.uniform(-1, 1, size=(batch, k, 1))


def _gram32(j: np.ndarray) -> jax.Array:
    return jnp.asarray(np.einsum("bkd,bld->bkl", j, j), jnp.float32)


@pytest.mark.parametrize("k", [25])
def test_nnls_matches_scipy(k):
    """The NNLS met in UPGrad: min ||A x - b||, x >= 0, with A'A = trace-normalised + 1e-4 I."""
    rng = np.random.default_rng(k)
    a = rng.normal(size=(BATCH, k + 5, k)) * 10 ** rng.uniform(-1, 1, size=(BATCH, 1, k))
    a /= np.linalg.norm(a, axis=(1, 2), keepdims=True)
    a = np.concatenate([a, np.broadcast_to(1e-2 * np.eye(k), (BATCH, k, k))], axis=1)
    b = np.concatenate([rng.normal(size=(BATCH, k + 5)), np.zeros((BATCH, k))], axis=1)
    q_mat = np.einsum("bnk,bnl->bkl", a, a)
    q_vec = -np.einsum("bnk,bn->bk", a, b)
    x, done = jax.jit(jax.vmap(nnls_gram))(jnp.asarray(q_mat, jnp.float32), jnp.asarray(q_vec))
    x = np.asarray(x, np.float64)
    assert np.all(np.asarray(done))
    for i in range(BATCH):
        want, _ = scipy.optimize.nnls(a[i], b[i])
        assert np.all(x[i] >= 0)
        np.testing.assert_allclose(x[i], want, rtol=0, atol=1e-3 * np.abs(want).max())
        # Same objective value to float32 precision.
        got_obj = 0.5 * np.sum((a[i] @ x[i] - b[i]) ** 2)
        want_obj = 0.5 * np.sum((a[i] @ want - b[i]) ** 2)
        assert got_obj <= want_obj * (1 + 1e-5)


@pytest.mark.parametrize("k, d", [(20, 64), (40, 24)])
def test_mgda_kkt(k, d):
    """w is on the simplex and G w >= (w'Gw) 1, with equality on the support of w."""
    j = _jacobians(100 + k, k, d)
    w = np.asarray(jax.jit(jax.vmap(mgda_weights))(_gram32(j)), np.float64)
    for i in range(BATCH):
        g = j[i] @ j[i].T
        scale = np.diag(g).max()
        lam = w[i] @ g @ w[i]
        assert np.all(w[i] >= 0) and abs(w[i].sum() - 1) < 1e-5
        slack = g @ w[i] - lam
        assert slack.min() >= -1e-5 * scale, slack.min() / scale
        support = w[i] > 1e-6
        assert np.abs(slack[support]).max() <= 1e-5 * scale
        # Not worse than the best single task or the mean (sanity, independent of KKT).
        assert lam <= min(np.diag(g).min(), np.full(k, 1 / k) @ g @ np.full(k, 1 / k)) + 1e-6


@pytest.mark.parametrize("k", [15])
def test_cagrad_zero_duality_gap(k):
    r"""Primal :math:`\min_i g_i^\top d` equals the dual at :math:`w = y / 1^\top y`."""
    j = _jacobians(200 + k, k, 32)
    cs = jnp.asarray([0.1, 0.5, 0.9, 2.0], jnp.float32)
    weights = jax.jit(jax.vmap(jax.vmap(lambda g, c: cagrad_weights(g, c=c), (None, 0)), (0, None)))
    out = np.asarray(weights(_gram32(j), cs), np.float64)
    for i in range(BATCH):
        g0 = j[i].mean(axis=0)
        for c, wts in zip(np.asarray(cs, np.float64), out[i], strict=True):
            d = wts @ j[i]
            radius = c * np.linalg.norm(g0)
            scale = np.abs(j[i] @ g0).max() + radius * np.linalg.norm(j[i], axis=1).max()
            assert np.linalg.norm(d - g0) <= radius * (1 + 1e-5) + 1e-7
            y = wts - 1 / k
            assert y.min() >= -1e-6
            w = y / y.sum()
            gw = w @ j[i]
            primal = (j[i] @ d).min()
            dual = gw @ g0 + radius * np.linalg.norm(gw)
            assert dual - primal <= 1e-5 * scale, (c, dual - primal, scale)
            assert primal - dual <= 1e-5 * scale  # weak duality, up to rounding


def _bargaining_scipy(g: np.ndarray) -> np.ndarray:
    """Independent float64 solution of G a = 1/a, a > 0.

    Minimises F(a) = a'Ga/2 - sum(log a) in log coordinates a = exp(z) with
    SciPy's BFGS (its only stationary point is the solution), polishes with
    ``scipy.optimize.root`` and checks the residual.
    """
    k = g.shape[0]

    def fun(z):
        a = np.exp(z)
        ga = g @ a
        return 0.5 * a @ ga - z.sum(), a * ga - 1

    z0 = np.full(k, -0.5 * np.log(g.sum() / k))
    sol = scipy.optimize.minimize(fun, z0, jac=True, method="BFGS", options={"gtol": 1e-10})
    # Polish: the same equations by MINPACK's hybrid method, from the BFGS point.
    sol = scipy.optimize.root(lambda z: fun(z)[1], sol.x, method="hybr", tol=1e-14)
    a = np.exp(sol.x)
    assert np.abs(a * (g @ a) - 1).max() < 1e-10
    return a


@pytest.mark.parametrize("k", [3, 10])
def test_nash_bargaining_solution(k):
    j = _jacobians(300 + k, k, 40)
    rng = np.random.default_rng(k)
    warm = jnp.asarray(10 ** rng.uniform(-2, 2, size=(BATCH, k)), jnp.float32)
    alpha, res = jax.jit(jax.vmap(nash_mtl_weights))(_gram32(j), warm)
    alpha = np.asarray(alpha, np.float64)
    assert np.all(np.asarray(res) <= 1e-4)
    for i in range(BATCH):
        g = j[i] @ j[i].T
        assert np.all(alpha[i] > 0)
        # The bargaining condition, checked in float64 on the float64 Gramian.
        assert np.abs(alpha[i] * (g @ alpha[i]) - 1).max() <= 1e-4
        want = _bargaining_scipy(g)
        np.testing.assert_allclose(alpha[i], want, rtol=2e-4)
        # Property of the solution: ||J^T a||^2 = sum_i a_i (G a)_i = K.
        assert abs(np.linalg.norm(alpha[i] @ j[i]) ** 2 - k) <= 1e-3 * k


def test_bargaining_residual_definition():
    g = jnp.asarray([[2.0, 0.5], [0.5, 1.0]])
    a = jnp.asarray([0.5, 2.0])
    want = np.abs(np.asarray(a) * (np.asarray(g) @ np.asarray(a)) - 1).max()
    assert float(bargaining_residual(g, a)) == pytest.approx(want)
