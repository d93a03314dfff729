"""SAM-GS driving Flax models inside jit-compiled training steps (NNX and Linen)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import samgs_optax

K = 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 8)).astype(np.float32)
# Two regression targets whose scales differ 100x: a magnitude conflict.
Y = np.stack([X @ RNG.normal(size=8), 100 * np.tanh(X @ RNG.normal(size=8))], 1).astype(np.float32)


def _tx():
    return optax.chain(samgs_optax.samgs(K), optax.scale(K), optax.adam(1e-2))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, K, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _task_losses(pred, y):
    return jnp.mean((pred - y) ** 2, axis=0)  # shape (K,)


def test_nnx_optimizer_steps_match_functional_optax():
    model = NnxNet(nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    params0 = jax.tree.map(jnp.copy, params0)  # a snapshot, unaffected by later steps
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def losses(p):
            return _task_losses(nnx.merge(graphdef, p, rest)(x), y)

        values, grads = samgs_optax.value_and_jacrev(losses)(params)
        optimizer.update(model, grads)
        return values

    history = [np.asarray(train_step(model, optimizer, X, Y)) for _ in range(15)]

    # The same chain applied to the same pure parameter State, outside NNX.
    tx = _tx()

    @jax.jit
    def functional_step(params, opt_state):
        _, grads = samgs_optax.value_and_jacrev(
            lambda p: _task_losses(nnx.merge(graphdef, p)(X), Y)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = params0, tx.init(params0)
    for _ in range(15):
        params, opt_state = functional_step(params, opt_state)
    _, final = nnx.split(model, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), final, params)
    assert np.all(history[-1] < history[0])  # both tasks improved


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(K)(nn.relu(nn.Dense(16)(x)))


def test_linen_train_state_with_per_task_gradients():
    net = LinenNet()
    params = net.init(jax.random.key(0), X)["params"]
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=_tx())

    @jax.jit
    def train_step(state, x, y):
        def losses(p):
            return _task_losses(state.apply_fn({"params": p}, x), y)

        values, grads = samgs_optax.value_and_jacrev(losses)(state.params)
        return state.apply_gradients(grads=grads), values

    first = None
    for _ in range(15):
        state, values = train_step(state, X, Y)
        first = values if first is None else first
    samgs_state = state.opt_state[0]
    assert int(samgs_state.count) == 15
    assert jax.tree.leaves(samgs_state.m)[0].shape[0] == K
    assert np.all(np.asarray(values) < np.asarray(first))
