"""GradNorm (issue 12) against an independent NumPy transcription of LibMTL's GradNorm.

The reference below is written from the equations (LibMTL's ``GradNorm.backward``
and the paper), in float64, with the softmax's gradient in closed form and Adam
and SGD written out; the transform runs the same sequences of steps (a
``lax.scan`` carrying the state, vmapped over seeds: one compilation per K and
dtype for all option sets) on a pytree of two shared leaves and a masked head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samgs_optax
from samgs_optax.aggregators.gradnorm import gradnorm

STEPS = 6
SEEDS = 3
SHAPES = {"w": (4, 3), "b": (5,), "head": (2,)}  # "head" is task-specific (masked)
MASK = {"w": True, "b": True, "head": False}
SGD_LR = 0.05
FIXED_L0 = (2.0, 0.5, 1.0, 3.0, 1.5)  # the first K of them, for initial_losses=

# option sets: (name, kwargs for gradnorm, reference optimizer, warmup, fixed L0)
CONFIGS = {
    "adam": ({}, ("adam", 0.025), 0, False),
    "sgd": ({"weight_optimizer": optax.sgd(SGD_LR)}, ("sgd", SGD_LR), 0, False),
    "adam_alpha0.5_warmup2": ({"alpha": 0.5, "warmup_steps": 2}, ("adam", 0.025), 2, False),
    "sgd_fixed_l0": (
        {"weight_optimizer": optax.sgd(SGD_LR), "alpha": 3.0},
        ("sgd", SGD_LR),
        0,
        True,
    ),
}
# The two optimizers at every K; the options (warm-up, fixed L0, other alpha) at K = 3 only
# (each option set adds ~0.5 s to a case's compilation).
CONFIGS_AT = {2: ("adam", "sgd"), 3: tuple(CONFIGS), 5: ("adam", "sgd")}
ALPHA = {"adam": 1.5, "sgd": 1.5, "adam_alpha0.5_warmup2": 0.5, "sgd_fixed_l0": 3.0}

# Worst relative errors against the float64 NumPy reference over 6 steps x 3 seeds x
# K = 2, 3, 5 (the options at K = 3), measured (`python tests/test_gradnorm.py`):
#                          float32            float64
#                          update  weights    update  weights
#   adam                   1.1e-06 1.1e-06    2.8e-16 4.1e-16
#   sgd                    1.4e-07 1.5e-07    4.9e-16 3.8e-16
#   adam_alpha0.5_warmup2  3.4e-07 5.4e-07    2.4e-16 2.2e-16
#   sgd_fixed_l0           1.2e-07 1.2e-07    4.0e-16 3.1e-16
# (update: ||u - u_ref|| / ||u_ref|| per step over the whole tree; weights:
# max_i |w_i - w_ref_i| / max_i w_ref_i.)
RTOL = {jnp.float32: 5e-6, jnp.float64: 1e-13}


# ---------------------------------------------------------------------------------------
# The NumPy reference.


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max())
    return e / e.sum()


def reference(grads, losses, *, alpha, optimizer, warmup=0, fixed_l0=None):
    """LibMTL's GradNorm over a sequence: (updates as flat (T, D) arrays, weights (T, K)).

    ``grads``: dict of (T, K, ...) float64 arrays; ``losses``: (T, K).
    """
    steps, k = losses.shape
    kind, lr = optimizer
    s = np.zeros(k)
    m, v, t = np.zeros(k), np.zeros(k), 0
    l0 = np.zeros(k) if fixed_l0 is None else np.asarray(fixed_l0, np.float64)
    outs, weights = [], []
    for n in range(steps):
        shared = np.concatenate([grads[key][n].reshape(k, -1) for key in ("w", "b")], axis=1)
        head = grads["head"][n].reshape(k, -1)
        if fixed_l0 is None and n < max(warmup, 1):
            l0 = losses[: n + 1].mean(axis=0)  # mean of the first losses
        if n < warmup:
            w = np.ones(k)
        else:
            z = _softmax(s)
            w = k * z
        outs.append(np.concatenate([w @ shared, head.sum(0)]))
        weights.append(w)
        if n < warmup:
            continue
        norms = np.sqrt((shared**2).sum(1))
        big_g = w * norms
        ratio = losses[n] / l0
        r = ratio / ratio.mean()
        target = big_g.mean() * r**alpha
        a = np.sign(big_g - target) * norms  # d L_grad / d w
        grad = k * z * (a - z @ a)  # through w = K softmax(s)
        if kind == "sgd":
            s = s - lr * grad
        else:  # Adam, PyTorch's and optax's defaults
            t += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            s = s - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return np.stack(outs), np.stack(weights)


def _inputs(k: int, seed: int):
    rng = np.random.default_rng(1000 * k + seed)
    scales = rng.uniform(0.3, 3.0, size=k)  # different gradient norms per task
    grads = {
        key: rng.normal(size=(STEPS, k, *shape)) * scales.reshape(1, k, *([1] * len(shape)))
        for key, shape in SHAPES.items()
    }
    rates = rng.uniform(0.02, 0.3, size=k)  # tasks train at different speeds
    start = rng.uniform(0.5, 3.0, size=k)
    noise = rng.uniform(0.95, 1.05, size=(STEPS, k))
    losses = start * np.exp(-rates * np.arange(STEPS)[:, None]) * noise
    return grads, losses


def _flat(tree, k=None) -> np.ndarray:
    parts = [np.asarray(tree[key], np.float64) for key in ("w", "b", "head")]
    lead = parts[-1].shape[:-1]
    return np.concatenate([p.reshape(*lead, -1) for p in parts], axis=-1)


def _run(k: int, dtype) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every option set over SEEDS sequences of one K, in one compiled function."""
    txs = {}
    for name in CONFIGS_AT[k]:
        options = CONFIGS[name][0]
        extra = {"initial_losses": FIXED_L0[:k]} if CONFIGS[name][3] else {}
        txs[name] = gradnorm(k, mask=MASK, **options, **extra)
    params = {key: jnp.zeros(shape, dtype) for key, shape in SHAPES.items()}
    cases = [_inputs(k, seed) for seed in range(SEEDS)]
    grads = {key: jnp.asarray(np.stack([c[0][key] for c in cases]), dtype) for key in SHAPES}
    losses = jnp.asarray(np.stack([c[1] for c in cases]), dtype)

    def one(g, loss):
        def step(states, x):
            gx, lx = x
            outs = {}
            new = {}
            for name, tx in txs.items():
                u, new[name] = tx.update(gx, states[name], params, task_losses=lx)
                outs[name] = (u, new[name].weights)
            return new, outs

        init = {name: tx.init(params) for name, tx in txs.items()}
        _, outs = jax.lax.scan(step, init, (g, loss))
        return outs

    outs = jax.jit(jax.vmap(one))(grads, losses)
    result = {}
    for name, (u, w) in outs.items():
        result[name] = (_flat(u), np.asarray(w, np.float64))
    result["inputs"] = cases
    return result


def _errors(k: int, dtype) -> dict[str, tuple[float, float]]:
    with jax.enable_x64(dtype == jnp.float64):
        got = _run(k, dtype)
    errors = {}
    for name in CONFIGS_AT[k]:
        _, optimizer, warmup, fixed = CONFIGS[name]
        worst_u = worst_w = 0.0
        for seed, (grads, losses) in enumerate(got["inputs"]):
            want_u, want_w = reference(
                grads,
                losses,
                alpha=ALPHA[name],
                optimizer=optimizer,
                warmup=warmup,
                fixed_l0=FIXED_L0[:k] if fixed else None,
            )
            u, w = got[name][0][seed], got[name][1][seed]
            err_u = np.linalg.norm(u - want_u, axis=-1) / np.linalg.norm(want_u, axis=-1)
            err_w = np.abs(w - want_w).max(-1) / want_w.max(-1)
            worst_u, worst_w = max(worst_u, err_u.max()), max(worst_w, err_w.max())
            # The sequences exercise the method: the weights left 1 (more with SGD).
            moved = np.abs(want_w - 1).max()
            assert moved > (0.02 if optimizer[0] == "adam" else 0.05), (name, seed, want_w)
        errors[name] = (worst_u, worst_w)
    return errors


# ---------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_numpy_reference(k, dtype):
    errors = _errors(k, dtype)
    for name, (err_u, err_w) in errors.items():
        assert err_u < RTOL[dtype] and err_w < RTOL[dtype], (name, err_u, err_w)


def test_reference_follows_libmtl_on_a_hand_checkable_step():
    """The reference's one SGD step on K = 2, worked out: w = 1, norms 3 and 4, r = 1."""
    w = np.zeros((1, 2, 4, 3))
    w[0, 0, 0, 0], w[0, 1, 0, 1] = 3.0, 4.0
    grads = {"w": w, "b": np.zeros((1, 2, 5)), "head": np.ones((1, 2, 2))}
    losses = np.array([[1.0, 2.0]])
    _, w = reference(grads, losses, alpha=1.5, optimizer=("sgd", 0.1))
    np.testing.assert_allclose(w[0], [1.0, 1.0])
    # G = (3, 4), target = mean(G) = 3.5, dL/dw = (-3, 4), dL/ds = 2 * 0.5 * (a - mean(a)).
    tx = gradnorm(2, weight_optimizer=optax.sgd(0.1), mask=MASK)
    params = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
    state = tx.init(params)
    g = jax.tree.map(lambda x: jnp.asarray(x[0], jnp.float32), grads)
    _, state = jax.jit(tx.update)(g, state, params, task_losses=jnp.asarray(losses[0]))
    np.testing.assert_allclose(state.logits, [0.35, -0.35], rtol=1e-6)


def _degenerate_inputs(k=3):
    rng = np.random.default_rng(7)
    base = {key: rng.normal(size=(k, *shape)) for key, shape in SHAPES.items()}
    losses = np.array([1.0, 2.0, 0.5])

    def scaled(c, task=None):
        out = {}
        for key, x in base.items():
            y = x.copy()
            if task is None:
                y = y * c
            else:
                y[task] = y[task] * c
            out[key] = y
        return out

    nan_grad = scaled(1.0)
    nan_grad["w"][1, 0, 0] = np.nan
    return {
        "zero_gradient_task1": (scaled(0.0, task=1), [losses] * 3),
        "all_zero_gradients": (scaled(0.0), [losses] * 3),
        "zero_initial_loss": (scaled(1.0), [np.array([0.0, 2.0, 0.5]), losses, losses]),
        "all_zero_losses": (scaled(1.0), [np.zeros(3)] * 3),
        "negative_losses": (scaled(1.0), [losses, -losses, losses]),
        "huge_gradients": (scaled(1e30), [losses, 0.5 * losses, losses]),
        "tiny_gradients": (scaled(1e-30), [losses, 0.5 * losses, losses]),
        "huge_and_tiny_task": (scaled(1e25, task=0), [losses, 0.5 * losses, losses]),
        "nan_loss": (scaled(1.0), [losses, np.array([np.nan, 1.0, 1.0]), losses]),
        "inf_loss": (scaled(1.0), [np.array([np.inf, 1.0, 1.0]), losses, losses]),
        "nan_gradient": (nan_grad, [losses] * 3),
    }


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_degenerate_inputs_keep_weights_finite(optimizer):
    k = 3
    tx = gradnorm(
        k, mask=MASK, **({} if optimizer == "adam" else {"weight_optimizer": optax.sgd(1.0)})
    )
    params = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
    update = jax.jit(tx.update)
    for name, (grads, losses_seq) in _degenerate_inputs(k).items():
        state = tx.init(params)
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
        for losses in losses_seq:
            out, state = update(g, state, params, task_losses=jnp.asarray(losses, jnp.float32))
            w = np.asarray(state.weights)
            # >= 0: an SGD step of ~1e30 (huge_gradients) saturates the softmax to (K, 0, 0).
            assert np.all(np.isfinite(w)) and np.all(w >= 0), (name, w)
            np.testing.assert_allclose(w.sum(), k, rtol=1e-5, err_msg=name)
            assert np.all(np.isfinite(np.asarray(state.logits))), name
            assert all(
                np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.opt_state)
            ), name
            if name != "nan_gradient":
                assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out)), name
        if name == "nan_gradient":  # the step is skipped: weights stay at 1
            np.testing.assert_array_equal(np.asarray(state.logits), np.zeros(k))


def test_zero_gradient_task_and_large_scales_still_balance():
    """With one task's gradient at 0 the others still get weight steps; with gradients
    1e30 (float32) the Adam step, whose second moment overflows, is skipped."""
    k = 3
    params = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
    cases = _degenerate_inputs(k)
    adam = gradnorm(k, mask=MASK)
    update = jax.jit(adam.update)
    g, losses = cases["zero_gradient_task1"]
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    _, state = update(g, adam.init(params), params, task_losses=losses[0])
    assert np.abs(np.asarray(state.logits)).max() > 0.01
    g, losses = cases["huge_gradients"]
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    _, state = update(g, adam.init(params), params, task_losses=losses[0])
    np.testing.assert_array_equal(state.logits, np.zeros(k))  # Adam's (1e61 = inf): skipped
    assert int(state.opt_state[0].count) == 0
    sgd = gradnorm(k, mask=MASK, weight_optimizer=optax.sgd(1e-30))
    _, state = jax.jit(sgd.update)(g, sgd.init(params), params, task_losses=losses[0])
    assert np.abs(np.asarray(state.logits)).max() > 1e-3  # SGD's step is finite: taken


def test_missing_or_misshapen_task_losses_raise():
    k = 3
    tx = gradnorm(k)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    grads = {"w": jnp.ones((k, 4))}
    with pytest.raises(TypeError, match=r"gradnorm needs the per-task losses: tx.update\("):
        tx.update(grads, state, params)
    with pytest.raises(
        ValueError, match=r"gradnorm: task_losses has shape \(2,\); expected \(3,\)"
    ):
        tx.update(grads, state, params, task_losses=jnp.ones(2))
    with pytest.raises(ValueError, match=r"shape \(3, 1\); expected \(3,\)"):
        tx.update(grads, state, params, task_losses=jnp.ones((3, 1)))
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    with pytest.raises(TypeError, match="gradnorm needs the per-task losses"):
        chained.update(grads, chained.init(params), params)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="alpha"):
        gradnorm(3, alpha=-1.0)
    with pytest.raises(ValueError, match="lr"):
        gradnorm(3, lr=-0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        gradnorm(3, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"initial_losses must have shape \(3,\)"):
        gradnorm(3, initial_losses=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        gradnorm(3, initial_losses=[1.0, 0.0, 2.0])
    with pytest.raises(TypeError, match="weight_optimizer"):
        gradnorm(3, weight_optimizer=0.1)


def test_chain_forwards_losses_and_inject_hyperparams():
    """In optax.chain the losses reach GradNorm; alpha and lr are injectable."""
    k = 2
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.asarray([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])}
    losses = jnp.asarray([1.0, 1.0])
    tx = optax.chain(gradnorm(k), optax.scale(-1.0))
    out, state = jax.jit(tx.update)(grads, tx.init(params), params, task_losses=losses)
    np.testing.assert_allclose(out["w"], [-1.0, -3.0, 0.0])  # weights 1 on the first step
    np.testing.assert_allclose(state[0].logits, [0.025, -0.025], rtol=1e-5)  # Adam's first step
    injected = samgs_optax.inject_hyperparams(gradnorm)(num_tasks=k, alpha=1.0, lr=0.1)
    state = injected.init(params)
    assert float(state.hyperparams["lr"]) == pytest.approx(0.1)
    _, state = jax.jit(injected.update)(grads, state, params, task_losses=losses)
    np.testing.assert_allclose(state.inner_state.logits, [0.1, -0.1], rtol=1e-5)


def test_state_checkpoint_round_trip_is_bit_identical():
    k = 3
    params = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
    grads, losses = _inputs(k, 0)
    seq = [
        (jax.tree.map(lambda x, n=n: jnp.asarray(x[n], jnp.float32), grads), losses[n])
        for n in range(STEPS)
    ]
    tx = gradnorm(k, mask=MASK)
    update = jax.jit(tx.update)

    def run(state, items):
        outs = []
        for g, loss in items:
            u, state = update(g, state, params, task_losses=jnp.asarray(loss, jnp.float32))
            outs.append(np.asarray(u["w"]))
        return outs, state

    straight, _ = run(tx.init(params), seq)
    first, state = run(tx.init(params), seq[:2])
    saved = jax.tree.map(np.asarray, state)
    restored = jax.tree.map(jnp.asarray, saved)
    rest, _ = run(restored, seq[2:])
    for a, b in zip(straight, first + rest, strict=True):
        np.testing.assert_array_equal(a, b)


if __name__ == "__main__":  # prints the worst errors for the table above
    for dtype in (jnp.float32, jnp.float64):
        worst = {}
        for k in (2, 3, 5):
            for name, errs in _errors(k, dtype).items():
                old = worst.get(name, (0.0, 0.0))
                worst[name] = (max(old[0], errs[0]), max(old[1], errs[1]))
        for name, (eu, ew) in worst.items():
            print(f"{np.dtype(dtype).name} {name:24s} update {eu:.1e}  weights {ew:.1e}")
