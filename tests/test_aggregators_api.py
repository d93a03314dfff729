"""API of the baseline aggregators: registry, jit + adam, masks, PRNG state, Nash-MTL state, errors.

Compile counts are kept low: every method runs inside one jitted function per
test, batched over inputs with ``jax.vmap`` where useful.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_aggregator

import samgs_optax

METHODS = (
    "linear_scalarization",
    "pcgrad",
    "mgda",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "nash_mtl",
    "upgrad",
    "dualproj",
    "graddrop",
    # Stateful methods of TorchJD 0.18 (issue 12).
    "gradvac",
    "pcd",
    "cr_mogm",
    "excess_mtl",
    "modo",
    "sdmgrad",
    # Stateless methods of TorchJD 0.18 (issue 12, second part).
    "constant",
    "random_weighting",
    "trimmed_mean",
    "krum",
    "con_fig",
    "fairgrad",
    # Loss-aware methods of LibMTL (issue 12).
    "moco",
    "db_mtl",
    "gradnorm",
)
# Krum needs K >= n_byzantine + 3: the K = 2 tests below run every other method, and
# test_krum_at_three_tasks holds Krum to the same checks at K = 3.
TWO_TASK_METHODS = tuple(m for m in METHODS if m != "krum")
# Deterministic weights w (state.weights) with output sum_k w_k g_k; random_weighting has
# random ones (test_random_weighting_values), trimmed_mean and graddrop none; moco and db_mtl
# weigh their per-task tracks / buffers, not this step's g_k (tests/test_moco_db_mtl.py).
GRAMIAN_METHODS = tuple(
    m
    for m in TWO_TASK_METHODS
    if m not in ("graddrop", "trimmed_mean", "random_weighting", "moco", "db_mtl")
)


def _params():
    return {
        "dense": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)},
        "emb": jnp.zeros(4, jnp.bfloat16),
    }


def _grads(rng: np.random.Generator, k: int, batch: tuple[int, ...] = ()):
    return jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(*batch, k, *p.shape)), p.dtype), _params()
    )


def _flat(tree, lead: int = 1) -> np.ndarray:
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return np.concatenate([x.reshape(*x.shape[:lead], -1) for x in leaves], axis=-1)


def test_registry_lists_every_method():
    assert set(samgs_optax.AGGREGATORS) == {"samgs", *METHODS}
    for name, factory in samgs_optax.AGGREGATORS.items():
        assert getattr(samgs_optax, name) is factory
        tx = factory(3)
        assert isinstance(tx, optax.GradientTransformation)


def _cases(rng: np.random.Generator):
    g = np.array([1.0, -2.0, 3.0, 0.5, -1.0, 2.0, 0.25, -0.5, 1.5, 1.0, -0.75, 2.5], np.float32)
    cases = {
        "random": rng.normal(size=(2, 12)).astype(np.float32),
        "zeros": np.zeros((2, 12), np.float32),
        "identical": np.stack([g, g]),
        "opposite": np.stack([g, -g]),
        "one_zero": np.stack([g, 0 * g]),
        "parallel": np.stack([g, 100 * g]),
        "tiny": np.stack([g, -0.5 * g + 1e-3]) * 1e-20,
        "huge": np.stack([g, 3 * g[::-1]]) * 1e17,
    }
    return g, cases


def _to_tree(flat):
    """(..., 12) -> the params' tree (with a bf16 leaf)."""
    return {
        "dense": {"w": flat[..., :6].reshape(*flat.shape[:-1], 3, 2), "b": flat[..., 6:8]},
        "emb": flat[..., 8:12].astype(jnp.bfloat16),
    }


B1 = 0.9


@pytest.fixture(scope="module")
def outputs():
    """Every method (K = 2) chained with Adam, on random and degenerate inputs, one compile.

    After one step Adam's first moment is (1 - b1) u, which recovers the
    aggregator's own output u from the chain's state.
    """
    params = _params()
    g, cases = _cases(np.random.default_rng(0))
    batch = jnp.asarray(np.stack(list(cases.values())))  # (cases, 2, 12)
    txs = {m: optax.chain(make_aggregator(m, 2), optax.adam(1e-2, b1=B1)) for m in TWO_TASK_METHODS}

    def run(flat):
        grads = _to_tree(flat)
        out = {}
        for m, tx in txs.items():
            update, (agg_state, adam_state) = tx.update(grads, tx.init(params), params)
            aggregated = jax.tree.map(lambda mu: mu / (1 - B1), adam_state[0].mu)
            weights = getattr(agg_state, "weights", None)
            out[m] = (update, aggregated, weights)
        return out

    out = jax.jit(jax.vmap(run))(batch)
    result = {}
    for i, case in enumerate(cases):
        result[case] = {
            m: (
                jax.tree.map(lambda x, i=i: x[i], out[m][0]),
                _flat(out[m][1])[i],
                None if out[m][2] is None else np.asarray(out[m][2][i], np.float64),
            )
            for m in TWO_TASK_METHODS
        }
    return _flat(_to_tree(jnp.asarray(g)), 0), _flat(_to_tree(batch), 2), list(cases), result


def test_every_method_chains_with_adam_under_jit(outputs):
    params = _params()
    _, _, _, result = outputs
    for m in TWO_TASK_METHODS:
        update = result["random"][m][0]
        assert jax.tree.structure(update) == jax.tree.structure(params), m
        for u, p in zip(jax.tree.leaves(update), jax.tree.leaves(params), strict=True):
            assert u.shape == p.shape and u.dtype == p.dtype, m  # bf16 leaf stays bf16
        assert np.any(_flat(update, 0) != 0), m


def test_degenerate_inputs_are_finite(outputs):
    _, _, _, result = outputs
    for case, per_method in result.items():
        for m, (update, aggregated, _) in per_method.items():
            assert np.all(np.isfinite(aggregated)), (case, m, aggregated)
            assert np.all(np.isfinite(_flat(update, 0))), (case, m)


def test_state_weights_are_the_weights_applied(outputs):
    """For the Gramian methods the output is sum_k w_k g_k with w = state.weights."""
    _, jac, names, result = outputs
    jac = jac[names.index("random")]
    for m in GRAMIAN_METHODS:
        _, got, weights = result["random"][m]
        want = weights @ jac
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max(), err_msg=m)


def test_degenerate_inputs_values(outputs):
    g, _, _, result = outputs
    out = {case: {m: v[1] for m, v in per.items()} for case, per in result.items()}
    scale = np.abs(g).max()
    for m in TWO_TASK_METHODS:
        np.testing.assert_array_equal(out["zeros"][m], 0, err_msg=m)
    # Two identical gradients: every "averaging" method returns g itself.
    for m in ("mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl"):
        np.testing.assert_allclose(out["identical"][m], g, rtol=1e-2, atol=1e-5, err_msg=m)
    np.testing.assert_allclose(out["identical"]["linear_scalarization"], 2 * g, rtol=1e-2)
    np.testing.assert_allclose(out["identical"]["cagrad"], 1.5 * g, rtol=1e-2)  # g0 + c|g0| g/|g|
    np.testing.assert_allclose(out["identical"]["nash_mtl"], g / np.linalg.norm(g), rtol=1e-2)
    # Exactly opposite gradients: no direction helps both; these methods return 0.
    # PCD serves task 0 first: its constraint for g_2 = -g_1 gives -tau g_1, rescaled: -g_1.
    np.testing.assert_allclose(out["opposite"]["pcd"], -g, rtol=1e-2, atol=1e-5)
    # SDMGrad's inner SGD (lr 10 on A / mean diag, eigenvalue 2 along g_1 - g_2) is unstable
    # there: the rounding of A w (FMA) decides which vertex it reaches; still a multiple of g.
    sdm = out["opposite"]["sdmgrad"]
    np.testing.assert_allclose(sdm, (sdm @ g) / (g @ g) * g, rtol=1e-2, atol=1e-5 * scale)
    for m in set(GRAMIAN_METHODS) - {"pcd", "sdmgrad"}:
        assert np.abs(out["opposite"][m]).max() <= 1e-5 * scale, (m, out["opposite"][m])
    # A zero task gradient makes the point Pareto-stationary: MGDA and CAGrad stop.
    assert np.abs(out["one_zero"]["mgda"]).max() <= 1e-5 * scale
    assert np.abs(out["one_zero"]["cagrad"]).max() <= 1e-5 * scale
    # Huge gradients (1e17, Gramian ~1e35 in float32) still give a non-zero direction.
    for m in GRAMIAN_METHODS:
        assert np.abs(out["huge"][m]).max() > 0, m


def test_random_weighting_values(outputs):
    """Random weights: positive, summing to 1, and the output is sum_k w_k g_k with them."""
    _, jac, names, result = outputs
    for case in ("random", "identical", "opposite", "parallel", "huge"):
        _, got, weights = result[case]["random_weighting"]
        assert np.all(weights > 0) and abs(weights.sum() - 1) < 1e-6, (case, weights)
        want = weights @ jac[names.index(case)]
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def _krum_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    g = rng.normal(size=12).astype(np.float32)
    return {
        "random": rng.normal(size=(3, 12)).astype(np.float32),
        "zeros": np.zeros((3, 12), np.float32),
        "identical": np.stack([g, g, g]),
        "opposite": np.stack([g, -g, g]),
        "tiny": rng.normal(size=(3, 12)).astype(np.float32) * 1e-20,
        "huge": rng.normal(size=(3, 12)).astype(np.float32) * 1e17,
    }


def test_krum_at_three_tasks():
    """Krum (K >= 3) held to the K = 2 checks: jit + Adam, leaf dtypes, finite and non-zero
    on degenerate inputs, zeros give 0, output = sum_k w_k g_k with one-hot state weights."""
    params = _params()
    cases = _krum_cases(np.random.default_rng(6))
    batch = jnp.asarray(np.stack(list(cases.values())))  # (cases, 3, 12)
    tx = optax.chain(samgs_optax.krum(3), optax.adam(1e-2, b1=B1))

    def run(flat):
        update, (agg_state, adam_state) = tx.update(_to_tree(flat), tx.init(params), params)
        return update, jax.tree.map(lambda mu: mu / (1 - B1), adam_state[0].mu), agg_state.weights

    update, aggregated, weights = jax.jit(jax.vmap(run))(batch)
    jac = _flat(_to_tree(batch), 2)
    for i, case in enumerate(cases):
        one = jax.tree.map(lambda x, i=i: x[i], update)
        assert jax.tree.structure(one) == jax.tree.structure(params)
        for u, p in zip(jax.tree.leaves(one), jax.tree.leaves(params), strict=True):
            assert u.shape == p.shape and u.dtype == p.dtype, case
        got = _flat(aggregated)[i]
        assert np.all(np.isfinite(got)) and np.all(np.isfinite(_flat(one, 0))), case
        w = np.asarray(weights[i], np.float64)
        np.testing.assert_array_equal(np.sort(w), [0, 0, 1], err_msg=case)
        want = w @ jac[i]
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
        if case == "zeros":
            np.testing.assert_array_equal(got, 0)
        else:
            assert np.abs(got).max() > 0, case


def test_byzantine_task_is_left_out():
    """K = 5, one task sends -100 g (Byzantine): Krum(n_byzantine=1) returns an honest task's
    gradient, the trimmed mean (t = 1) stays within the honest tasks' range in every
    coordinate, while the mean is dragged far off."""
    k = 5
    rng = np.random.default_rng(7)
    g = rng.normal(size=12)
    honest = g + 0.1 * rng.normal(size=(k - 1, 12))
    jac = np.concatenate([honest[:2], -100 * g[None], honest[2:]]).astype(np.float32)
    params = {"w": jnp.zeros(12)}
    txs = {
        "krum": samgs_optax.krum(k, n_byzantine=1),
        "trimmed_mean": samgs_optax.trimmed_mean(k, trim_number=1),
        "mean": samgs_optax.constant(k),
    }

    @jax.jit
    def run(grads):
        return {m: tx.update({"w": grads}, tx.init(params), params) for m, tx in txs.items()}

    out = run(jnp.asarray(jac))
    krum_w = np.asarray(out["krum"][1].weights)
    assert krum_w[2] == 0 and krum_w.sum() == 1
    np.testing.assert_allclose(out["krum"][0]["w"], krum_w @ jac, rtol=1e-6)
    trimmed = np.asarray(out["trimmed_mean"][0]["w"])
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    assert np.all((trimmed >= lo - 1e-5) & (trimmed <= hi + 1e-5))
    assert np.linalg.norm(np.asarray(out["mean"][0]["w"]) - g) > 10 * np.linalg.norm(g)


def test_robust_methods_refuse_bad_options():
    """Krum: K >= n_byzantine + 3 and 1 <= n_selected <= K; trimmed mean: 2 t + 1 <= K."""
    samgs_optax.krum(5, n_byzantine=2, n_selected=5)  # the limits are allowed
    samgs_optax.trimmed_mean(5, trim_number=2)
    with pytest.raises(ValueError, match=r"num_tasks >= n_byzantine \+ 3"):
        samgs_optax.krum(5, n_byzantine=3)
    with pytest.raises(ValueError, match="num_tasks >= 3"):
        samgs_optax.krum(2)
    with pytest.raises(ValueError, match="n_selected must be <= num_tasks"):
        samgs_optax.krum(5, n_selected=6)
    with pytest.raises(ValueError, match="n_selected must be >= 1"):
        samgs_optax.krum(5, n_selected=0)
    with pytest.raises(TypeError, match="n_byzantine must be a Python int"):
        samgs_optax.krum(5, n_byzantine=1.0)
    with pytest.raises(ValueError, match=r"2 \* trim_number \+ 1 <= num_tasks"):
        samgs_optax.trimmed_mean(5, trim_number=3)


def test_mask_heads_get_plain_sum():
    """Masked-out leaves get sum_k g_k and do not enter the Gramian."""
    k = 3
    params = _params()
    mask = {"dense": {"w": True, "b": True}, "emb": False}
    shared_params = {"dense": params["dense"]}
    methods = ("upgrad", "pcgrad", "graddrop", "trimmed_mean", "krum")
    masked = {m: make_aggregator(m, k, mask=mask) for m in methods}
    plain = {m: make_aggregator(m, k) for m in methods}
    grads = _grads(np.random.default_rng(2), k)

    @jax.jit
    def run(grads):
        shared = {"dense": grads["dense"]}
        return (
            {m: tx.update(grads, tx.init(params), params)[0] for m, tx in masked.items()},
            {m: tx.update(shared, tx.init(shared_params))[0] for m, tx in plain.items()},
        )

    with_mask, shared_only = run(grads)
    for m in methods:
        np.testing.assert_allclose(
            np.asarray(with_mask[m]["emb"], np.float32),
            np.asarray(
                jnp.sum(grads["emb"].astype(jnp.float32), 0).astype(jnp.bfloat16), np.float32
            ),
            err_msg=m,
        )
        np.testing.assert_allclose(
            _flat(with_mask[m]["dense"], 0), _flat(shared_only[m]["dense"], 0), rtol=1e-5, err_msg=m
        )


def test_mask_callable_and_errors():
    params = _params()
    tx = samgs_optax.mgda(2, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
    state = tx.init(params)
    assert isinstance(state.shared["emb"], optax.MaskedNode)
    with pytest.raises(ValueError, match=r"does not cover the parameter at \[.emb.\]"):
        samgs_optax.mgda(2, mask={"dense": True}).init(params)
    with pytest.raises(ValueError, match="no shared leaf"):
        samgs_optax.mgda(2, mask=jax.tree.map(lambda _: False, params)).init(params)


@pytest.mark.parametrize("method", ["pcgrad", "graddrop", "random_weighting"])
def test_random_methods_are_reproducible(method):
    k = 3
    params = _params()
    tx = samgs_optax.AGGREGATORS[method](k, seed=7)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    grads = [_grads(rng, k) for _ in range(3)]

    def trajectory(state):
        outs, keys = [], []
        for g in grads:
            u, state = update(g, state, params)
            outs.append(_flat(u, 0))
            keys.append(np.asarray(jax.random.key_data(state.key)))
        return np.stack(outs), keys

    first, keys = trajectory(tx.init(params))
    again, _ = trajectory(samgs_optax.AGGREGATORS[method](k, seed=7).init(params))
    np.testing.assert_array_equal(first, again)
    via_key, _ = trajectory(
        samgs_optax.AGGREGATORS[method](k, key=jax.random.PRNGKey(7)).init(params)
    )
    np.testing.assert_array_equal(first, via_key)
    assert len({k.tobytes() for k in keys}) == len(keys)  # the key advances every step
    if method == "graddrop":  # 10 coordinates x 3 steps: other draws differ somewhere
        other, _ = trajectory(tx.init(params)._replace(key=jax.random.PRNGKey(8)))
        assert np.any(other != first)


@pytest.mark.parametrize("method", ["pcgrad", "graddrop", "random_weighting", "gradvac"])
def test_random_methods_seed_and_key_forms(method):
    """A typed key starts the stream its raw form starts; a non-integer seed is refused by name."""
    params = _params()
    grads = _grads(np.random.default_rng(2), 3)
    make = samgs_optax.AGGREGATORS[method]
    typed = make(3, key=jax.random.key(5))
    raw = make(3, key=jax.random.PRNGKey(5))
    u_typed, _ = typed.update(grads, typed.init(params), params)
    u_raw, _ = raw.update(grads, raw.init(params), params)
    np.testing.assert_array_equal(_flat(u_typed, 0), _flat(u_raw, 0))
    for bad in (1.5, True, "0", None):
        with pytest.raises(TypeError, match=r"seed must be an int \(or pass key=\), got"):
            make(3, seed=bad)


@pytest.mark.parametrize(("purity", "kept"), [(1.0, np.maximum), (0.0, np.minimum)])
def test_graddrop_purity_fn_decides_the_sign(purity, kept):
    """f(P) = 1 beats every draw in [0, 1): only positive values pass; f(P) = 0: only negative."""
    k = 3
    params = {"w": jnp.zeros(50)}
    grads = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(k, 50)), jnp.float32)}
    tx = samgs_optax.graddrop(k, purity_fn=lambda p: jnp.full_like(p, purity))
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    want = kept(np.asarray(grads["w"], np.float64), 0.0).sum(axis=0)
    np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-6, atol=1e-6)


def test_nash_mtl_state_and_norm():
    k = 3
    params = {"w": jnp.zeros(8)}
    every2 = samgs_optax.nash_mtl(k, update_weights_every=2)
    # Through optax.inject_hyperparams, max_norm injected as an array.
    unclipped = optax.inject_hyperparams(
        samgs_optax.nash_mtl, static_args=("num_tasks", "update_weights_every", "optim_niter")
    )(num_tasks=k, max_norm=0.0)
    rng = np.random.default_rng(4)
    grads = [{"w": jnp.asarray(rng.normal(size=(k, 8)), jnp.float32)} for _ in range(3)]

    @jax.jit
    def both(g, s2, s0):
        return every2.update(g, s2, params), unclipped.update(g, s0, params)

    s2, s0 = every2.init(params), unclipped.init(params)
    np.testing.assert_array_equal(s2.alpha, np.ones(k))
    alphas = []
    for step, g in enumerate(grads):
        (u2, s2), (u0, s0) = both(g, s2, s0)
        assert int(s2.count) == step + 1
        alphas.append(np.asarray(s2.alpha))
        jac = np.asarray(g["w"], np.float64)
        gram = jac @ jac.T
        # Unclipped: the bargaining solution, so ||u||^2 = sum_i a_i (G a)_i = K.
        a0 = np.asarray(s0.inner_state.alpha, np.float64)
        assert np.abs(a0 * (gram @ a0) - 1).max() < 1e-4
        assert np.linalg.norm(np.asarray(u0["w"])) ** 2 == pytest.approx(k, rel=1e-4)
        # Clipped to max_norm = 1.
        assert np.linalg.norm(np.asarray(u2["w"])) == pytest.approx(1.0, rel=1e-4)
        np.testing.assert_allclose(
            np.asarray(u2["w"]), np.asarray(s2.weights) @ jac, rtol=1e-4, atol=1e-6
        )
    # Solved at steps 1 and 3, reused at step 2.
    assert not np.allclose(alphas[0], np.ones(k))
    np.testing.assert_array_equal(alphas[1], alphas[0])
    assert not np.allclose(alphas[2], alphas[1])


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise_like_samgs(method):
    factory = samgs_optax.AGGREGATORS[method]
    with pytest.raises(ValueError, match="num_tasks must be >= 2"):
        factory(1)
    with pytest.raises(TypeError, match="num_tasks must be a Python int"):
        factory(2.0)
    params = {"w": jnp.zeros(3)}
    k = 3 if method == "krum" else 2  # Krum needs K >= 3
    tx = factory(k)
    state = tx.init(params)
    with pytest.raises(ValueError, match="leading task"):
        tx.update({"w": jnp.zeros((k + 1, 3))}, state, params)
    with pytest.raises(TypeError, match="floating"):
        tx.update({"w": jnp.zeros((k, 3), jnp.int32)}, state, params)
    with pytest.raises(ValueError, match="does not match"):
        tx.update({"v": jnp.zeros((k, 3))}, state, params)


@pytest.mark.parametrize(
    "method, options, error",
    [
        ("linear_scalarization", {"reduction": "max"}, ValueError),
        ("cagrad", {"c": -0.1}, ValueError),
        ("cagrad", {"rescale": 3}, ValueError),
        ("cagrad", {"norm_eps": -1.0}, ValueError),
        ("upgrad", {"reg_eps": -1.0}, ValueError),
        ("dualproj", {"norm_eps": -1.0}, ValueError),
        ("aligned_mtl", {"scale_mode": "max"}, ValueError),
        ("nash_mtl", {"update_weights_every": 0}, ValueError),
        ("nash_mtl", {"optim_niter": 0}, ValueError),
        ("nash_mtl", {"max_norm": -1.0}, ValueError),
        ("graddrop", {"leak": [0.1]}, ValueError),
        ("graddrop", {"leak": [0.1, 1.5]}, ValueError),
        ("graddrop", {"purity_fn": 0.5}, TypeError),
        ("gradvac", {"beta": 1.5}, ValueError),
        ("gradvac", {"eps": -1.0}, ValueError),
        ("pcd", {"tau": 1.5}, ValueError),
        ("pcd", {"tau": [0.1, 0.2]}, ValueError),
        ("pcd", {"beta": 1.0}, ValueError),
        ("cr_mogm", {"weighting": "nope"}, ValueError),
        ("cr_mogm", {"weighting": 3}, TypeError),
        ("cr_mogm", {"weighting": "mgda", "c": 0.5}, TypeError),
        ("cr_mogm", {"alpha": 2.0}, ValueError),
        ("cr_mogm", {"initial_weights": [1.0]}, ValueError),
        ("excess_mtl", {"robust_step_size": 0.0}, ValueError),
        ("excess_mtl", {"n_warmup_steps": -1}, ValueError),
        ("modo", {"gamma": 0.0}, ValueError),
        ("modo", {"rho": -1.0}, ValueError),
        ("modo", {"num_batches": 4}, ValueError),
        ("sdmgrad", {"momentum": 1.0}, ValueError),
        ("sdmgrad", {"n_iter": 0}, ValueError),
        ("sdmgrad", {"pref_vector": [1.0]}, ValueError),
        ("constant", {"weights": [1.0]}, ValueError),
        ("constant", {"weights": [1.0, float("nan")]}, ValueError),
        ("trimmed_mean", {"trim_number": 1}, ValueError),  # 2 t + 1 > K = 2
        ("trimmed_mean", {"trim_number": -1}, ValueError),
        ("trimmed_mean", {"trim_number": 0.5}, TypeError),
        ("krum", {}, ValueError),  # K = 2 < 3
        ("krum", {"n_byzantine": 0}, ValueError),
        ("con_fig", {"pref_vector": [1.0, 2.0, 3.0]}, ValueError),
        ("con_fig", {"pref_vector": [1.0, float("inf")]}, ValueError),
        ("fairgrad", {"alpha": -1.0}, ValueError),
        ("fairgrad", {"alpha": float("inf")}, ValueError),
        ("fairgrad", {"max_iter": 0}, ValueError),
    ],
)
def test_bad_options_raise(method, options, error):
    with pytest.raises(error):
        samgs_optax.AGGREGATORS[method](2, **options)
