"""Golden sequences for the loss scalarizers, produced by TorchJD 0.18 (run in its own venv).

torch and torchjd are NOT dependencies of samgs_optax or of its tests: the
tests (``tests/test_scalarizers_golden.py``) only read the file this script
writes, ``tests/golden/torchjd_scalarizers.npz``. Regenerate it with::

    /path/to/venv-with-torchjd/bin/python scripts/make_golden_torchjd_scalarizers.py

(torch 2.13 CPU and torchjd 0.18.0, as for ``scripts/make_golden_torchjd.py``).

Everything is float64. For K in {2, 5} (keys ``"K<k>/..."``), T = 6 steps:

* ``losses`` (T, K): positive losses, log-uniform over [1e-2, 1e1];
  ``new_losses`` (T, K): the same after a pretend model step (x e^u,
  u ~ U[-0.4, 0.1]), for FAMO's ``update``.
* For each scalarizer and option set ``<m>``: ``<m>/total`` (T,) the
  scalarizer's value on ``losses[t]`` and ``<m>/weights`` (T, K) its gradient
  with respect to the losses (``torch.autograd.grad``), plus:

  - ``constant/w``: the constant weights (any sign).
  - ``random/noise`` (T, K): the draws of ``torch.randn`` inside
    ``Random.forward``, recorded by wrapping ``torch.randn``.
  - ``uw/log_var`` and ``imtl_l/log_scale`` (T, K): the parameter before step
    t, ``uw/grad``, ``imtl_l/grad`` (T, K): the scalar's gradient with respect
    to it; between steps ``torch.optim.SGD`` (lr ``UW_LR``, ``IMTLL_LR``) steps
    the parameter alone with that gradient.
  - ``famo_<cfg>/logits`` (T, K): FAMO's logits after ``update(new_losses[t])``
    that follows ``forward(losses[t])``; ``famo_custom`` uses ``min_losses``
    ``famo_custom/min_losses``, lr 0.1, weight_decay 1e-2.
  - DWA (``dwa_T<temperature>``): ``dwa_losses`` (E, B, K), E = 5 epochs of B =
    3 batches, each task decreasing at its own rate; ``total`` (E, B),
    ``weights`` (E, B, K), ``average`` (E, K) the epoch's average after its
    ``step()``. After epoch 1 ``step()`` is called a second time (a no-op).
  - ``stch_<cfg>``, ``pbi_<cfg>``, ``cosmos_<cfg>``: ``<cfg>/preference``
    (T, K) drawn per step from ``torch.distributions.Dirichlet(ones(K))`` and
    assigned to the scalarizer's ``weights`` before the call, as TorchJD's
    documentation suggests (``stch_uniform``: weights None);
    ``<cfg>/reference`` (K,) where one is used.

No TorchJD class exists for the SAM-GS authors' scale-invariant loss; the test
checks it against a NumPy transcription instead.

Randomness: NumPy ``default_rng(20261203)``, ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import numpy as np
import torch
from torchjd import scalarization as sc

OUT_FILE = pathlib.Path(__file__).resolve().parent.parent / "tests/golden/torchjd_scalarizers.npz"
STEPS = 6
EPOCHS, BATCHES = 5, 3
UW_LR, IMTLL_LR = 0.5, 0.1
DWA_TEMPERATURES = (2.0, 0.5)


def _value_and_weights(scalarizer, losses: np.ndarray) -> tuple[float, np.ndarray]:
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    total = scalarizer(values)
    (weights,) = torch.autograd.grad(total, values)
    return float(total.detach()), weights.numpy().copy()


def _sequence(make, losses: np.ndarray, prefs: np.ndarray | None = None) -> dict:
    """Totals and weights of a stateless scalarizer over the steps, with per-step preferences."""
    totals, weights = [], []
    for t, row in enumerate(losses):
        scalarizer = make(None if prefs is None else torch.tensor(prefs[t]))
        total, w = _value_and_weights(scalarizer, row)
        totals.append(total)
        weights.append(w)
    return {"total": np.array(totals), "weights": np.stack(weights)}


class _Recorder:
    def __init__(self, fn):
        self.fn = fn
        self.calls: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append(out.detach().clone())
        return out


def _random(losses: np.ndarray) -> dict:
    saved = torch.randn
    recorder = _Recorder(saved)
    torch.randn = recorder
    try:
        res = _sequence(lambda _: sc.Random(), losses)
    finally:
        torch.randn = saved
    res["noise"] = np.stack([c.numpy() for c in recorder.calls])
    return res


def _learned(scalarizer, param: torch.nn.Parameter, lr: float, losses: np.ndarray) -> dict:
    """Steps the scalarizer's own parameter by SGD on the scalar; records everything."""
    optimizer = torch.optim.SGD([param], lr=lr)
    before, totals, weights, grads = [], [], [], []
    for row in losses:
        before.append(param.detach().numpy().copy())
        values = torch.tensor(row, dtype=torch.float64, requires_grad=True)
        total = scalarizer(values)
        w, g = torch.autograd.grad(total, [values, param])
        totals.append(float(total.detach()))
        weights.append(w.numpy().copy())
        grads.append(g.numpy().copy())
        optimizer.zero_grad()
        param.grad = g
        optimizer.step()
    return {
        "param": np.stack(before),
        "total": np.array(totals),
        "weights": np.stack(weights),
        "grad": np.stack(grads),
    }


def _famo(famo: sc.FAMO, losses: np.ndarray, new_losses: np.ndarray) -> dict:
    totals, weights, logits = [], [], []
    for row, new in zip(losses, new_losses, strict=True):
        total, w = _value_and_weights(famo, row)
        famo.update(torch.tensor(new, dtype=torch.float64))
        totals.append(total)
        weights.append(w)
        logits.append(famo._w.detach().numpy().copy())
    return {"total": np.array(totals), "weights": np.stack(weights), "logits": np.stack(logits)}


def _dwa(temperature: float, epochs: np.ndarray) -> dict:
    dwa = sc.DWA(temperature)
    totals, weights, averages = [], [], []
    for e, batches in enumerate(epochs):
        for row in batches:
            total, w = _value_and_weights(dwa, row)
            totals.append(total)
            weights.append(w)
        dwa.step()
        if e == 1:
            dwa.step()  # no call since the last step(): nothing changes
        averages.append(dwa._previous_averages[-1].numpy().copy())
    shape = (*epochs.shape[:2],)
    return {
        "total": np.array(totals).reshape(shape),
        "weights": np.stack(weights).reshape(*shape, -1),
        "average": np.stack(averages),
    }


def _dirichlet(k: int) -> np.ndarray:
    dist = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64))
    return np.stack([dist.sample().numpy() for _ in range(STEPS)])


def _case(k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every entry for one K."""
    res: dict[str, np.ndarray] = {}
    losses = 10 ** rng.uniform(-2, 1, size=(STEPS, k))
    new_losses = losses * np.exp(rng.uniform(-0.4, 0.1, size=(STEPS, k)))
    res["losses"], res["new_losses"] = losses, new_losses

    def put(prefix: str, entries: dict) -> None:
        for name, value in entries.items():
            res[f"{prefix}/{name}"] = np.asarray(value)

    put("mean", _sequence(lambda _: sc.Mean(), losses))
    put("sum", _sequence(lambda _: sc.Sum(), losses))
    w_const = rng.normal(size=k)
    put("constant", _sequence(lambda _: sc.Constant(torch.tensor(w_const)), losses))
    res["constant/w"] = w_const
    put("geometric_mean", _sequence(lambda _: sc.GeometricMean(), losses))
    put("random", _random(losses))

    uw = sc.UW(k).double()
    seq = _learned(uw, uw.log_var, UW_LR, losses)
    seq["log_var"] = seq.pop("param")
    put("uw", seq)
    imtl = sc.IMTLL(k).double()
    seq = _learned(imtl, imtl.log_scale, IMTLL_LR, losses)
    seq["log_scale"] = seq.pop("param")
    put("imtl_l", seq)

    put("famo_default", _famo(sc.FAMO(k).double(), losses, new_losses))
    bounds = 0.5 * np.minimum(losses.min(axis=0), new_losses.min(axis=0))
    famo = sc.FAMO(k, min_losses=torch.tensor(bounds), lr=0.1, weight_decay=1e-2).double()
    put("famo_custom", _famo(famo, losses, new_losses))
    res["famo_custom/min_losses"] = bounds

    rates = rng.uniform(0.3, 0.9, size=k)
    start = 10 ** rng.uniform(-1, 1, size=k)
    steps = np.arange(EPOCHS * BATCHES).reshape(EPOCHS, BATCHES, 1)
    noise = np.exp(rng.uniform(-0.2, 0.2, size=(EPOCHS, BATCHES, k)))
    dwa_losses = start * rates ** (steps / BATCHES) * noise
    res["dwa_losses"] = dwa_losses
    for temperature in DWA_TEMPERATURES:
        put(f"dwa_T{temperature}", _dwa(temperature, dwa_losses))

    reference = 0.5 * losses.min(axis=0)
    put("stch_uniform", _sequence(lambda _: sc.STCH(0.1), losses))
    prefs = _dirichlet(k)
    put(
        "stch_pref",
        _sequence(lambda p: sc.STCH(1.0, p, torch.tensor(reference)), losses, prefs),
    )
    res["stch_pref/preference"], res["stch_pref/reference"] = prefs, reference

    prefs = _dirichlet(k)
    put("pbi_ref", _sequence(lambda p: sc.PBI(5.0, p, torch.tensor(reference)), losses, prefs))
    res["pbi_ref/preference"], res["pbi_ref/reference"] = prefs, reference
    prefs = _dirichlet(k)
    put("pbi_origin", _sequence(lambda p: sc.PBI(2.0, p), losses, prefs))
    res["pbi_origin/preference"] = prefs

    for lam in (2.0, 0.5):
        prefs = _dirichlet(k)
        put(f"cosmos_L{lam}", _sequence(lambda p, lam=lam: sc.COSMOS(lam, p), losses, prefs))
        res[f"cosmos_L{lam}/preference"] = prefs
    return res


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(20261203)
    out: dict[str, np.ndarray] = {
        "meta/torchjd_version": np.array(importlib.metadata.version("torchjd")),
        "meta/torch_version": np.array(torch.__version__),
    }
    for k in (2, 5):
        for name, value in _case(k, rng).items():
            out[f"K{k}/{name}"] = value
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT_FILE, **out)
    print(f"wrote {OUT_FILE} ({len(out)} arrays)")


if __name__ == "__main__":
    main()
