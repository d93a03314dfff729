"""Prints the README's method table from the registries (issue 12).

Every row comes from ``samgs_optax.AGGREGATOR_SPECS`` (name, family, reference,
TorchJD class, the recipe's scale-by-K rule) or ``samgs_optax.scalarizers.SCALARIZER_SPECS``
(name, reference, TorchJD class), plus the measured agreement recorded in :data:`MEASURED`
below. ``tests/test_method_table.py`` asserts that README.md contains this script's output
verbatim (and docs/aggregators.md the aggregator rows), so after registering a method or
changing a spec, run::

    .venv/bin/python scripts/method_table.py                 # the README's table
    .venv/bin/python scripts/method_table.py --aggregators   # docs/aggregators.md's intro

and paste the output in place of the old table.
"""

from __future__ import annotations

import argparse

from samgs_optax.aggregators import AGGREGATOR_SPECS
from samgs_optax.scalarizers import SCALARIZER_SPECS

# Worst relative error of ours against the reference, "float32 / float64", with what the
# reference is when it is not TorchJD 0.18's class of the same row. NOT re-measured here:
# copied from where each measurement is recorded. Aggregator keys are the registry names,
# scalarizer keys are "scalarizers.NAME" (``constant`` is both).
MEASURED: dict[str, str] = {
    # tests/test_samgs_reference.py against tests/numpy_reference.py, measured by
    # `scripts/reference_agreement.py` (README, "Tests").
    "samgs": "1.1e-06 / 1.2e-14 vs `tests/numpy_reference.py` (NumPy transcription)",
    # docs/aggregators.md, "Agreement with TorchJD 0.18": `python tests/test_aggregators_golden.py`
    # and `--x64`, ||u - u_TorchJD|| / ||u_TorchJD|| over 12 Jacobians, K = 2..10.
    "linear_scalarization": '9.2e-08 / 1.3e-16 (`Mean` with `reduction="mean"`)',
    "pcgrad": "1.8e-07 / 4.5e-16 (TorchJD's task orders replayed)",
    "mgda": "1.2e-06 / 3.9e-15 vs the exact min-norm point (NumPy face enumeration); "
    "TorchJD's Frank-Wolfe `MGDA()` stops up to 5.4e-01 from it",
    "cagrad": "2.2e-04 / 2.2e-04: TorchJD's cvxpy solve stops short (ours has the larger "
    "worst-task gain and a zero duality gap)",
    "imtl_g": "5.9e-06 / 1.1e-14",
    "aligned_mtl": "4.3e-06 / 7.2e-14",
    # docs/aggregators.md (same section); the precision of that comparison is not stated there.
    "nash_mtl": "1.3e-06 vs one step of `NashMTL(K, max_norm=0)` (its CCP) on 11 of 12 "
    "matrices; ECOS failed on the 12th",
    "upgrad": "5.4e-07 / 2.1e-15",
    "dualproj": "3.4e-07 / 2.0e-15",
    "graddrop": "4.5e-08 / 0 (TorchJD's uniform draws replayed)",
    # tests/test_aggregators_stateful.py's header comment (docs/aggregators.md, "Agreement with
    # TorchJD 0.18, over sequences of steps"): 5 steps x K in {2, 3, 5}, state carried.
    "gradvac": "2.9e-07 / 5.9e-16 over 15 steps (TorchJD's task orders replayed)",
    "pcd": "4.4e-07 / 1.3e-15 over 15 steps",
    "cr_mogm": "2.1e-06 / 8.1e-15 over 15 steps (over IMTL-G; 2.7e-07 / 8.8e-16 over UPGrad)",
    "excess_mtl": "4.7e-07 / 1.3e-15 over 15 steps",
    "modo": "9.9e-07 / 2.1e-15 over 15 steps (2 batches)",
    "sdmgrad": "2.7e-07 / 9.4e-16 over 15 steps (2 batches)",
    # tests/test_aggregators_golden.py's RTOL_12 comment (docs/aggregators.md, stateless part).
    "constant": "9.7e-08 / 1.3e-16",
    "random_weighting": "1.3e-07 / 2.1e-16 (TorchJD's draws replayed)",
    "trimmed_mean": "9.1e-08 / 1.4e-16",
    "krum": "7.3e-08 / 0 (one closest-pair tie aside)",
    "con_fig": "1.1e-05 / 1.8e-14",
    "fairgrad": "2.7e-06 / 3.1e-08: TorchJD's SciPy least squares stops at residual 1.5e-08, "
    "ours at 1.4e-14 (`alpha=0`: 8.0e-08 / 1.2e-16)",
    # tests/test_moco_db_mtl.py's header comment (docs/aggregators.md, "MoCo and DB-MTL"):
    # 6 steps x 3 sequences x K in {2, 3, 5}, state carried, vs a float64 NumPy transcription.
    "moco": "7.5e-07 / 8.8e-16 vs a NumPy transcription of LibMTL's `MoCo` (incl. the paper's "
    "projection form), 6 steps",
    "db_mtl": "5.5e-07 / 2.8e-15 vs a NumPy transcription of LibMTL's `DB_MTL`, 6 steps",
    # tests/test_gradnorm.py's header comment (docs/aggregators.md, "GradNorm, from LibMTL"):
    # 6 steps x 3 sequences x K in {2, 3, 5}, Adam and SGD on the logits, vs float64 NumPy.
    "gradnorm": "1.1e-06 / 4.9e-16 vs a NumPy transcription of LibMTL's `GradNorm` (Adam and "
    "SGD on the weights), 6 steps",
    # docs/scalarizers.md's table (`python tests/test_scalarizers_golden.py`):
    # max|ours - TorchJD| / max|TorchJD| over totals, weights and internal updates, K = 2, 5.
    "scalarizers.mean": "3.6e-08 / 1.2e-16",
    "scalarizers.sum": "1.2e-07 / 5.8e-18",
    "scalarizers.constant": "4.8e-08 / 2.0e-16",
    "scalarizers.random": "1.1e-07 / 2.4e-16 (TorchJD's draws replayed)",
    # tests/test_scalarizers.py::test_scale_invariant_matches_numpy: no measured figure is
    # recorded, only the test's required tolerances.
    "scalarizers.scale_invariant": "vs a NumPy transcription, within 1e-6 / 1e-14 "
    "(the test's tolerance)",
    "scalarizers.geometric_mean": "1.3e-07 / 3.3e-16",
    "scalarizers.uw": "1.4e-07 / 1.8e-16",
    # window form: tests/test_scalarizers_dwa_window.py's tolerances (no measured figure).
    "scalarizers.dwa": "1.0e-07 / 4.1e-16; `window=W` vs a NumPy transcription of the "
    "authors' trainer, within 1e-6 / 1e-13 (the test's tolerance)",
    "scalarizers.famo": "8.4e-06 / 5.0e-16",
    "scalarizers.imtl_l": "1.7e-07 / 2.9e-16",
    "scalarizers.stch": "8.7e-08 / 2.3e-16",
    "scalarizers.pbi": "1.4e-07 / 3.5e-16 (TorchJD's preferences replayed)",
    "scalarizers.cosmos": "1.6e-07 / 4.7e-16 (TorchJD's preferences replayed)",
}

HEADER = (
    "| method | family | reference | TorchJD 0.18 | × K in `recipe` "
    "| measured agreement: worst relative error, float32 / float64 |\n"
    "|---|---|---|---|---|---|"
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _scales(spec) -> str:
    if callable(spec.scale_by_tasks):  # an option changes the output's size: the default's
        return f"{'yes' if spec.scales() else 'no'} (by default; option-dependent)"
    return "yes" if spec.scale_by_tasks else "no"


def aggregator_rows() -> list[str]:
    rows = []
    for spec in AGGREGATOR_SPECS:
        torchjd = f"`{spec.torchjd}`" if spec.torchjd else "none"
        rows.append(
            f"| `{spec.name}` | {spec.family} | {_cell(spec.reference)} | {torchjd} "
            f"| {_scales(spec)} | {_cell(MEASURED[spec.name])} |"
        )
    return rows


def scalarizer_rows() -> list[str]:
    rows = []
    for spec in SCALARIZER_SPECS:
        torchjd = f"`{spec.torchjd}`" if spec.torchjd else "none"
        key = f"scalarizers.{spec.name}"
        rows.append(
            f"| `{key}` | loss scalarizer | {_cell(spec.paper)} | {torchjd} "
            f"| — (one backward pass) | {_cell(MEASURED[key])} |"
        )
    return rows


def method_table(*, scalarizers: bool = True) -> str:
    """The Markdown table: every aggregator, then (by default) every loss scalarizer."""
    rows = aggregator_rows() + (scalarizer_rows() if scalarizers else [])
    return "\n".join([HEADER, *rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--aggregators", action="store_true", help="only the gradient aggregators' rows"
    )
    args = parser.parse_args()
    print(method_table(scalarizers=not args.aggregators), end="")


if __name__ == "__main__":
    main()
