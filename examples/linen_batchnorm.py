"""SAM-GS on a Flax Linen model with BatchNorm and Dropout: ``batch_stats`` through ``has_aux``.

The Linen twin of ``nnx_batchnorm.py`` (same data, same three tasks, same recipe).
Per-task gradients come from ``samgs_optax.value_and_jacrev(..., has_aux=True)``:
the loss runs ``apply`` with ``mutable=["batch_stats"]`` and a per-step dropout
key, and returns the new ``batch_stats`` as ``aux``. There is one forward pass
(``mode="auto"``/``"jacrev"``/``"sequential"``), so the statistics move once
per step; ``TrainState.apply_gradients`` takes the *stacked* gradients (the
chain starts with SAM-GS) and the new statistics together.

Run: python examples/linen_batchnorm.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nnx_batchnorm import NUM_TASKS, make_data  # noqa: E402

import samgs_optax  # noqa: E402


class MultiTaskNet(nn.Module):
    """Shared trunk (``trunk``, ``norm``) with BatchNorm and Dropout; one head per task."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.hidden, name="trunk")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(NUM_TASKS, name="heads")(x)


class TrainState(train_state.TrainState):
    batch_stats: Any
    dropout_key: jax.Array


def create_state(seed: int, dim: int, learning_rate: float) -> TrainState:
    net = MultiTaskNet()
    variables = net.init(jax.random.key(seed), jnp.zeros((1, dim)), train=False)
    mask = {"trunk": True, "norm": True, "heads": False}  # a prefix tree of the params
    tx = samgs_optax.recipe("samgs", NUM_TASKS, learning_rate, mask=mask, gamma=0.5)
    return TrainState.create(
        apply_fn=net.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        dropout_key=jax.random.key(seed + 1),
        tx=tx,
    )


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)  # a new mask every step

    def task_losses(params):
        pred, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        return jnp.mean((pred - y) ** 2, axis=0), updates["batch_stats"]

    (losses, batch_stats), grads = samgs_optax.value_and_jacrev(task_losses, has_aux=True)(
        state.params
    )
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), losses


def evaluate(state: TrainState, x, y) -> np.ndarray:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    pred = state.apply_fn(variables, x, train=False)  # running statistics, no dropout
    return np.asarray(jnp.mean((pred - y) ** 2, axis=0)) / np.var(y, axis=0)


def train(steps: int, *, seed: int = 0, lr: float = 3e-3) -> dict:
    """Trains one model; returns the relative test losses before and after, and the state."""
    x, y = make_data(seed, 512)
    x_test, y_test = make_data(seed + 1, 512)
    state = create_state(seed, x.shape[1], lr)
    before = evaluate(state, x_test, y_test)
    batches = np.random.default_rng(seed).integers(0, len(x), size=(steps, 64))
    for idx in batches:
        state, _ = train_step(state, x[idx], y[idx])
    return {
        "relative_test_mse_before": before.tolist(),
        "relative_test_mse_after": evaluate(state, x_test, y_test).tolist(),
        "samgs_steps": int(state.opt_state[0].count),
        "state": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    run = train(args.steps)
    print(
        "Linen + samgs_optax.value_and_jacrev test MSE / target variance per task: "
        f"{np.round(run['relative_test_mse_before'], 3)} -> "
        f"{np.round(run['relative_test_mse_after'], 3)}"
    )
    print(json.dumps({k: v for k, v in run.items() if k != "state"}))


if __name__ == "__main__":
    main()
