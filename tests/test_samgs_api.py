"""SAM-GS as an optax transform: jit, chaining, injection, mask, dtypes, errors, edge cases."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    flatten,
    flatten_stacked,
    make_params,
    relative_error,
    task_gradient_sequence,
    unflatten_stacked,
)
from numpy_reference import NumpyAdam, NumpySamgs
from optax.transforms import MaskedNode

import samgs_optax

K = 3
PARAMS = make_params()
DIM = flatten(PARAMS).size


def _sequence(steps=12, seed=0, k=K):
    seq = task_gradient_sequence(np.random.default_rng(seed), k, DIM, steps)
    return [unflatten_stacked(g, PARAMS, np.float32) for g in seq], seq


def _run(tx, grads_seq, jit=True, params=PARAMS):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for grads in grads_seq:
        out, state = update(grads, state, params)
        outs.append(out)
    return outs, state


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_jit_and_eager_agree():
    grads, _ = _sequence(steps=4)
    tx = samgs_optax.samgs(K)
    eager, eager_state = _run(tx, grads, jit=False)
    jitted, jit_state = _run(tx, grads, jit=True)
    for a, b in zip(eager, jitted, strict=True):
        assert relative_error(flatten(a), flatten(b)) < 1e-6
    assert int(jit_state.count) == int(eager_state.count) == len(grads)


def test_chain_with_adam_matches_numpy():
    grads, raw = _sequence(seed=1)
    lr = 1e-2
    tx = optax.chain(samgs_optax.samgs(K), optax.scale(K), optax.adam(lr))
    outs, _ = _run(tx, grads)
    ref_samgs, ref_adam = NumpySamgs(K, DIM), NumpyAdam(DIM, lr)
    for out, g in zip(outs, raw, strict=True):
        want = ref_adam.step(K * ref_samgs.step(g))
        assert relative_error(flatten(out), want) < 1e-4


def test_inject_hyperparams_follows_the_injected_gamma():
    grads, raw = _sequence(seed=2)
    factory = optax.inject_hyperparams(samgs_optax.samgs, static_args=("num_tasks",))
    tx = factory(num_tasks=K, gamma=0.1, b1=0.9, b2=0.99)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    ref = NumpySamgs(K, DIM, gamma=0.1)
    for i, (g_tree, g) in enumerate(zip(grads, raw, strict=True)):
        gamma = 0.1 if i < 6 else 0.95  # change the threshold mid-run, no recompile needed
        state.hyperparams["gamma"] = jnp.asarray(gamma)
        ref.gamma = gamma
        out, state = update(g_tree, state)
        want = ref.step(g)
        assert bool(state.inner_state.equalised) == ref.last_equalised
        assert relative_error(flatten(out), want) < 1e-4
    assert update._cache_size() == 1


def test_inject_hyperparams_without_static_num_tasks_explains():
    factory = optax.inject_hyperparams(samgs_optax.samgs)
    with pytest.raises(TypeError, match="static_args"):
        factory(num_tasks=K).init(PARAMS)


def _head_mask(params):
    return {"conv": True, "dense": {"w": True, "b": False}, "scale": False}


@pytest.mark.parametrize("mask", [_head_mask(PARAMS), _head_mask], ids=["tree", "callable"])
def test_mask_heads_get_plain_sum_and_no_moments(mask):
    grads, raw = _sequence(seed=3)
    outs, state = _run(samgs_optax.samgs(K, mask=mask), grads)
    assert isinstance(state.m["dense"]["b"], MaskedNode)
    assert isinstance(state.m["scale"], MaskedNode)
    # Shared leaves (conv, dense.w) follow the reference on the shared columns only.
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(PARAMS)]
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS)]
    offsets = np.cumsum([0, *sizes])
    shared = [i for i, n in enumerate(names) if n in ("['conv']", "['dense']['w']")]
    shared_cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in shared])
    ref = NumpySamgs(K, shared_cols.size)
    for out, g in zip(outs, raw, strict=True):
        want = ref.step(g[:, shared_cols])
        got = np.concatenate([np.ravel(out["conv"]), np.ravel(out["dense"]["w"])])
        assert relative_error(got, want) < 5e-4
    last = grads[-1]
    np.testing.assert_allclose(outs[-1]["dense"]["b"], last["dense"]["b"].sum(0), rtol=1e-6)
    np.testing.assert_allclose(outs[-1]["scale"], last["scale"].sum(0), rtol=1e-6)


def test_mask_of_wrong_structure_is_rejected():
    # The message names the first uncovered parameter path, not two tree dumps.
    with pytest.raises(ValueError, match=r"does not cover the parameter at \['dense'\]\['b'\]"):
        samgs_optax.samgs(K, mask={"conv": True}).init(PARAMS)


def test_m_dtype_bfloat16_stores_small_moments_and_stays_close():
    grads, _ = _sequence(seed=4)
    outs16, state16 = _run(samgs_optax.samgs(K, m_dtype=jnp.bfloat16), grads)
    outs32, state32 = _run(samgs_optax.samgs(K), grads)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state16.m))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(outs16[-1]))
    m16, m32 = flatten_stacked(state16.m, K), flatten_stacked(state32.m, K)
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 2e-3 per step).
    for task in range(K):
        assert relative_error(m16[task], m32[task]) < 8e-3
    for a, b in zip(outs16, outs32, strict=True):
        assert relative_error(flatten(a), flatten(b)) < 8e-3


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_tasks=1), ValueError, "num_tasks must be >= 2"),
        (dict(num_tasks=2.0), TypeError, "num_tasks must be a Python int"),
        (dict(num_tasks=2, gamma=1.5), ValueError, r"gamma must be in \[0.0, 1.0\]"),
        (dict(num_tasks=2, gamma=-0.1), ValueError, "gamma must be in"),
        (dict(num_tasks=2, b1=1.0), ValueError, r"b1 must be in \[0.0, 1.0\)"),
        (dict(num_tasks=2, b2=-0.5), ValueError, r"b2 must be in \[0.0, 1.0\)"),
        (dict(num_tasks=2, eps=-1.0), ValueError, "eps must be in"),
        (dict(num_tasks=2, similarity="max"), ValueError, "similarity must be 'mean' or 'min'"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        samgs_optax.samgs(**kwargs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_wrong_task_axis_names_the_leaf(jit):
    tx = samgs_optax.samgs(K)
    state = tx.init(PARAMS)
    grads, _ = _sequence(steps=1)
    bad = dict(
        grads[0], dense={"w": np.zeros((K + 1, 5, 4), np.float32), "b": grads[0]["dense"]["b"]}
    )
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=r"\['dense'\]\['w'\] has shape \(4, 5, 4\).*num_tasks=3"):
        update(bad, state)


def test_unstacked_gradient_is_rejected():
    tx = samgs_optax.samgs(K)
    with pytest.raises(ValueError, match=r"\['dense'\]\['b'\] has shape \(4,\).*num_tasks=3"):
        tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS))


def test_integer_gradients_are_rejected():
    tx = samgs_optax.samgs(K)
    grads = jax.tree.map(lambda p: np.zeros((K, *p.shape), np.int32), PARAMS)
    with pytest.raises(TypeError, match=r"leaf \['conv'\] has dtype int32.*floating"):
        tx.update(grads, tx.init(PARAMS))


def test_tree_that_does_not_match_the_state_is_rejected():
    tx = samgs_optax.samgs(K)
    grads, _ = _sequence(steps=1)
    with pytest.raises(ValueError, match="does not match the tree the optimizer state"):
        tx.update({"conv": grads[0]["conv"]}, tx.init(PARAMS))


def test_zero_norm_task_gives_finite_update_as_spec_defines():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(K, DIM))
    g[1] = 0.0
    g[2] *= 1e3  # dissimilar: equalisation branch, where 0/0 would appear
    ref = NumpySamgs(K, DIM)
    tx = samgs_optax.samgs(K)
    state = tx.init(PARAMS)
    for _ in range(3):
        out, state = jax.jit(tx.update)(unflatten_stacked(g, PARAMS, np.float32), state)
        want = ref.step(g)
        assert np.all(np.isfinite(flatten(out)))
        assert relative_error(flatten(out), want) < 5e-4
    assert bool(state.equalised) and ref.last_equalised


def test_all_tasks_zero_gives_zeros():
    tx = samgs_optax.samgs(K)
    state = tx.init(PARAMS)
    zeros = jax.tree.map(lambda p: np.zeros((K, *p.shape), np.float32), PARAMS)
    for _ in range(2):
        out, state = tx.update(zeros, state)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
        assert np.isfinite(float(state.h))
    assert float(state.similarity) == 1.0


def test_apply_if_finite_skips_a_nan_step_exactly():
    grads, _ = _sequence(seed=6)
    poisoned = jax.tree.map(lambda x: x.copy(), grads[5])
    poisoned["conv"][0, 0, 0, 0] = np.nan
    inner = optax.chain(samgs_optax.samgs(K), optax.scale(K), optax.adam(1e-2))
    tx = samgs_optax.apply_if_finite(inner, max_consecutive_errors=3)
    clean, clean_state = _run(tx, grads)
    with_nan, nan_state = _run(tx, grads[:5] + [poisoned] + grads[5:])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(with_nan[5]))
    assert int(nan_state.total_notfinite) == 1 and bool(nan_state.last_finite)
    for a, b in zip(clean, with_nan[:5] + with_nan[6:], strict=True):
        _assert_trees_equal(a, b)
    _assert_trees_equal(clean_state.inner_state, nan_state.inner_state)


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
    grads, _ = _sequence(steps=1)
    bad = jax.tree.map(lambda x: np.full_like(x, np.inf), grads[0])
    tx = samgs_optax.apply_if_finite(samgs_optax.samgs(K), max_consecutive_errors=2)
    outs, state = _run(tx, [bad, bad, bad])
    assert all(np.all(np.asarray(x) == 0) for out in outs[:2] for x in jax.tree.leaves(out))
    assert not np.all(np.isfinite(flatten(outs[2])))
    assert int(state.notfinite_count) == 3


def test_optax_apply_if_finite_cannot_wrap_samgs():
    """Why the library ships its own guard (SPEC): optax's returns input-shaped zeros."""
    grads, _ = _sequence(steps=1)
    tx = optax.apply_if_finite(samgs_optax.samgs(K), max_consecutive_errors=3)
    with pytest.raises(TypeError):
        jax.jit(tx.update)(grads[0], tx.init(PARAMS))


def test_state_saved_and_restored_continues_bit_identically(tmp_path):
    grads, _ = _sequence(steps=10, seed=7)
    tx = optax.chain(samgs_optax.samgs(K), optax.adam(1e-2))
    update = jax.jit(tx.update)
    straight, straight_state = _run(tx, grads)
    state = tx.init(PARAMS)
    for g in grads[:5]:
        _, state = update(g, state, PARAMS)
    path = tmp_path / "state.msgpack"
    path.write_bytes(flax.serialization.to_bytes(state))
    restored = flax.serialization.from_bytes(tx.init(PARAMS), path.read_bytes())
    for g, want in zip(grads[5:], straight[5:], strict=True):
        out, restored = update(g, restored, PARAMS)
        _assert_trees_equal(out, want)
    _assert_trees_equal(restored, straight_state)
