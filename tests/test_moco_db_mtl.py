"""MoCo and DB-MTL (issue 12: LibMTL's loss-aware methods) against NumPy transcriptions.

The references below are written from LibMTL's ``MoCo`` and ``DB_MTL`` (and
the papers' equations), in float64 on flattened (K, D) matrices; the library
runs pytree-native. Every case is a sequence of 6 steps fed to one transform
(a ``lax.scan`` carrying the state), vmapped over 3 random sequences, all
variants of one (K, dtype) in one compiled function: K = 2, 3, 5, float32 and
float64 (the option variants at fewer (K, dtype), see ``variants_at``), a
pytree of two shared leaves and a masked head. The sequences have task
gradients across four orders of magnitude, losses from 0.05 to 5, and one step
where a task's gradient is exactly zero.

Worst relative error max|u - u_ref| / max|u_ref| over every step, sequence and K,
measured (``python tests/test_moco_db_mtl.py``):

                                   float32   float64
    moco                           1.7e-07   4.1e-16
    moco(rho, gamma=0.5, sigmas)   2.5e-07   5.1e-16
    moco(paper: raw, projection)   7.5e-07   8.8e-16
    db_mtl                         5.5e-07   2.8e-15
    db_mtl(beta_sigma, heads=log)  1.9e-07   5.4e-16
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samgs_optax
from samgs_optax.aggregators.db_mtl import db_mtl
from samgs_optax.aggregators.moco import moco

KS = (2, 3, 5)
DTYPES = (np.float32, np.float64)
STEPS = 6
SEQUENCES = 3
SHAPES = {"trunk": {"w": (4, 3), "b": (3,)}, "head": (2,)}
MASK = {"trunk": {"w": True, "b": True}, "head": False}
RTOL = {np.float32: 2e-6, np.float64: 1e-14}

VARIANTS = {
    "moco": (moco, {}),
    "moco_options": (moco, dict(rho=0.1, gamma=0.5, beta=0.8, beta_sigma=0.3, gamma_sigma=0.7)),
    "moco_paper": (moco, dict(normalize=False, lambda_update="projection", gamma=0.02)),
    "db_mtl": (db_mtl, {}),
    "db_mtl_options": (db_mtl, dict(beta=0.7, beta_sigma=0.5, heads="log")),
}
DEFAULTS = ("moco", "db_mtl")


def variants_at(k, dtype):
    """The defaults at every (K, dtype); the options at K = 3 and 5 in float32, K = 3 in
    float64 (each (K, dtype) is one compile of ~1.5 s per variant on the loaded machine)."""
    if k == 3 or (k == 5 and dtype == np.float32):
        return list(VARIANTS)
    return list(DEFAULTS)


# ------------------------------------------------------------------ NumPy references


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _simplex(z):
    """Euclidean projection onto the simplex by bisection on the threshold (independent of
    the library's sort-based rule)."""
    lo, hi = z.min() - 1.0, z.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(z - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - (lo + hi) / 2, 0)


def moco_reference(
    jacobians,
    losses,
    heads,
    *,
    beta=0.5,
    beta_sigma=0.5,
    gamma=0.1,
    gamma_sigma=0.5,
    rho=0.0,
    normalize=True,
    lambda_update="softmax",
):
    """LibMTL's MoCo on (T, K, D) shared Jacobians; heads (T, K, H) get their task sum."""
    _, k, d = jacobians.shape
    y, lam = np.zeros((k, d)), np.full(k, 1.0 / k)
    out = []
    for t, (g, loss, h) in enumerate(zip(jacobians, losses, heads, strict=True), start=1):
        if normalize:
            g = g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-8) * loss[:, None]
        y = y - beta / t**beta_sigma * (y - g)
        z = lam - gamma / t**gamma_sigma * (y @ y.T + rho * np.eye(k)) @ lam
        lam = _softmax(z) if lambda_update == "softmax" else _simplex(z)
        out.append((y.T @ lam, h.sum(0)))
    return out


def db_mtl_reference(jacobians, losses, heads, *, beta=0.9, beta_sigma=0.0, heads_mode="sum"):
    """LibMTL's DB_MTL on (T, K, D) shared Jacobians of the raw losses."""
    _, k, d = jacobians.shape
    buf = np.zeros((k, d))
    out = []
    for t, (g, loss, h) in enumerate(zip(jacobians, losses, heads, strict=True), start=1):
        log_grad = g / (loss[:, None] + 1e-8)  # the gradient of log(L + 1e-8)
        buf = log_grad + beta / t**beta_sigma * (buf - log_grad)
        norms = np.linalg.norm(buf, axis=1)
        alpha = norms.max() / (norms + 1e-8)
        head = (h / (loss[:, None] + 1e-8)).sum(0) if heads_mode == "log" else h.sum(0)
        out.append((alpha @ buf, head))
    return out


def reference(name, jacobians, losses, heads):
    factory, options = VARIANTS[name]
    if factory is moco:
        return moco_reference(jacobians, losses, heads, **options)
    options = dict(options)
    return db_mtl_reference(
        jacobians, losses, heads, heads_mode=options.pop("heads", "sum"), **options
    )


# ------------------------------------------------------------------ data and the library run

_LEAVES, _TREEDEF = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
_SHARED = [i for i, f in enumerate(jax.tree.leaves(MASK)) if f]
_HEADS = [i for i, f in enumerate(jax.tree.leaves(MASK)) if not f]


def make_data(k, seed):
    """(T, K, D_all) stacked gradients, (T, K) losses; step 3 has task 0's gradient zero."""
    rng = np.random.default_rng(1000 * k + seed)
    d_all = sum(int(np.prod(s)) for s in _LEAVES)
    scales = 10.0 ** rng.uniform(-2, 2, size=(STEPS, k, 1))
    jac = scales * rng.normal(size=(STEPS, k, d_all))
    jac[3, 0] = 0.0
    losses = rng.uniform(0.05, 5.0, size=(STEPS, k))
    return jac, losses


def to_tree(jac, dtype):
    """(..., K, D_all) -> stacked tree (leaves in SHAPES' flatten order)."""
    out, start = [], 0
    for shape in _LEAVES:
        size = int(np.prod(shape))
        out.append(jac[..., start : start + size].reshape(*jac.shape[:-1], *shape).astype(dtype))
        start += size
    return jax.tree.unflatten(_TREEDEF, out)


def split_columns(jac):
    """(..., D_all) -> (shared columns, head columns) in leaf order."""
    cols, start = [], 0
    for shape in _LEAVES:
        size = int(np.prod(shape))
        cols.append(jac[..., start : start + size])
        start += size
    shared = np.concatenate([cols[i] for i in _SHARED], axis=-1)
    heads = np.concatenate([cols[i] for i in _HEADS], axis=-1)
    return shared, heads


def run_sequences(txs, params, grads, losses):
    """{name: stacked (B, T, ...) updates} for every transform, one compiled function."""

    def one(tx, g_seq, l_seq):
        def step(state, xs):
            g, loss = xs
            out, state = tx.update(g, state, params, task_losses=loss)
            return state, out

        return jax.lax.scan(step, tx.init(params), (g_seq, l_seq))[1]

    @jax.jit
    def run(g, loss):
        return {n: jax.vmap(lambda a, b, tx=tx: one(tx, a, b))(g, loss) for n, tx in txs.items()}

    return run(grads, losses)


@pytest.fixture(scope="module")
def results():
    """{(name, k, dtype): worst relative error over every step and sequence}."""
    errors = {}
    for k in KS:
        data = [make_data(k, seed) for seed in range(SEQUENCES)]
        for dtype in DTYPES:
            with jax.enable_x64(dtype == np.float64):
                params = _params(dtype)
                txs = {
                    n: VARIANTS[n][0](k, mask=MASK, **VARIANTS[n][1]) for n in variants_at(k, dtype)
                }
                grads = to_tree(np.stack([j for j, _ in data]), dtype)
                losses = jnp.asarray(np.stack([loss for _, loss in data]), dtype)
                outs = jax.device_get(run_sequences(txs, params, grads, losses))
            for name in txs:
                worst = 0.0
                for b, (jac, loss) in enumerate(data):
                    jac_cast = jac.astype(dtype).astype(np.float64)
                    loss_cast = loss.astype(dtype).astype(np.float64)
                    shared, heads = split_columns(jac_cast)
                    want = reference(name, shared, loss_cast, heads)
                    got_all = np.concatenate(
                        [
                            np.asarray(x[b], np.float64).reshape(STEPS, -1)
                            for x in jax.tree.leaves(outs[name])
                        ],
                        axis=-1,
                    )
                    got_shared, got_heads = split_columns(got_all)
                    for t, (u, h) in enumerate(want):
                        u_all, g_all = (
                            np.concatenate([u, h]),
                            np.concatenate([got_shared[t], got_heads[t]]),
                        )
                        scale = np.max(np.abs(u_all))
                        worst = max(worst, np.max(np.abs(g_all - u_all)) / scale)
                errors[name, k, dtype] = worst
    return errors


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sequences_match_the_numpy_transcription(results, name, dtype):
    errors = {k: e for (n, k, d), e in results.items() if n == name and d == dtype}
    assert set(errors) == {k for k in KS if name in variants_at(k, dtype)}
    assert max(errors.values()) <= RTOL[dtype], (name, dtype, errors)


# ------------------------------------------------------------------ edge cases


def _params(dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.zeros(s, dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
    )


@pytest.mark.parametrize("factory", [moco, db_mtl])
def test_extreme_scales_zero_gradients_and_zero_losses_stay_finite(factory):
    """float32 gradients from 1e-30 to 1e30 (tasks of different scales side by side, a zero
    task, all zero), with and without a zero loss: every update and state finite, and equal
    to the float64 reference wherever the true update is a normal float32 number.

    Not tested: DB-MTL with a zero loss beside gradients ~1e30, whose true update
    (g / 1e-8 ~ 1e38, summed) is beyond float32."""
    k = 3
    params = _params()
    base = np.random.default_rng(7).normal(size=(k, 17))  # D_all = 2 + 3 + 12
    cases = {
        "tiny": np.full(k, 1e-30),
        "huge": np.full(k, 1e30),
        "mixed": np.array([1e-30, 1.0, 1e30]),
        "zero_task_beside_huge": np.array([0.0, 1e30, 1e25]),
        "all_zero": np.zeros(k),
    }
    loss_cases = {"losses": np.array([0.5, 2.0, 1.0]), "zero_loss": np.array([0.0, 2.0, 1.0])}
    tx = factory(k, mask=MASK)
    step = jax.jit(tx.update)
    ref = moco_reference if factory is moco else db_mtl_reference
    checked = 0
    for case, scales in cases.items():
        for lname, loss in loss_cases.items():
            if factory is db_mtl and lname == "zero_loss" and scales.max() >= 1e30:
                continue
            jac = (scales[:, None] * base).astype(np.float32)
            state = tx.init(params)
            for _ in range(3):
                out, state = step(
                    to_tree(jac, np.float32),
                    state,
                    params,
                    task_losses=jnp.asarray(loss, jnp.float32),
                )
            for x in [*jax.tree.leaves(out), state.y if factory is moco else state.buffer]:
                for leaf in jax.tree.leaves(x):
                    assert np.all(np.isfinite(np.asarray(leaf))), (case, lname)
            shared, heads = split_columns(jac.astype(np.float64))
            u, h = ref(np.stack([shared] * 3), np.stack([loss] * 3), np.stack([heads] * 3))[-1]
            got = np.concatenate(
                [np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(out)]
            )
            got_shared, got_heads = split_columns(got)
            want = np.concatenate([u, h])
            got = np.concatenate([got_shared, got_heads])
            scale = np.max(np.abs(want))
            if scale == 0:
                assert np.all(got == 0), (case, lname)
                checked += 1
            elif 1e-36 < np.min(np.abs(want[want != 0])) and scale < 1e37:
                err = np.max(np.abs(got - want)) / scale
                assert err < 1e-5, (case, lname, err)
                checked += 1
    assert checked >= 5


# ------------------------------------------------------------------ the call, options, errors


@pytest.mark.parametrize("factory", [moco, db_mtl])
def test_losses_reach_the_method_through_chain_and_inject_hyperparams(factory):
    k, params = 3, _params()
    grads = to_tree(np.random.default_rng(3).normal(size=(k, 17)), np.float32)
    losses = jnp.array([0.3, 1.0, 2.0])
    plain = factory(k, mask=MASK)
    chained = optax.chain(factory(k, mask=MASK), optax.scale(-1.0))
    injected = samgs_optax.inject_hyperparams(factory)(num_tasks=k, mask=MASK, beta=0.5)
    ref = factory(k, mask=MASK, beta=0.5)

    @jax.jit
    def run(grads, losses):
        def call(tx):
            return tx.update(grads, tx.init(params), params, task_losses=losses)

        return call(plain), call(chained), call(injected), call(ref)

    (want, _), (got, _), (got2, state2), (want2, _) = run(grads, losses)
    assert float(state2.hyperparams["beta"]) == 0.5
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, -b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got2), jax.tree.leaves(want2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("factory", [moco, db_mtl])
def test_the_recipe_forwards_the_losses_and_does_not_scale(factory):
    """samgs_optax.recipe(name): the losses reach the method through the masked clip and
    the optimizer; the trunk is clipped to norm 1 but not multiplied by K, heads untouched."""
    k, params = 3, _params()
    grads = to_tree(50.0 * np.random.default_rng(6).normal(size=(k, 17)), np.float32)
    losses = jnp.array([3.0, 10.0, 20.0])  # MoCo's trunk is loss-sized: above the clip
    tx = samgs_optax.recipe(factory.__name__, k, mask=MASK, optimizer=optax.identity())
    agg = factory(k, mask=MASK)

    @jax.jit
    def run(grads, losses):
        out, _ = tx.update(grads, tx.init(params), params, task_losses=losses)
        raw, _ = agg.update(grads, agg.init(params), params, task_losses=losses)
        return out, raw

    out, raw = run(grads, losses)
    trunk_norm = float(optax.tree.norm(raw["trunk"]))
    assert trunk_norm > 1.0
    for a, b in zip(jax.tree.leaves(out["trunk"]), jax.tree.leaves(raw["trunk"]), strict=True):
        np.testing.assert_allclose(a, b / trunk_norm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["head"], raw["head"], rtol=1e-6)


@pytest.mark.parametrize("factory", [moco, db_mtl])
def test_moments_in_bfloat16(factory):
    """m_dtype=bfloat16 stores the state in bfloat16; the update keeps the gradients' dtype
    and stays within bfloat16's rounding of the float32 run."""
    k, params = 2, _params()
    grads = to_tree(np.random.default_rng(4).normal(size=(k, 17)), np.float32)
    losses = jnp.array([0.7, 1.5])
    full, half = factory(k, mask=MASK), factory(k, mask=MASK, m_dtype=jnp.bfloat16)

    @jax.jit
    def run(grads, losses):
        s_full, s_half = full.init(params), half.init(params)
        for _ in range(3):
            u_full, s_full = full.update(grads, s_full, params, task_losses=losses)
            u_half, s_half = half.update(grads, s_half, params, task_losses=losses)
        return u_full, u_half, s_half

    u_full, u_half, s_half = run(grads, losses)
    stored = s_half.y if factory is moco else s_half.buffer
    assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(u_half), jax.tree.leaves(u_full), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2 * float(jnp.max(jnp.abs(b))))


def test_moco_without_normalisation_needs_no_losses():
    k, params = 2, _params()
    grads = to_tree(np.random.default_rng(5).normal(size=(k, 17)), np.float32)
    tx = moco(k, mask=MASK, normalize=False)
    out, state = jax.jit(lambda g: tx.update(g, tx.init(params), params))(grads)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
    np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("factory", [moco, db_mtl])
def test_missing_or_misshapen_losses_are_refused(factory):
    k, params = 3, _params()
    name = factory.__name__
    grads = to_tree(np.ones((k, 17)), np.float32)
    tx = factory(k, mask=MASK)
    state = tx.init(params)
    with pytest.raises(TypeError, match=rf"{name} needs the per-task losses.*task_losses=losses"):
        tx.update(grads, state, params)
    chained = optax.chain(factory(k, mask=MASK))
    with pytest.raises(TypeError, match=f"{name} needs the per-task losses"):
        chained.update(grads, chained.init(params), params)
    for bad in (jnp.ones(k - 1), jnp.ones((k, 1)), 1.0):
        with pytest.raises(ValueError, match=rf"{name}: task_losses has shape .*expected \({k},\)"):
            tx.update(grads, state, params, task_losses=bad)
    with pytest.raises(ValueError, match="leading task axis"):
        tx.update(to_tree(np.ones((k + 1, 17)), np.float32), state, params, task_losses=jnp.ones(k))


@pytest.mark.parametrize(
    "factory, options, error",
    [
        (moco, dict(beta=1.5), ValueError),
        (moco, dict(beta=-0.1), ValueError),
        (moco, dict(beta_sigma=-1.0), ValueError),
        (moco, dict(gamma=-0.1), ValueError),
        (moco, dict(gamma_sigma=-1.0), ValueError),
        (moco, dict(rho=-1.0), ValueError),
        (moco, dict(lambda_update="adam"), ValueError),
        (moco, dict(normalize="yes"), TypeError),
        (db_mtl, dict(beta=1.5), ValueError),
        (db_mtl, dict(beta_sigma=-0.5), ValueError),
        (db_mtl, dict(heads="mean"), ValueError),
    ],
)
def test_bad_options_are_refused(factory, options, error):
    with pytest.raises(error):
        factory(3, **options)
    with pytest.raises(ValueError, match="num_tasks must be >= 2"):
        factory(1)


if __name__ == "__main__":  # prints the measured errors quoted in the module docstring
    errs = results.__wrapped__()
    for name in VARIANTS:
        row = [max(e for (n, _, dd), e in errs.items() if n == name and dd == d) for d in DTYPES]
        print(f"{name:16s} float32 {row[0]:.1e}   float64 {row[1]:.1e}")
