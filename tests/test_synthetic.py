"""Tests of the synthetic-problem example (examples/synthetic.py, examples/synthetic_problems.py).

References are independent of the code under test: a NumPy float64 transcription of the
authors' PyTorch formulas (experiments/toy1o/problem.py and toy2o/problem.py) with central
finite differences, the SPEC's optima, and the NumPy SAM-GS / Adam of ``numpy_reference``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import NumpyAdam, NumpySamgs

import samgs_optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import synthetic as syn  # noqa: E402
import synthetic_problems as sp  # noqa: E402

LOWER = 0.000005


# ---------------------------------------------------------------- NumPy transcription (float64)


def _np_common(x1, x2):
    c1 = np.maximum(np.tanh(x2 * 0.5), 0.0)
    c2 = np.maximum(np.tanh(-x2 * 0.5), 0.0)
    f1 = np.log(np.maximum(np.abs(0.5 * (-x1 - 7) - np.tanh(-x2)), LOWER)) + 6
    f2 = np.log(np.maximum(np.abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), LOWER)) + 6
    return c1, c2, f1, f2


def np_problem1(x):
    x1, x2 = x[..., 0], x[..., 1]
    c1, c2, f1, f2 = _np_common(x1, x2)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return np.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2], -1)


def np_problem2(x):
    x1, x2 = x[..., 0], x[..., 1]
    c1, c2, f1, f2 = _np_common(x1, x2)
    f1_sq = (
        (0.1 * ((x1 - 5.45) / 4) ** 6 + 0.1 * (x2 / 4) ** 6)
        - (((x1 - 5.5) / 4) ** 4 + (x2 / 4) ** 4)
        - (1.5 * ((x1 - 5.5) / 4) ** 2 + 1.5 * (x2 / 4) ** 2)
    ) + 1.5
    f2_sq = (
        (0.1 * ((x1 + 5.45) / 4) ** 6 + 0.1 * (x2 / 4) ** 6)
        - (((x1 + 5.5) / 4) ** 4 + (x2 / 4) ** 4)
        - (1.5 * ((x1 + 5.5) / 4) ** 2 + 1.5 * (x2 / 4) ** 2)
    ) + 1.5
    return np.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2], -1)


NP_PROBLEMS = {"problem1": np_problem1, "problem2": np_problem2}


def fd_jacobian(fn, x, h=1e-6):
    """Central differences, (K, 2) per point: d loss_k / d x_i."""
    cols = []
    for i in range(2):
        e = np.zeros(2)
        e[i] = h
        cols.append((fn(x + e) - fn(x - e)) / (2 * h))
    return np.stack(cols, -1)


def smooth_points(rng, n=60):
    """Random points away from the kinks (x2 = 0, the log crevasses, the log floor)."""
    pts = []
    while len(pts) < n:
        x1, x2 = rng.uniform(-11, 11), rng.uniform(-13, 11)
        a1 = abs(0.5 * (-x1 - 7) - np.tanh(-x2))
        a2 = abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2)
        if abs(x2) > 0.1 and min(a1, a2) > 0.05:
            pts.append((x1, x2))
    return np.array(pts)


# ---------------------------------------------------------------- problem definitions


@pytest.mark.parametrize("name", ["problem1", "problem2"])
def test_values_and_gradients_match_numpy_transcription(name, rng):
    pts = smooth_points(rng)
    want = NP_PROBLEMS[name](pts)
    with jax.enable_x64(True):
        vg = jax.jit(jax.vmap(samgs_optax.value_and_jacrev(sp.PROBLEMS[name])))
        got, jac = vg(jnp.asarray(pts))
        got, jac = np.asarray(got), np.asarray(jac)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for p, j in zip(pts, jac, strict=True):
        fd = fd_jacobian(NP_PROBLEMS[name], p)
        np.testing.assert_allclose(j, fd, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(fd).max()))
    # float32, as the experiments run
    got32 = np.asarray(jax.jit(jax.vmap(sp.PROBLEMS[name]))(jnp.asarray(pts, jnp.float32)))
    np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-4)


def test_problem2_follows_code_not_paper_sign():
    """Appendix A.2 prints '- tanh(-x2)' in f2; the code (and this module) has '+ tanh(-x2)'."""
    x = np.array([1.0, 2.0])
    c1 = np.tanh(1.0)
    paper_f2 = np.log(abs(0.5 * (-1 + 3) - np.tanh(-2.0) + 2)) + 6
    code = np.asarray(sp.problem2(jnp.asarray(x)))
    assert abs(code[1] - c1 * paper_f2) > 0.1
    np.testing.assert_allclose(code, np_problem2(x), rtol=1e-6)


def test_optima_match_spec_and_are_minima():
    o1 = sp.find_optima("problem1")
    np.testing.assert_allclose(o1[0, 0], 0.0, atol=1e-6)
    assert -8.36 <= o1[0, 1] <= -8.33  # SPEC: x = (0, -8.33..-8.36)
    np.testing.assert_allclose(np_problem1(o1[0]), [-15.0916, -15.0916], atol=5e-5)
    o2 = sp.find_optima("problem2")
    np.testing.assert_allclose(np.abs(o2), [[5.4546, 10.8426]] * 2, atol=5e-5)
    assert np.sign(o2[:, 0]).tolist() == [1.0, -1.0]
    for name, opts in (("problem1", o1), ("problem2", o2)):
        total = lambda x, f=NP_PROBLEMS[name]: f(x).sum(-1)  # noqa: E731
        for o in opts:
            assert np.abs(fd_jacobian(total, o)).max() < 1e-6
            g = np.linspace(-0.5, 0.5, 101)
            ring = o + np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
            assert total(ring).min() >= total(o) - 1e-9


# ---------------------------------------------------------------- the vectorised runner

STEPS = 300
STARTS = np.array([[-8.0, 5.0], [10.0, -2.5]], np.float32)


@pytest.fixture(scope="module")
def vectorised():
    """(method -> xs (S, STEPS + 1, 2)) from the vmap/scan runner, problem 1."""
    out = {}
    for method in ("ls", "samgs"):
        tx = syn.make_optimizer(method)
        xs, _ = syn.make_runner(sp.problem1, tx, STEPS)(jnp.asarray(STARTS))
        out[method] = np.asarray(xs)
    return out


@pytest.mark.parametrize("method", ["ls", "samgs"])
def test_runner_equals_python_loop(vectorised, method):
    """vmap over starts + lax.scan over steps == a Python loop of the same chain."""
    tx = syn.make_optimizer(method)
    vg = samgs_optax.value_and_jacrev(sp.problem1)

    @jax.jit
    def step(x, state):
        _, grads = vg(x)
        updates, state = tx.update(grads, state, x)
        return optax.apply_updates(x, updates), state

    for s, start in enumerate(STARTS):
        x = jnp.asarray(start)
        state = tx.init(x)
        traj = [np.asarray(x)]
        for _ in range(STEPS):
            x, state = step(x, state)
            traj.append(np.asarray(x))
        np.testing.assert_allclose(vectorised[method][s], np.array(traj), rtol=0, atol=1e-5)


def _numpy_run(method, start, steps):
    """The authors' recipe in float64 NumPy with finite-difference task gradients."""
    x = np.asarray(start, np.float64)
    adam = NumpyAdam(2, 1e-3)
    samgs = NumpySamgs(2, 2)
    traj = [x.copy()]
    for _ in range(steps):
        grads = fd_jacobian(np_problem1, x)  # (K, 2)
        if method == "ls":
            u = grads.sum(0)  # plain Adam on the summed loss
        else:
            u = 2.0 * samgs.step(grads)  # scale(K)
            u = u * min(1.0, 1.0 / np.linalg.norm(u))  # clip_by_global_norm(1.0)
        x = x + adam.step(u)
        traj.append(x.copy())
    return np.array(traj)


@pytest.mark.parametrize("method", ["ls", "samgs"])
def test_runner_matches_numpy_recipe(vectorised, method):
    """float32 JAX trajectories stay within 1e-4 of a float64 NumPy run of the recipe."""
    for s, start in enumerate(STARTS):
        want = _numpy_run(method, start, STEPS)
        got = vectorised[method][s]
        assert np.abs(got - want).max() < 1e-4
        assert np.linalg.norm(got[-1] - got[0]) > 0.1  # it did move


def test_score_distance_reached_first_step():
    """Scoring of a hand-made trajectory: nearest optimum, tolerance, first step inside."""
    opt = sp.find_optima("problem2")[0]
    start = sp.STARTS["problem2"]
    xs = np.repeat(start[:, None, :], 5, axis=1).astype(np.float64)
    xs[0, 3:] = opt + [0.6, 0.0]  # enters the 1.0 ball at step 3
    xs[1, 2] = opt  # passes through, then leaves
    run = syn.Run("problem2", "x", 4, "float32", xs, np.zeros_like(xs), 0.0)
    rows = run.rows = syn.score(run)
    assert rows[0]["reached"] and rows[0]["first_step"] == 3
    np.testing.assert_allclose(rows[0]["distance"], 0.6, atol=1e-9)
    assert not rows[1]["reached"] and rows[1]["first_step"] == 2
    assert not rows[2]["reached"] and rows[2]["first_step"] is None
    assert syn.reached(run) == "1/6"
