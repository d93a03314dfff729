"""Prints how closely samgs_optax.samgs follows the NumPy transcription of SPEC.

For each case of tests/test_samgs_reference.py (40 random steps whose task
magnitudes alternate between similar and eight orders of magnitude apart) it
prints the largest relative error of the update, of the per-task moments m and
of h, and the largest absolute error of Psi, over the whole run.

Run: .venv/bin/python scripts/reference_agreement.py
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from test_samgs_reference import CASES, compare_with_reference  # noqa: E402


def main() -> None:
    print(
        f"{'K':>3} {'similarity':>10} {'dtype':>8} {'tol':>7}  {'update':>9} {'m':>9} "
        f"{'h':>9} {'Psi':>9}  branches  switches"
    )
    for k, similarity, dtype, tol in CASES:
        errors, mismatch, branches = compare_with_reference(k, similarity, dtype)
        switches = sum(a != b for a, b in zip(branches[:-1], branches[1:], strict=True))
        print(
            f"{k:>3} {similarity:>10} {dtype.__name__:>8} {tol:>7.0e}  "
            + " ".join(f"{errors[key]:9.1e}" for key in ("update", "m", "h", "psi"))
            + f"  {'MISMATCH' if mismatch else 'agree':>8}  {switches:>3}"
            + f" ({sum(branches)} equalised)"
        )


if __name__ == "__main__":
    main()
