"""The scalarizers' API, the semantics of their outputs, their own random draws, and training.

TorchJD agreement is in ``tests/test_scalarizers_golden.py``; here: the
scale-invariant loss against a NumPy transcription (TorchJD has no class for
it), ``weights`` as the gradient's loss weights for every method, what is
detached, the distributions of the key-based draws, errors, and a jitted
training step with ``optax.adam`` for every registered scalarizer.
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import samgs_optax
from samgs_optax import scalarizers as S

NAMES = list(S.SCALARIZERS)


def _make(name: str, k: int, **options):
    spec = S.scalarizer_spec(name)
    return spec.factory(k, **{**spec.example(k), **options})


def test_registry_is_complete_and_exported():
    assert samgs_optax.SCALARIZERS is S.SCALARIZERS
    assert samgs_optax.scalarizers is S
    assert NAMES == [
        "mean", "sum", "constant", "random", "scale_invariant", "geometric_mean", "uw", "dwa",
        "famo", "imtl_l", "stch", "pbi", "cosmos",
    ]  # fmt: skip
    for spec in S.SCALARIZER_SPECS:
        assert (
            spec.factory.__doc__
            and "Reference" in spec.factory.__doc__
            or spec.name
            in (
                "mean",
                "sum",
                "constant",
            )
        )
    with pytest.raises(ValueError, match="registered: mean, sum"):
        S.scalarizer_spec("gradnorm")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_scale_invariant_matches_numpy(dtype):
    """sum_k log L_k, weights 1 / L_k (the authors' ``torch.sum(torch.log(losses))``)."""
    rng = np.random.default_rng(3)
    losses = (10 ** rng.uniform(-3, 2, size=(8, 4))).astype(dtype)
    want_total = np.sum(np.log(losses.astype(np.float64)), axis=1)
    want_weights = 1.0 / losses.astype(np.float64)
    with jax.enable_x64(dtype == np.float64):
        sc = S.scale_invariant(4)
        total, (weights, _) = jax.jit(jax.vmap(sc.scalarize, (0, None)))(losses, sc.init())
        assert total.dtype == dtype
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(total, want_total, rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(weights, want_weights, rtol=tol)


def test_weights_are_the_gradients_loss_weights():
    """For losses L(theta): grad of the total = J^T weights, for every method, in one jit."""
    k, d = 3, 5
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(k, d)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=d), jnp.float32)

    def task_losses(theta):
        return jnp.exp(a @ theta / 4)  # positive

    @jax.jit
    def check():
        out = {}
        jac = jax.jacrev(task_losses)(theta)
        for name in NAMES:
            sc = _make(name, k)

            def total(theta, sc=sc):
                t, (w, new) = sc.scalarize(task_losses(theta), sc.init())
                return t, (w, new)

            grad, (weights, new) = jax.grad(total, has_aux=True)(theta)
            out[name] = (grad, jac.T @ weights, sc.init(), new)
        return out

    for name, (grad, want, state, new) in check().items():
        np.testing.assert_allclose(grad, want, rtol=2e-5, atol=1e-6, err_msg=name)
        _assert_dtype(state, jnp.float32, name)  # init() without losses: float32
        _assert_dtype(new, jnp.float32, name)


def test_detached_parts():
    """DWA's and FAMO's weights and FAMO's logits get no gradient through the total;
    UW's log-variances do, with the closed form 1/2 (1 - e^{-s} L)."""
    losses = jnp.array([0.3, 2.0])
    dwa, famo, uw = S.dwa(2), S.famo(2), S.uw(2)
    s = jnp.array([0.2, -1.0])

    @jax.jit
    def grads():
        state = dwa.init()
        for factor in ([1.0, 1.0], [1.0, 1.0], [0.5, 0.9]):
            _, (_, state) = dwa.scalarize(losses * jnp.array(factor), state)
            state = dwa.end_epoch(state)
        g_dwa = jax.grad(lambda st: dwa.scalarize(losses, st)[0], allow_int=True)(state)
        fstate = famo.update(famo.scalarize(losses, famo.init())[1][1], losses / 2)
        g_famo = jax.grad(lambda st: famo.scalarize(losses, st)[0], allow_int=True)(fstate)
        g_uw = jax.grad(lambda st: uw.scalarize(losses, st)[0])(S.UWState(s))
        return state, g_dwa, fstate, g_famo, g_uw

    state, g_dwa, fstate, g_famo, g_uw = grads()
    assert int(state.num_averages) == 2
    np.testing.assert_array_equal(g_dwa.averages, 0.0)
    assert np.all(fstate.logits != 0)
    np.testing.assert_array_equal(g_famo.logits, 0.0)
    np.testing.assert_allclose(g_uw.log_var, 0.5 * (1 - np.exp(-s) * losses), rtol=1e-6)


def test_famo_update_before_scalarize_is_a_no_op_and_dwa_waits_two_epochs():
    famo, dwa = S.famo(3), S.dwa(3)

    @jax.jit
    def run():
        state = famo.init()
        untouched = famo.update(state, jnp.ones(3))
        dstate, weights = dwa.init(), []
        for epoch in range(3):
            losses = jnp.array([1.0, 2.0, 3.0]) / (epoch + 1.0) ** jnp.array([1.0, 2.0, 3.0])
            _, (w, dstate) = dwa.scalarize(losses, dstate)
            weights.append(w)
            dstate = dwa.end_epoch(dstate)
        return state, untouched, weights

    state, untouched, weights = run()
    jax.tree.map(np.testing.assert_array_equal, untouched, state)
    np.testing.assert_array_equal(weights[:2], 1.0)
    assert not np.allclose(weights[2], 1.0) and np.isclose(np.sum(weights[2]), 3.0)
    assert weights[2][0] > weights[2][1] > weights[2][2]  # the slowest-decreasing task first


def _draws(sc, n: int, k: int, seed: int = 1) -> jax.Array:
    """The weights of n calls, each from its own key, at losses 1 (vmapped; trace-able)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    state = sc.init()
    return jax.vmap(lambda key: sc.scalarize(jnp.ones(k), state._replace(key=key))[1][0])(keys)


def test_random_draws_are_a_softmax_of_standard_normals():
    k, n = 4, 5000
    sc = S.random(k, seed=5)

    @jax.jit
    def run():
        state = sc.init()
        _, (w1, s1) = sc.scalarize(jnp.ones(k), state)
        _, (w2, s2) = sc.scalarize(jnp.ones(k), s1)
        _, (w3, s3) = sc.scalarize(jnp.ones(k), s2, noise=jnp.log(w1))
        return _draws(sc, n, k), (w1, w2, w3), (s2, s3)

    w, (w1, w2, w3), (s2, s3) = jax.tree.map(np.asarray, run())
    assert np.all(w > 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    # log(w_i / w_j) = z_i - z_j ~ N(0, 2), independent of the softmax's normaliser
    diffs = np.log(w[:, 1:].astype(np.float64)) - np.log(w[:, :1])
    for col in diffs.T:
        assert scipy.stats.kstest(col / np.sqrt(2), "norm").pvalue > 1e-3
    # Consecutive calls advance the key; noise= replays a draw and leaves the state alone;
    # the same seed gives the same stream.
    assert not np.allclose(w1, w2)
    np.testing.assert_allclose(w3, w1, rtol=1e-6)
    np.testing.assert_array_equal(s3.key, s2.key)
    np.testing.assert_array_equal(run()[1][0], w1)


@pytest.mark.parametrize(
    "make",
    [S.random, functools.partial(S.pbi, theta=5.0), functools.partial(S.cosmos, lambda_=2.0)],
    ids=["random", "pbi", "cosmos"],
)
def test_random_scalarizers_refuse_a_non_integer_seed(make):
    for bad in (0.5, True, "1"):
        with pytest.raises(TypeError, match=r"seed must be an int \(or pass key=\), got"):
            make(3, seed=bad)
    typed, raw = make(3, key=jax.random.key(2)), make(3, key=jax.random.PRNGKey(2))
    losses = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(
        typed.scalarize(losses, typed.init())[1][0], raw.scalarize(losses, raw.init())[1][0]
    )


def test_preferences_are_dirichlet():
    """cosmos with lambda_=0 has weights r; pbi with theta=0 has weights r / ||r||;
    r ~ Dirichlet(concentration * 1): each coordinate is Beta(a, (K - 1) a)."""
    k, n = 3, 4000
    p = jnp.array([0.2, 0.3, 0.5])
    cases = [("cosmos", 1.0), ("pbi", 0.3)]

    def make(name, a):
        options = {"lambda_": 0.0} if name == "cosmos" else {"theta": 0.0}
        return _make(name, k, concentration=a, **options)

    @jax.jit
    def run():
        out = {}
        for name, a in cases:
            sc = make(name, a)
            state = sc.init()
            _, (given, new_state) = sc.scalarize(jnp.ones(k), state, preference=p)
            out[name, a] = (_draws(sc, n, k), given, new_state.key, state.key)
        return out

    for (name, a), (w, given, new_key, key) in run().items():
        w = np.asarray(w, np.float64)
        if name == "cosmos":
            np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
        else:
            np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
        r = w / w.sum(axis=1, keepdims=True)
        for col in r.T:
            assert scipy.stats.kstest(col, "beta", args=(a, (k - 1) * a)).pvalue > 1e-3
        # A given preference replaces the draw and keeps the key.
        np.testing.assert_allclose(given / given.sum(), p, rtol=1e-6)
        np.testing.assert_array_equal(new_key, key)


def test_float64_state_and_outputs():
    """init(losses) takes the losses' dtype (float32 without them: test_weights_are_...)."""
    with jax.enable_x64(True):

        @jax.jit
        def call():
            states = {name: _make(name, 3).init(jnp.ones(3, jnp.float64)) for name in NAMES}
            losses = jnp.ones(3, jnp.float64)
            return states, {name: _make(name, 3).scalarize(losses, states[name]) for name in NAMES}

        states, outs = call()
    for name in NAMES:
        _assert_dtype(states[name], jnp.float64, name)
        total, (w, new) = outs[name]
        assert total.dtype == w.dtype == jnp.float64, name
        assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(
            lambda x: x.dtype, states[name]
        ), name


def _assert_dtype(state, dtype, name):
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == dtype, name


def test_errors():
    sc = S.mean(3)
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        sc.scalarize(jnp.ones(2), sc.init())
    with pytest.raises(TypeError, match="floating"):
        sc.scalarize(jnp.ones(3, jnp.int32), sc.init())
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        jax.jit(sc.scalarize)(jnp.ones((3, 1)), sc.init())
    with pytest.raises(ValueError, match="num_tasks must be >= 2"):
        S.uw(1)
    with pytest.raises(ValueError, match="temperature must be strictly positive"):
        S.dwa(2, temperature=0.0)
    with pytest.raises(ValueError, match="lr must be non-negative"):
        S.famo(2, lr=-1.0)
    with pytest.raises(ValueError, match="min_losses has shape"):
        S.famo(2, min_losses=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="mu must be strictly positive"):
        S.stch(2, mu=0.0)
    with pytest.raises(ValueError, match="theta must be non-negative"):
        S.pbi(2, theta=-1.0)
    with pytest.raises(TypeError):
        S.cosmos(2)  # lambda_ is required, as in TorchJD
    with pytest.raises(ValueError, match="weights has shape"):
        S.constant(2, weights=[1.0])


def test_training_with_every_scalarizer():
    """A two-task toy model trained with optax.adam and each scalarizer, all in one jit:
    UW's and IMTL-L's parameters learned with the model, FAMO updated after every
    step on the same batch, DWA's epoch closed every 5 steps."""
    k, steps, epoch = 2, 30, 5
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    y = jnp.stack([x @ jnp.array([1.0, -2.0, 0.5]), 10 * jnp.tanh(x[:, 0])], axis=1)
    net = {"w1": jnp.asarray(rng.normal(size=(3, 8)) / 3, jnp.float32), "w2": jnp.zeros((8, k))}

    def task_losses(net):
        return jnp.mean((jnp.tanh(x @ net["w1"]) @ net["w2"] - y) ** 2, axis=0) + 1e-3

    def train(name):
        sc = _make(name, k)
        learned = name in ("uw", "imtl_l")
        params = {"net": net, "sc": sc.init()} if learned else {"net": net}
        opt = optax.adam(0.05)

        def loss_fn(params, sc_state):
            state = params["sc"] if learned else sc_state
            total, (weights, state) = sc.scalarize(task_losses(params["net"]), state)
            return total, state

        def step(carry, t):
            params, opt_state, sc_state = carry
            grads, sc_state_new = jax.grad(loss_fn, has_aux=True)(params, sc_state)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if not learned:
                sc_state = sc_state_new
            if name == "famo":
                sc_state = sc.update(sc_state, task_losses(params["net"]))
            if name == "dwa":
                sc_state = jax.lax.cond((t + 1) % epoch == 0, sc.end_epoch, lambda s: s, sc_state)
            return (params, opt_state, sc_state), None

        sc_state = None if learned else sc.init()
        carry = (params, opt.init(params), sc_state)
        (params, _, sc_state), _ = jax.lax.scan(step, carry, jnp.arange(steps))
        return task_losses(params["net"]), sc_state

    before = np.asarray(task_losses(net))
    results = jax.jit(lambda: {name: train(name) for name in NAMES})()
    for name, (after, state) in results.items():
        after = np.asarray(after)
        assert np.all(np.isfinite(after)), name
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state)), name
        assert np.mean(after / before) < 0.5, (name, before, after)


DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "scalarizers.md"


def test_docs_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/scalarizers.md lost its example"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "docs_example"})


def test_docs_table_is_the_registry():
    """docs/scalarizers.md's table is the registry's (all but the measured column)."""
    from test_scalarizers_golden import table

    def strip(text):  # rows without their last (measured) cell
        rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
        return [ln.rsplit("|", 2)[0] for ln in rows]

    assert strip(DOC.read_text()) == strip(table())
    assert [ln.split("`")[1] for ln in strip(table())] == NAMES
