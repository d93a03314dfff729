"""MultiMNIST training with a Flax Linen ``TrainState`` and SAM-GS (the short version).

The same MultiLeNet and recipe as ``multimnist.py`` (which uses Flax NNX), written the
Linen way: ``TrainState.apply_gradients`` accepts the *stacked* per-task gradients,
because the optimizer chain starts with the aggregator, which turns them into one
update shaped like the parameters::

    python examples/multimnist_linen.py [--method samgs|ls] [--epochs 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multimnist_data  # noqa: E402

import samgs_optax  # noqa: E402

NUM_TASKS = 2


class MultiLeNet(nn.Module):
    """Shared LeNet encoder (params under ``encoder_*``) and one head per task."""

    num_tasks: int = NUM_TASKS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x[..., None]
        x = nn.relu(
            nn.max_pool(
                nn.Conv(10, (5, 5), padding="VALID", name="encoder_conv1")(x), (2, 2), (2, 2)
            )
        )
        x = nn.relu(
            nn.max_pool(
                nn.Conv(20, (5, 5), padding="VALID", name="encoder_conv2")(x), (2, 2), (2, 2)
            )
        )
        z = nn.relu(nn.Dense(50, name="encoder_fc")(x.reshape(x.shape[0], -1)))
        heads = []
        for k in range(self.num_tasks):
            h = nn.relu(nn.Dense(50, name=f"head{k}_hidden")(z))
            heads.append(nn.Dense(10, name=f"head{k}_out")(h))
        return jnp.stack(heads)  # (K, B, 10)


def shared(params):
    """True on the encoder's leaves: only they get the surgery."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key.startswith("encoder"), params
    )


def make_optimizer(method: str, lr: float) -> optax.GradientTransformation:
    """LS: Adam on the summed loss. SAM-GS: the authors' recipe, surgery on the encoder only
    (``chain(samgs, scale(K), clip_by_global_norm(1), adam)``, scale and clip on the encoder;
    the heads get their own task's gradient)."""
    if method == "ls":
        return optax.adam(lr)
    return samgs_optax.recipe("samgs", NUM_TASKS, lr, mask=shared)


def make_step(per_task: bool):
    @jax.jit
    def step(state: TrainState, images, labels):
        def losses(params):
            logits = state.apply_fn({"params": params}, images)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.T)
            return jnp.mean(ce, axis=1)  # (K,)

        if per_task:  # stacked (K, ...) gradients; the chain aggregates them
            value, grads = samgs_optax.value_and_jacrev(losses)(state.params)
        else:
            value, grads = jax.value_and_grad(lambda p: jnp.sum(losses(p)))(state.params)
        return state.apply_gradients(grads=grads), value

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("samgs", "ls"), default="samgs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    data = multimnist_data.make_multimnist(0, args.n_train, 256, 512)
    train, test = data["train"], data["test"]
    model = MultiLeNet()
    params = model.init(jax.random.key(args.seed), train.images[:1])["params"]
    tx = make_optimizer(args.method, args.lr)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    step = make_step(per_task=args.method != "ls")

    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch, 7]).permutation(len(train.images))
        for i in range(len(order) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            state, _ = step(state, train.images[idx], train.labels[idx])

    pred = jnp.argmax(model.apply({"params": state.params}, test.images), axis=-1)
    acc = jnp.mean(pred == test.labels.T, axis=1)
    out = {
        "method": args.method,
        "seed": args.seed,
        "api": "linen",
        "test_accuracy": [round(float(a), 6) for a in acc],
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
