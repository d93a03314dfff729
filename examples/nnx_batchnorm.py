"""SAM-GS on a Flax NNX model with BatchNorm and Dropout: mutable state done right.

A shared trunk (Linear, BatchNorm, Dropout) feeds three task heads; task 2's
target is 30x larger than the others', a magnitude conflict. Two equivalent
training steps are shown:

* ``helper_step``: ``samgs_optax.nnx.value_and_jacrev(task_losses)(model)``
  takes modules as ``nnx.value_and_grad`` does, differentiates the ``nnx.Param``
  state only, and writes the other state back: the BatchNorm running statistics
  move and the dropout RNG counter advances once per step, not K times;
* ``functional_step``: the same by hand with the NNX split/merge pattern:
  ``nnx.split`` the model, rebuild it inside the loss with
  ``nnx.merge(..., copy=True)``, return the updated non-Param state as ``aux``
  (``has_aux=True``) and ``nnx.update`` the model with it.

Both run under ``nnx.jit`` with ``nnx.Optimizer`` and the authors' recipe
(``samgs_optax.recipe``: SAM-GS on the trunk, scale by K and clip on the trunk
only, Adam); the heads get their own task's gradient. Evaluation switches
BatchNorm to its running statistics and Dropout off with ``model.eval()``.

Run: python examples/nnx_batchnorm.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import samgs_optax

NUM_TASKS = 3
TARGET_SCALES = np.array([1.0, 1.0, 30.0], np.float32)  # task 2 dominates the summed gradient


class MultiTaskNet(nnx.Module):
    """Shared trunk with BatchNorm and Dropout; one linear head per task."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.trunk = nnx.Linear(dim, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.heads = nnx.Linear(hidden, NUM_TASKS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = self.dropout(nnx.relu(self.norm(self.trunk(x))))
        return self.heads(features)  # (batch, NUM_TASKS)


def make_data(seed: int, n: int, dim: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=(dim, NUM_TASKS)).astype(np.float32)
    return x, (np.tanh(x @ w / np.sqrt(dim)) * TARGET_SCALES).astype(np.float32)


def task_losses(model: MultiTaskNet, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of each task, shape (NUM_TASKS,)."""
    return jnp.mean((model(x) - y) ** 2, axis=0)


def make_optimizer(model: MultiTaskNet, learning_rate: float) -> nnx.Optimizer:
    trunk_only = nnx.Not(nnx.PathContains("heads"))  # an NNX filter as the mask
    tx = samgs_optax.recipe("samgs", NUM_TASKS, learning_rate, mask=trunk_only, gamma=0.5)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def helper_step(model: MultiTaskNet, optimizer: nnx.Optimizer, x, y) -> jax.Array:
    losses, grads = samgs_optax.nnx.value_and_jacrev(task_losses)(model, x, y)
    optimizer.update(model, grads)
    return losses


@nnx.jit
def functional_step(model: MultiTaskNet, optimizer: nnx.Optimizer, x, y) -> jax.Array:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses_of(params):
        # copy=True: fresh Variables, so the traced forward never writes into `model`.
        clone = nnx.merge(graphdef, params, rest, copy=True)
        losses = task_losses(clone, x, y)
        return losses, nnx.state(clone, nnx.Not(nnx.Param))  # new batch stats, RNG counts

    (losses, new_rest), grads = samgs_optax.value_and_jacrev(losses_of, has_aux=True)(params)
    nnx.update(model, new_rest)
    optimizer.update(model, grads)
    return losses


def evaluate(model: MultiTaskNet, x, y) -> np.ndarray:
    model.eval()  # BatchNorm uses its running statistics; Dropout is off
    losses = np.asarray(task_losses(model, x, y)) / np.var(y, axis=0)
    model.train()
    return losses


def train(steps: int, *, functional: bool = False, seed: int = 0, lr: float = 3e-3) -> dict:
    """Trains one model; returns the relative test losses before and after, and the state."""
    x, y = make_data(seed, 512)
    x_test, y_test = make_data(seed + 1, 512)
    model = MultiTaskNet(x.shape[1], 32, nnx.Rngs(params=seed, dropout=seed + 1))
    optimizer = make_optimizer(model, lr)
    step = functional_step if functional else helper_step
    before = evaluate(model, x_test, y_test)
    batches = np.random.default_rng(seed).integers(0, len(x), size=(steps, 64))
    for idx in batches:
        step(model, optimizer, x[idx], y[idx])
    return {
        "relative_test_mse_before": before.tolist(),
        "relative_test_mse_after": evaluate(model, x_test, y_test).tolist(),
        "dropout_draws": int(model.dropout.rngs.count.get_value()),
        "samgs_steps": int(optimizer.opt_state[0].count),
        "model": model,
    }


def identical(a: MultiTaskNet, b: MultiTaskNet) -> bool:
    """Whether two models hold bit-identical parameters, statistics and RNG counters."""
    state_a, state_b = (nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.RngKey))) for m in (a, b))
    same = jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), state_a, state_b)
    return all(jax.tree.leaves(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    helper = train(args.steps)
    functional = train(args.steps, functional=True)
    same = identical(helper["model"], functional["model"])
    for name, run in (("samgs_optax.nnx.value_and_jacrev", helper), ("split/merge", functional)):
        print(
            f"{name:34s} test MSE / target variance per task: "
            f"{np.round(run['relative_test_mse_before'], 3)} -> "
            f"{np.round(run['relative_test_mse_after'], 3)}"
        )
    print(
        f"dropout draws {helper['dropout_draws']} for {helper['samgs_steps']} steps; "
        f"both steps give bit-identical models: {same}"
    )
    summary = {k: v for k, v in helper.items() if k != "model"}
    print(json.dumps(summary | {"identical": same}))


if __name__ == "__main__":
    main()
