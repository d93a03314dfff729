"""multi_steps: k accumulated micro-batches then one step equal one step on the k-times batch."""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flatten, relative_error

import samgs_optax

D_IN, HIDDEN, MICRO = 4, 6, 8  # input size, trunk width, micro-batch size
LR = 1e-2
# Per-task loss weights (the first K are used): "dissimilar" makes every pair of task norms
# differ by >= 30x (Psi <~ 0.06 < gamma = 0.1: SAM-GS equalises); "similar" keeps them alike
# (Psi >~ 0.88: it modulates).
WEIGHTS = {"dissimilar": (1.0, 1000.0, 30.0), "similar": (1.0, 1.3, 0.8)}
HIGHEST = jax.lax.Precision.HIGHEST
HEAD_MASK = {"trunk": {"w": True, "b": True}, "heads": {"w": False, "b": False}}


def _params(num_tasks, seed=0):
    r = np.random.default_rng(seed)
    return {
        "trunk": {
            "w": jnp.asarray(r.normal(size=(D_IN, HIDDEN)) / 2, jnp.float32),
            "b": jnp.zeros(HIDDEN, jnp.float32),
        },
        "heads": {
            "w": jnp.asarray(r.normal(size=(HIDDEN, num_tasks)) / HIDDEN**0.5, jnp.float32),
            "b": jnp.zeros(num_tasks, jnp.float32),
        },
    }


def _data(num_tasks, n, seed=1):
    """n samples (x, t): targets of K different smooth functions of x."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, D_IN))
    t = np.sin(x @ r.normal(size=(D_IN, num_tasks))) + 0.1 * r.normal(size=(n, num_tasks))
    return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)


def _task_losses_fn(weights):
    """K task losses, each a weighted mean over the batch: a shared trunk and one head per task."""
    weights = jnp.asarray(weights, jnp.float32)

    def task_losses(params, batch):
        x, t = batch
        # HIGHEST: exact float32 matmuls on accelerators too (no TF32), so that the two
        # batchings differ by rounding only.
        z = jnp.tanh(jnp.dot(x, params["trunk"]["w"], precision=HIGHEST) + params["trunk"]["b"])
        y = jnp.dot(z, params["heads"]["w"], precision=HIGHEST) + params["heads"]["b"]  # (n, K)
        return weights * jnp.mean((y - t) ** 2, axis=0)

    return task_losses


def _recipe(num_tasks, mask=None, aggregator="samgs"):
    """The authors' recipe: aggregate, times K, clip the global norm to 1, Adam."""
    first = samgs_optax.AGGREGATORS[aggregator](num_tasks, mask=mask)
    return optax.chain(
        first, optax.scale(num_tasks), optax.clip_by_global_norm(1.0), optax.adam(LR)
    )


def _train_step(tx, task_losses):
    """One jitted step; the per-task losses go along (``task_losses=``) for the loss-aware
    aggregators, dropped for the transforms that do not take them."""
    update = optax.with_extra_args_support(tx).update

    @jax.jit
    def step(params, opt_state, batch):
        losses, grads = samgs_optax.value_and_jacrev(task_losses)(params, batch)
        updates, opt_state = update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, updates

    return step


def _micro_batches(batch, k):
    x, t = batch
    return [(x[j * MICRO : (j + 1) * MICRO], t[j * MICRO : (j + 1) * MICRO]) for j in range(k)]


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _max_relative_error(a, b):
    """Largest leaf-wise relative error (max |a - b| / max |b|); int/bool leaves must be equal."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if not np.issubdtype(y.dtype, np.floating):
            np.testing.assert_array_equal(x, y)
            continue
        worst = max(worst, relative_error(x, y))
    return worst


@functools.cache
def _large_batch_step(num_tasks, case, heads, aggregator):
    """The recipe, the task losses and their jitted train step, shared by the runs below."""
    task_losses = _task_losses_fn(WEIGHTS[case][:num_tasks])
    tx = _recipe(num_tasks, HEAD_MASK if heads else None, aggregator)
    return tx, task_losses, _train_step(tx, task_losses)


@functools.cache
def _run_both(num_tasks, schedule, outer_steps, case, heads=False, aggregator="samgs"):
    """Large-batch steps and accumulated micro-steps side by side, each with its own params.

    Returns one record per outer step: (large-batch update, its opt state,
    accumulated update, the wrapper's state, the k used, and (state before,
    update, state after) of each intermediate micro-step). Cached: several
    tests read the same runs.
    """
    tx, task_losses, step = _large_batch_step(num_tasks, case, heads, aggregator)
    acc_tx = samgs_optax.multi_steps(tx, schedule, num_tasks)
    acc_step = _train_step(acc_tx, task_losses)
    ks = [int(schedule(i)) if callable(schedule) else schedule for i in range(outer_steps)]
    data = _data(num_tasks, MICRO * sum(ks))
    params = acc_params = _params(num_tasks)
    state, acc_state = tx.init(params), acc_tx.init(acc_params)
    records, start = [], 0
    for k in ks:
        batch = jax.tree.map(lambda a, s=start, n=k * MICRO: a[s : s + n], data)
        start += k * MICRO
        params, state, update = step(params, state, batch)
        intermediate = []
        for micro in _micro_batches(batch, k):
            before = acc_state
            acc_params, acc_state, acc_update = acc_step(acc_params, acc_state, micro)
            intermediate.append((before, acc_update, acc_state))
        records.append((update, state, acc_update, acc_state, k, intermediate[:-1]))
    return records


OUTER_STEPS = 4
CASES = [
    # (K, k, weights, heads): both K, both k, both branches, with and without task heads.
    (2, 2, "dissimilar", True),
    (3, 4, "dissimilar", False),
    (2, 4, "similar", False),
    (3, 2, "similar", True),
]


@pytest.mark.parametrize(
    "num_tasks,k,case,heads",
    CASES,
    ids=[f"K{n}-k{k}-{c}-{'heads' if h else 'shared'}" for n, k, c, h in CASES],
)
def test_accumulated_samgs_step_equals_the_large_batch_step(num_tasks, k, case, heads):
    records = _run_both(num_tasks, k, OUTER_STEPS, case, heads)
    for update, state, acc_update, acc_state, _, _ in records:
        samgs_state, acc_samgs_state = state[0], acc_state.inner_state[0]
        # Same per-task norms and similarity: the wrapper fed SAM-GS the large-batch gradient
        # (a sum instead of the mean would give k times the norms).
        np.testing.assert_allclose(acc_samgs_state.norms, samgs_state.norms, rtol=1e-5)
        np.testing.assert_allclose(acc_samgs_state.similarity, samgs_state.similarity, rtol=1e-5)
        assert bool(acc_samgs_state.equalised) == bool(samgs_state.equalised)
        assert bool(samgs_state.equalised) == (case == "dissimilar")
        # Same update and the same state everywhere in the chain (moments, h, Adam's mu, nu);
        # measured <= 6e-7 and 3e-6 (h = EMA of (1 - Psi)^2 loses digits when Psi ~ 1), while
        # one micro-batch alone is 44% off in the norms (test below).
        assert relative_error(flatten(acc_update), flatten(update)) < 1e-5
        assert _max_relative_error(acc_state.inner_state, state) < 5e-5
        assert int(acc_state.gradient_step) == int(samgs_state.count)


def test_accumulation_is_not_the_last_micro_batch():
    """The comparison above can fail: one micro-batch alone has other task gradients and norms."""
    num_tasks, k = 3, 4
    jacobian = jax.jit(samgs_optax.value_and_jacrev(_task_losses_fn(WEIGHTS["dissimilar"])))
    params = _params(num_tasks)
    batch = _data(num_tasks, k * MICRO)
    large = jacobian(params, batch)[1]
    micro = [jacobian(params, m)[1] for m in _micro_batches(batch, k)]
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
    assert relative_error(flatten(mean), flatten(large)) < 1e-5
    large_norms = samgs_optax.task_norms(large)
    np.testing.assert_allclose(samgs_optax.task_norms(mean), large_norms, rtol=1e-5)
    assert relative_error(samgs_optax.task_norms(micro[-1]), large_norms) > 1e-2
    assert relative_error(flatten(micro[-1]), flatten(large)) > 1e-2


def test_accumulated_upgrad_step_equals_the_large_batch_step():
    records = _run_both(3, 2, OUTER_STEPS, "dissimilar", aggregator="upgrad")
    for update, state, acc_update, acc_state, _, _ in records:
        weights, acc_weights = state[0].weights, acc_state.inner_state[0].weights
        assert relative_error(acc_weights, weights) < 1e-5
        assert relative_error(flatten(acc_update), flatten(update)) < 1e-5
        assert _max_relative_error(acc_state.inner_state, state) < 5e-5


@pytest.mark.parametrize("aggregator", ["gradnorm", "db_mtl"])
def test_accumulated_loss_aware_step_equals_the_large_batch_step(aggregator):
    """GradNorm and DB-MTL read the per-task losses: the wrapper hands the inner chain the
    mean of the micro-batches' losses, the large batch's, so the steps and states agree
    (GradNorm's reference losses, its logits and their Adam; DB-MTL's buffer of g / L)."""
    records = _run_both(3, 2, OUTER_STEPS, "dissimilar", aggregator=aggregator)
    for update, state, acc_update, acc_state, _, intermediate in records:
        assert relative_error(flatten(acc_update), flatten(update)) < 1e-5
        assert _max_relative_error(acc_state.inner_state, state) < 5e-5
        assert np.all(np.asarray(acc_state.acc_losses) == 0)
        assert np.all(np.asarray(intermediate[0][2].acc_losses) > 0)  # the first micro-batch's


def test_intermediate_micro_steps_return_zeros_and_keep_the_inner_state():
    num_tasks, k = 2, 4
    records = _run_both(num_tasks, k, OUTER_STEPS, "similar")  # cached from the test above
    for _, _, acc_update, acc_state, _, intermediate in records:
        assert len(intermediate) == k - 1
        for j, (before, update, after) in enumerate(intermediate):
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(update))
            assert jax.tree.structure(update) == jax.tree.structure(acc_update)
            _assert_trees_equal(after.inner_state, before.inner_state)
            assert int(after.mini_step) == j + 1 and not bool(samgs_optax.has_updated(after))
            assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(after.acc_grads))
        assert int(acc_state.mini_step) == 0 and bool(samgs_optax.has_updated(acc_state))
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(acc_state.acc_grads))
        assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(acc_update))


def test_eager_accumulates_the_sum_then_steps_on_the_mean():
    num_tasks, k = 2, 2
    params = _params(num_tasks)
    tx = samgs_optax.multi_steps(samgs_optax.samgs(num_tasks), k, num_tasks)
    state = tx.init(params)
    assert {a.shape[0] for a in jax.tree.leaves(state.acc_grads)} == {num_tasks}
    r = np.random.default_rng(2)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(r.normal(size=(num_tasks, *p.shape)), p.dtype), params)
        for _ in range(k)
    ]
    _, state1 = tx.update(grads[0], state, params)  # eager, no jit
    _assert_trees_equal(state1.acc_grads, grads[0])
    out, state2 = tx.update(grads[1], state1, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    want_out, want_state = jax.jit(samgs_optax.samgs(num_tasks).update)(mean, state.inner_state)
    assert relative_error(flatten(out), flatten(want_out)) < 1e-6
    assert _max_relative_error(state2.inner_state, want_state) < 1e-6
    assert int(state2.gradient_step) == 1 and int(state2.mini_step) == 0


def test_use_grad_mean_false_sums_the_micro_batches():
    num_tasks, k = 2, 2
    task_losses = _task_losses_fn(WEIGHTS["similar"][:num_tasks])
    params = _params(num_tasks)
    batch = _data(num_tasks, k * MICRO)
    tx = samgs_optax.samgs(num_tasks)
    acc_tx = samgs_optax.multi_steps(tx, k, num_tasks, use_grad_mean=False)
    _, state, _ = _train_step(tx, task_losses)(params, tx.init(params), batch)
    acc_state = acc_tx.init(params)
    acc_step = _train_step(acc_tx, task_losses)
    for micro in _micro_batches(batch, k):
        _, acc_state, _ = acc_step(params, acc_state, micro)
    np.testing.assert_allclose(acc_state.inner_state.norms, k * state.norms, rtol=1e-5)


def _two_then_three(gradient_step):
    return jnp.where(gradient_step < 2, 2, 3)  # 2 micro-batches per step, then 3


def test_schedule_as_a_function_of_the_gradient_step():
    records = _run_both(2, _two_then_three, OUTER_STEPS, "dissimilar", heads=True)
    assert [r[4] for r in records] == [2, 2, 3, 3]
    for update, state, acc_update, acc_state, _, _ in records:
        np.testing.assert_allclose(acc_state.inner_state[0].norms, state[0].norms, rtol=1e-5)
        assert bool(acc_state.inner_state[0].equalised) == bool(state[0].equalised)
        assert relative_error(flatten(acc_update), flatten(update)) < 1e-5
    assert int(records[-1][3].gradient_step) == 4


def test_accumulator_dtype_defaults_to_at_least_float32():
    num_tasks = 2
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(num_tasks))
    tx = samgs_optax.multi_steps(samgs_optax.samgs(num_tasks), 2, num_tasks)
    state = tx.init(params)
    assert {a.dtype for a in jax.tree.leaves(state.acc_grads)} == {jnp.dtype(jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.ones((num_tasks, *p.shape), p.dtype), params)
    update = jax.jit(tx.update)
    for _ in range(2):
        out, state = update(grads, state, params)
    assert {o.dtype for o in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    narrow = samgs_optax.multi_steps(
        samgs_optax.samgs(num_tasks), 2, num_tasks, accumulator_dtype=jnp.bfloat16
    )
    assert {a.dtype for a in jax.tree.leaves(narrow.init(params).acc_grads)} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_runs_inside_lax_scan():
    """The state keeps its shapes and dtypes from step to step (a scan carry)."""
    num_tasks, k = 2, 3
    params = _params(num_tasks)
    tx = samgs_optax.multi_steps(samgs_optax.samgs(num_tasks), k, num_tasks)
    r = np.random.default_rng(4)
    grads = jax.tree.map(
        lambda p: jnp.asarray(r.normal(size=(2 * k, num_tasks, *p.shape)), p.dtype), params
    )

    def body(state, g):
        out, state = tx.update(g, state, params)
        return state, out

    state, outs = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(tx.init(params), grads)
    emitted = [bool(np.any(np.asarray(outs["trunk"]["w"][i]) != 0)) for i in range(2 * k)]
    assert emitted == [False, False, True, False, False, True]
    assert int(state.gradient_step) == 2


def test_state_checkpoint_round_trip_continues_bit_identically(tmp_path):
    num_tasks, k = 3, 4
    params = _params(num_tasks)
    tx = samgs_optax.multi_steps(_recipe(num_tasks, mask=HEAD_MASK), k, num_tasks)
    update = jax.jit(tx.update)
    r = np.random.default_rng(5)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(r.normal(size=(num_tasks, *p.shape)), p.dtype), params)
        for _ in range(3 * k)
    ]
    straight, outs = tx.init(params), []
    for g in grads:
        out, straight = update(g, straight, params)
        outs.append(out)
    cut = k + 3  # in the middle of the second accumulation
    state = tx.init(params)
    for g in grads[:cut]:
        _, state = update(g, state, params)
    path = tmp_path / "state.msgpack"
    path.write_bytes(flax.serialization.to_bytes(state))
    restored = flax.serialization.from_bytes(tx.init(params), path.read_bytes())
    leaves, treedef = jax.tree.flatten(restored)  # and through plain NumPy leaves
    restored = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])
    assert int(restored.mini_step) == 3
    for g, want in zip(grads[cut:], outs[cut:], strict=True):
        out, restored = update(g, restored, params)
        _assert_trees_equal(out, want)
    _assert_trees_equal(restored, straight)


def test_apply_if_finite_around_skips_a_bad_micro_batch_as_if_it_never_came():
    num_tasks, k = 2, 2
    params = _params(num_tasks)
    acc = samgs_optax.multi_steps(samgs_optax.samgs(num_tasks), k, num_tasks)
    tx = samgs_optax.apply_if_finite(acc, max_consecutive_errors=3)
    r = np.random.default_rng(6)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(r.normal(size=(num_tasks, *p.shape)), p.dtype), params)
        for _ in range(2 * k)
    ]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
    update = jax.jit(tx.update)

    def run(seq):
        state, outs = tx.init(params), []
        for g in seq:
            out, state = update(g, state, params)
            outs.append(out)
        return outs, state

    clean, clean_state = run(grads)
    with_bad, bad_state = run(grads[:1] + [bad] + grads[1:])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(with_bad[1]))
    for a, b in zip(clean, with_bad[:1] + with_bad[2:], strict=True):
        _assert_trees_equal(a, b)
    _assert_trees_equal(clean_state.inner_state, bad_state.inner_state)
    assert int(bad_state.total_notfinite) == 1


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_params_shaped_gradients_are_rejected_naming_the_leaf(jit):
    num_tasks = 3
    params = _params(num_tasks)
    tx = samgs_optax.multi_steps(_recipe(num_tasks), 2, num_tasks)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(
        ValueError,
        match=r"updates leaf \['heads'\]\['w'\] has shape \(6, 3\); expected a leading task "
        r"axis of length num_tasks=3",
    ):
        update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


def test_wrong_task_count_and_wrong_tree_are_rejected():
    params = _params(3)
    tx = samgs_optax.multi_steps(samgs_optax.samgs(2), 2, 2)
    grads = jax.tree.map(lambda p: jnp.ones((3, *p.shape)), params)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\).*num_tasks=2"):
        tx.update(grads, tx.init(params))
    with pytest.raises(ValueError, match="does not match the tree the optimizer state"):
        tx.update({"trunk": grads["trunk"]}, tx.init(params))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(every_k_schedule=0, num_tasks=2), ValueError, "every_k_schedule must be >= 1"),
        (dict(every_k_schedule=2.0, num_tasks=2), TypeError, "every_k_schedule must be a Python"),
        (dict(every_k_schedule=2, num_tasks=1), ValueError, "num_tasks must be >= 2"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        samgs_optax.multi_steps(samgs_optax.samgs(2), **kwargs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_optax_multisteps_cannot_wrap_samgs(jit):
    """Why multi_steps exists: optax.MultiSteps calls the inner transform with params-shaped
    zeros (optax 0.2.8: the skip branch of its lax.cond, traced even when never taken)."""
    num_tasks = 2
    params = _params(num_tasks)
    tx = optax.MultiSteps(_recipe(num_tasks), every_k_schedule=2)
    grads = jax.tree.map(lambda p: jnp.ones((num_tasks, *p.shape)), params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(
        ValueError,
        match=r"updates leaf \['heads'\]\['w'\] has shape \(6, 2\); expected a leading task "
        r"axis of length num_tasks=2",
    ):
        update(grads, tx.init(params), params)
