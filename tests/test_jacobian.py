"""value_and_jacrev against closed-form per-task gradients (least squares)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samgs_optax

K, N, D = 3, 5, 4
RNG = np.random.default_rng(0)
A = RNG.normal(size=(K, N, D)).astype(np.float32)
B = RNG.normal(size=(K, N)).astype(np.float32)
PARAMS = {"x": RNG.normal(size=D).astype(np.float32), "s": np.float32(1.5)}


def losses(params, a, b):
    """Task k: 0.5 || s * A_k x - b_k ||^2."""
    resid = params["s"] * jnp.einsum("knd,d->kn", a, params["x"]) - b
    return 0.5 * jnp.sum(resid**2, axis=1), {"resid": resid}


def closed_form(params):
    x, s = params["x"].astype(np.float64), float(params["s"])
    resid = s * np.einsum("knd,d->kn", A, x) - B
    grad_x = s * np.einsum("knd,kn->kd", A, resid)
    grad_s = np.einsum("kn,kn->k", np.einsum("knd,d->kn", A, x), resid)
    return 0.5 * np.sum(resid**2, axis=1), {"x": grad_x, "s": grad_s}, resid


@pytest.mark.parametrize("mode", ["jacrev", "vmap", "sequential"])
def test_stacked_gradients_match_closed_form(mode):
    fn = jax.jit(samgs_optax.value_and_jacrev(losses, has_aux=True, mode=mode))
    (values, aux), grads = fn(PARAMS, A, B)
    want_values, want_grads, want_resid = closed_form(PARAMS)
    np.testing.assert_allclose(values, want_values, rtol=1e-5)
    np.testing.assert_allclose(aux["resid"], want_resid, rtol=1e-5, atol=1e-5)
    assert grads["x"].shape == (K, D) and grads["s"].shape == (K,)
    np.testing.assert_allclose(grads["x"], want_grads["x"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["s"], want_grads["s"], rtol=1e-4, atol=1e-4)


def test_without_aux_and_other_argnums():
    fn = samgs_optax.value_and_jacrev(lambda b, p, a: losses(p, a, b)[0], argnums=1)
    values, grads = fn(B, PARAMS, A)
    want_values, want_grads, _ = closed_form(PARAMS)
    np.testing.assert_allclose(values, want_values, rtol=1e-5)
    np.testing.assert_allclose(grads["x"], want_grads["x"], rtol=1e-4, atol=1e-4)


def test_feeds_samgs_directly():
    _, grads = samgs_optax.value_and_jacrev(lambda p: losses(p, A, B)[0])(PARAMS)
    tx = samgs_optax.samgs(K)
    out, _ = jax.jit(tx.update)(grads, tx.init(PARAMS))
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, PARAMS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be"):
        samgs_optax.value_and_jacrev(losses, mode="forward")
    with pytest.raises(ValueError, match=r"vector of task losses of shape \(K,\)"):
        samgs_optax.value_and_jacrev(lambda p: jnp.sum(p["x"]))(PARAMS)
