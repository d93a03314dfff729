"""Golden sequences for the stateful aggregators, produced by TorchJD 0.18 (issue 12).

Like ``scripts/make_golden_torchjd.py``, this runs in its own venv with torch and
torchjd; the library and its tests only read the file it writes,
``tests/golden/torchjd_stateful.npz``::

    /tmp/venv-torch/bin/python scripts/make_golden_torchjd_stateful.py

The state is what these methods are about, so every case is a SEQUENCE of
``STEPS`` steps fed to one TorchJD object (its state carried from step to
step). For each K in {2, 3, 5}, under keys ``"K<k>/<name>"``:

* ``J``: (STEPS, K, 24) float64 Jacobians: a slowly drifting set of task
  directions with conflicts (task 0 against the others), norms spread over two
  orders of magnitude, and fresh noise at every step.
* ``J2``: a second (STEPS, K, 24) Jacobian per step, ``J`` plus independent
  noise: the "second mini-batch" of the two-batch methods.
* ``gradvac`` (STEPS, 24): ``GradVac()`` on ``J``; ``gradvac_perms``
  (STEPS, K, K - 1): the ``torch.randperm(K - 1)`` draws it made (row i: the
  order of the other tasks, in increasing task order, for task i), recorded by
  wrapping ``torch.randperm``; ``gradvac_phi`` (K, K): its EMA targets after the
  last step.
* ``pcd`` (STEPS, 24): ``PCD()`` on ``J``.
* ``cr_mogm_upgrad``, ``cr_mogm_imtl_g`` (STEPS, 24):
  ``GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))`` (and
  IMTL-G) on ``J``.
* ``excess_mtl`` (STEPS, 24): ``ExcessMTL()`` on ``J``; ``excess_mtl_warmup2``:
  ``ExcessMTL(n_warmup_steps=2)``.
* ``modo_weights``, ``sdmgrad_weights`` (STEPS, K): ``MoDoWeighting()`` and
  ``SDMGradWeighting()`` applied to ``J @ J2.T`` at every step (the weights;
  how a step turns them into an update is the caller's choice in TorchJD).

Randomness: NumPy ``default_rng(20261203)`` for the matrices, ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import numpy as np
import torch
from torchjd import aggregation as agg

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden"
OUT_FILE = OUT / "torchjd_stateful.npz"
COLUMNS = 24
STEPS = 5
KS = (2, 3, 5)


def make_sequence(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(STEPS, K, 24) Jacobians and their second-batch counterparts."""
    base = rng.normal(size=COLUMNS)
    base /= np.linalg.norm(base)
    # Task 0 along base, the others partly against it, each with its own direction.
    dirs = -rng.uniform(0.2, 1.0, size=(k, 1)) * base + 0.5 * rng.normal(size=(k, COLUMNS)) / 5
    dirs[0] = base + 0.1 * rng.normal(size=COLUMNS) / 5
    norms = 10 ** rng.uniform(-1, 1, size=(k, 1))
    jacs, jacs2 = [], []
    for _ in range(STEPS):
        dirs = dirs + 0.15 * rng.normal(size=dirs.shape) / np.sqrt(COLUMNS)  # drift
        rows = dirs + 0.25 * rng.normal(size=dirs.shape) / np.sqrt(COLUMNS)  # step noise
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        j = rows * norms * 10 ** (0.2 * rng.normal(size=(k, 1)))
        noise = 0.3 * rng.normal(size=j.shape) / np.sqrt(COLUMNS)
        jacs.append(j)
        jacs2.append(j + noise * np.linalg.norm(j, axis=1, keepdims=True))
    return np.stack(jacs), np.stack(jacs2)


class _Recorder:
    """Wraps a torch sampling function and keeps what it returned."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append(out.clone())
        return out


def _sequence(aggregator, jacs: np.ndarray) -> np.ndarray:
    return np.stack([aggregator(torch.from_numpy(j)).detach().numpy() for j in jacs])


def _gradvac(jacs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = jacs.shape[1]
    aggregator = agg.GradVac()
    saved = torch.randperm
    outs, perms = [], []
    try:
        for j in jacs:
            recorder = _Recorder(saved)
            torch.randperm = recorder
            outs.append(aggregator(torch.from_numpy(j)).detach().numpy())
            torch.randperm = saved
            assert len(recorder.calls) == k
            perms.append(torch.stack(recorder.calls).numpy())
    finally:
        torch.randperm = saved
    phi = aggregator.gramian_weighting._phi_t.numpy().copy()
    return np.stack(outs), np.stack(perms), phi


def _weights_sequence(weighting, jacs: np.ndarray, jacs2: np.ndarray) -> np.ndarray:
    out = []
    for j1, j2 in zip(jacs, jacs2, strict=True):
        a = torch.from_numpy(j1) @ torch.from_numpy(j2).T
        out.append(weighting(a).detach().numpy().copy())
    return np.stack(out)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(20261203)
    out: dict[str, np.ndarray] = {
        "meta/torchjd_version": np.array(importlib.metadata.version("torchjd")),
        "meta/torch_version": np.array(torch.__version__),
        "meta/steps": np.array(STEPS),
    }
    for k in KS:
        jacs, jacs2 = make_sequence(rng, k)
        res: dict[str, np.ndarray] = {"J": jacs, "J2": jacs2}
        res["gradvac"], res["gradvac_perms"], res["gradvac_phi"] = _gradvac(jacs)
        res["pcd"] = _sequence(agg.PCD(), jacs)
        res["cr_mogm_upgrad"] = _sequence(
            agg.GramianWeightedAggregator(agg.CRMOGMWeighting(agg.UPGradWeighting())), jacs
        )
        res["cr_mogm_imtl_g"] = _sequence(
            agg.GramianWeightedAggregator(agg.CRMOGMWeighting(agg.IMTLGWeighting())), jacs
        )
        res["excess_mtl"] = _sequence(agg.ExcessMTL(), jacs)
        res["excess_mtl_warmup2"] = _sequence(agg.ExcessMTL(n_warmup_steps=2), jacs)
        res["modo_weights"] = _weights_sequence(agg.MoDoWeighting(), jacs, jacs2)
        res["sdmgrad_weights"] = _weights_sequence(agg.SDMGradWeighting(), jacs, jacs2)
        for key, value in res.items():
            out[f"K{k}/{key}"] = np.asarray(value)
        print(f"K={k}: " + ", ".join(f"{key} {np.shape(v)}" for key, v in res.items()))
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT_FILE, **out)
    print(f"wrote {OUT_FILE} ({OUT_FILE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
