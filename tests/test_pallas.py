"""The Pallas moments-and-output kernel (``implementation="pallas"``) against references.

On CPU the kernel runs in Pallas' interpreter (``interpret=True``), which executes
the kernel's own operations block by block, masks included; compiling it for a GPU
(Triton) is not possible here, but lowering it to Triton IR is (``lowering_platforms``).

References: NumPy float64 (independent of the code under test) for the kernel on one
leaf and for whole SAM-GS runs; the XLA path (``implementation="xla"``, itself checked
against NumPy in ``test_samgs_reference.py``) for agreement to rounding.

Tolerances. Both paths round the same float32 operations in the same order (moments
in float32, weights ``a_k + c|m'_k|`` in float32, the task sum left to right, or by
groups of 8 beyond 16 tasks), and on CPU most results are bit-identical. A compiler
may still contract a multiply-add into one FMA in one path and not the other (XLA:CPU
does so in some fusions; Triton does by default), which skips the rounding of one
product: ``m' = b1 m + (1 - b1) g`` may then differ by ``eps (b1|m| + (1-b1)|g|)``
(more than 1 ulp of m' where the two products cancel) plus 1 ulp of its storage dtype
(a float32 difference can cross a bfloat16 rounding boundary). Each term
``g_k (a_k + c|m'_k|)`` then differs by a few float32 roundings of itself, and the
K - 1 additions in the same order add at most one rounding of each partial sum:
``|du| <= (K + 3) eps sum_k |term_k|``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flatten, relative_error
from numpy_reference import NumpySamgs

import samgs_optax
from samgs_optax import _pallas_samgs

samgs_module = importlib.import_module("samgs_optax.samgs")

EPS32 = float(np.finfo(np.float32).eps)
# Odd sizes (ragged last block), an exact multiple of the block, a scalar; one head.
SHAPES = {"a": (7, 13), "b": (129,), "c": (3, 5, 7), "d": (64,), "s": (), "head": (11,)}
MASK = {name: name != "head" for name in SHAPES}
PARAMS = {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}
BLOCK = 32  # small, so that the small leaves above span several blocks


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(_pallas_samgs, "BLOCK", BLOCK)


def _assert_moments_close(got, want, g, m, b1, storage):
    """|got - want| <= one rounding of each product (cancellation) + 1 ulp of storage."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    g, m = np.asarray(g, np.float64), np.asarray(m, np.float64)
    size = b1 * np.abs(m) + (1 - b1) * np.abs(g)
    bound = EPS32 * size + np.spacing(np.abs(want).astype(storage)).astype(np.float64)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def _assert_output_close(got, want, terms, k):
    """|got - want| <= (K + 3) eps sum_k |term_k| elementwise (see the module docstring)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = (k + 3) * EPS32 * np.sum(np.abs(terms), axis=0)
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def _leaf_case(rng, k, shape, m_dtype):
    scales = rng.uniform(0.1, 10, (k,) + (1,) * len(shape))
    g = jnp.asarray(rng.standard_normal((k, *shape)) * scales, jnp.float32)
    m = jnp.asarray(rng.standard_normal((k, *shape)), m_dtype)
    a = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32)
    return g, m, a


# --------------------------------------------------------------------------------------
# The kernel on one leaf.


@pytest.mark.parametrize(
    ("k", "shape"), [(2, (91,)), (3, (4, 32)), (10, (3, 5, 7)), (17, (91,)), (40, (3, 5, 7))]
)
def test_kernel_matches_numpy(k, shape):
    """m' = b1 m + (1 - b1) g and u = sum_k g_k (a_k + c |m'_k|) in float64.

    With the float32 constants, m' is two products and a sum (at most 2 eps of
    ``b1|m| + (1-b1)|g|``, which bounds cancellation too), and u's error is bounded
    as in the module docstring with |m'| replaced by that magnitude.
    """
    rng = np.random.default_rng(k * 100 + len(shape))
    g, m, a = _leaf_case(rng, k, shape, jnp.float32)
    c, b1 = jnp.float32(0.7), 0.9

    def fn(g, m, a, c):
        return _pallas_samgs.moments_and_output(g, m, a, c, b1, interpret=True)

    m_new, u = jax.jit(fn)(g, m, a, c)
    assert m_new.shape == m.shape and m_new.dtype == jnp.float32
    assert u.shape == shape and u.dtype == jnp.float32
    g64, m64 = np.asarray(g, np.float64), np.asarray(m, np.float64)
    a64 = np.asarray(a, np.float64).reshape((k,) + (1,) * len(shape))
    b1_32, rest_32, c_32 = (float(np.float32(x)) for x in (0.9, 0.1, 0.7))
    want_m = b1_32 * m64 + rest_32 * g64
    size = b1_32 * np.abs(m64) + rest_32 * np.abs(g64)
    assert np.all(np.abs(np.asarray(m_new, np.float64) - want_m) <= 2 * EPS32 * size)
    want_u = np.sum(g64 * (a64 + c_32 * np.abs(want_m)), axis=0)
    bound = (k + 4) * EPS32 * np.sum(np.abs(g64) * (a64 + c_32 * size), axis=0)
    assert np.all(np.abs(np.asarray(u, np.float64) - want_u) <= bound)


@pytest.mark.parametrize("k", [3, 17, 40])
@pytest.mark.parametrize("m_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("traced_b1", [False, True])
def test_kernel_matches_xla_leaf(k, m_dtype, traced_b1):
    """Against the XLA path's own functions (samgs._ema, samgs._combine), jitted."""
    rng = np.random.default_rng(k)
    g, m, a = _leaf_case(rng, k, (7, 13), m_dtype)
    c = jnp.float32(0.37)
    b1 = jnp.float32(0.9) if traced_b1 else 0.9

    @jax.jit
    def xla(g, m, a, c, b1):
        new = samgs_module._ema(g, m, b1)
        return new.astype(m_dtype), samgs_module._combine(g, new, a, c), new

    @jax.jit
    def pallas(g, m, a, c, b1):
        return _pallas_samgs.moments_and_output(g, m, a, c, b1, m_dtype, interpret=True)

    m_x, u_x, m_f32 = xla(g, m, a, c, b1)
    m_p, u_p = pallas(g, m, a, c, b1)
    assert m_p.dtype == m_x.dtype == m_dtype and u_p.dtype == u_x.dtype == jnp.float32
    _assert_moments_close(m_p, m_x, g, m, 0.9, m_dtype)
    m_f64 = np.asarray(m_f32, np.float64)
    weights = np.asarray(a, np.float64)[:, None, None] + 0.37 * np.abs(m_f64)
    _assert_output_close(u_p, u_x, np.asarray(g, np.float64) * weights, k)


def test_kernel_block_must_be_a_power_of_two():
    g = jnp.ones((2, 10))
    with pytest.raises(ValueError, match="power of two"):
        _pallas_samgs.moments_and_output(g, g, jnp.ones(2), 1.0, 0.9, interpret=True, block=48)


@pytest.mark.parametrize(("k", "n", "block"), [(3, 1000, 256), (40, 4097, 1024), (2, 1, 1024)])
def test_kernel_lowers_to_triton(k, n, block):
    """The kernel passes Pallas' Triton lowering (power-of-two tensors, masks, dtypes).

    Lowering only: the Triton IR is then compiled by XLA's GPU backend, which needs
    a GPU; ``benchmarks/bench_update.py --implementation both`` on a GPU checks it.
    """
    args = (jnp.ones((k, n)), jnp.ones((k, n), jnp.bfloat16), jnp.ones(k), jnp.float32(1))

    def fn(g, m, a, c):
        return _pallas_samgs.moments_and_output(g, m, a, c, 0.9, jnp.bfloat16, block=block)

    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


def test_samgs_update_lowers_for_cuda_with_the_kernel():
    """Explicit "pallas": the Triton kernel on CUDA (not the interpreter)."""
    tx = samgs_optax.samgs(3, mask=MASK, implementation="pallas")
    g = _grads(np.random.default_rng(0), 3)
    lowered = jax.jit(tx.update).trace(g, tx.init(PARAMS)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == len(SHAPES) - 1


# --------------------------------------------------------------------------------------
# The whole transform.


def _grads(rng, k, scales=None):
    scales = rng.uniform(0.5, 2.0, k) if scales is None else scales
    return {
        name: jnp.asarray(
            rng.standard_normal((k, *shape)) * scales.reshape((k,) + (1,) * len(shape)),
            jnp.float32,
        )
        for name, shape in SHAPES.items()
    }


def _sequence(k, steps, seed=0):
    """Steps alternating similar and very different task magnitudes (both branches)."""
    rng = np.random.default_rng(seed)
    return [
        _grads(rng, k, rng.uniform(1, 2, k) if i % 2 else 10 ** rng.uniform(-3, 3, k))
        for i in range(steps)
    ]


def _run(tx, seq):
    """Updates and the final state; ``_run.branches``: equalised at each step."""
    update = jax.jit(tx.update, donate_argnums=(1,))
    state, outs, _run.branches = tx.init(PARAMS), [], []
    for g in seq:
        u, state = update(g, state, PARAMS)
        outs.append(u)
        _run.branches.append(bool(_inner(state).equalised))
    return outs, state


def _inner(state):
    return getattr(state, "inner_state", state)  # through optax.inject_hyperparams


def _side_by_side(tx_xla, tx_pallas, seq):
    """Per step, both updates from the same state (the XLA run's, carried).

    So each step's comparison sees one step's rounding differences only; the
    carried pallas-only runs are checked against NumPy below.
    """
    update_x, update_p = jax.jit(tx_xla.update), jax.jit(tx_pallas.update)
    state = tx_xla.init(PARAMS)
    for g in seq:
        m_old = _inner(state).m
        u_p, state_p = update_p(g, state, PARAMS)
        u_x, state = update_x(g, state, PARAMS)
        yield (g, m_old), (u_x, state), (u_p, state_p)


def _assert_step_agrees(k, inputs, xla, pallas, b1=0.9, storage=np.float32):
    (g, m_old), (u_x, state_x), (u_p, state_p) = inputs, xla, pallas
    inner_x, inner_p = _inner(state_x), _inner(state_p)
    for name in ("count", "h", "similarity", "equalised", "norms"):
        np.testing.assert_array_equal(getattr(inner_p, name), getattr(inner_x, name))
    assert isinstance(inner_p.m["head"], type(inner_x.m["head"]))  # MaskedNode: no moments
    for name in SHAPES.keys() - {"head"}:
        assert inner_p.m[name].dtype == inner_x.m[name].dtype == storage
        got, want = inner_p.m[name], inner_x.m[name]
        _assert_moments_close(got, want, g[name], m_old[name], b1, storage)
    np.testing.assert_array_equal(u_p["head"], u_x["head"])  # plain task sum, XLA's
    # Relative to max |u|: each element is within (K + 3) eps sum_k |term_k|, and on
    # these draws sum_k |term_k| stays within a few K times max |u|.
    assert relative_error(flatten(u_p), flatten(u_x)) <= 4 * (k + 3) * k * EPS32


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("m_dtype", [None, jnp.bfloat16])
def test_samgs_pallas_matches_xla(k, m_dtype):
    """Six steps, a head leaf, both branches: same u, m and scalars as the XLA path."""
    kwargs = dict(gamma=0.5, mask=MASK, m_dtype=m_dtype)
    tx_x = samgs_optax.samgs(k, implementation="xla", **kwargs)
    tx_p = samgs_optax.samgs(k, implementation="pallas", **kwargs)
    branches = set()
    for inputs, xla, pallas in _side_by_side(tx_x, tx_p, _sequence(k, 6, seed=k)):
        _assert_step_agrees(k, inputs, xla, pallas, storage=m_dtype or np.float32)
        branches.add(bool(xla[1].equalised))
    assert branches == {True, False}


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_samgs_pallas_matches_numpy(gamma):
    """Against the NumPy transcription of SPEC (float64), as test_samgs_reference does."""
    k = 4
    seq = _sequence(k, 8, seed=7)
    tx = samgs_optax.samgs(k, gamma=gamma, implementation="pallas")
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    ref = NumpySamgs(k, flatten(PARAMS).size, gamma=gamma)
    for g in seq:
        u, state = update(g, state)
        want = ref.step(np.stack([flatten(jax.tree.map(lambda x, i=i: x[i], g)) for i in range(k)]))
        assert bool(state.equalised) == ref.last_equalised
        # float32 against float64 over 8 steps (test_samgs_reference allows 5e-4).
        assert relative_error(flatten(u), want) < 1e-5


def test_inject_hyperparams_gamma_and_b1():
    """gamma scheduled across both branches and b1 injected (a traced array in the kernel)."""
    k = 3

    def make(implementation):
        injected = optax.inject_hyperparams(samgs_optax.samgs, static_args=("num_tasks",))
        return injected(
            num_tasks=k,
            gamma=optax.piecewise_constant_schedule(1.0, {3: 0.0}),
            b1=0.8,
            mask=MASK,
            implementation=implementation,
        )

    branches = []
    for inputs, xla, pallas in _side_by_side(make("xla"), make("pallas"), _sequence(k, 6)):
        assert pallas[1].hyperparams["b1"].dtype == jnp.float32  # an array, not a Python float
        _assert_step_agrees(k, inputs, xla, pallas, b1=0.8)
        branches.append(bool(xla[1].inner_state.equalised))
    assert branches == [True] * 3 + [False] * 3  # gamma 1, then 0


# --------------------------------------------------------------------------------------
# Selecting the implementation.


def _has_pallas_call(tx, k=2) -> bool:
    g = _grads(np.random.default_rng(0), k)
    return "pallas_call" in str(jax.make_jaxpr(tx.update)(g, tx.init(PARAMS)))


def test_auto_is_xla_on_every_platform_until_measured():
    assert samgs_module.AUTO_IMPLEMENTATION == {}
    assert not _has_pallas_call(samgs_optax.samgs(2, mask=MASK))
    assert not _has_pallas_call(samgs_optax.samgs(2, mask=MASK, implementation="xla"))
    assert _has_pallas_call(samgs_optax.samgs(2, mask=MASK, implementation="pallas"))


def test_auto_table_selects_the_kernel(monkeypatch):
    """An entry for this platform switches "auto" to the kernel (here interpreted)."""
    seq = _sequence(2, 3)
    want, _ = _run(samgs_optax.samgs(2, mask=MASK, implementation="pallas"), seq)
    monkeypatch.setattr(samgs_module, "AUTO_IMPLEMENTATION", {jax.default_backend(): "pallas"})
    tx = samgs_optax.samgs(2, mask=MASK)
    assert _has_pallas_call(tx)
    got, _ = _run(tx, seq)
    for u, w in zip(got, want, strict=True):
        jax.tree.map(np.testing.assert_array_equal, u, w)


def test_bad_implementation():
    with pytest.raises(ValueError, match="implementation must be"):
        samgs_optax.samgs(2, implementation="triton")


def test_library_imports_without_pallas():
    """Pallas is imported lazily: blocked, the default path works and "pallas" says why."""
    script = textwrap.dedent(
        """
        import sys, importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("jax.experimental.pallas"):
                    raise ImportError("pallas blocked for this test")

        sys.meta_path.insert(0, Block())
        import jax.numpy as jnp
        import samgs_optax
        params = {"w": jnp.zeros(5)}
        g = {"w": jnp.ones((2, 5))}
        tx = samgs_optax.samgs(2)
        u, _ = tx.update(g, tx.init(params))
        assert "jax.experimental.pallas" not in sys.modules
        tx = samgs_optax.samgs(2, implementation="pallas")
        try:
            tx.update(g, tx.init(params))
        except ImportError as e:
            print("pallas:", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pallas: pallas blocked for this test" in proc.stdout
