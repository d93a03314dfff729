"""``dwa(K, window=W)``: the per-step sliding-window DWA of the SAM-GS (Nash-MTL, FAMO) authors.

The reference is a NumPy transcription of their ``DynamicWeightAverage.get_weighted_loss``
(ThomBors/samgs, methods/weight_methods.py): a FIFO of the last 2W per-step losses starting
as ones, the current losses pushed first, the weights recomputed once more than W calls have
run and kept otherwise, and their loss the mean over tasks of weights * losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samgs_optax import scalarizers as S


def authors_dwa(losses: np.ndarray, window: int, temp: float) -> tuple[np.ndarray, np.ndarray]:
    """Their loop, call by call: returns (weights per call, their loss per call)."""
    n_tasks = losses.shape[1]
    costs = np.ones((2 * window, n_tasks), np.float64)
    weights = np.ones(n_tasks, np.float64)
    running = 0
    all_weights, all_losses = [], []
    for cost in losses:
        costs[:-1] = costs[1:]
        costs[-1] = cost
        if running > window:
            ws = costs[window:].mean(0) / costs[:window].mean(0)
            weights = n_tasks * np.exp(ws / temp) / np.exp(ws / temp).sum()
        all_weights.append(weights.copy())
        all_losses.append(np.mean(weights * cost))
        running += 1
    return np.array(all_weights), np.array(all_losses)


def _run(losses: np.ndarray, window: int, temp: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    sc = S.dwa(losses.shape[1], temperature=temp, window=window)
    xs = jnp.asarray(losses, dtype)

    @jax.jit
    def run(xs):
        def body(state, v):
            total, (weights, state) = sc.scalarize(v, state)
            state = sc.end_epoch(state)  # a no-op in the windowed form
            return state, (weights, total)

        return jax.lax.scan(body, sc.init(xs[0]), xs)[1]

    weights, totals = run(xs)
    return np.asarray(weights, np.float64), np.asarray(totals, np.float64)


@pytest.mark.parametrize(("window", "temp", "k"), [(3, 2.0, 3), (25, 2.0, 2), (4, 0.5, 5)])
def test_windowed_dwa_matches_the_authors_loop(window, temp, k):
    rng = np.random.default_rng(window + k)
    steps = 2 * window + 12
    # decaying losses with noise and a task-dependent rate: the ratios differ from 1
    decay = np.exp(-np.outer(np.arange(steps), rng.uniform(0.01, 0.2, k)))
    losses = (rng.uniform(0.5, 3.0, k) * decay * rng.uniform(0.8, 1.2, (steps, k))).astype(
        np.float32
    )
    want_w, want_loss = authors_dwa(losses.astype(np.float64), window, temp)
    assert np.all(want_w[: window + 1] == 1) and not np.allclose(want_w[-1], 1)
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.float64, 1e-13)):
        with jax.enable_x64(dtype == jnp.float64):
            weights, totals = _run(losses, window, temp, dtype)
        np.testing.assert_allclose(weights, want_w, rtol=rtol)
        np.testing.assert_allclose(totals / k, want_loss, rtol=rtol)  # theirs: the mean


def test_windowed_dwa_state_and_gradient():
    sc = S.dwa(2, window=2)
    state = sc.init()
    assert isinstance(state, S.DWAWindowState) and state.costs.shape == (4, 2)
    losses = jnp.array([1.0, 4.0])
    for _ in range(4):
        _, (_, state) = sc.scalarize(losses * 0.5, state)
    grad = jax.grad(lambda v: sc.scalarize(v, state)[0])(losses)
    weights = sc.scalarize(losses, state)[1][0]
    np.testing.assert_allclose(grad, weights)  # the weights are d total / d losses
    assert int(state.num_steps) == 4
    with pytest.raises(ValueError, match="window"):
        S.dwa(2, window=0)
