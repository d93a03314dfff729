"""Which optax wrappers work around or after SAM-GS as they are, and how the others fail.

SAM-GS takes stacked per-task gradients (leading task axis K) and returns an
update shaped like the params. A wrapper that only sees params-shaped updates
(placed after samgs in the chain) or that passes its input straight to the
wrapped chain works; one that builds params-shaped buffers from the updates it
receives, or returns its input unchanged, does not. The README's table quotes
the errors asserted here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samgs_optax

K = 2
LR = 1e-2
PARAMS = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3)}


def _grads(steps, seed=0):
    r = np.random.default_rng(seed)
    scales = np.array([1.0, 50.0]).reshape(K, 1, 1)  # dissimilar: SAM-GS equalises
    return [
        jax.tree.map(
            lambda p: jnp.asarray(
                r.normal(size=(K, *p.shape)) * scales.reshape((K,) + (1,) * p.ndim), p.dtype
            ),
            PARAMS,
        )
        for _ in range(steps)
    ]


def _run(tx, grads, params=PARAMS, apply=True):
    """Runs tx under jit; returns the updates, the final state and the final params."""
    state, outs = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        out, state = update(g, state, params)
        outs.append(out)
        if apply:
            params = optax.apply_updates(params, out)
    return outs, state, params


def _assert_trees_close(a, b, rtol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


def _is_zero(tree):
    return all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(tree))


def test_lookahead_around_the_whole_chain_works():
    inner = optax.chain(samgs_optax.samgs(K), optax.adam(LR))
    tx = optax.lookahead(inner, sync_period=2, slow_step_size=0.5)
    grads = _grads(2)
    _, _, params = _run(tx, grads, params=optax.LookaheadParams.init_synced(PARAMS))
    _, _, fast = _run(inner, grads)  # the fast weights follow the chain for sync_period steps
    want = jax.tree.map(lambda p0, f: p0 + 0.5 * (f - p0), PARAMS, fast)
    _assert_trees_close(params.slow, want)
    _assert_trees_close(params.fast, want)  # synced


def test_masked_inside_the_chain_works():
    decay = {"a": True, "b": False}
    tx = optax.chain(
        samgs_optax.samgs(K), optax.masked(optax.add_decayed_weights(0.1), decay), optax.sgd(LR)
    )
    outs, _, _ = _run(tx, _grads(3))
    ref, _, _ = _run(optax.chain(samgs_optax.samgs(K), optax.sgd(LR)), _grads(3), apply=False)
    # Same params for both at step 1: sgd(-lr * (u + 0.1 p)) on a, -lr * u on b.
    np.testing.assert_allclose(outs[0]["a"], ref[0]["a"] - LR * 0.1 * PARAMS["a"], rtol=1e-6)
    np.testing.assert_allclose(outs[0]["b"], ref[0]["b"], rtol=1e-6)


def test_masked_around_samgs_fails():
    """optax.masked hands samgs MaskedNode leaves and would return masked-out leaves still
    stacked (K, ...); use samgs(K, mask=...) for task heads instead."""
    tx = optax.masked(samgs_optax.samgs(K), {"a": True, "b": False})
    with pytest.raises(
        ValueError, match="The gradient tree does not match the tree the optimizer state"
    ):
        _run(tx, _grads(1))


def test_inject_hyperparams_works_on_samgs_and_on_the_whole_chain():
    grads = _grads(4)
    want, _, _ = _run(
        optax.chain(samgs_optax.samgs(K, gamma=0.5), optax.scale(K), optax.adam(LR)), grads
    )
    samgs_injected = optax.inject_hyperparams(samgs_optax.samgs, static_args=("num_tasks",))
    tx = optax.chain(samgs_injected(num_tasks=K, gamma=0.5), optax.scale(K), optax.adam(LR))
    got, state, _ = _run(tx, grads)
    assert float(state[0].hyperparams["gamma"]) == 0.5

    def recipe(num_tasks, learning_rate):
        return optax.chain(
            samgs_optax.samgs(num_tasks, gamma=0.5),
            optax.scale(num_tasks),
            optax.adam(learning_rate),
        )

    whole = optax.inject_hyperparams(recipe, static_args=("num_tasks",))(K, learning_rate=LR)
    got_whole, _, _ = _run(whole, grads)
    for a, b, c in zip(got, got_whole, want, strict=True):
        _assert_trees_close(a, c)
        _assert_trees_close(b, c)


def test_schedule_free_after_samgs_and_around_a_chain_starting_with_samgs_work():
    grads = _grads(4)

    def base():
        return optax.chain(optax.scale_by_adam(b1=0.0), optax.scale(-LR))

    after = optax.chain(samgs_optax.samgs(K), optax.contrib.schedule_free(base(), LR))
    around = optax.contrib.schedule_free(optax.chain(samgs_optax.samgs(K), base()), LR)
    outs_after, state_after, params_after = _run(after, grads)
    outs_around, state_around, params_around = _run(around, grads)
    for a, b in zip(outs_after, outs_around, strict=True):
        _assert_trees_close(a, b)
    _assert_trees_close(
        optax.contrib.schedule_free_eval_params(state_after[1], params_after),
        optax.contrib.schedule_free_eval_params(state_around, params_around),
    )
    adamw = optax.chain(samgs_optax.samgs(K), optax.contrib.schedule_free_adamw(LR))
    outs, state, params = _run(adamw, grads)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(outs))
    assert not _is_zero(outs[-1]) and int(state[1].step_count) == 1 + len(grads)  # from 1
    assert jax.tree.structure(optax.contrib.schedule_free_eval_params(state[1], params)) == (
        jax.tree.structure(PARAMS)
    )


def test_apply_every_after_samgs_sums_the_surgery_outputs():
    """Runs, but it is not gradient accumulation: samgs steps on every micro-batch."""
    grads, k = _grads(3), 3
    outs, state, _ = _run(optax.chain(samgs_optax.samgs(K), optax.apply_every(k)), grads)
    ref, _, _ = _run(samgs_optax.samgs(K), grads, apply=False)
    assert _is_zero(outs[0]) and _is_zero(outs[1])
    _assert_trees_close(outs[2], jax.tree.map(lambda *u: sum(u), *ref), rtol=1e-5)
    assert int(state[0].count) == k


def test_apply_every_before_samgs_fails_in_a_scan():
    """Its buffer is built from the params and becomes stacked after one step; eagerly it
    runs but feeds samgs zeros on k - 1 steps of k (so samgs still steps every micro-batch)."""
    tx = optax.chain(optax.apply_every(2), samgs_optax.samgs(K))
    grads = jax.tree.map(lambda *g: jnp.stack(g), *_grads(2))

    def body(state, g):
        out, state = tx.update(g, state, PARAMS)
        return state, out

    with pytest.raises(
        TypeError, match="scan body function carry input and carry output must have equal types"
    ):
        jax.lax.scan(body, tx.init(PARAMS), grads)


def test_multisteps_around_the_params_shaped_rest_runs_but_samgs_steps_every_micro_batch():
    rest = optax.MultiSteps(optax.adam(LR), every_k_schedule=2)
    tx = optax.chain(samgs_optax.samgs(K), rest.gradient_transformation())
    outs, state, _ = _run(tx, _grads(4))
    assert [_is_zero(o) for o in outs] == [True, False, True, False]
    assert int(state[0].count) == 4 and int(state[1].gradient_step) == 2


def test_optax_apply_if_finite_fails_around_samgs_and_does_not_protect_it_after():
    grads = _grads(2)
    with pytest.raises(TypeError, match="cond branches must have equal output types"):
        _run(optax.apply_if_finite(samgs_optax.samgs(K), max_consecutive_errors=3), grads)
    # After samgs it runs, but a NaN has already reached samgs's moments for ever.
    nan = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[0])
    tx = optax.chain(samgs_optax.samgs(K), optax.apply_if_finite(optax.adam(LR), 3))
    outs, state, _ = _run(tx, [nan, grads[1]])
    assert _is_zero(outs[0]) and _is_zero(outs[1])  # every later step is skipped too
    assert not np.all(np.isfinite(np.asarray(state[0].m["a"])))
