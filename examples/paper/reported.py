"""The numbers the SAM-GS paper reports in its Tables 1-3 (Borsani et al., ECML PKDD 2025).

Transcribed once, in the paper's units (mIoU, pixel accuracy and the "within t degrees" columns
in percent), so that a run of :mod:`train` can be printed next to the paper's row and a table
of runs next to the paper's table (:mod:`table`). :func:`paper_row` converts a row to the
trainer's units (those fractions as fractions, as :data:`metrics.NYUV2_STL_BASE`).

Consistency, checked by ``tests/test_paper_reported.py``: the STL rows equal the authors'
single-task baselines in :mod:`metrics`, and Eq. 4 recomputed from each row's own metrics
gives the paper's Delta m% to its rounding (within 0.15), except for the rows listed in
:data:`INCONSISTENT_DELTA_M`, whose printed Delta m does not follow from their printed metrics.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metrics  # noqa: E402

# The paper's row label -> the trainer's --method name. SI, RLW, DWA, UW and FAMO weight the
# losses (scalarizers); GradNorm weights them too, from the per-task gradients' norms (a
# loss-aware aggregator here); the others aggregate per-task gradients.
METHOD_NAMES: dict[str, str] = {
    "STL": "stl",
    "LS": "ls",
    "SI": "scale_invariant",
    "RLW": "random",
    "DWA": "dwa",
    "UW": "uw",
    "MGDA": "mgda",
    "PCGrad": "pcgrad",
    "GradNorm": "gradnorm",
    "GradDrop": "graddrop",
    "CAGrad": "cagrad",
    "IMTL-G": "imtl_g",
    "Nash-MTL": "nash_mtl",
    "FAMO": "famo",
    "Aligned-MTL": "aligned_mtl",
    "SAM-GS": "samgs",
}


class Table(NamedTuple):
    """One of the paper's tables: metric columns (trainer names) and rows by paper label.

    ``rows[label]`` is ``(*metrics, mean_rank, delta_m)`` (STL: the metrics only; CelebA: the
    Delta m only); ``percent``: the columns printed in percent that the trainer keeps as
    fractions.
    """

    name: str
    columns: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    percent: tuple[str, ...]
    rows: Mapping[str, tuple[float, ...]]


CITYSCAPES = Table(
    "Table 1 (CityScapes, SegNet-MTAN, 2 tasks)",
    metrics.CITYSCAPES_COLUMNS,
    metrics.CITYSCAPES_HIGHER_IS_BETTER,
    ("mean_iou", "pixel_accuracy"),
    {
        "STL": (74.01, 93.16, 0.0125, 27.77),
        "LS": (71.0, 91.7, 0.0161, 33.8, 11.8, 14.1),
        "SI": (71.0, 91.7, 0.0161, 33.8, 11.8, 14.1),
        "RLW": (74.6, 93.4, 0.0158, 47.8, 11.0, 24.4),
        "DWA": (75.2, 93.5, 0.016, 44.4, 8.5, 21.4),
        "UW": (72.0, 92.8, 0.014, 30.1, 7.75, 5.89),
        "MGDA": (68.8, 91.5, 0.0309, 33.5, 12.5, 44.1),
        "PCGrad": (75.1, 93.5, 0.0154, 42.1, 9.12, 18.3),
        "GradNorm": (73.7, 93.0, 0.0124, 34.1, 7.75, 5.63),
        "GradDrop": (75.3, 93.5, 0.0157, 47.5, 7.75, 23.7),
        "CAGrad": (75.2, 93.5, 0.0141, 37.6, 7.88, 11.6),
        "IMTL-G": (75.3, 93.5, 0.0135, 38.4, 6, 11.1),
        "Nash-MTL": (75.4, 93.7, 0.0129, 35.0, 3.75, 6.82),
        "FAMO": (74.5, 93.3, 0.0145, 32.6, 7.50, 8.13),
        "Aligned-MTL": (75.8, 93.7, 0.0133, 32.66, 2, 5.27),
        "SAM-GS": (75.2, 93.5, 0.0136, 33.1, 5.00, 6.41),
    },
)

NYUV2 = Table(
    "Table 2 (NYU-v2, SegNet-MTAN, 3 tasks)",
    metrics.NYUV2_COLUMNS,
    metrics.NYUV2_HIGHER_IS_BETTER,
    ("mean_iou", "pixel_accuracy", "within_11_25", "within_22_5", "within_30"),
    {
        "STL": (38.3, 63.76, 0.6754, 0.278, 25.01, 19.21, 30.14, 57.2, 69.15),
        "LS": (39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.5, 61.08, 11.4, 5.59),
        "SI": (38.45, 64.27, 0.5354, 0.2201, 27.6, 23.37, 22.53, 48.57, 62.32, 10.3, 4.39),
        "RLW": (37.17, 63.77, 0.5759, 0.241, 28.27, 24.18, 22.26, 47.05, 60.62, 13.8, 7.78),
        "DWA": (39.11, 65.31, 0.551, 0.2285, 27.61, 23.18, 24.17, 50.18, 62.39, 10.2, 3.57),
        "UW": (36.87, 63.17, 0.5446, 0.226, 27.04, 22.61, 23.54, 49.05, 63.65, 10.0, 4.05),
        "MGDA": (30.47, 59.9, 0.607, 0.2555, 24.88, 19.45, 29.18, 56.88, 69.36, 7.4, 1.38),
        "PCGrad": (38.06, 64.64, 0.555, 0.2325, 27.41, 22.8, 23.86, 49.83, 63.14, 10.6, 3.97),
        "GradNorm": (20.09, 64.64, 0.7200, 0.2800, 24.83, 18.86, 30.81, 57.94, 69.73, 7.2, 7.22),
        "GradDrop": (39.39, 65.12, 0.5455, 0.2279, 27.48, 22.96, 23.38, 49.44, 62.87, 9.6, 3.58),
        "CAGrad": (39.79, 65.49, 0.5486, 0.225, 26.31, 21.58, 25.61, 52.36, 65.58, 7.1, 0.2),
        "IMTL-G": (39.35, 65.6, 0.5426, 0.2256, 26.02, 21.19, 26.2, 53.13, 66.24, 6.3, -0.76),
        "Nash-MTL": (40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.4, 55.47, 68.15, 4.2, -4.04),
        "FAMO": (38.88, 64.9, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98, 4.8, -4.1),
        "Aligned-MTL": (
            40.82,
            66.33,
            0.5300,
            0.2200,
            25.19,
            19.71,
            28.88,
            56.23,
            68.54,
            3.6,
            -4.93,
        ),
        "SAM-GS": (40.79, 66.46, 0.5251, 0.2169, 25.03, 19.65, 29.26, 56.35, 68.78, 2.4, -5.3),
    },
)

# CelebA: Delta m% only (the paper prints no per-attribute F1 and no mean rank).
CELEBA = Table(
    "Table 3 (CelebA, 40 tasks)",
    (),
    (),
    (),
    {
        "LS": (6.28,),
        "SI": (7.83,),
        "RLW": (5.22,),
        "DWA": (6.95,),
        "UW": (5.78,),
        "MGDA": (10.93,),
        "PCGrad": (6.65,),
        "GradDrop": (7.80,),
        "CAGrad": (6.20,),
        "IMTL-G": (4.67,),
        "Nash-MTL": (4.97,),
        "FAMO": (4.72,),
        "Aligned-MTL": (4.58,),
        "SAM-GS": (3.33,),
    },
)

TABLES: dict[str, Table] = {"cityscapes": CITYSCAPES, "nyuv2": NYUV2, "celeba": CELEBA}

# (dataset, paper label): rows whose printed Delta m% is not Eq. 4 of their printed metrics
# against the printed STL row (recomputed: NYU-v2 GradNorm 5.18, IMTL-G -0.60, Aligned-MTL
# -4.77). Their mIoU or Delta m were likely carried over from other papers' tables.
INCONSISTENT_DELTA_M = frozenset(
    {("nyuv2", "GradNorm"), ("nyuv2", "IMTL-G"), ("nyuv2", "Aligned-MTL")}
)


def label_of(method: str) -> str | None:
    """The paper's row label of a trainer ``--method`` name (None if the paper has none)."""
    return next((label for label, name in METHOD_NAMES.items() if name == method), None)


def paper_row(dataset: str, method: str) -> dict[str, Any] | None:
    """The paper's row for ``method`` in the trainer's units, or None if it reports none.

    Returns ``{"label", "metrics": {column: value}, "mean_rank", "delta_m"}`` (``metrics``
    empty and ``mean_rank`` None for CelebA; ``mean_rank``/``delta_m`` None for STL).
    """
    table, label = TABLES[dataset], label_of(method)
    if label is None or label not in table.rows:
        return None
    row = table.rows[label]
    k = len(table.columns)
    values = {
        col: value / 100 if col in table.percent else value
        for col, value in zip(table.columns, row[:k], strict=True)
    }
    rest = row[k:]
    if not table.columns:
        return {"label": label, "metrics": {}, "mean_rank": None, "delta_m": rest[0]}
    mean_rank, delta = rest if rest else (None, None)
    return {"label": label, "metrics": values, "mean_rank": mean_rank, "delta_m": delta}
