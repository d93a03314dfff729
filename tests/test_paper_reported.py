"""examples/paper/reported.py (the paper's Tables 1-3) and examples/paper/table.py (tables of runs).

The paper's rows are checked against themselves: the STL rows against the authors' baselines
in metrics.py, each printed Delta m% against Eq. 4 of the row's own printed metrics. The
table script is checked on generated results.json files against NumPy written out here.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import load_paper_module

metrics = load_paper_module("metrics")
reported = load_paper_module("reported")
table = load_paper_module("table")

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "paper_benchmarks.md"
BASES = {
    "nyuv2": (metrics.NYUV2_COLUMNS, metrics.NYUV2_STL_BASE, metrics.NYUV2_HIGHER_IS_BETTER),
    "cityscapes": (
        metrics.CITYSCAPES_COLUMNS,
        metrics.CITYSCAPES_STL_BASE,
        metrics.CITYSCAPES_HIGHER_IS_BETTER,
    ),
}


@pytest.mark.parametrize("dataset", ["nyuv2", "cityscapes"])
def test_stl_rows_are_the_authors_baselines(dataset):
    columns, base, _ = BASES[dataset]
    stl = reported.paper_row(dataset, "stl")
    assert tuple(stl["metrics"]) == columns
    np.testing.assert_allclose(list(stl["metrics"].values()), base, rtol=1e-12)


@pytest.mark.parametrize("dataset", ["nyuv2", "cityscapes"])
def test_printed_delta_m_is_eq4_of_the_printed_row(dataset):
    """Eq. 4 written out with NumPy from each printed row gives its printed Delta m% to the
    rounding of the table (0.15), except the rows listed as inconsistent, which are off."""
    columns, base, higher = BASES[dataset]
    sign = np.where(higher, -1.0, 1.0)
    rows = reported.TABLES[dataset].rows
    for label in rows:
        if label == "STL":
            continue
        row = reported.paper_row(dataset, reported.METHOD_NAMES[label])
        values = np.array([row["metrics"][c] for c in columns])
        eq4 = 100 * np.mean(sign * (values - np.array(base)) / np.array(base))
        off = abs(eq4 - row["delta_m"])
        assert metrics.delta_m_against_authors(dataset, row["metrics"]) == pytest.approx(eq4)
        if (dataset, label) in reported.INCONSISTENT_DELTA_M:
            assert off > 0.15, (label, eq4, row["delta_m"])
        else:
            assert off <= 0.15, (label, eq4, row["delta_m"])


def test_paper_row_lookup():
    assert reported.paper_row("celeba", "samgs")["delta_m"] == 3.33
    assert reported.paper_row("celeba", "gradnorm") is None  # not in Table 3
    assert reported.paper_row("nyuv2", "upgrad") is None  # not compared in the paper
    samgs = reported.paper_row("nyuv2", "samgs")
    assert samgs["mean_rank"] == 2.4 and samgs["metrics"]["within_30"] == pytest.approx(0.6878)


def _run(tmp_path, i, dataset, method, values, **extra):
    path = tmp_path / f"run{i}" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"dataset": dataset, "method": method, **values, **extra}))
    return path


def test_table_means_delta_m_and_mean_rank(tmp_path):
    """Three methods, two seeds each, and single-task runs of both tasks (CityScapes)."""
    rng = np.random.default_rng(0)
    columns, base, higher = BASES["cityscapes"]
    runs = {m: rng.uniform(0.5, 1.5, size=(2, 4)) * base for m in ("samgs", "mgda", "ls")}
    i = 0
    for method, seeds in runs.items():
        for seed in seeds:
            metrics_ = dict(zip(columns, seed.tolist(), strict=True))
            _run(tmp_path, i, "cityscapes", method, {"metrics": metrics_})
            i += 1
    stl = rng.uniform(0.5, 1.5, size=4) * base
    for task, cols in (("segmentation", slice(0, 2)), ("depth", slice(2, 4))):
        values = dict(zip(columns[cols], stl[cols].tolist(), strict=True))
        _run(tmp_path, i, "cityscapes", "stl", {"metrics": values}, task=task)
        i += 1
    (summary,) = table.main([str(tmp_path), "--json"])
    assert summary["stl_runs"] == 2 and summary["columns"] == list(columns)

    means = {m: v.mean(axis=0) for m, v in runs.items()}
    sign = np.where(higher, -1.0, 1.0)
    # Ranks per column by hand: sort the methods' signed values, 1 = best (no ties here).
    names = list(means)
    signed = np.array([sign * means[m] for m in names])
    ranks = np.argsort(np.argsort(signed, axis=0), axis=0) + 1.0
    want_mr = dict(zip(names, ranks.mean(axis=1), strict=True))
    rows = {r["method"]: r for r in summary["rows"]}
    assert [r["mean_rank"] for r in summary["rows"]] == sorted(want_mr.values())
    for method, mean in means.items():
        row = rows[method]
        assert row["runs"] == 2
        np.testing.assert_allclose(row["values"], mean, rtol=1e-12)
        want = 100 * np.mean(sign * (mean - np.array(base)) / np.array(base))
        assert row["delta_m"] == pytest.approx(want)
        assert row["delta_m_stl"] == pytest.approx(100 * np.mean(sign * (mean - stl) / stl))
        assert row["mean_rank"] == pytest.approx(want_mr[method])
    assert rows["samgs"]["paper_delta_m"] == 6.41 and rows["samgs"]["paper_mean_rank"] == 5.0
    text = table.markdown(summary)
    assert text.splitlines()[0].startswith("| method | runs | mean_iou |")
    assert len(text.splitlines()) == 2 + 3


def test_table_celeba_delta_m_against_single_task_runs(tmp_path):
    """CelebA: per-attribute F1 columns; Delta m only when every attribute has an STL run."""
    f1 = {"samgs": {"a": 0.8, "b": 0.4}, "ls": {"a": 0.6, "b": 0.5}}
    for i, (method, per) in enumerate(f1.items()):
        _run(tmp_path, i, "celeba", method, {"metrics": {"f1_mean": 0.0}, "f1": per})
    (summary,) = table.main([str(tmp_path), "--json"])
    assert all(r["delta_m_stl"] is None and r["delta_m"] is None for r in summary["rows"])
    _run(tmp_path, 5, "celeba", "stl", {"metrics": {"f1_mean": 0.7}, "f1": {"a": 0.7}}, task="a")
    _run(tmp_path, 6, "celeba", "stl", {"metrics": {"f1_mean": 0.5}, "f1": {"b": 0.5}}, task="b")
    (summary,) = table.main([str(tmp_path), "--json"])
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["samgs"]["delta_m_stl"] == pytest.approx(-100 * (0.1 / 0.7 - 0.1 / 0.5) / 2)
    assert rows["ls"]["delta_m_stl"] == pytest.approx(-100 * (-0.1 / 0.7) / 2)
    assert rows["samgs"]["mean_rank"] == 1.5 and rows["samgs"]["paper_delta_m"] == 3.33


def test_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such results"):
        table.main([str(tmp_path / "missing")])
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a results.json"):
        table.main([str(bad)])


@pytest.mark.parametrize("dataset", ["cityscapes", "nyuv2", "celeba"])
def test_docs_list_the_papers_tables(dataset):
    """docs/paper_benchmarks.md shows ``table.py --paper DATASET``'s output verbatim."""
    assert table.paper_markdown(dataset) in DOCS.read_text()
