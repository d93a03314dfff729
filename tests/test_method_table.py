"""The README's method table is the one ``scripts/method_table.py`` prints from the registries.

So the table can never go stale: registering a method, or changing a spec's family,
reference, TorchJD class or recipe rule, fails here until the script's output is pasted
into README.md (and, for the aggregators, docs/aggregators.md). The measured-agreement
cells come from the script's ``MEASURED`` dict, which must cover every registered name.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from samgs_optax.aggregators import AGGREGATOR_SPECS
from samgs_optax.scalarizers import SCALARIZER_SPECS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("method_table", ROOT / "scripts" / "method_table.py")
method_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(method_table)

AGGREGATOR_NAMES = [spec.name for spec in AGGREGATOR_SPECS]
SCALARIZER_KEYS = [f"scalarizers.{spec.name}" for spec in SCALARIZER_SPECS]
# Allowed families (comma-separated combinations of them).
FAMILIES = {
    "Gramian weighting",
    "projection",
    "random",
    "stateful",
    "coordinate-wise",
    "fixed weights",
    "loss-aware",
}


def test_every_spec_is_filled_in():
    for spec in AGGREGATOR_SPECS:
        assert spec.reference and "\n" not in spec.reference, spec.name
        assert set(spec.family.split(", ")) <= FAMILIES, (spec.name, spec.family)
        assert re.fullmatch(r"[A-Za-z]*", spec.torchjd), (spec.name, spec.torchjd)
    assert set(method_table.MEASURED) == set(AGGREGATOR_NAMES + SCALARIZER_KEYS)


DOCS = [("README.md", True), ("docs/aggregators.md", False)]


@pytest.mark.parametrize("doc, scalarizers", DOCS, ids=["README", "docs"])
def test_doc_contains_the_script_output(doc, scalarizers):
    table = method_table.method_table(scalarizers=scalarizers)
    assert table in (ROOT / doc).read_text(), (
        f"{doc}'s method table is stale: paste the output of "
        f"`python scripts/method_table.py{'' if scalarizers else ' --aggregators'}`"
    )
    names = re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M)
    assert names == AGGREGATOR_NAMES + (SCALARIZER_KEYS if scalarizers else [])


def test_table_states_the_declarations():
    """Each row carries its spec's fields and recipe rule (a check on the script itself)."""
    rows = method_table.aggregator_rows()
    for spec, row in zip(AGGREGATOR_SPECS, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`{spec.name}`"
        assert cells[1] == spec.family and cells[2] == spec.reference
        assert cells[3] == (f"`{spec.torchjd}`" if spec.torchjd else "none")
        assert cells[4].split()[0] == ("yes" if spec.scales() else "no")


SCALARIZERS_DOC = ROOT / "docs" / "scalarizers.md"


def test_scalarizers_doc_table_states_the_registry():
    """docs/scalarizers.md's table: one row per ``SCALARIZER_SPECS`` entry, in order, with
    its reference, TorchJD class, state type and the measured errors the README states."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split(" | ")]
        for line in SCALARIZERS_DOC.read_text().splitlines()
        if re.match(r"^\| `\w+` \|", line)
    ]
    assert [r[0] for r in rows] == [f"`{spec.name}`" for spec in SCALARIZER_SPECS]
    for spec, (_, paper, torchjd, state, error) in zip(SCALARIZER_SPECS, rows, strict=True):
        assert paper == spec.paper, spec.name
        assert torchjd == (f"`{spec.torchjd}`" if spec.torchjd else "none"), spec.name
        init = spec.factory(3, **spec.example(3)).init()
        assert state == f"`{type(init).__name__}`", spec.name
        measured = method_table.MEASURED[f"scalarizers.{spec.name}"]
        if spec.torchjd:  # the README's figures are this table's
            assert measured.startswith(error), (spec.name, error, measured)
        else:
            assert "NumPy transcription" in error and "NumPy transcription" in measured
