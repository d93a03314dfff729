"""value_and_jacrev against closed-form per-task gradients (least squares).

The model's contractions ask for float32 (``Precision.HIGHEST``): on GPUs XLA's
default float32 matmul precision is TF32 (10-bit mantissa), which is the
model's choice, not the library's, and would fail these float32 tolerances.
"""

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
HIGHEST = jax.lax.Precision.HIGHEST
PARAMS = {"x": RNG.normal(size=D).astype(np.float32), "s": np.float32(1.5)}


def losses(params, a, b):
    """Task k: 0.5 || s * A_k x - b_k ||^2."""
    resid = params["s"] * jnp.einsum("knd,d->kn", a, params["x"], precision=HIGHEST) - b
    return 0.5 * jnp.sum(resid**2, axis=1), {"resid": resid}


def closed_form(params):
    x, s = params["x"].astype(np.float64), float(params["s"])
    resid = s * np.einsum("knd,d->kn", A, x) - B
    grad_x = s * np.einsum("knd,kn->kd", A, resid)
    grad_s = np.einsum("kn,kn->k", np.einsum("knd,d->kn", A, x), resid)
    return 0.5 * np.sum(resid**2, axis=1), {"x": grad_x, "s": grad_s}, resid


MODES = [
    ("auto", {}),
    ("jacrev", {}),
    ("vmap", {}),
    ("sequential", {}),
    ("sequential", {"unroll": 1}),  # lax.map over 3 chunks of 1
    ("sequential", {"unroll": 2}),  # lax.map over 1 chunk of 2, then 1 unrolled
    ("sequential", {"unroll": 3}),  # exactly K: straight-line code
]


@pytest.mark.parametrize(("mode", "options"), MODES, ids=[f"{m}-{o}" for m, o in MODES])
def test_stacked_gradients_match_closed_form(mode, options):
    fn = jax.jit(samgs_optax.value_and_jacrev(losses, has_aux=True, mode=mode, **options))
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


@pytest.mark.parametrize("mode", ["auto", "jacrev", "vmap", "sequential"])
def test_tuple_argnums_gives_a_tuple_of_stacked_gradients(mode):
    """As jax.value_and_grad: one gradient tree per differentiated argument."""

    def fn(x, b, s):
        return losses({"x": x, "s": s}, A, b)[0]

    values, (grad_x, grad_s) = samgs_optax.value_and_jacrev(fn, argnums=(0, 2), mode=mode)(
        PARAMS["x"], B, PARAMS["s"]
    )
    want_values, want_grads, _ = closed_form(PARAMS)
    np.testing.assert_allclose(values, want_values, rtol=1e-5)
    np.testing.assert_allclose(grad_x, want_grads["x"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_s, want_grads["s"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argnums", [(0, 0), (), -1, 1.0, True])
def test_bad_argnums_are_refused(argnums):
    with pytest.raises(TypeError, match="argnums must be"):
        samgs_optax.value_and_jacrev(lambda p, a, b: losses(p, a, b)[0], argnums=argnums)


def test_non_float_inputs_are_refused_like_jax_grad():
    params = {"x": PARAMS["x"], "n": np.int32(3)}

    def fn(p):
        return losses({"x": p["x"], "s": PARAMS["s"]}, A, B)[0] * p["n"]

    with pytest.raises(TypeError, match=r"argument 0 leaf \['n'\] has dtype int32"):
        samgs_optax.value_and_jacrev(fn)(params)
    with pytest.raises(TypeError, match="int32"):  # what jax.value_and_grad says in its place
        jax.value_and_grad(lambda p: jnp.sum(fn(p)))(params)


def test_feeds_samgs_directly():
    _, grads = samgs_optax.value_and_jacrev(lambda p: losses(p, A, B)[0])(PARAMS)
    tx = samgs_optax.samgs(K)
    out, _ = jax.jit(tx.update)(grads, tx.init(PARAMS))
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, PARAMS)


def test_auto_compiles_the_mode_of_its_platform():
    """Same buffers as the mode AUTO_MODE names for this backend, not the other one's."""
    from samgs_optax.jacobian import AUTO_MODE

    def mlp(p, x):  # K = 4 task outputs of a one-hidden-layer network
        h = jnp.tanh(jnp.matmul(x, p["w1"], precision=HIGHEST))
        return jnp.mean(jnp.matmul(h, p["w2"], precision=HIGHEST) ** 2, axis=0)

    p = {"w1": jnp.full((64, 256), 0.01), "w2": jnp.full((256, 4), 0.01)}
    x = jnp.ones((128, 64))

    def temp_bytes(mode):
        fn = jax.jit(samgs_optax.value_and_jacrev(mlp, mode=mode))
        return fn.lower(p, x).compile().memory_analysis().temp_size_in_bytes

    expected = AUTO_MODE.get(jax.default_backend(), "jacrev")
    assert temp_bytes("sequential") != temp_bytes("jacrev")  # the check can tell them apart
    assert temp_bytes("auto") == temp_bytes(expected)


def test_sequential_temporaries_grow_less_than_jacrev():
    """Temporaries from K = 2 to K = 16: jacrev holds every task's backward at once.

    Measured in XLA's buffer assignment (``memory_analysis``), in units of one
    (batch, hidden) activation: the unrolled sequential passes add about one per
    task (XLA keeps one activation-sized buffer per unrolled pass), jacrev about
    two, and the ``lax.map`` loop (``unroll=1``) none.
    """

    def temp_bytes(k, mode, **options):
        def fn(p, x):
            h = jnp.tanh(jnp.matmul(x, p["w1"], precision=HIGHEST))
            return jnp.mean(jnp.matmul(h, p["w2"], precision=HIGHEST) ** 2, axis=0)

        p = {"w1": jnp.full((64, 512), 0.01), "w2": jnp.full((512, k), 0.01)}
        grad_fn = samgs_optax.value_and_jacrev(fn, mode=mode, **options)
        compiled = jax.jit(grad_fn).lower(p, jnp.ones((256, 64))).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    activation = 256 * 512 * 4
    growth = {
        name: (temp_bytes(16, mode, **kw) - temp_bytes(2, mode, **kw)) / activation
        for name, (mode, kw) in {
            "jacrev": ("jacrev", {}),
            "unrolled": ("sequential", {}),
            "loop": ("sequential", {"unroll": 1}),
        }.items()
    }
    assert growth["jacrev"] >= 20, growth
    assert growth["unrolled"] <= 0.6 * growth["jacrev"], growth
    assert growth["loop"] <= 1, growth


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be"):
        samgs_optax.value_and_jacrev(losses, mode="forward")
    with pytest.raises(ValueError, match="unroll must be a positive int"):
        samgs_optax.value_and_jacrev(losses, mode="sequential", unroll=0)
    with pytest.raises(ValueError, match=r"vector of task losses of shape \(K,\)"):
        samgs_optax.value_and_jacrev(lambda p: jnp.sum(p["x"]))(PARAMS)
