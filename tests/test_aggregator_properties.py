"""Every registered aggregator held to the properties TorchJD's tests check, with its tolerances.

The properties (Quinton & Rey 2024, TorchJD ``tests/unit/aggregation``), each on seeded
matrices J (K rows = tasks, D columns) that we generate here with NumPy:

* **structure**: the output has D entries, all finite, for J of several ranks, all-zero J, and
  J scaled by 0, 1e-10, 1e3, 1e5, 1e10 and 1e15;
* **non-conflicting**: ``J u`` has no negative entry, i.e. ``||(J u)_+|| = ||J u||``;
* **permutation invariance**: permuting the rows of J leaves ``u`` unchanged (5 permutations);
  the weights of the exact solvers (MGDA, UPGrad, DualProj) bit for bit, ``u`` to the
  tolerance plus the float32 rounding bound of ``sum_k w_k g_k`` summed in another order,
  ``K eps |w|^T |J|`` (it can exceed the tolerance where the weights are large and cancel);
* **linear under scaling**: ``u(diag(a c1 + b c2) J) = a u(diag(c1) J) + b u(diag(c2) J)`` for
  c1, c2 in [0, 1]^K, a, b in [0, 1] (5 draws);
* **strong stationarity**: ``||u||`` above a threshold whenever J is not strongly stationary
  (there is no w > 0 with ``J^T w = 0``).

Tolerances are TorchJD's (``assert_close``'s ``|x - y| <= atol + rtol |y|``): by default
4e-4/4e-4 (non-conflicting), 1e-4/1e-4 (permutation, linear), a threshold of 5e-3; UPGrad
and DualProj with their own, tighter permutation tolerances (5e-7, 2e-7).

Matrices: ``generic(K, D, rank)`` = U_r S V_r^T from random orthonormal U, V and 0.2 + |N(0, 1)|
singular values; ``strong(K, D, rank)``: the column space orthogonal to a positive vector;
``weak_not_strong``: orthogonal to a non-negative vector with zeros, not to any positive one;
``not_weak``: containing a positive vector. K in {4, 9, 20}, D up to 100. Stateful methods
are applied once from their initial state; every method sees each K once (one compile),
the matrices of that K batched with ``jax.vmap`` and zero-padded to a common D (zero columns
change neither the Gramian nor any coordinate-wise rule, and get zero output: checked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_aggregator

import samgs_optax

KS = (4, 9, 20)
D_MAX = 100
SCALES = (0.0, 1e-10, 1e3, 1e5, 1e10, 1e15)
N_PERMUTATIONS = 5
CHUNK = 128  # matrices per compiled call, see _outputs

STRUCTURE, NON_CONFLICTING, PERMUTATION, LINEAR, STATIONARITY = (
    "structure",
    "non_conflicting",
    "permutation",
    "linear",
    "stationarity",
)
# TorchJD's default tolerances: (atol, rtol) of the comparison, or the stationarity threshold.
DEFAULT = {
    NON_CONFLICTING: (4e-4, 4e-4),
    PERMUTATION: (1e-4, 1e-4),
    LINEAR: (1e-4, 1e-4),
    STATIONARITY: 5e-3,
}

# Solved in a canonical task order: their weights must not depend on the order at all.
EXACT_SOLVERS = ("mgda", "upgrad", "dualproj")
# FairGrad's equations G w = w^(-1/alpha) have no solution when G is singular (rank < K):
# there any weights are a compromise (TorchJD: SciPy's least squares), so its permutation
# invariance is checked on the full-rank matrices only.
FULL_RANK_ONLY = ("fairgrad",)

# name -> (options, {property: tolerance or None for TorchJD's default}): the properties
# TorchJD tests its version of the method for, with its per-method tolerances (UPGrad,
# DualProj), and the same rule for the methods it lacks (SAM-GS: permutation invariant).
# Random methods (a PRNG key in the state) have the structure only.
PROPERTIES: dict[str, tuple[dict, dict[str, object]]] = {
    "samgs": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "linear_scalarization": (
        {},
        {STRUCTURE: None, PERMUTATION: None, LINEAR: None, STATIONARITY: None},
    ),
    "pcgrad": ({}, {STRUCTURE: None}),
    "mgda": ({}, {STRUCTURE: None, NON_CONFLICTING: None, PERMUTATION: None}),
    # CAGrad is non-conflicting for c >= 1 only: with c = 0.5 (TorchJD's test) J u has negative
    # entries on rank-1 J, for TorchJD's CAGrad too (K = 9: ||J u|| 0.094, ||(J u)_+|| 0.066).
    "cagrad": ({"c": 1.0}, {STRUCTURE: None, NON_CONFLICTING: None}),
    "imtl_g": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "aligned_mtl": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "nash_mtl": ({}, {STRUCTURE: None}),
    "upgrad": (
        {},
        {
            STRUCTURE: None,
            NON_CONFLICTING: None,
            PERMUTATION: (5e-7, 5e-7),
            # TorchJD: 6e-2, but its own UPGrad misses that on two of our K = 9 matrices
            # (0.069 and 0.076, float64): trace normalisation and the eps regularisation
            # make UPGrad only approximately linear under scaling.
            LINEAR: (8e-2, 8e-2),
            STATIONARITY: 5e-3,
        },
    ),
    "dualproj": (
        {},
        {
            STRUCTURE: None,
            # TorchJD's 1e-4, plus the gap TorchJD's own DualProj has (float64) on our K = 4
            # strongly stationary J, where u is ~1e-3: ||J u|| 1.18e-3, ||(J u)_+|| 1.06e-3.
            NON_CONFLICTING: (2e-4, 1e-4),
            PERMUTATION: (2e-7, 2e-7),
            STATIONARITY: 3e-3,
        },
    ),
    "graddrop": ({}, {STRUCTURE: None}),
    "gradvac": ({}, {STRUCTURE: None}),
    "pcd": ({}, {STRUCTURE: None}),  # task 0 is the primary task: not permutation invariant
    "cr_mogm": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "excess_mtl": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "modo": ({}, {STRUCTURE: None, PERMUTATION: None}),
    "constant": (
        {"weights": (0.5, 1.0, 1.5, 2.0) * 5},  # first K entries, see _options
        {STRUCTURE: None, LINEAR: None, STATIONARITY: None},
    ),
    "random_weighting": ({}, {STRUCTURE: None, STATIONARITY: None}),
    "trimmed_mean": ({"trim_number": 1}, {STRUCTURE: None, PERMUTATION: None}),
    "krum": ({"n_byzantine": 1}, {STRUCTURE: None}),
    "con_fig": ({}, {STRUCTURE: None, PERMUTATION: None, LINEAR: None}),
    "fairgrad": ({}, {STRUCTURE: None, PERMUTATION: None}),
    # SDMGrad's inner projected-gradient loop (TorchJD's lr 10) jumps between corners of the
    # simplex: its weights depend on the summation order at 1e-4 (K = 20), so structure only.
    "sdmgrad": ({}, {STRUCTURE: None}),
    # Loss-aware (equal losses of 1, see conftest.make_aggregator): positive weights on the
    # normalised gradients (MoCo: softmax weights on g_i / ||g_i||; DB-MTL: max ||b|| / ||b_i||
    # on b_i), so u = 0 only at a strongly stationary J. Neither is non-conflicting or linear.
    "moco": ({}, {STRUCTURE: None, PERMUTATION: None, STATIONARITY: None}),
    "db_mtl": ({}, {STRUCTURE: None, PERMUTATION: None, STATIONARITY: None}),
    # GradNorm: positive weights (K softmax) on the g_i, so u = 0 only at a strongly stationary
    # J; from a fresh state (these tests) they are all 1, but not after weight steps: neither
    # non-conflicting nor linear in general.
    "gradnorm": ({}, {STRUCTURE: None, PERMUTATION: None, STATIONARITY: None}),
}


# --------------------------------------------------------------------------- matrices


def _orthonormal(rng: np.random.Generator, n: int, against: np.ndarray | None = None):
    """(n, n - k) orthonormal columns orthogonal to the k orthonormal columns ``against``."""
    k = 0 if against is None else against.shape[1]
    a = rng.normal(size=(n, n - k))
    if against is not None:
        a -= against @ (against.T @ a)
    q, _ = np.linalg.qr(a)
    return q


def _compose(rng, u: np.ndarray, d: int, rank: int) -> np.ndarray:
    """U_r S V_r^T, singular values 0.2 + |N(0, 1)|: away from 0, so that the absolute
    thresholds (stationarity) measure the method, not a near-zero singular value."""
    s = 0.2 + np.abs(rng.normal(size=rank))
    v = _orthonormal(rng, d)
    return (u[:, :rank] * s) @ v[:, :rank].T


def generic(rng, k, d, rank):
    return _compose(rng, _orthonormal(rng, k), d, rank)


def strong(rng, k, d, rank):
    """J^T v = 0 for a positive v: strongly stationary (rank <= k - 1)."""
    v = np.abs(rng.normal(size=(k, 1)))
    v /= np.linalg.norm(v)
    return _compose(rng, _orthonormal(rng, k, v), d, rank)


def weak_not_strong(rng, k, d, rank):
    """J^T v1 = 0 for v1 >= 0 with zeros; J's columns contain v2 >= 0 (v1 + v2 > 0)."""
    v = np.abs(rng.normal(size=k))
    first = rng.permutation(k)[: rng.integers(1, k)]
    v1, v2 = np.zeros(k), v.copy()
    v1[first], v2[first] = v[first], 0.0
    basis = np.stack([v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)], axis=1)
    u = np.concatenate([basis[:, 1:], _orthonormal(rng, k, basis)], axis=1)
    return _compose(rng, u, d, rank)


def not_weak(rng, k, d, rank):
    """J's columns contain a positive vector: no w >= 0, w != 0 with J^T w = 0."""
    v = np.abs(rng.normal(size=(k, 1)))
    v /= np.linalg.norm(v)
    u = np.concatenate([v, _orthonormal(rng, k, v)], axis=1)
    return _compose(rng, u, d, rank)


def matrices(k: int) -> dict[str, list[np.ndarray]]:
    """Seeded matrices of K rows, by kind (each (K, D) with D <= D_MAX, float64)."""
    rng = np.random.default_rng(k)
    d_small, d_large = max(k - 1, 2), 11 if k < 20 else D_MAX
    generic_ = [generic(rng, k, d, r) for d, r in ((d_small, 1), (d_small, d_small - 1))]
    generic_ += [generic(rng, k, d_large, min(k, d_large)), generic(rng, k, d_large, 2)]
    stationary_shapes = ((3, min(3, k - 1)), (d_large, min(6, k - 1)), (13, 2))
    out = {
        "generic": generic_,
        "zero": [np.zeros((k, 3)), np.zeros((k, d_large))],
        "strong": [strong(rng, k, d, r) for d, r in stationary_shapes],
        "weak_not_strong": [weak_not_strong(rng, k, d, r) for d, r in stationary_shapes],
        "not_weak": [not_weak(rng, k, d, r) for d, r in stationary_shapes],
    }
    out["typical"] = out["generic"] + out["zero"] + out["strong"]
    out["typical"] += out["weak_not_strong"] + out["not_weak"]
    out["non_strong"] = out["weak_not_strong"] + out["not_weak"]
    out["scaled"] = [s * j for s in SCALES for j in out["generic"]]
    return out


def _pad(j: np.ndarray) -> np.ndarray:
    return np.pad(j, ((0, 0), (0, D_MAX - j.shape[1])))


@functools.cache
def _inputs(k: int):
    """Every matrix one K's properties need, padded and stacked: (stack, index of each use)."""
    rng = np.random.default_rng(100 + k)
    m = matrices(k)
    stack, index = [], {}

    def add(key, j):
        index[key] = len(stack)
        stack.append(_pad(j))

    for i, j in enumerate(m["scaled"] + m["typical"]):
        add(("structure", i), j)
    for i, j in enumerate(m["typical"]):
        for p in range(N_PERMUTATIONS):
            perm = rng.permutation(k)
            add(("permutation", i, p), j[perm])
            index[("perm_of", i, p)] = perm
        for r in range(N_PERMUTATIONS):
            c1, c2, (a, b) = rng.uniform(size=k), rng.uniform(size=k), rng.uniform(size=2)
            add(("linear", i, r, 1), c1[:, None] * j)
            add(("linear", i, r, 2), c2[:, None] * j)
            add(("linear", i, r, 0), (a * c1 + b * c2)[:, None] * j)
            index[("linear_coefficients", i, r)] = (a, b)
    return m, np.stack(stack).astype(np.float32), index


@functools.cache
def _options(name: str, k: int) -> dict:
    """The method's declared options; ``constant``'s weights cut to K entries."""
    options = dict(PROPERTIES[name][0])
    if "weights" in options:
        options["weights"] = options["weights"][:k]
    return options


@functools.cache
def _outputs(name: str, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The method applied once, from its initial state, to every stacked matrix of K rows:
    the outputs and, for the methods whose state records them, the task weights. Cached:
    computed (one compile) once per method and K, shared by all of that method's properties."""
    tx = make_aggregator(name, k, **_options(name, k))
    params = {"w": jnp.zeros(D_MAX)}

    def one(j, state):
        u, new_state = tx.update({"w": j}, state, params)
        return u["w"], getattr(new_state, "weights", jnp.zeros(0))

    @jax.jit
    def apply(stack):
        return jax.vmap(one, in_axes=(0, None))(stack, tx.init(params))

    # In chunks of CHUNK matrices (zero-padded: one compile): CAGrad's program vmapped over
    # all 339 matrices of K = 20 at once deadlocks XLA:CPU (jaxlib 0.10.2: every worker
    # idle, the result never ready; not with
    # --xla_cpu_enable_concurrency_optimized_scheduler=false, nor in chunks of 128).
    stack = _inputs(k)[1]
    n = len(stack)
    padded = np.concatenate([stack, np.zeros((-n % CHUNK, *stack.shape[1:]), stack.dtype)])
    parts = [apply(padded[i : i + CHUNK]) for i in range(0, len(padded), CHUNK)]
    u = np.concatenate([np.asarray(p[0], np.float64) for p in parts])[:n]
    w = np.concatenate([np.asarray(p[1], np.float64) for p in parts])[:n]
    return u, (w if w.shape[-1] else None)


CASES = [(name, prop, k) for name, (_, props) in PROPERTIES.items() for prop in props for k in KS]


def test_every_registered_method_declares_its_properties():
    assert set(PROPERTIES) == set(samgs_optax.AGGREGATORS)


@pytest.mark.parametrize(("name", "prop", "k"), CASES)
def test_property(name, prop, k):
    m, stack, index = _inputs(k)
    out, weights = _outputs(name, k)
    typical = m["typical"]
    tol = PROPERTIES[name][1][prop] or DEFAULT.get(prop)
    if prop == STRUCTURE:
        for i, j in enumerate(m["scaled"] + typical):
            u = out[index[("structure", i)]]
            assert np.all(np.isfinite(u)), (name, k, i)
            assert np.all(u[j.shape[1] :] == 0), (name, k, i)  # the zero padding stays zero
    elif prop == NON_CONFLICTING:
        for i, j in enumerate(typical):
            ju = j @ out[index[("structure", len(m["scaled"]) + i)]][: j.shape[1]]
            total, positive = np.linalg.norm(ju), np.linalg.norm(np.maximum(ju, 0))
            assert total - positive <= tol[0] + tol[1] * total, (name, k, i, total, positive)
    elif prop == PERMUTATION:
        eps = np.finfo(np.float32).eps
        for i, j in enumerate(typical):
            if name in FULL_RANK_ONLY and np.linalg.matrix_rank(j) < k:
                continue
            at = index[("structure", len(m["scaled"]) + i)]
            for p in range(N_PERMUTATIONS):
                perm, v = index[("perm_of", i, p)], out[index[("permutation", i, p)]]
                atol = tol[0]
                if weights is not None:
                    w, wp = weights[at], weights[index[("permutation", i, p)]]
                    if name in EXACT_SOLVERS:  # solved in a canonical order: bit-identical
                        np.testing.assert_array_equal(wp, w[perm], err_msg=str(i))
                    else:
                        np.testing.assert_allclose(wp, w[perm], atol=tol[0], rtol=tol[1])
                    # u = sum_k w_k g_k summed in another order: its float32 rounding bound
                    atol = tol[0] + k * eps * (np.abs(w) @ np.abs(stack[at]))
                excess = np.abs(v - out[at]) - (atol + tol[1] * np.abs(out[at]))
                assert np.all(excess <= 0), (name, k, i, p, excess.max())
    elif prop == LINEAR:
        for i in range(len(typical)):
            for r in range(N_PERMUTATIONS):
                a, b = index[("linear_coefficients", i, r)]
                x1, x2, x = (out[index[("linear", i, r, n)]] for n in (1, 2, 0))
                want = a * x1 + b * x2
                np.testing.assert_allclose(x, want, atol=tol[0], rtol=tol[1], err_msg=str(i))
    elif prop == STATIONARITY:
        first = len(m["scaled"]) + len(m["generic"]) + len(m["zero"]) + len(m["strong"])
        for i in range(len(m["non_strong"])):
            norm = np.linalg.norm(out[index[("structure", first + i)]])
            assert norm > tol, (name, k, i, norm)
