"""A paper table from the runs of :mod:`train`: means over seeds, Delta m%, mean rank, the paper.

Give it the runs' ``results.json`` files, or directories to search for them::

    python examples/paper/table.py checkpoints/paper            # every run under it
    python examples/paper/table.py --dataset nyuv2 runs/*/results.json
    python examples/paper/table.py --paper nyuv2                 # the paper's Table 2 only

Per dataset, one row per multi-task method: the mean over its runs (seeds) of each metric
column, the number of runs, Delta m% (paper Eq. 4, lower is better) of those means against
the authors' single-task baselines (:func:`metrics.delta_m_against_authors`) and, when the
inputs hold a single-task (``--method stl``) run for every column, against those runs too
(``Delta m% (your STL)``; CelebA: per-attribute F1, the only Delta m it has), the mean rank
(MR, :func:`metrics.mean_rank` over the methods in the table, 1 = best), and the paper's
Delta m% and MR for that method (:mod:`reported`). Runs of different configurations (e.g.
``--gamma``) under one method name are pooled: give the directories of one configuration.

``--paper DATASET`` prints the paper's table with Eq. 4 recomputed from each printed row,
which is how ``docs/paper_benchmarks.md`` lists them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metrics  # noqa: E402
import reported  # noqa: E402

HIGHER_IS_BETTER = dict(
    zip(metrics.NYUV2_COLUMNS, metrics.NYUV2_HIGHER_IS_BETTER, strict=True),
)


def _higher_is_better(column: str) -> bool:
    return column.startswith("f1") or HIGHER_IS_BETTER.get(column, False)


def find_results(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``results.json`` files: the paths themselves, or found under the directories given."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob("results.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such results file or directory")
    return found


def load_runs(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    runs = []
    for path in find_results(paths):
        run = json.loads(Path(path).read_text())
        if not {"dataset", "method", "metrics"} <= run.keys():
            raise ValueError(f"{path}: not a results.json of examples/paper/train.py")
        runs.append(run)
    return runs


def _columns(run: Mapping[str, Any]) -> dict[str, float]:
    """The run's table columns: its metrics, CelebA's per-attribute F1 as ``f1_<attr>``."""
    values = dict(run["metrics"])
    if run["dataset"] == "celeba":
        values = {f"f1_{a}": v for a, v in run.get("f1", {}).items()}
    return {k: float(v) for k, v in values.items() if v is not None}


def _stl_base(stl_runs: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[float] | None:
    """Per column, the mean over the single-task runs that report it; None if one is missing."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for run in stl_runs:
        for column, value in _columns(run).items():
            pooled[column].append(value)
    if not all(pooled.get(c) for c in columns):
        return None
    return [float(np.mean(pooled[c])) for c in columns]


def summarise(runs: Sequence[Mapping[str, Any]], dataset: str) -> dict[str, Any]:
    """The table of one dataset: rows by method (means over runs), columns, Delta m, MR."""
    runs = [r for r in runs if r["dataset"] == dataset]
    stl = [r for r in runs if r["method"] == "stl"]
    by_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs:
        if run["method"] != "stl":
            by_method[run["method"]].append(_columns(run))
    columns = sorted({c for rows in by_method.values() for row in rows for c in row})
    if dataset != "celeba":
        order = reported.TABLES[dataset].columns
        columns = [c for c in order if c in columns]
    higher = [_higher_is_better(c) for c in columns]
    base = _stl_base(stl, columns)
    rows = []
    for method, seeds in by_method.items():
        means = [float(np.mean([s.get(c, math.nan) for s in seeds])) for c in columns]
        paper = reported.paper_row(dataset, method) or {}
        rows.append(
            {
                "method": method,
                "runs": len(seeds),
                "values": means,
                "delta_m": metrics.delta_m_against_authors(
                    dataset, dict(zip(columns, means, strict=True))
                ),
                "delta_m_stl": None if base is None else metrics.delta_m(means, base, higher),
                "paper_delta_m": paper.get("delta_m"),
                "paper_mean_rank": paper.get("mean_rank"),
            }
        )
    table = np.array([r["values"] for r in rows], np.float64).reshape(len(rows), len(columns))
    complete = len(rows) > 1 and columns and not np.isnan(table).any()
    ranks = metrics.mean_rank(table, higher) if complete else [None] * len(rows)
    for row, rank in zip(rows, ranks, strict=True):
        row["mean_rank"] = None if rank is None else float(rank)
    rows.sort(key=lambda r: (r["mean_rank"] is None, r["mean_rank"] or 0.0, r["method"]))
    return {"dataset": dataset, "columns": columns, "rows": rows, "stl_runs": len(stl)}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def markdown(summary: Mapping[str, Any]) -> str:
    """The table as Markdown (CelebA: the mean F1 over attributes instead of 40 columns)."""
    celeba = summary["dataset"] == "celeba"
    columns = ["mean F1"] if celeba else list(summary["columns"])
    header = ["method", "runs", *columns, "MR", "Delta m%", "Delta m% (your STL)"]
    header += ["paper MR", "paper Delta m%"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        values = [float(np.mean(row["values"]))] if celeba else row["values"]
        cells = [row["method"], str(row["runs"]), *(_fmt(v) for v in values)]
        cells += [_fmt(row["mean_rank"]), _fmt(row["delta_m"])]
        cells += [_fmt(row["delta_m_stl"]), _fmt(row["paper_mean_rank"])]
        cells.append(_fmt(row["paper_delta_m"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_markdown(dataset: str) -> str:
    """The paper's table for ``dataset`` as printed, with Eq. 4 recomputed from each row."""
    table = reported.TABLES[dataset]
    header = ["paper row", "--method", *table.columns, "MR", "Delta m%", "Eq. 4 of the row"]
    lines = [f"{table.name}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.rows.items():
        method = reported.METHOD_NAMES[label]
        paper = reported.paper_row(dataset, method)
        k = len(table.columns)
        recomputed = metrics.delta_m_against_authors(dataset, paper["metrics"])
        cells = [label, f"`{method}`", *(_fmt(v) for v in row[:k])]
        cells += [_fmt(paper["mean_rank"]), _fmt(paper["delta_m"])]
        cells.append("-" if label == "STL" or not k else _fmt(recomputed))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="results.json files or directories holding them")
    p.add_argument("--dataset", choices=tuple(reported.TABLES), help="only this dataset")
    p.add_argument("--paper", choices=tuple(reported.TABLES), help="print the paper's table")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    args = p.parse_args(argv)
    if args.paper:
        print(paper_markdown(args.paper))
        return []
    if not args.paths:
        p.error("give results.json files or directories (or --paper DATASET)")
    runs = load_runs(args.paths)
    datasets = [args.dataset] if args.dataset else sorted({r["dataset"] for r in runs})
    summaries = [summarise(runs, d) for d in datasets]
    for summary in summaries:
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"## {summary['dataset']} ({summary['stl_runs']} single-task runs)\n")
            print(markdown(summary) + "\n")
    return summaries


if __name__ == "__main__":
    main()
