"""Scale: every aggregator on c * J for c far outside float32's comfortable range.

The Gramian's entries are squares of the gradients' scale, so for c = 1e-20 it
underflows in float32 (to zero on CPU) and for c = 1e20 it overflows; the
aggregators use :func:`samgs_optax.gramian.scaled_gramian` to solve on an exactly
rescaled copy. References are independent: NumPy float64 Gramians, traces and
norms, and the same aggregator on the unscaled (normal-range) J.

Expected scale behaviour, by method (``u(J)`` the update for J):
- ``linear_scalarization``, ``graddrop``, ``pcgrad``, ``mgda``, ``imtl_g``,
  ``aligned_mtl``: homogeneous, ``u(cJ) = c u(J)``;
- ``upgrad``, ``dualproj``: ``c u(J)`` unless the true trace ``c^2 tr(JJ^T)`` is
  below ``norm_eps`` (then the mean gradient); ``cagrad``: then 0;
- ``nash_mtl``: ``u(cJ) = u(J)`` (alpha scales as 1/c);
- ``constant``, ``random_weighting`` (same key), ``trimmed_mean``, ``krum``, ``con_fig``:
  homogeneous; ``fairgrad``: ``u(cJ) = c^((1-a)/(1+a)) u(J)`` (w scales as c^(-2a/(1+a)));
- ``cr_mogm`` (around ``upgrad``): as ``upgrad``; ``gradvac``, ``pcd``: homogeneous
  with ``eps=0``, and with the default ``eps`` wherever it is negligible;
  ``excess_mtl``, ``modo``: the mean for tiny c, one task's gradient (a vertex
  of the simplex) for huge c; ``sdmgrad``: homogeneous unless c is so small that
  its absolute 1e-8 dominates (then the mean);
- ``moco``: scale-free while ||g|| >> 1e-8 (unit gradients times the losses);
  ``db_mtl``: homogeneous while its buffer norms >> 1e-8; both with LibMTL's absolute
  1e-8 dominating for tiny c;
- ``gradnorm``: its first update is the sum (homogeneous); the next ones too while Adam's
  step on its logits is scale-free (the weights stay 1 when it is ~0 or overflows);
- ``samgs``: Psi and h are scale-free (its per-task norms are rescaled), the
  equalisation branch is homogeneous of degree 1, the momentum branch of degree 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_aggregator

import samgs_optax
from samgs_optax.gramian import gramian, gramian_range, pow2_scale, scaled_gramian
from samgs_optax.similarity import task_norms

K, D = 3, 30
SCALES = (1e-20, 1e-30, 1e17, 1e20)
HOMOGENEOUS = ("linear_scalarization", "graddrop", "pcgrad", "mgda", "imtl_g", "aligned_mtl")
# Issue 12's stateless methods are homogeneous too (fairgrad: a power of c, its own test).
HOMOGENEOUS += ("constant", "random_weighting", "trimmed_mean", "krum", "con_fig")
TRACE_EPS = ("upgrad", "dualproj", "cagrad", "cr_mogm")  # cr_mogm wraps upgrad by default
# Issue 12's stateful methods with other absolute constants (see their tests below).
ABSOLUTE_EPS = ("gradvac", "pcd")
SATURATING = ("excess_mtl", "modo")


def _jacobian(seed: int = 0, k: int = K, d: int = D) -> np.ndarray:
    """(k, d) float32, rows pulled against row 0 (conflicts), norms over two decades."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(k, d))
    j[1:] -= rng.uniform(0, 2, size=(k - 1, 1)) * j[:1]
    j *= 10 ** rng.uniform(-1, 1, size=(k, 1))
    return j.astype(np.float32)


def _scaled(j: np.ndarray, c: float) -> np.ndarray:
    return (j.astype(np.float64) * c).astype(np.float32)


def _tree(j: np.ndarray) -> dict:
    """Splits the columns into a pytree of leaves of different shapes."""
    k = j.shape[0]
    return {"a": jnp.asarray(j[:, :12].reshape(k, 4, 3)), "b": {"c": jnp.asarray(j[:, 12:])}}


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in leaves])


def _true_trace(j: np.ndarray) -> float:
    j = j.astype(np.float64)
    return float(np.sum(j * j))


@functools.cache
def _step(name: str, **options):
    """One jitted update from a fresh state: (update, state) for a (K, D) Jacobian."""
    tx = make_aggregator(name, K, **options)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), _tree(_jacobian()))

    @jax.jit
    def run(tree):
        return tx.update(tree, tx.init(params), params)

    return lambda j: run(_tree(j))


@functools.cache
def _steps(name: str, **options):
    """Two jitted updates from a fresh state (J1, then J2): (update, state) of the second."""
    tx = make_aggregator(name, K, **options)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), _tree(_jacobian()))

    @jax.jit
    def run(tree1, tree2):
        _, state = tx.update(tree1, tx.init(params), params)
        return tx.update(tree2, state, params)

    return lambda j1, j2: run(_tree(j1), _tree(j2))


@functools.cache
def _with_traced_eps(name: str):
    """The update for two values of norm_eps (traced: one compile), from a fresh state."""
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), _tree(_jacobian()))

    def one(tree, eps):
        tx = make_aggregator(name, K, norm_eps=eps)
        return tx.update(tree, tx.init(params), params)[0]

    @jax.jit
    def run(tree, eps_a, eps_b):
        return one(tree, eps_a), one(tree, eps_b)

    return run


def _assert_close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), what
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rtol, (what, err)


# --------------------------------------------------------------------------------------
# The Gramian.


@pytest.mark.parametrize("c", (1.0, *SCALES, 1e-33, 1e35))
def test_scaled_gramian_matches_float64(c):
    """2^t G_hat equals the float64 Gramian of the float32 input, t even, G_hat in range."""
    j = _scaled(_jacobian(1), c)
    # Entries below float32's smallest normal number are flushed on CPU: not tested.
    assert np.abs(j).min() >= np.finfo(np.float32).tiny
    g_hat, t = jax.jit(scaled_gramian)(_tree(j))
    g_hat, t = np.asarray(g_hat, np.float64), int(t)
    want = j.astype(np.float64) @ j.T.astype(np.float64)
    assert t % 2 == 0
    assert np.all(np.isfinite(g_hat))
    np.testing.assert_allclose(g_hat * 2.0**t, want, rtol=0, atol=1e-6 * np.diag(want).max())
    lo, hi = gramian_range(D)
    assert lo <= np.diag(g_hat).max() <= hi
    if c == 1.0:  # in range: untouched, bit for bit
        assert t == 0
        np.testing.assert_array_equal(g_hat, np.asarray(gramian(_tree(j)), np.float64))
    else:
        assert t != 0


def test_scaled_gramian_window_edges():
    """Just inside the window the plain Gramian is kept (t = 0); just outside it is rescaled."""
    lo, hi = gramian_range(D)
    j = np.zeros((2, D), np.float32)
    j[1, 0] = 1.0  # row 0 is zero: max diag = the square of one entry
    for top, inside in ((lo, True), (lo / 4, False), (hi, True), (hi * 4, False)):
        j[1, 0] = np.float32(np.sqrt(top))
        g_hat, t = jax.jit(scaled_gramian)({"w": jnp.asarray(j)})
        assert (int(t) == 0) == inside, (top, int(t))
        np.testing.assert_allclose(float(g_hat[1, 1]) * 2.0 ** int(t), top, rtol=1e-6)


def test_scaled_gramian_zero_and_nonfinite():
    z, t = jax.jit(scaled_gramian)({"w": jnp.zeros((2, 5))})
    np.testing.assert_array_equal(z, 0)
    assert int(t) == 0
    bad = jnp.asarray([[1.0, jnp.nan], [1.0, 2.0]])
    g_hat, _ = jax.jit(scaled_gramian)({"w": bad})
    assert not np.all(np.isfinite(np.asarray(g_hat)))  # garbage in stays visible


def test_scaled_gramian_under_vmap_is_the_same():
    """Under vmap the cond is a select (both branches run): same values as one by one."""
    js = np.stack([_scaled(_jacobian(2), c) for c in (1.0, *SCALES)])
    g_b, t_b = jax.jit(jax.vmap(lambda w: scaled_gramian({"w": w})))(jnp.asarray(js))
    for i, j in enumerate(js):
        g_1, t_1 = jax.jit(scaled_gramian)({"w": jnp.asarray(j)})
        np.testing.assert_array_equal(g_b[i], g_1)
        assert int(t_b[i]) == int(t_1)


def test_pow2_scale():
    x = jnp.asarray([1e-4, 3.0, 1.5e-38], jnp.float32)
    for n in (0, 1, -1, 60, -60, 126):
        got = np.asarray(pow2_scale(x, n), np.float64)
        want = np.asarray(x, np.float64) * 2.0**n
        fine = (np.abs(want) >= np.finfo(np.float32).tiny) & (np.abs(want) < 3e38)
        np.testing.assert_array_equal(got[fine], want[fine])
    assert float(pow2_scale(jnp.float32(1e-4), 140)) == pytest.approx(1e-4 * 2.0**140, rel=1e-7)
    assert float(pow2_scale(jnp.float32(1e-4), 300)) == np.inf  # saturates, no NaN
    assert float(pow2_scale(jnp.float32(1e-4), -300)) == 0.0


# --------------------------------------------------------------------------------------
# Every aggregator.


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_homogeneous_methods(name, c):
    j = _jacobian()
    step = _step(name)
    want = c * _flat(step(j)[0])
    _assert_close(_flat(step(_scaled(j, c))[0]), want, 1e-5, (name, c))


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("name", TRACE_EPS)
def test_trace_threshold_methods_default_eps(name, c):
    """Default norm_eps = 1e-4 against the true trace: tiny scales are 'small', huge are not."""
    j = _jacobian()
    jc = _scaled(j, c)
    step = _step(name)
    got = _flat(step(jc)[0])
    if _true_trace(jc) < 1e-4:
        if name == "cagrad":
            np.testing.assert_array_equal(got, 0)
        else:  # the mean gradient
            _assert_close(got, jc.astype(np.float64).mean(axis=0), 1e-6, (name, c))
    else:
        _assert_close(got, c * _flat(step(j)[0]), 1e-5, (name, c))


@pytest.mark.parametrize("c", (1e-17, 1e17))
@pytest.mark.parametrize("name", TRACE_EPS)
def test_trace_threshold_at_extreme_scale(name, c):
    """norm_eps at half and twice the true (float64) trace, with the Gramian out of range."""
    j = _jacobian()
    jc = _scaled(j, c)
    trace = _true_trace(jc)
    g = jc.astype(np.float64) @ jc.T.astype(np.float64)
    lo, hi = gramian_range(D)
    assert not lo <= np.diag(g).max() <= hi  # the rescaled path is the one under test
    above, below = (_flat(u) for u in _with_traced_eps(name)(_tree(jc), 0.5 * trace, 2.0 * trace))
    if name == "cagrad" and trace > 1:
        # CAGrad's norm_eps also bounds the dual norm on G / tr G (at most 1): always 0.
        np.testing.assert_array_equal(above, 0)
    else:
        _assert_close(above, c * _flat(_step(name)(j)[0]), 1e-5, (name, c))
    if name == "cagrad":
        np.testing.assert_array_equal(below, 0)
    else:
        _assert_close(below, jc.astype(np.float64).mean(axis=0), 1e-6, (name, c))


@pytest.mark.parametrize("c", SCALES)
def test_nash_mtl_scale(c):
    """alpha scales as 1/c and satisfies G alpha = 1/alpha on the float64 Gramian of c J."""
    j = _jacobian()
    jc = _scaled(j, c)
    g = jc.astype(np.float64) @ jc.T.astype(np.float64)
    for max_norm in (0.0, 1.0):
        step = _step("nash_mtl", max_norm=max_norm)
        u, state = step(j)
        u_c, state_c = step(jc)
        alpha = np.asarray(state_c.alpha, np.float64)
        assert np.abs(alpha * (g @ alpha) - 1).max() <= 1e-4, (c, max_norm)
        _assert_close(c * alpha, state.alpha, 1e-4, (c, max_norm))
        _assert_close(_flat(u_c), _flat(u), 1e-4, (c, max_norm))
        norm = np.linalg.norm(_flat(u_c))
        assert norm == pytest.approx(np.sqrt(K) if max_norm == 0 else max_norm, rel=1e-4)


def test_nash_mtl_reuses_alpha_across_scales():
    """update_weights_every=2: alpha solved at scale 1e-20 is reused (true units) at 1e-19."""
    nash = samgs_optax.nash_mtl(K, update_weights_every=2, max_norm=0.0)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), _tree(_jacobian()))
    update = jax.jit(nash.update)
    j1, j2 = _scaled(_jacobian(3), 1e-20), _scaled(_jacobian(4), 1e-19)
    _, state = update(_tree(j1), nash.init(params), params)
    u2, state2 = update(_tree(j2), state, params)
    alpha = np.asarray(state.alpha, np.float64)
    g1 = j1.astype(np.float64) @ j1.T.astype(np.float64)
    assert np.abs(alpha * (g1 @ alpha) - 1).max() <= 1e-4
    np.testing.assert_array_equal(np.asarray(state2.alpha), np.asarray(state.alpha))
    _assert_close(_flat(u2), alpha @ j2.astype(np.float64), 1e-5, "reused alpha")
    # The diagnostic residual of the reused alpha, on the second Gramian.
    g2 = j2.astype(np.float64) @ j2.T.astype(np.float64)
    want = np.abs(alpha * (g2 @ alpha) - 1).max()
    assert float(state2.residual) == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("c", (1e17, *SCALES))
def test_samgs_equalised_scale(c):
    """Equalisation branch (gamma = 1): u(cJ) = c u(J), and the norms are c n(J).

    ``samgs`` computes its norms with ``task_norms(g, rescale=True)``: at
    c = 1e-20 and 1e-30 the plain squared norms underflow (zero norms, Psi = 1),
    at c = 1e20 they overflow (inf norms, NaN update); rescaled, they are exact.
    """
    j = _jacobian()
    step = _step("samgs", gamma=1.0)
    u, state = step(j)
    assert bool(state.equalised)
    u_c, state_c = step(_scaled(j, c))
    assert bool(state_c.equalised)
    _assert_close(_flat(u_c), c * _flat(u), 1e-5, c)
    want = np.linalg.norm(_scaled(j, c).astype(np.float64), axis=1)
    np.testing.assert_allclose(np.asarray(state_c.norms, np.float64), want, rtol=1e-6)


@pytest.mark.parametrize("c", (1e-17, 1e17, 1e-30, 1e20))
def test_samgs_momentum_scale(c):
    """Momentum branch (gamma = 0), two steps: Psi, h and the branch do not depend on c.

    m is linear in c, so u(cJ) = c^2 u(J): checked where c^2 u(J) is a normal
    float32 (c = 1e-17, 1e17). At c = 1e-30 and 1e20, c^2 u(J) lies outside
    float32 (1e-60, 1e40): the update is then not checked, but the state
    (norms, Psi, h, m) still is.
    """
    j, j2 = _jacobian(), _jacobian(7)
    step = _steps("samgs", gamma=0.0)
    (u, state), (u_c, state_c) = step(j, j2), step(_scaled(j, c), _scaled(j2, c))
    assert not bool(state_c.equalised)
    np.testing.assert_allclose(float(state_c.similarity), float(state.similarity), rtol=1e-6)
    np.testing.assert_allclose(float(state_c.h), float(state.h), rtol=1e-6)
    want = np.linalg.norm(_scaled(j2, c).astype(np.float64), axis=1)
    np.testing.assert_allclose(np.asarray(state_c.norms, np.float64), want, rtol=1e-6)
    _assert_close(_flat(state_c.m), c * _flat(state.m), 1e-6, c)
    top = c * c * np.abs(_flat(u)).max()
    if np.finfo(np.float32).tiny < top < np.finfo(np.float32).max:
        assert c in (1e-17, 1e17)
        _assert_close(_flat(u_c), c * c * _flat(u), 1e-5, c)


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("name", ABSOLUTE_EPS)
def test_absolute_eps_methods(name, c):
    """GradVac and PCD: homogeneous with eps = 0 at every scale (their constants scaled with
    the Gramian), and with the default eps = 1e-8 where it is negligible (c >= 1e17)."""
    j = _jacobian()
    step = _step(name, eps=0.0)
    _assert_close(_flat(step(_scaled(j, c))[0]), c * _flat(step(j)[0]), 1e-5, (name, c))
    if c > 1:
        step = _step(name)
        _assert_close(_flat(step(_scaled(j, c))[0]), c * _flat(step(j)[0]), 1e-5, (name, c))


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("name", SATURATING)
def test_saturating_methods(name, c):
    """ExcessMTL and MoDo step in absolute units: for tiny c nothing moves the uniform weights
    (the mean); for huge c the first step lands on a vertex, finite: the task with the largest
    excess risk (sum |g_i|, g_i^2 >> 1e-7) or the smallest (G 1/K)_i, from float64 NumPy."""
    jc = _scaled(_jacobian(), c)
    got = _flat(_step(name)(jc)[0])
    j64 = jc.astype(np.float64)
    if c < 1:
        _assert_close(got, j64.mean(axis=0), 1e-6, (name, c))
    else:
        i = (
            np.argmax(np.abs(j64).sum(1))
            if name == "excess_mtl"
            else np.argmin((j64 @ j64.T).sum(1))
        )
        _assert_close(got, j64[i], 1e-6, (name, c))


@pytest.mark.parametrize("c", SCALES)
def test_sdmgrad_scale(c):
    """Normalised by its mean diagonal: homogeneous, unless c^2 ||g||^2 is far below the
    absolute 1e-8 added to it (then the weights stay uniform: the mean)."""
    j = _jacobian()
    jc = _scaled(j, c)
    step = _step("sdmgrad")
    want = c * _flat(step(j)[0]) if c > 1 else jc.astype(np.float64).mean(axis=0)
    _assert_close(_flat(step(jc)[0]), want, 1e-5, c)


@pytest.mark.parametrize("c", SCALES)
def test_fairgrad_scale(c):
    """FairGrad (alpha = 2): w(cJ) = c^(-4/3) w(J) and u(cJ) = c^(-1/3) u(J), the weights
    solving G w = w^(-1/2) on the float64 Gramian of cJ. At c = 1e-30 the weights (~1e39)
    exceed float32: the state saturates, the update (combined as mantissa x 2^e) does not."""
    a = 2.0
    j = _jacobian()
    jc = _scaled(j, c)
    step = _step("fairgrad")
    u, state = step(j)
    u_c, state_c = step(jc)
    _assert_close(_flat(u_c), c ** ((1 - a) / (1 + a)) * _flat(u), 1e-4, c)
    want = c ** (-2 * a / (1 + a)) * np.asarray(state.weights, np.float64)
    if np.abs(want).max() < np.finfo(np.float32).max:
        w = np.asarray(state_c.weights, np.float64)
        _assert_close(w, want, 1e-4, c)
        g = jc.astype(np.float64) @ jc.T.astype(np.float64)
        residual = np.linalg.norm(g @ w - w ** (-1 / a)) / np.linalg.norm(w ** (-1 / a))
        assert residual < 1e-4, (c, residual)
    else:
        assert c == 1e-30


def _loss_aware_first_step(name: str, j: np.ndarray) -> np.ndarray:
    """float64 NumPy: the first update of MoCo / DB-MTL (LibMTL's defaults) for losses of 1."""
    j = j.astype(np.float64)
    k = j.shape[0]
    norms = np.linalg.norm(j, axis=1)
    if name == "moco":
        y = 0.5 * j / (norms[:, None] + 1e-8)  # beta = 0.5 at t = 1, L = 1
        z = np.full(k, 1 / k) - 0.1 * (y @ y.T) @ np.full(k, 1 / k)
        lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        return lam @ y
    b = 0.1 * j / (1 + 1e-8)  # db_mtl: (1 - beta) g / (L + 1e-8) at t = 1
    n = np.linalg.norm(b, axis=1)
    return (n.max() / (n + 1e-8)) @ b


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("name", ["moco", "db_mtl"])
def test_loss_aware_scale(name, c):
    """MoCo: scale-free (unit gradients times the losses) while ||g|| >> 1e-8, and for tiny c
    its absolute 1e-8 makes it ~c/1e-8 times smaller; DB-MTL: homogeneous while the buffer
    norms >> 1e-8, ~c^2 for tiny c. Both against float64 NumPy wherever the true update is a
    normal float32 number (not DB-MTL at c = 1e-30: ~1e-52, then zero)."""
    jc = _scaled(_jacobian(), c)
    got = _flat(_step(name)(jc)[0])
    want = _loss_aware_first_step(name, jc)
    assert np.all(np.isfinite(got))
    if np.abs(want).max() > 1e-36:
        _assert_close(got, want, 1e-5, (name, c))
    else:
        assert name == "db_mtl" and c == 1e-30 and np.abs(got).max() < 1e-37


@pytest.mark.parametrize("c", SCALES)
def test_gradnorm_scale(c):
    """GradNorm's second update, after one Adam step on its logits (equal losses): Adam's step
    is scale-free while |dL_grad/ds| >> its eps 1e-8 and its square is finite, so u(cJ) = c u(J)
    (c = 1e17); for tiny c the step is ~1e-12 and for c = 1e20 the square overflows float32 and
    the step is skipped: the weights stay 1 and u = c sum_k g_k (float64 NumPy)."""
    j1, j2 = _jacobian(), _jacobian(1)
    step = _steps("gradnorm")
    base, state = step(j1, j2)
    assert np.abs(np.asarray(state.weights) - 1).max() > 0.01  # the weights did move at c = 1
    got = _flat(step(_scaled(j1, c), _scaled(j2, c))[0])
    if c == 1e17:
        want = c * _flat(base)
    else:
        want = _scaled(j2, c).astype(np.float64).sum(axis=0)
    _assert_close(got, want, 1e-5, c)


def test_every_aggregator_is_covered():
    covered = {*HOMOGENEOUS, *TRACE_EPS, *ABSOLUTE_EPS, *SATURATING, "sdmgrad", "nash_mtl", "samgs"}
    covered.add("fairgrad")  # test_fairgrad_scale
    covered.update(("moco", "db_mtl"))  # test_loss_aware_scale
    covered.add("gradnorm")  # test_gradnorm_scale
    assert covered == set(samgs_optax.AGGREGATORS)


# --------------------------------------------------------------------------------------
# Per-task norms.


@pytest.mark.parametrize("c", (1.0, *SCALES))
def test_task_norms_rescaled_match_float64(c):
    """rescale=True: per-task norms exact over ~70 decades, including a zero task."""
    j = _jacobian(5, k=5)
    j[3] = 0
    spread = np.array([1.0, 1e-25, 1e18, 1.0, 1e-12])
    jc = (j.astype(np.float64) * spread[:, None] * c).astype(np.float32)
    want = np.linalg.norm(jc.astype(np.float64), axis=1)
    got = np.asarray(jax.jit(lambda t: task_norms(t, rescale=True))(_tree(jc)), np.float64)
    plain = np.asarray(jax.jit(task_norms)(_tree(jc)), np.float64)
    # Tasks with entries below float32's smallest normal number are flushed on CPU
    # (not tested); the others, zero or not, are.
    normal = np.all((jc == 0) | (np.abs(jc) >= np.finfo(np.float32).tiny), axis=1)
    got, want, plain = got[normal], want[normal], plain[normal]
    assert len(want) >= 3
    representable = want < np.finfo(np.float32).max
    np.testing.assert_allclose(got[representable], want[representable], rtol=1e-6)
    assert np.all(np.isinf(got[~representable]))
    # Tasks in range equal the plain norms to rounding (the three sums of one variadic
    # reduction add in another order than the plain sum).
    lo, hi = gramian_range(D)
    fine = (want**2 >= lo * 1.01) & (want**2 <= hi * 0.99)
    np.testing.assert_allclose(got[fine], plain[fine], rtol=1e-6)


@pytest.mark.parametrize(
    "shape", [(2, 2**24 + 2**23), (2, 5000, 8003), (3, 1000, 1000, 4), (2, 3, 3, 64, 128)]
)
def test_task_norms_rescaled_of_large_leaves(shape):
    """Large leaves, far from unit scale: each norm to float32 rounding (float64 reference).

    XLA:CPU runs the variadic reduction as one sequential loop; unblocked, a (2, 2^24 + 2^23)
    leaf of ones gave 4096 for 5016.6 (the float32 sum stops growing at 2^24) and a
    (2, 5e5) leaf lost four digits.
    """
    rng = np.random.default_rng(sum(shape))
    for scale in (1.0, 1e-25, 1e22):
        equal = len(shape) == 2 and shape[1] > 2**24  # equal entries: the saturating case
        if equal:
            x = np.full(shape, scale, np.float32)
        else:
            x = (rng.standard_normal(shape) * scale).astype(np.float32)
        want = np.sqrt((x.astype(np.float64) ** 2).reshape(shape[0], -1).sum(axis=1))
        got = np.asarray(jax.jit(lambda t: task_norms(t, rescale=True))({"w": jnp.asarray(x)}))
        # Equal terms round the same way in every block of 4096 (2.4e-5 seen at 1e22)
        rtol = 5e-5 if equal else 5e-6
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=f"{shape}, scale {scale}")


def test_task_norms_rescaled_similarity_is_scale_free():
    j = _jacobian(6, k=4)
    similarity = jax.jit(lambda t: samgs_optax.magnitude_similarity(task_norms(t, rescale=True)))
    psi = [np.asarray(similarity(_tree(_scaled(j, c)))) for c in (1.0, *SCALES)]
    for p in psi[1:]:
        np.testing.assert_allclose(p, psi[0], rtol=1e-5)
