"""The scalarizers against TorchJD 0.18 golden sequences (``tests/golden/torchjd_scalarizers.npz``).

The file is written by ``scripts/make_golden_torchjd_scalarizers.py`` in a
separate venv with torch and torchjd; these tests only read it. Every sequence
(totals, weights = d total / d losses, and the internal updates: UW's and
IMTL-L's parameter gradients under SGD, FAMO's logits after ``update``, DWA's
epoch averages) is replayed in one ``lax.scan`` under ``jit``, in float32 and
in float64; TorchJD's random draws (``torch.randn`` of ``Random``, the Dirichlet
preferences) are fed through ``noise=`` / ``preference=``.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from samgs_optax import scalarizers as S

GOLDEN = pathlib.Path(__file__).parent / "golden" / "torchjd_scalarizers.npz"
UW_LR, IMTLL_LR = 0.5, 0.1  # as in the script
KS = (2, 5)

# Worst relative error max|ours - torchjd| / max|torchjd| over every quantity, K and
# option set of a method. Measured (one run, docs/scalarizers.md's table): float32 at most
# 1.7e-7 (FAMO 8.4e-6: its logit step divides by sqrt(v) of gradients made of differences
# of logarithms of nearby losses), float64 at most 5e-16.
RTOL = {np.float32: 1e-6, np.float64: 1e-14}
RTOL_FAMO_F32 = 5e-5


@pytest.fixture(scope="module")
def golden():
    data = np.load(GOLDEN)
    assert str(data["meta/torchjd_version"]).startswith("0.18")
    return data


def _case(golden, k: int, dtype) -> dict[str, np.ndarray]:
    prefix = f"K{k}/"
    return {
        name[len(prefix) :]: np.asarray(golden[name], dtype)
        for name in golden.files
        if name.startswith(prefix)
    }


def _scan(step, state, xs):
    return jax.jit(lambda s, x: jax.lax.scan(step, s, x))(state, xs)


def _stateless(sc, losses, extra_name=None, extra=None):
    """Totals and weights of ``sc`` over the steps (``extra_name=extra[t]`` per step)."""

    def step(state, x):
        loss, e = x
        kwargs = {} if extra_name is None else {extra_name: e}
        total, (weights, state) = sc.scalarize(loss, state, **kwargs)
        return state, (total, weights)

    _, (total, weights) = _scan(step, sc.init(losses[0]), (losses, extra))
    return {"total": total, "weights": weights}


def _learned(sc, field: str, lr: float, losses):
    """SGD on the scalarizer's own parameter, as the script does with torch.optim.SGD."""

    def step(state, loss):
        def f(st):
            total, (weights, _) = sc.scalarize(loss, st)
            return total, weights

        (total, weights), grad = jax.value_and_grad(f, has_aux=True)(state)
        new = jax.tree.map(lambda p, g: p - lr * g, state, grad)
        return new, (getattr(state, field), total, weights, getattr(grad, field))

    _, (param, total, weights, grad) = _scan(step, sc.init(losses[0]), losses)
    return {field: param, "total": total, "weights": weights, "grad": grad}


def _famo(sc, losses, new_losses):
    def step(state, x):
        loss, new = x
        total, (weights, state) = sc.scalarize(loss, state)
        state = sc.update(state, new)
        return state, (total, weights, state.logits)

    _, (total, weights, logits) = _scan(step, sc.init(losses[0]), (losses, new_losses))
    return {"total": total, "weights": weights, "logits": logits}


def _dwa(sc, epochs):
    @jax.jit
    def run(state, epochs):
        totals, weights, averages = [], [], []
        for e in range(epochs.shape[0]):

            def batch(st, loss):
                total, (w, st) = sc.scalarize(loss, st)
                return st, (total, w)

            state, (t, w) = jax.lax.scan(batch, state, epochs[e])
            state = sc.end_epoch(state)
            if e == 1:
                state = sc.end_epoch(state)  # no call since: a no-op, as TorchJD's step()
            totals.append(t)
            weights.append(w)
            averages.append(state.averages[1])
        return jnp.stack(totals), jnp.stack(weights), jnp.stack(averages)

    total, weights, average = run(sc.init(epochs[0, 0]), epochs)
    return {"total": total, "weights": weights, "average": average}


def _runs(g: dict[str, np.ndarray], k: int) -> dict[str, dict[str, jax.Array]]:
    """Ours, for every golden entry of one K, keyed like the file."""
    losses = g["losses"]
    runs = {
        "mean": _stateless(S.mean(k), losses),
        "sum": _stateless(S.sum(k), losses),
        "constant": _stateless(S.constant(k, weights=g["constant/w"]), losses),
        "geometric_mean": _stateless(S.geometric_mean(k), losses),
        "random": _stateless(S.random(k), losses, "noise", g["random/noise"]),
        "uw": _learned(S.uw(k), "log_var", UW_LR, losses),
        "imtl_l": _learned(S.imtl_l(k), "log_scale", IMTLL_LR, losses),
        "famo_default": _famo(S.famo(k), losses, g["new_losses"]),
        "famo_custom": _famo(
            S.famo(k, min_losses=g["famo_custom/min_losses"], lr=0.1, weight_decay=1e-2),
            losses,
            g["new_losses"],
        ),
        "stch_uniform": _stateless(S.stch(k, mu=0.1), losses),
        "stch_pref": _stateless(
            S.stch(k, mu=1.0, reference=g["stch_pref/reference"]),
            losses,
            "preference",
            g["stch_pref/preference"],
        ),
        "pbi_ref": _stateless(
            S.pbi(k, theta=5.0, reference=g["pbi_ref/reference"]),
            losses,
            "preference",
            g["pbi_ref/preference"],
        ),
        "pbi_origin": _stateless(
            S.pbi(k, theta=2.0), losses, "preference", g["pbi_origin/preference"]
        ),
    }
    for lam in (2.0, 0.5):
        name = f"cosmos_L{lam}"
        runs[name] = _stateless(
            S.cosmos(k, lambda_=lam), losses, "preference", g[f"{name}/preference"]
        )
    for temperature in (2.0, 0.5):
        runs[f"dwa_T{temperature}"] = _dwa(S.dwa(k, temperature=temperature), g["dwa_losses"])
    return runs


def _method(case: str) -> str:
    for name in S.SCALARIZERS:
        if case == name or case.startswith(name + "_") and name != "random":
            return name
    raise AssertionError(case)


@pytest.fixture(scope="module")
def errors(golden):
    return measure(golden)


def measure(golden) -> dict[tuple[str, type], float]:
    """Worst relative error per (method, dtype) over every quantity, K and option set."""
    worst: dict[tuple[str, type], float] = {}
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            for k in KS:
                g = _case(golden, k, dtype)
                for case, outputs in jax.jit(_runs, static_argnums=1)(g, k).items():
                    for quantity, ours in outputs.items():
                        assert np.asarray(ours).dtype == dtype, (case, quantity)
                        ref = np.asarray(golden[f"K{k}/{case}/{quantity}"])
                        err = relative_error(ours, ref)
                        key = (_method(case), dtype)
                        worst[key] = max(worst.get(key, 0.0), err)
    return worst


TORCHJD_METHODS = [spec.name for spec in S.SCALARIZER_SPECS if spec.torchjd]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", TORCHJD_METHODS)
def test_matches_torchjd(errors, method, dtype):
    tol = RTOL_FAMO_F32 if (method == "famo" and dtype == np.float32) else RTOL[dtype]
    assert errors[(method, dtype)] <= tol, errors[(method, dtype)]


def test_report_errors(errors):
    """Prints the measured agreement (``pytest -s``) for docs/scalarizers.md."""
    for method in TORCHJD_METHODS:
        print(
            f"{method:16s} f32 {errors[(method, np.float32)]:.1e}"
            f"  f64 {errors[(method, np.float64)]:.1e}"
        )


def table(errors: dict[tuple[str, type], float] | None = None) -> str:
    """docs/scalarizers.md's table, from the registry (and the measured errors, if given)."""
    lines = [
        "| name | reference | TorchJD 0.18 | state | worst rel. error f32 / f64 |",
        "|---|---|---|---|---|",
    ]
    for spec in S.SCALARIZER_SPECS:
        state = type(spec.factory(3, **spec.example(3)).init()).__name__
        if not spec.torchjd:
            agreement = "NumPy transcription (`tests/test_scalarizers.py`)"
        elif errors is None:
            agreement = "..."
        else:
            f32, f64 = errors[(spec.name, np.float32)], errors[(spec.name, np.float64)]
            agreement = f"{f32:.1e} / {f64:.1e}"
        torchjd = f"`{spec.torchjd}`" if spec.torchjd else "none"
        lines.append(f"| `{spec.name}` | {spec.paper} | {torchjd} | `{state}` | {agreement} |")
    return "\n".join(lines)


if __name__ == "__main__":  # prints the table with freshly measured errors
    print(table(measure(np.load(GOLDEN))))
