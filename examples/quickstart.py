"""Quickstart: two regression tasks whose gradients differ ~100x in magnitude.

A small network with a shared trunk and one head per task is trained on both
tasks at once, first with plain Adam on the summed loss (linear
scalarisation), then with SAM-GS + Adam using the authors' recipe. Task 0's
loss carries a weight of 100 (as when one task's loss is on a larger scale), so
its gradient is ~100x task 1's and dominates the summed gradient: under plain
Adam task 1 gets little of the shared trunk. SAM-GS measures the magnitude
dissimilarity and equalises the task gradients. The printed losses are the
unweighted mean squared errors.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import samgs_optax

NUM_TASKS = 2
STEPS = 3000
LEARNING_RATE = 3e-3


def make_data(key: jax.Array, n: int = 512, dim: int = 16):
    """Inputs and two nonlinear regression targets of unit scale."""
    kx, k0, k1 = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, dim))
    y0 = jnp.sin(x @ jax.random.normal(k0, (dim,)))
    y1 = jnp.sin(x @ jax.random.normal(k1, (dim,)))
    return x, jnp.stack([y0, y1], axis=1)


def init_params(key: jax.Array, dim: int = 16, hidden: int = 8):
    """A shared trunk (deliberately narrow, so tasks compete) and one linear head per task."""
    k_trunk, k_heads = jax.random.split(key)
    scale = 1.0 / jnp.sqrt(dim)
    return {
        "trunk": {"w": scale * jax.random.normal(k_trunk, (dim, hidden)), "b": jnp.zeros(hidden)},
        "heads": {
            "w": jax.random.normal(k_heads, (NUM_TASKS, hidden)) / jnp.sqrt(hidden),
            "b": jnp.zeros(NUM_TASKS),
        },
    }


LOSS_WEIGHTS = jnp.array([100.0, 1.0])  # the magnitude conflict


def mse(params, x, y):
    """Unweighted mean squared error of each task, shape (NUM_TASKS,)."""
    features = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    pred = features @ params["heads"]["w"].T + params["heads"]["b"]
    return jnp.mean((pred - y) ** 2, axis=0)


def task_losses(params, x, y):
    """The training losses: task 0 weighted 100x."""
    return LOSS_WEIGHTS * mse(params, x, y)


def train(tx: optax.GradientTransformation, per_task: bool, params, x, y):
    """Runs STEPS full-batch steps under jit with lax.scan; returns final task losses."""
    per_task_grads = samgs_optax.value_and_jacrev(task_losses)
    summed_grad = jax.value_and_grad(lambda p, x, y: jnp.sum(task_losses(p, x, y)))

    def step(carry, _):
        params, opt_state = carry
        if per_task:  # stacked gradients: every leaf gets a leading task axis
            _, grads = per_task_grads(params, x, y)
        else:
            _, grads = summed_grad(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=STEPS)
    return mse(params, x, y)


def main() -> None:
    x, y = make_data(jax.random.key(0))
    params = init_params(jax.random.key(1))
    head_mask = {"trunk": True, "heads": False}  # shared trunk; the heads are task-specific
    methods = {
        "Adam on the summed loss": (optax.adam(LEARNING_RATE), False),
        # The authors' recipe: SAM-GS on the trunk, times K (to match the summed loss) and
        # clipped to norm 1 on the trunk only, then Adam; the heads get their task's gradient.
        "SAM-GS + Adam": (
            samgs_optax.recipe("samgs", NUM_TASKS, LEARNING_RATE, mask=head_mask),
            True,
        ),
    }
    initial = mse(params, x, y)
    print(f"initial MSE: task 0 {initial[0]:9.4f}   task 1 {initial[1]:9.4f}")
    print(f"{STEPS} full-batch steps, lr {LEARNING_RATE}")
    for name, (tx, per_task) in methods.items():
        start = time.perf_counter()
        final = jax.block_until_ready(
            jax.jit(train, static_argnums=(0, 1))(tx, per_task, params, x, y)
        )
        seconds = time.perf_counter() - start
        relative = final / initial
        print(
            f"{name:<24} task 0 {final[0]:9.4f} ({relative[0]:6.1%} of initial)   "
            f"task 1 {final[1]:9.4f} ({relative[1]:6.1%} of initial)   "
            f"mean {relative.mean():6.1%}   [{seconds:.1f} s incl. compile]"
        )


if __name__ == "__main__":
    main()
