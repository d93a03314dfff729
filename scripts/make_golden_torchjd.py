"""Golden vectors for the aggregators, produced by TorchJD 0.18 (run in its own venv).

torch and torchjd are NOT dependencies of samgs_optax or of its tests: the
tests only read the file this script writes, ``tests/golden/torchjd_aggregators.npz``.
Regenerate it with (CPU torch is enough; the optional solvers TorchJD needs come
with the ``full`` extra)::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch==2.13.0 "torchjd[full]==0.18.0"
    /tmp/venv-torch/bin/python scripts/make_golden_torchjd.py           # keeps stored entries
    /tmp/venv-torch/bin/python scripts/make_golden_torchjd.py --fresh   # rewrites them all

What is stored, for every case (K in {2, 3, 5, 10}, three matrices each, 24
columns, rows with conflicting directions and norms spread over two orders of
magnitude), under keys ``"<case>/<name>"``:

* ``J``: the (K, 24) float64 Jacobian (task gradients as rows).
* TorchJD's aggregation of ``J`` in float64 with default parameters:
  ``upgrad``, ``dualproj``, ``imtl_g``, ``aligned_mtl``, ``sum``, ``mean``,
  ``cagrad_c{0.2,0.5,1.5}`` (``CAGrad(c)``), ``mgda_torchjd`` (its Frank-Wolfe,
  kept to measure how far it stops from the optimum) and ``nash_mtl_torchjd``
  (``NashMTL(K, max_norm=0)``, one step from a fresh state: the authors' CCP).
* ``mgda_exact``: the exact min-norm point of the convex hull, by enumerating
  every face in float64 NumPy (independent of TorchJD and of samgs_optax).
* ``pcgrad`` with ``pcgrad_perms`` (K, K): the task orders ``torch.randperm``
  drew (row i for task i), recorded by wrapping ``torch.randperm``.
* ``graddrop`` with ``graddrop_uniform`` (24,): the draws of ``torch.rand``,
  recorded the same way.
* ``graddrop_square``: ``GradDrop(f=square)`` with the same draws (the torch RNG
  state is restored around it, so every other entry is as without it).

Added for issue 12 (the stateless aggregators TorchJD 0.18 has and the first set
lacked), computed in a second pass over the same matrices, after every entry
above, with their own NumPy and torch seeds, so that the entries above are
bit-identical to the file written before them:

* ``constant_mean``: ``Constant(ones(K) / K)`` (our ``constant`` default);
  ``constant`` with ``constant_weights`` (K,): ``Constant(w)``, w standard normal.
* ``random`` with ``random_draws`` (K,): ``Random()`` and the ``torch.randn``
  draw it made (recorded like ``pcgrad_perms``).
* ``trimmed_mean_t{t}``: ``TrimmedMean(t)`` for every allowed t (2t + 1 <= K).
* ``krum_f{f}_m{m}``: ``Krum(f, m)`` for f in {0, (K-3)//2, K-3} and m in {1, 2}
  (K >= 3 only: TorchJD needs K >= f + 3).
* ``config``: ``ConFIG()``; ``config_pref`` with ``config_pref_vector`` (K,):
  ``ConFIG(pref_vector)``, the vector uniform in [0.2, 2].
* ``fairgrad_a{alpha}`` and ``fairgrad_a{alpha}_weights`` for alpha in
  ``FAIRGRAD_ALPHAS``: ``FairGrad(alpha)`` and the weights its SciPy least-squares
  solve returned (``FairGradWeighting(alpha)`` on ``J J^T``).

Randomness: NumPy ``default_rng(20250611)`` for the matrices, ``torch.manual_seed(0)``;
for the issue-12 entries ``default_rng(12)`` and ``torch.manual_seed(12)``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import pathlib
import sys

import numpy as np
import torch
from torchjd import aggregation as agg

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden"
OUT_FILE = OUT / "torchjd_aggregators.npz"
COLUMNS = 24
CAGRAD_CS = (0.2, 0.5, 1.5)
FAIRGRAD_ALPHAS = (0.0, 0.5, 1.0, 2.0, 5.0)


def make_matrices(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Three (K, 24) Jacobians per K with conflicts and norms spanning ~1e-1..1e1."""
    cases = {}
    for k in (2, 3, 5, 10):
        # "random": independent directions, log-uniform norms.
        rows = rng.normal(size=(k, COLUMNS))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        cases[f"K{k}_random"] = rows * 10 ** rng.uniform(-1, 1, size=(k, 1))
        # "opposed": every task but the first pulls against the first one.
        base = rng.normal(size=COLUMNS)
        base /= np.linalg.norm(base)
        rows = -rng.uniform(0.3, 1.0, size=(k, 1)) * base + 0.6 * rng.normal(size=(k, COLUMNS)) / 5
        rows[0] = base + 0.1 * rng.normal(size=COLUMNS) / 5
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        cases[f"K{k}_opposed"] = rows * 10 ** rng.uniform(-1, 1, size=(k, 1))
        # "camps": two groups of tasks with opposite mean directions.
        signs = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None]
        rows = signs * base + 0.8 * rng.normal(size=(k, COLUMNS)) / np.sqrt(COLUMNS) * 3
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        cases[f"K{k}_camps"] = rows * 10 ** rng.uniform(-1, 1, size=(k, 1))
    return cases


def exact_min_norm(j: np.ndarray) -> np.ndarray:
    """Min-norm point of conv{rows of j}, by solving the KKT system on every face."""
    g = j @ j.T
    k = g.shape[0]
    best_val, best_w = np.inf, None
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            f = list(face)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = g[np.ix_(f, f)]
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = np.zeros(size + 1)
            rhs[size] = 1
            try:
                sol = np.linalg.solve(kkt, rhs)
            except np.linalg.LinAlgError:
                continue
            w = np.zeros(k)
            w[f] = sol[:size]
            if np.any(w < 0):
                continue
            val = w @ g @ w
            if val < best_val:
                best_val, best_w = val, w
    return best_w @ j


class _Recorder:
    """Wraps a torch sampling function and keeps what it returned."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append(out.clone())
        return out


def _recording(name: str, aggregator, j: torch.Tensor):
    """``aggregator(j)`` with ``torch.<name>`` wrapped; returns the result and the draws."""
    saved = getattr(torch, name)
    recorder = _Recorder(saved)
    setattr(torch, name, recorder)
    try:
        return aggregator(j), recorder.calls
    finally:
        setattr(torch, name, saved)


def stateless_issue_12(j_np: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The issue-12 entries for one (K, 24) float64 Jacobian (see the module docstring)."""
    k = j_np.shape[0]
    j = torch.from_numpy(j_np)
    res = {"constant_mean": agg.Constant(torch.ones(k, dtype=j.dtype) / k)(j)}
    weights = rng.normal(size=k)
    res["constant_weights"] = weights
    res["constant"] = agg.Constant(torch.from_numpy(weights))(j)

    res["random"], (draw,) = _recording("randn", agg.Random(), j)
    res["random_draws"] = draw.numpy()

    for t in range((k - 1) // 2 + 1):
        res[f"trimmed_mean_t{t}"] = agg.TrimmedMean(trim_number=t)(j)
    if k >= 3:
        for f in sorted({0, (k - 3) // 2, k - 3}):
            for m in (1, 2):
                res[f"krum_f{f}_m{m}"] = agg.Krum(n_byzantine=f, n_selected=m)(j)

    res["config"] = agg.ConFIG()(j)
    pref = rng.uniform(0.2, 2.0, size=k)
    res["config_pref_vector"] = pref
    res["config_pref"] = agg.ConFIG(pref_vector=torch.from_numpy(pref))(j)

    gram = j @ j.T
    for alpha in FAIRGRAD_ALPHAS:
        res[f"fairgrad_a{alpha}"] = agg.FairGrad(alpha=alpha)(j)
        res[f"fairgrad_a{alpha}_weights"] = agg.FairGradWeighting(alpha=alpha)(gram)
    return res


def _store(out: dict[str, np.ndarray], name: str, res: dict) -> None:
    for key, value in res.items():
        arr = value.detach().numpy() if isinstance(value, torch.Tensor) else value
        out[f"{name}/{key}"] = np.asarray(arr)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(20250611)
    out: dict[str, np.ndarray] = {
        "meta/torchjd_version": np.array(importlib.metadata.version("torchjd")),
        "meta/torch_version": np.array(torch.__version__),
    }
    for name, j_np in make_matrices(rng).items():
        k = j_np.shape[0]
        j = torch.from_numpy(j_np)
        res = {
            "J": j_np,
            "upgrad": agg.UPGrad()(j),
            "dualproj": agg.DualProj()(j),
            "imtl_g": agg.IMTLG()(j),
            "aligned_mtl": agg.AlignedMTL()(j),
            "sum": agg.Sum()(j),
            "mean": agg.Mean()(j),
            "mgda_torchjd": agg.MGDA()(j),
            "mgda_exact": exact_min_norm(j_np),
            "nash_mtl_torchjd": agg.NashMTL(n_tasks=k, max_norm=0.0)(j),
        }
        for c in CAGRAD_CS:
            res[f"cagrad_c{c}"] = agg.CAGrad(c=c)(j)

        res["pcgrad"], perms = _recording("randperm", agg.PCGrad(), j)
        res["pcgrad_perms"] = torch.stack(perms).numpy()

        state = torch.get_rng_state()
        res["graddrop"], (uniform,) = _recording("rand", agg.GradDrop(), j)
        res["graddrop_uniform"] = uniform.numpy()
        after = torch.get_rng_state()
        torch.set_rng_state(state)  # the same draws again, then the sequence as without it
        res["graddrop_square"], (again,) = _recording("rand", agg.GradDrop(f=torch.square), j)
        torch.set_rng_state(after)
        assert torch.equal(again, uniform), "GradDrop(f) must reuse the draws"

        _store(out, name, res)
        print(f"{name}: K={k}")

    # Entries already in the file are kept bit for bit: the file was first written with
    # another NumPy build, and a fresh run here differs from it by about one ulp in some
    # entries (63 of 218, e.g. 5.6e-17 in K2_opposed/J). --fresh rewrites everything.
    if OUT_FILE.exists() and "--fresh" not in sys.argv:
        with np.load(OUT_FILE) as kept:
            out.update({key: kept[key] for key in kept.files if key in out})

    # Issue 12, after everything above: the same (stored) matrices, their own seeds.
    torch.manual_seed(12)
    rng12 = np.random.default_rng(12)
    for name in make_matrices(np.random.default_rng(20250611)):
        _store(out, name, stateless_issue_12(out[f"{name}/J"], rng12))
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT_FILE, **out)
    print(f"wrote {OUT_FILE} ({OUT_FILE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
