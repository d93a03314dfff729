"""SAM-GS against the independent NumPy transcription of SPEC, step by step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    flatten,
    flatten_stacked,
    make_params,
    relative_error,
    task_gradient_sequence,
    unflatten_stacked,
)
from numpy_reference import NumpySamgs, similarity_pairs

import samgs_optax

STEPS = 40
CASES = [
    # (K, similarity, dtype, tolerance)
    (2, "mean", np.float64, 1e-9),
    (3, "min", np.float64, 1e-9),
    (7, "mean", np.float64, 1e-9),
    (40, "mean", np.float64, 1e-9),
    (40, "min", np.float64, 1e-9),
    (2, "mean", np.float32, 5e-4),
    (5, "min", np.float32, 5e-4),
    (40, "mean", np.float32, 5e-4),
]


def _criterion(grads, similarity):
    pairs = similarity_pairs(np.linalg.norm(grads, axis=1))
    return pairs.min() if similarity == "min" else pairs.mean()


def _sequence(rng, k, dim, similarity, gamma, margin):
    """A gradient sequence whose criterion stays a relative `margin` away from gamma."""
    seq = []
    while len(seq) < STEPS:
        (g,) = task_gradient_sequence(rng, k, dim, 1)
        if abs(_criterion(g, similarity) - gamma) > margin * gamma:
            seq.append(g)
    return seq


def _gamma_for(rng, k, dim, similarity):
    """A threshold that splits the criterion of this kind of sequence in half.

    The default 0.1 suits K = 2; with many tasks the mean (and even more the
    min) over K(K-1)/2 pairs sits elsewhere, so the tests pick the median.
    """
    pilot = task_gradient_sequence(rng, k, dim, 40)
    return float(f"{np.median([_criterion(g, similarity) for g in pilot]):.3g}")


def compare_with_reference(k, similarity, dtype):
    """Runs SAM-GS and the NumPy transcription side by side on one random sequence.

    Returns the largest relative error of each quantity over the run, whether
    the branch ever disagreed, and the reference's branch at each step.
    """
    rng = np.random.default_rng(k)
    params = make_params(dtype)
    dim = flatten(params).size
    gamma = _gamma_for(rng, k, dim, similarity)
    margin = 1e-6 if dtype == np.float64 else 1e-3
    seq = _sequence(rng, k, dim, similarity, gamma, margin)
    ref = NumpySamgs(k, dim, gamma=gamma, similarity=similarity)
    errors = {"update": 0.0, "m": 0.0, "h": 0.0, "psi": 0.0}
    branches, branch_mismatch = [], False
    with jax.enable_x64(dtype == np.float64):
        tx = samgs_optax.samgs(k, gamma=gamma, similarity=similarity)
        state = tx.init(jax.tree.map(jnp.asarray, params))
        update = jax.jit(tx.update)
        for grads in seq:
            want = ref.step(grads)
            out, state = update(unflatten_stacked(grads, params, dtype), state)
            assert jax.tree.leaves(out)[0].dtype == dtype
            branches.append(ref.last_equalised)
            branch_mismatch |= bool(state.equalised) != ref.last_equalised
            m = flatten_stacked(state.m, k)
            step_errors = {
                "update": relative_error(flatten(out), want),
                # per task, so that tasks with small gradients are checked too
                "m": max(relative_error(m[task], ref.m[task]) for task in range(k)),
                "h": abs(float(state.h) - ref.h) / ref.h,
                "psi": abs(float(state.similarity) - ref.last_psi),
            }
            errors = {key: max(errors[key], step_errors[key]) for key in errors}
    return errors, branch_mismatch, branches


@pytest.mark.parametrize("k,similarity,dtype,tol", CASES)
def test_matches_numpy_transcription(k, similarity, dtype, tol):
    errors, branch_mismatch, branches = compare_with_reference(k, similarity, dtype)
    assert not branch_mismatch
    for key, value in errors.items():
        assert value < tol, (key, value)
    # The sequence must exercise both branches and switch between them.
    assert any(branches) and not all(branches)
    assert sum(a != b for a, b in zip(branches[:-1], branches[1:], strict=True)) >= 4


def test_defaults_match_spec():
    """Algorithm 1's defaults: b1 0.9, b2 0.99, gamma 0.1, eps 1e-8."""
    rng = np.random.default_rng(1)
    params = make_params(np.float64)
    dim = flatten(params).size
    seq = _sequence(rng, 3, dim, "mean", 0.1, 1e-6)
    ref = NumpySamgs(3, dim, gamma=0.1, b1=0.9, b2=0.99, eps=1e-8)
    with jax.enable_x64(True):
        tx = samgs_optax.samgs(3)
        state = tx.init(jax.tree.map(jnp.asarray, params))
        update = jax.jit(tx.update)
        for grads in seq[:10]:
            out, state = update(unflatten_stacked(grads, params, np.float64), state)
            assert relative_error(flatten(out), ref.step(grads)) < 1e-9
