"""Every accepted form of ``mask=``, with plain pytrees and with Flax NNX state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samgs_optax
from samgs_optax.masks import resolve_mask

K = 2
PARAMS = {
    "encoder": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)},
    "heads": [jnp.ones((4, 1)), jnp.ones((4, 1))],
}
EXPLICIT = {"encoder": {"w": True, "b": True}, "heads": [False, False]}


@pytest.mark.parametrize(
    "mask",
    [
        EXPLICIT,
        {"encoder": True, "heads": False},  # a prefix tree covers whole sub-trees
        {"encoder": {"w": True, "b": True}, "heads": {0: False, 1: False}},  # other containers
        lambda params: {"encoder": True, "heads": False},  # a callable of params
        lambda path, leaf: path[0] == "encoder",  # a path predicate
        nnx.Not(nnx.PathContains("heads")),  # an NNX filter is one
    ],
    ids=["tree", "prefix", "dict-for-list", "callable", "predicate", "nnx-filter"],
)
def test_every_form_resolves_to_the_explicit_tree(mask):
    assert resolve_mask(mask, PARAMS) == EXPLICIT


def test_mismatch_names_the_first_path_briefly():
    with pytest.raises(ValueError, match=r"does not cover the parameter at \['heads'\]\[0\]") as e:
        resolve_mask({"encoder": True}, PARAMS)
    assert len(str(e.value)) < 300 and "PyTreeDef" not in str(e.value)
    with pytest.raises(ValueError, match=r"mask entry at \['decoder'\] matches no parameter"):
        resolve_mask({"encoder": True, "heads": False, "decoder": True}, PARAMS)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.trunk = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, K, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.trunk(x))))


X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(8, K)).astype(np.float32) * np.array([1.0, 50.0])


def _pure_mask(model):
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key != "head", pure)


def _nnx_forms(model):
    pure = _pure_mask(model)
    as_state = nnx.State(pure)
    return {
        "pure-dict": pure,
        "nnx-state": as_state,
        "filter": nnx.Not(nnx.PathContains("head")),
        "callable": lambda params: jax.tree.map(lambda _: True, params) | {"head": False},
    }


@pytest.mark.parametrize("form", ["pure-dict", "nnx-state", "filter", "callable"])
def test_nnx_optimizer_accepts_masks_from_nnx_state(form):
    """Each form gives the same steps as the explicit mask on the functional path."""
    model = Net(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params0 = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # snapshots, unaffected
    state = jax.tree.map(jnp.copy, nnx.to_pure_dict(rest))  # by the steps below
    mask = _nnx_forms(model)[form]
    optimizer = nnx.Optimizer(
        model, optax.chain(samgs_optax.samgs(K, mask=mask), optax.sgd(1e-3)), wrt=nnx.Param
    )

    def losses(model):
        return jnp.mean((model(X) - Y) ** 2, axis=0)

    @nnx.jit
    def step(model, optimizer):
        _, grads = samgs_optax.nnx.value_and_jacrev(losses)(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)

    # Reference: plain pytrees, the explicit bool tree, no NNX in the optimizer.
    explicit = _pure_mask(model)
    # SGD, not Adam: Adam's first steps are sign(u), which would amplify the rounding
    # differences between two compilations into whole steps.
    tx = optax.chain(samgs_optax.samgs(K, mask=explicit), optax.sgd(1e-3))

    def ref_losses(p, state):
        m = nnx.merge(graphdef, nnx.State(p), nnx.State(state), copy=True)
        out = losses(m)
        return out, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    p, opt_state = params0, tx.init(params0)
    for _ in range(3):
        (_, state), g = samgs_optax.value_and_jacrev(ref_losses, has_aux=True)(p, state)
        updates, opt_state = tx.update(g, opt_state, p)
        p = optax.apply_updates(p, updates)
    assert jax.tree.leaves(optimizer.opt_state[0].m["head"]) == []  # heads keep no moments
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, p)


def test_inject_hyperparams_keeps_mask_and_dtype_static():
    schedule = optax.linear_schedule(0.1, 0.9, 4)
    tx = samgs_optax.inject_hyperparams(samgs_optax.samgs)(
        num_tasks=K,
        gamma=schedule,
        mask=lambda p: {"encoder": True, "heads": False},
        m_dtype=jnp.bfloat16,
    )
    state = tx.init(PARAMS)
    assert set(state.hyperparams) >= {"gamma", "b1", "b2", "eps"}
    assert "mask" not in state.hyperparams and "m_dtype" not in state.hyperparams
    assert state.inner_state.m["encoder"]["w"].dtype == jnp.bfloat16
    assert jax.tree.leaves(state.inner_state.m["heads"]) == []
    g = jax.tree.map(lambda x: jnp.stack([x, 3 * x]), PARAMS)
    for step in range(3):
        out, state = jax.jit(tx.update)(g, state)
        np.testing.assert_allclose(state.hyperparams["gamma"], schedule(step), rtol=1e-6)
    np.testing.assert_allclose(out["heads"][0], 4 * PARAMS["heads"][0])  # plain task sum


def test_optax_inject_hyperparams_with_a_callable_mask_says_what_to_do():
    # optax calls the mask with the step count; a mask function that survives that
    # yields a single bool, and the error says how to keep the mask static.
    tx = optax.inject_hyperparams(samgs_optax.samgs, static_args=("num_tasks",))(
        num_tasks=K, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    )
    with pytest.raises(ValueError, match=r"static_args=\('num_tasks', 'mask'\)"):
        tx.init(PARAMS)
