"""The stateful aggregators against TorchJD 0.18 over sequences of steps (issue 12).

``tests/golden/torchjd_stateful.npz`` is written by
``scripts/make_golden_torchjd_stateful.py`` (torch and torchjd in their own
venv); these tests only read it. Each K in {2, 3, 5} has a sequence of 5 steps
of (K, 24) float64 Jacobians fed to ONE TorchJD object, so its state (GradVac's
similarity targets, PCD's norm average, CR-MOGM's smoothed weights,
ExcessMTL's sums of squares and baseline, MoDo's and SDMGrad's weights) is
exercised. Here every method runs the same sequence through the full optax
transform (a ``lax.scan`` over the steps carrying the state; the Jacobian split
into a pytree of three leaves), all methods of one K in one compiled function,
in float32 and in float64 (``jax.enable_x64``).

GradVac draws its task orders at random: at K = 2 there is only one order, so
the transform itself must equal TorchJD step after step; at K = 3, 5 the pure
``gradvac_weights`` is fed the orders TorchJD drew (recorded in the file) and
carries the targets itself.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samgs_optax
from samgs_optax.aggregators import gradvac_weights, imtl_g_weights
from samgs_optax.gramian import combine

GOLDEN = pathlib.Path(__file__).parent / "golden" / "torchjd_stateful.npz"
KS = (2, 3, 5)

# Worst ||u - u_torchjd|| / ||u_torchjd|| over the 5 steps x 3 values of K, measured
# (one run, `python tests/test_aggregators_stateful.py [--x64]`):
#                        float32   float64
#   gradvac (K = 2)      1.0e-07   2.5e-16
#   gradvac_orders       2.9e-07   5.9e-16   (pure function, TorchJD's recorded orders)
#   pcd                  4.4e-07   1.3e-15
#   cr_mogm_upgrad       2.7e-07   8.8e-16
#   cr_mogm_imtl_g       2.1e-06   8.1e-15   (pseudo-inverse of the Gramian)
#   excess_mtl           3.4e-08   9.8e-17
#   excess_mtl_warmup2   4.7e-07   1.3e-15
#   modo (2 batches)     9.9e-07   2.1e-15
#   sdmgrad (2 batches)  2.7e-07   9.4e-16
RTOL = {jnp.float32: 1e-5, jnp.float64: 1e-13}
RTOL_PINV = {jnp.float32: 5e-5, jnp.float64: 1e-12}  # cr_mogm over IMTL-G


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN)
    assert str(data["meta/torchjd_version"]).startswith("0.18")
    return data


def _split(j):
    """Splits the columns of a (..., K, 24) Jacobian into three leaves of different shapes."""
    lead = j.shape[:-1]
    return {
        "w": j[..., :12].reshape(*lead, 4, 3),
        "b": j[..., 12:20],
        "s": {"t": j[..., 20:24].reshape(*lead, 2, 2)},
    }


def _flat(tree) -> np.ndarray:
    w, b, t = (np.asarray(x, np.float64) for x in (tree["w"], tree["b"], tree["s"]["t"]))
    lead = w.shape[:-2]
    return np.concatenate([w.reshape(*lead, 12), b.reshape(*lead, 8), t.reshape(*lead, 4)], axis=-1)


def _third(golden, k):
    """A third batch for MoDo/SDMGrad(num_batches=3): any Jacobian other than the first two."""
    return golden[f"K{k}/J2"] - 0.5 * golden[f"K{k}/J"]


def _transforms(k: int) -> dict:
    return {
        "gradvac": samgs_optax.gradvac(k),
        "pcd": samgs_optax.pcd(k),
        "cr_mogm_upgrad": samgs_optax.cr_mogm(k, weighting="upgrad"),
        "cr_mogm_imtl_g": samgs_optax.cr_mogm(k, weighting=imtl_g_weights),  # a callable
        "excess_mtl": samgs_optax.excess_mtl(k),
        "excess_mtl_warmup2": samgs_optax.excess_mtl(k, n_warmup_steps=2),
        "modo": samgs_optax.modo(k, num_batches=2),
        "sdmgrad": samgs_optax.sdmgrad(k, num_batches=2),
    }


def _run_all(golden, k: int, dtype, only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every method (or those in ``only``) over the 5-step sequence of one K, in one compiled
    function. Returns (STEPS, 24) float64 updates per method.
    """
    jac = golden[f"K{k}/J"]
    jac2 = golden[f"K{k}/J2"]
    perms = jnp.asarray(golden[f"K{k}/gradvac_perms"], jnp.int32)
    txs = {n: tx for n, tx in _transforms(k).items() if only is None or n in only}
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[2:], dtype), _split(jac))
    one = jax.tree.map(lambda x: jnp.asarray(x, dtype), _split(jac))
    two = jax.tree.map(lambda *x: jnp.asarray(np.stack(x, 1), dtype), _split(jac), _split(jac2))

    def inputs(name):
        return two if name in ("modo", "sdmgrad") else one

    @jax.jit
    def run(xs):
        def step(carry, x):
            states, phi = carry
            outs, new_states = {}, {}
            for name, tx in txs.items():
                outs[name], new_states[name] = tx.update(x[name], states[name], params)
            g = samgs_optax.gramian(x["jac"], dtype)
            w, phi = gradvac_weights(g, phi, x["perms"])
            outs["gradvac_orders"] = combine(x["jac"], w)
            return (new_states, phi), outs

        init = ({name: tx.init(params) for name, tx in txs.items()}, jnp.zeros((k, k), dtype))
        (states, phi), outs = jax.lax.scan(step, init, xs)
        return outs, phi, states

    xs = {name: inputs(name) for name in txs}
    xs["jac"], xs["perms"] = one, perms
    outs, phi, states = run(xs)
    result = {name: _flat(out) for name, out in outs.items()}
    result["gradvac_orders_phi"] = np.asarray(phi, np.float64)
    result["states"] = states
    return result


def _reference(golden, k: int) -> dict[str, np.ndarray]:
    """TorchJD's updates; MoDo/SDMGrad: its weights combining J_u (the batches' mean / J_3)."""
    jac, jac2 = golden[f"K{k}/J"], golden[f"K{k}/J2"]
    ref = {
        key: golden[f"K{k}/{key}"]
        for key in ("pcd", "cr_mogm_upgrad", "cr_mogm_imtl_g", "excess_mtl", "excess_mtl_warmup2")
    }
    ref["gradvac_orders"] = golden[f"K{k}/gradvac"]
    if k == 2:
        ref["gradvac"] = golden[f"K{k}/gradvac"]
    for name in ("modo", "sdmgrad"):
        w = golden[f"K{k}/{name}_weights"]
        ref[name] = np.einsum("sk,skd->sd", w, (jac + jac2) / 2)
    return ref


def _rel(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


# float32 at every K, float64 at K = 5 (the largest): each case is one compilation of
# every method (~10 s on a loaded 2-core machine); GradVac's transform alone in float64 at K = 2.
CASES = [(jnp.float32, 2), (jnp.float32, 3), (jnp.float32, 5), (jnp.float64, 2), (jnp.float64, 5)]
ONLY = {(jnp.float64, 2): ("gradvac",)}
CASE_IDS = [f"{'f32' if d == jnp.float32 else 'f64'}-K{k}" for d, k in CASES]


@pytest.fixture(scope="module")
def results(golden):
    out = {}
    for dtype, k in CASES:
        with jax.enable_x64(dtype == jnp.float64):
            out[dtype, k] = _run_all(golden, k, dtype, ONLY.get((dtype, k)))
    return out


@pytest.mark.parametrize("dtype, k", CASES, ids=CASE_IDS)
def test_sequences_match_torchjd(golden, results, k, dtype):
    got = results[dtype, k]
    ref = _reference(golden, k)
    if (dtype, k) in ONLY:
        ref = {key: ref[key] for key in (*ONLY[dtype, k], "gradvac_orders")}
    assert set(ref) <= set(got)
    for key, want in ref.items():
        rtol = RTOL_PINV[dtype] if key == "cr_mogm_imtl_g" else RTOL[dtype]
        err = _rel(got[key], want)
        assert np.all(err < rtol), (key, err)


@pytest.mark.parametrize("dtype, k", CASES, ids=CASE_IDS)
def test_states_match_torchjd(golden, results, k, dtype):
    """GradVac's targets after the sequence; MoDo's and SDMGrad's weights in the state."""
    got = results[dtype, k]
    tol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(
        got["gradvac_orders_phi"], golden[f"K{k}/gradvac_phi"], rtol=0, atol=tol
    )
    if k == 2:
        phi = np.asarray(got["states"]["gradvac"].phi_hat, np.float64)
        np.testing.assert_allclose(phi, golden[f"K{k}/gradvac_phi"], rtol=0, atol=tol)
    for name in set(got["states"]) & {"modo", "sdmgrad"}:
        last = golden[f"K{k}/{name}_weights"][-1]
        np.testing.assert_allclose(
            np.asarray(got["states"][name].weights, np.float64), last, rtol=0, atol=10 * tol
        )


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_three_batches_weigh_with_two_and_update_with_the_third(golden, name):
    """num_batches=3: TorchJD's weights from J_1 J_2^T, combining the third batch J_3."""
    k = 3
    jac, jac2, jac3 = golden[f"K{k}/J"], golden[f"K{k}/J2"], _third(golden, k)
    tx = samgs_optax.AGGREGATORS[name](k, num_batches=3)
    params = {"w": jnp.zeros(24)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(2):
        grads = {"w": jnp.asarray(np.stack([jac[t], jac2[t], jac3[t]]), jnp.float32)}
        out, state = update(grads, state, params)
        weights = golden[f"K{k}/{name}_weights"][t]
        np.testing.assert_allclose(np.asarray(state.weights), weights, rtol=0, atol=1e-6)
        want = weights @ jac3[t]
        assert _rel(np.asarray(out["w"], np.float64), want) < 1e-5


def test_the_golden_sequences_exercise_the_state(golden):
    """The reference data would catch a method that forgot its state."""
    for k in KS:
        # GradVac corrected something (the update is not the plain sum) at most steps.
        jac = golden[f"K{k}/J"]
        assert np.sum(_rel(golden[f"K{k}/gradvac"], jac.sum(1)) > 1e-3) >= 3
        # PCD moved away from the primary gradient, rescaled (some constraint active).
        primary = jac[:, 0]
        assert np.any(_rel(golden[f"K{k}/pcd"], primary) > 1e-3)
        # Warm-up: the first two ExcessMTL steps are the mean, the later ones are not.
        warm = golden[f"K{k}/excess_mtl_warmup2"]
        np.testing.assert_allclose(warm[:2], jac[:2].mean(1), rtol=1e-12)
        assert np.all(_rel(warm[2:], jac[2:].mean(1)) > 1e-3)
        # CR-MOGM: from step 2 on, not the wrapped weighting's own output.
        assert np.all(
            _rel(golden[f"K{k}/cr_mogm_upgrad"][1:], golden[f"K{k}/cr_mogm_imtl_g"][1:]) > 1e-6
        )


def _run_steps(tx, grads_seq, params, state=None):
    update = jax.jit(tx.update)
    state = tx.init(params) if state is None else state
    outs = []
    for g in grads_seq:
        u, state = update(g, state, params)
        outs.append(np.asarray(u["w"]))
    return outs, state


@pytest.mark.parametrize("name", ["gradvac", "pcd", "cr_mogm", "excess_mtl", "modo", "sdmgrad"])
def test_state_checkpoint_round_trip_is_bit_identical(name):
    """Stopping after 2 steps, saving the state as NumPy arrays and resuming changes nothing."""
    k = 3
    rng = np.random.default_rng(5)
    params = {"w": jnp.zeros(6), "h": jnp.zeros(2)}
    mask = {"w": True, "h": False}
    tx = samgs_optax.AGGREGATORS[name](k, mask=mask)
    seq = [
        {"w": jnp.asarray(rng.normal(size=(k, 6)), jnp.float32), "h": jnp.ones((k, 2))}
        for _ in range(5)
    ]
    straight, _ = _run_steps(tx, seq, params)
    first, state = _run_steps(tx, seq[:2], params)
    saved = jax.tree.map(np.asarray, state)  # what a checkpoint holds
    restored = jax.tree.map(jnp.asarray, saved)
    rest, _ = _run_steps(tx, seq[2:], params, restored)
    for a, b in zip(straight, first + rest, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(straight[0], straight[-1])


def test_gradvac_key_semantics():
    """``seed=`` and ``key=`` start the same stream; the key advances; other keys differ."""
    k = 5
    rng = np.random.default_rng(1)
    params = {"w": jnp.zeros(8)}
    seq = [{"w": jnp.asarray(rng.normal(size=(k, 8)), jnp.float32)} for _ in range(3)]
    tx = samgs_optax.gradvac(k, seed=3)
    start = tx.init(params)
    via_key = samgs_optax.gradvac(k, key=jax.random.PRNGKey(3)).init(params)
    np.testing.assert_array_equal(start.key, via_key.key)
    by_seed, end = _run_steps(tx, seq, params)
    other, _ = _run_steps(tx, seq, params, samgs_optax.gradvac(k, seed=4).init(params))
    assert any(not np.allclose(a, b) for a, b in zip(by_seed, other, strict=True))
    assert not np.array_equal(end.key, start.key)


def test_gradvac_orders_are_permutations_of_the_others():
    orders = np.asarray(samgs_optax.aggregators.gradvac_orders(jax.random.PRNGKey(0), 6))
    assert orders.shape == (6, 5)
    for row in orders:
        assert sorted(row) == list(range(5))


def test_pcd_infeasible_constraints_return_the_primary_gradient():
    """Two exactly opposite secondary gradients: no direction serves both; the output is g_1."""
    rng = np.random.default_rng(3)
    g1, g2 = rng.normal(size=(2, 7))
    jac = jnp.asarray(np.stack([g1, g2, -g2]), jnp.float32)
    (out,), _ = _run_steps(samgs_optax.pcd(3), [{"w": jac}], {"w": jnp.zeros(7)})
    np.testing.assert_allclose(out, g1, rtol=1e-5)


def test_cr_mogm_moving_average_and_initial_weights():
    """lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k from the given lambda_0; the raw
    weights are the wrapped method's (CAGrad with an option passed through)."""
    k = 3
    rng = np.random.default_rng(4)
    params = {"w": jnp.zeros(5)}
    seq = [{"w": jnp.asarray(rng.normal(size=(k, 5)), jnp.float32)} for _ in range(2)]
    init = np.array([0.2, 0.3, 0.5], np.float32)
    tx = samgs_optax.cr_mogm(k, weighting="cagrad", alpha=0.25, initial_weights=init, c=0.4)
    update = jax.jit(tx.update)
    plain = samgs_optax.cagrad(k, c=0.4)
    plain_update = jax.jit(lambda g: plain.update(g, plain.init(params), params)[0]["w"])
    state, prev = tx.init(params), init
    for g in seq:
        out, state = update(g, state, params)
        np.testing.assert_allclose(state.weights, 0.25 * prev + 0.75 * state.raw_weights, rtol=1e-6)
        jac = np.asarray(g["w"], np.float64)
        np.testing.assert_allclose(out["w"], np.asarray(state.weights) @ jac, rtol=1e-5, atol=1e-6)
        want = plain_update(g)
        np.testing.assert_allclose(np.asarray(state.raw_weights) @ jac, want, rtol=1e-4, atol=1e-5)
        prev = np.asarray(state.weights)


def test_cr_mogm_under_inject_hyperparams():
    """alpha injected (the paper's schedule changes it), weighting options still passed on."""
    k = 3
    rng = np.random.default_rng(7)
    params = {"w": jnp.zeros(5)}
    seq = [{"w": jnp.asarray(rng.normal(size=(k, 5)), jnp.float32)} for _ in range(2)]
    make = samgs_optax.inject_hyperparams(
        samgs_optax.cr_mogm, static_args=("num_tasks", "weighting")
    )
    injected = make(num_tasks=k, weighting="cagrad", alpha=0.5, c=0.4)
    got, state = _run_steps(injected, seq, params)
    want, _ = _run_steps(samgs_optax.cr_mogm(k, weighting="cagrad", alpha=0.5, c=0.4), seq, params)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(state.hyperparams["alpha"]) == 0.5


def test_two_batch_layout_and_heads():
    """(B, K, ...) leaves: heads get the task sum of J_u; a wrong batch axis is an error."""
    k = 3
    rng = np.random.default_rng(6)
    params = {"w": jnp.zeros(4), "h": jnp.zeros(3)}
    mask = {"w": True, "h": False}
    two = {
        "w": jnp.asarray(rng.normal(size=(2, k, 4)), jnp.float32),
        "h": jnp.asarray(rng.normal(size=(2, k, 3)), jnp.float32),
    }
    for make in (samgs_optax.modo, samgs_optax.sdmgrad):
        tx = make(k, num_batches=2, mask=mask)
        out, state = jax.jit(tx.update)(two, tx.init(params), params)
        np.testing.assert_allclose(out["h"], two["h"].mean(0).sum(0), rtol=1e-6)
        want = np.asarray(state.weights) @ np.asarray(two["w"].mean(0))
        np.testing.assert_allclose(out["w"], want, rtol=1e-5)
        with pytest.raises(ValueError, match="leading batch axis of 2"):
            tx.update(jax.tree.map(lambda x: x[0], two), tx.init(params), params)
        with pytest.raises(ValueError, match="num_batches"):
            make(k, num_batches=4)


def _report() -> None:
    """Prints the worst relative error of every method (``--x64`` for float64)."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    golden = np.load(GOLDEN)
    worst: dict[str, float] = {}
    for k in KS:
        got = _run_all(golden, k, dtype)
        for key, want in _reference(golden, k).items():
            worst[key] = max(worst.get(key, 0.0), float(_rel(got[key], want).max()))
    print(f"worst ||u - u_torchjd|| / ||u_torchjd||, 5 steps x K in {KS}, {dtype.__name__}:")
    for name, err in worst.items():
        print(f"  {name:20s} {err:.1e}")


if __name__ == "__main__":
    import sys

    if "--x64" in sys.argv:
        jax.config.update("jax_enable_x64", True)
    _report()
