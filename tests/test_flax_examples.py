"""examples/nnx_batchnorm.py and examples/linen_batchnorm.py: mutable state, trained for real."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import linen_batchnorm  # noqa: E402
import nnx_batchnorm  # noqa: E402

STEPS = 150


@pytest.fixture(scope="module")
def nnx_runs():
    return nnx_batchnorm.train(STEPS), nnx_batchnorm.train(STEPS, functional=True)


def test_nnx_helper_and_split_merge_steps_are_bit_identical(nnx_runs):
    helper, functional = nnx_runs
    assert nnx_batchnorm.identical(helper["model"], functional["model"])
    # The check can fail: one more step of the functional version breaks it.
    x, y = nnx_batchnorm.make_data(0, 64)
    optimizer = nnx_batchnorm.make_optimizer(functional["model"], 3e-3)
    nnx_batchnorm.functional_step(functional["model"], optimizer, x, y)
    assert not nnx_batchnorm.identical(helper["model"], functional["model"])


def test_nnx_state_moves_once_per_step_and_every_task_learns(nnx_runs):
    helper, _ = nnx_runs
    assert helper["dropout_draws"] == STEPS == helper["samgs_steps"]
    assert np.any(np.asarray(helper["model"].norm.mean[...]) != 0)  # running stats moved
    before, after = helper["relative_test_mse_before"], helper["relative_test_mse_after"]
    assert all(a < 0.5 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_linen_batch_stats_are_one_forward_pass_per_step():
    x, y = nnx_batchnorm.make_data(0, 64)
    state = linen_batchnorm.create_state(0, x.shape[1], 3e-3)
    new_state, _ = linen_batchnorm.train_step(state, x, y)
    # Reference: one apply with the same parameters and dropout key.
    _, updates = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(state.dropout_key, 0)},
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        new_state.batch_stats,
        updates["batch_stats"],
    )
    assert int(new_state.opt_state[0].count) == 1


def test_linen_example_trains_every_task():
    run = linen_batchnorm.train(STEPS)
    before, after = run["relative_test_mse_before"], run["relative_test_mse_after"]
    assert run["samgs_steps"] == STEPS
    assert all(a < 0.5 * b for a, b in zip(after, before, strict=True)), (before, after)
