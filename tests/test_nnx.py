"""samgs_optax.nnx.value_and_jacrev: per-task gradients of NNX modules, other state carried once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samgs_optax
import samgs_optax.nnx as snnx

K = 3
MODES = ["auto", "jacrev", "sequential", "vmap"]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 5)).astype(np.float32)
Y = RNG.normal(size=(16, K)).astype(np.float32)


class Net(nnx.Module):
    """Shared trunk with BatchNorm and Dropout, one output per task."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.5):
        self.trunk = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(8, K, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.bn(nnx.relu(self.trunk(x)))))


def task_losses(model: Net, x, y):
    return jnp.mean((model(x) - y) ** 2, axis=0)  # shape (K,)


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("mode", MODES)
def test_batch_statistics_move_once_as_one_forward_pass(mode):
    model = Net(nnx.Rngs(0, dropout=1))
    w, b = np.asarray(model.trunk.kernel[...]), np.asarray(model.trunk.bias[...])
    mean0, var0 = np.asarray(model.bn.mean[...]), np.asarray(model.bn.var[...])

    snnx.value_and_jacrev(task_losses, mode=mode)(model, X, Y)

    # One forward pass's update, by hand: EMA (momentum 0.9) of the batch mean and
    # (biased) variance of the BatchNorm input.
    h = np.maximum(X.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(model.bn.mean[...], 0.9 * mean0 + 0.1 * h.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.bn.var[...], 0.9 * var0 + 0.1 * h.var(0), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_each_call_draws_a_new_dropout_mask_and_advances_the_counter_once(mode):
    model = Net(nnx.Rngs(0, dropout=1))
    fn = snnx.value_and_jacrev(task_losses, mode=mode)
    seen = []
    for call in range(1, 3):
        before = nnx.clone(model)  # same RNG state: its forward pass draws the same mask
        losses, _ = fn(model, X, Y)
        np.testing.assert_allclose(losses, task_losses(before, X, Y), rtol=1e-5)
        assert int(model.drop.rngs.count.get_value()) == call  # once per call, not K
        seen.append(np.asarray(losses))
    assert not np.allclose(seen[0], seen[1])  # a different mask on the second call


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_k_separate_nnx_grad_calls(mode):
    model = Net(nnx.Rngs(0, dropout=1))
    references = []
    for k in range(K):
        clone = nnx.clone(model)  # same parameters, statistics and RNG state
        grads = nnx.grad(lambda m, k=k: task_losses(m, X, Y)[k])(clone)
        references.append(_numpy(nnx.to_pure_dict(grads)))

    losses, grads = snnx.value_and_jacrev(task_losses, mode=mode)(model, X, Y)

    assert isinstance(grads, nnx.State)
    got = nnx.to_pure_dict(grads)
    for k in range(K):
        jax.tree.map(
            lambda g, r, k=k: np.testing.assert_allclose(g[k], r, rtol=2e-5, atol=1e-6),
            got,
            references[k],
        )


def test_optimizer_steps_under_nnx_jit_with_has_aux_and_a_second_module():
    model, other = Net(nnx.Rngs(0, dropout=1)), Net(nnx.Rngs(5, dropout=6))
    tx = optax.chain(samgs_optax.samgs(K, mask=nnx.Not(nnx.PathContains("head"))), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, other, optimizer):
        def fn(model, other):
            losses = task_losses(model, X, Y) + 0.0 * task_losses(other, X, Y)
            return losses, jnp.sum(losses)

        (losses, total), grads = snnx.value_and_jacrev(fn, has_aux=True)(model, other)
        optimizer.update(model, grads)
        return losses, total

    first, total = train_step(model, other, optimizer)
    np.testing.assert_allclose(total, np.sum(first), rtol=1e-6)
    for _ in range(20):
        last, _ = train_step(model, other, optimizer)
    assert int(optimizer.opt_state[0].count) == 21
    assert int(model.drop.rngs.count.get_value()) == 21
    assert int(other.drop.rngs.count.get_value()) == 21  # state of a non-diff module, too
    assert float(np.sum(last)) < float(np.sum(first))


def test_tuple_argnums_gives_one_state_per_module():
    a, b = Net(nnx.Rngs(0, dropout=1), dropout=0.0), Net(nnx.Rngs(2, dropout=3), dropout=0.0)

    def fn(a, x, b):
        return task_losses(a, x, Y) + 2 * task_losses(b, x, Y)

    _, (ga, gb) = snnx.value_and_jacrev(fn, argnums=(0, 2))(a, X, b)
    ref = nnx.grad(lambda m: 2 * task_losses(m, X, Y)[1])(nnx.clone(b))
    np.testing.assert_allclose(gb["head"]["kernel"][...][1], ref["head"]["kernel"][...], rtol=1e-5)
    assert ga["trunk"]["kernel"][...].shape == (K, 5, 8)


def test_argnums_must_point_at_a_module():
    with pytest.raises(TypeError, match="argument 1 must be a Flax NNX module, got ndarray"):
        snnx.value_and_jacrev(task_losses, argnums=1)(Net(nnx.Rngs(0)), X, Y)


def test_core_value_and_jacrev_refuses_modules_and_non_float_state():
    model = Net(nnx.Rngs(0, dropout=1))
    with pytest.raises(TypeError, match=r"NNX module \(Net\).*samgs_optax.nnx"):
        samgs_optax.value_and_jacrev(task_losses)(model, X, Y)
    graphdef, state = nnx.split(model)  # every variable, RNG counters and keys included

    def losses(state):
        return task_losses(nnx.merge(graphdef, state), X, Y)

    with pytest.raises(TypeError, match=r"\['count'\].*dtype uint32.*samgs_optax.nnx"):
        samgs_optax.value_and_jacrev(losses)(state)
    with pytest.raises(TypeError):  # what jax.value_and_grad does in the same place
        jax.value_and_grad(lambda s: jnp.sum(losses(s)))(state)
