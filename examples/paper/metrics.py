"""Evaluation metrics of the SAM-GS paper's benchmarks, as the authors compute them.

Reference: ThomBors/samgs, ``experiments/{nyuv2,cityscapes}/utils.py`` (``ConfMatrix``,
``depth_error``, ``normal_error``, ``delta_fn``) and ``experiments/celeba/trainer.py``
(``CelebaMetrics``). Arrays are NHWC (NumPy or JAX; JAX arrays are copied to the host) and
every statistic is computed in float64 NumPy.

Conventions kept from the authors' code (``docs/paper_benchmarks.md`` lists them):

* Segmentation: a confusion matrix ``M[t, p]`` over the pixels with ``0 <= t < C`` (so the
  ignore label -1 drops out), **pooled over the whole evaluation set**;
  ``IoU_c = M_cc / (sum_p M_cp + sum_t M_tc - M_cc)``, ``mIoU = mean_c IoU_c`` over *all*
  ``C`` classes (a class absent from both targets and predictions gives 0/0 = NaN and makes
  the mean NaN; ``absent_classes="ignore"`` averages over the defined IoUs instead) and
  ``pixel accuracy = trace(M) / sum(M)``.
* Depth: over the pixels whose target channel sum is non-zero,
  ``abs_err = sum |p - t| / n`` and ``rel_err = sum |p - t| / t / n``.
* Normals: over the pixels whose target channel sum is non-zero,
  ``angle = degrees(arccos(clip(<p, t>, -1, 1)))``; mean, median and the fractions (in [0, 1])
  of angles below 11.25, 22.5 and 30 degrees. Predictions are *not* normalised here: the
  authors' networks end in ``p / ||p||``.
* Depth and normal statistics of a split are the unweighted mean of the per-batch values
  (``DenseEvaluator(average="batch")``, the authors' ``avg_cost += cost / test_batch``);
  ``average="pixel"`` pools the pixels instead.
* CelebA: per attribute, ``tp``, ``fp``, ``fn`` of ``prob > 0.5`` pooled over the split,
  ``P = tp / (tp + fp + 1e-8)``, ``R = tp / (tp + fn + 1e-8)``, ``F1 = 2PR / (P + R + 1e-8)``
  (0 where nothing is predicted or present).
* ``delta_m``: paper Eq. 4, ``100 / K * sum_k (-1)^{h_k} (M_k - B_k) / B_k`` with ``h_k = 1``
  when higher is better; lower is better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-8  # the authors' CelebA epsilon

# Single-task baselines of the authors' Delta m (experiments/*/utils.py, "base results from
# CAGrad"). Order: the table's columns; fractions for mIoU / accuracies / "within" columns.
NYUV2_COLUMNS = (
    "mean_iou",
    "pixel_accuracy",
    "abs_err",
    "rel_err",
    "angle_mean",
    "angle_median",
    "within_11_25",
    "within_22_5",
    "within_30",
)
NYUV2_STL_BASE = (0.3830, 0.6376, 0.6754, 0.2780, 25.01, 19.21, 0.3014, 0.5720, 0.6915)
NYUV2_HIGHER_IS_BETTER = (True, True, False, False, False, False, True, True, True)
CITYSCAPES_COLUMNS = ("mean_iou", "pixel_accuracy", "abs_err", "rel_err")
CITYSCAPES_STL_BASE = (0.7401, 0.9316, 0.0125, 27.77)
CITYSCAPES_HIGHER_IS_BETTER = (True, True, False, False)


class NormalStats(NamedTuple):
    """Angular errors in degrees; ``within_*`` are fractions in [0, 1]."""

    mean: float
    median: float
    within_11_25: float
    within_22_5: float
    within_30: float


def _host(x: ArrayLike) -> np.ndarray:
    return np.asarray(x)


def _check_labels(pred_labels: np.ndarray, target: np.ndarray) -> None:
    if pred_labels.shape != target.shape:
        raise ValueError(
            f"pred_labels shape {pred_labels.shape} != target shape {target.shape} "
            "(pass arg-maxed labels, e.g. logits.argmax(-1), not logits)"
        )
    if not np.issubdtype(pred_labels.dtype, np.integer):
        raise ValueError(f"pred_labels must be integer class indices, got {pred_labels.dtype}")


def confusion_matrix(pred_labels: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts ``M[t, p]`` over the pixels with ``0 <= t < C``.

    ``target`` may be an integer or a float array of integral values (the authors' loaders
    give float labels); any value outside ``[0, C)`` (the ignore label -1) is skipped.
    """
    pred, tgt = _host(pred_labels), _host(target)
    _check_labels(pred, tgt)
    valid = (tgt >= 0) & (tgt < num_classes)
    t = tgt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred_labels outside [0, {num_classes}) on a labelled pixel")
    counts = np.bincount(num_classes * t + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(
    matrix: ArrayLike, absent_classes: Literal["nan", "ignore"] = "nan"
) -> tuple[float, float]:
    """``(mean_iou, pixel_accuracy)`` of a confusion matrix.

    ``absent_classes="nan"`` is the authors' ``torch.mean`` over all classes: NaN as soon as
    one class has an empty union. ``"ignore"`` averages the defined IoUs only.
    """
    h = np.asarray(matrix, np.float64)
    diag = np.diag(h)
    union = h.sum(0) + h.sum(1) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / union
        acc = diag.sum() / h.sum()
    if absent_classes == "nan":
        miou = float(iou.mean())
    elif absent_classes == "ignore":
        miou = float(iou[union > 0].mean()) if np.any(union > 0) else float("nan")
    else:
        raise ValueError(f"absent_classes must be 'nan' or 'ignore', got {absent_classes!r}")
    return miou, float(acc)


def segmentation_metrics(
    pred_labels: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    absent_classes: Literal["nan", "ignore"] = "nan",
) -> tuple[float, float]:
    """``(mean_iou, pixel_accuracy)`` of one batch (pool a split with ``ConfusionMatrix``)."""
    return metrics_from_confusion(
        confusion_matrix(pred_labels, target, num_classes), absent_classes
    )


class ConfusionMatrix:
    """Confusion matrix pooled over batches, as the authors' ``ConfMatrix``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred_labels: ArrayLike, target: ArrayLike) -> None:
        self.matrix += confusion_matrix(pred_labels, target, self.num_classes)

    def compute(self, absent_classes: Literal["nan", "ignore"] = "nan") -> tuple[float, float]:
        return metrics_from_confusion(self.matrix, absent_classes)

    def reset(self) -> None:
        self.matrix[...] = 0


def _valid_mask(target: np.ndarray) -> np.ndarray:
    """(B, H, W) mask of the pixels whose target channel sum is non-zero (authors' rule)."""
    return target.sum(axis=-1) != 0


def _depth_sums(pred: ArrayLike, target: ArrayLike) -> tuple[float, float, int]:
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"depth pred shape {p.shape} != target shape {t.shape}")
    mask = _valid_mask(t)
    diff = np.abs(p - t)[mask]  # (n, C): every channel of a valid pixel
    t_valid = t[mask]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = diff / t_valid
    return float(diff.sum()), float(rel.sum()), int(mask.sum())


def depth_metrics(pred: ArrayLike, target: ArrayLike) -> tuple[float, float]:
    """``(abs_err, rel_err)`` over the pixels with a non-zero target (NaN if there are none).

    ``abs_err = sum |p - t| / n``, ``rel_err = sum (|p - t| / t) / n``; ``pred`` and
    ``target`` are ``(B, H, W, 1)``.
    """
    abs_sum, rel_sum, n = _depth_sums(pred, target)
    if n == 0:
        return float("nan"), float("nan")
    return abs_sum / n, rel_sum / n


def normal_angles(pred: ArrayLike, target: ArrayLike, normalize_pred: bool = False) -> np.ndarray:
    """Angles in degrees between ``pred`` and ``target`` on the valid pixels, ``(n,)``.

    ``normalize_pred=False`` is the authors' metric (their networks normalise the output);
    ``True`` divides ``pred`` by its norm first.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if p.shape != t.shape or p.shape[-1] != 3:
        raise ValueError(f"normal pred {p.shape} and target {t.shape} must both be (..., 3)")
    if normalize_pred:
        with np.errstate(invalid="ignore", divide="ignore"):
            p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    cos = np.sum(p * t, axis=-1)[_valid_mask(t)]
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _angle_stats(angles: np.ndarray) -> NormalStats:
    if angles.size == 0:
        return NormalStats(*([float("nan")] * 5))
    return NormalStats(
        float(np.mean(angles)),
        float(np.median(angles)),
        float(np.mean(angles < 11.25)),
        float(np.mean(angles < 22.5)),
        float(np.mean(angles < 30)),
    )


def normal_metrics(pred: ArrayLike, target: ArrayLike, normalize_pred: bool = False) -> NormalStats:
    """``(mean, median, within_11_25, within_22_5, within_30)`` of one batch, degrees."""
    return _angle_stats(normal_angles(pred, target, normalize_pred))


class DenseEvaluator:
    """Split-level NYU-v2 / CityScapes metrics, accumulated batch by batch.

    Segmentation pools one confusion matrix. Depth and normal statistics are, with
    ``average="batch"`` (the authors'), the unweighted mean over batches of the per-batch
    values; with ``average="pixel"`` they are computed once over all valid pixels of the split.
    """

    def __init__(
        self,
        num_classes: int,
        average: Literal["batch", "pixel"] = "batch",
        absent_classes: Literal["nan", "ignore"] = "nan",
    ) -> None:
        if average not in ("batch", "pixel"):
            raise ValueError(f"average must be 'batch' or 'pixel', got {average!r}")
        self.confusion = ConfusionMatrix(num_classes)
        self.average = average
        self.absent_classes = absent_classes
        self._depth: list[tuple[float, float, int]] = []
        self._normal: list[np.ndarray] = []

    def update(
        self,
        seg: tuple[ArrayLike, ArrayLike] | None = None,
        depth: tuple[ArrayLike, ArrayLike] | None = None,
        normal: tuple[ArrayLike, ArrayLike] | None = None,
    ) -> None:
        """Adds one batch: each argument is ``(prediction, target)`` or None."""
        if seg is not None:
            self.confusion.update(*seg)
        if depth is not None:
            self._depth.append(_depth_sums(*depth))
        if normal is not None:
            self._normal.append(normal_angles(*normal).astype(np.float32))

    def _depth_result(self) -> dict[str, float]:
        sums = np.array(self._depth, np.float64).reshape(-1, 3)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.average == "batch":
                per_batch = sums[:, :2] / sums[:, 2:]
                abs_err, rel_err = per_batch.mean(axis=0)
            else:
                abs_err, rel_err = sums[:, :2].sum(axis=0) / sums[:, 2].sum()
        return {"abs_err": float(abs_err), "rel_err": float(rel_err)}

    def _normal_result(self) -> dict[str, float]:
        if self.average == "batch":
            stats = np.array([_angle_stats(a.astype(np.float64)) for a in self._normal])
            values = stats.mean(axis=0)
        else:
            values = _angle_stats(np.concatenate(self._normal).astype(np.float64))
        names = ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30")
        return {k: float(v) for k, v in zip(names, values, strict=True)}

    def compute(self) -> dict[str, float]:
        """The table's columns that were fed: ``mean_iou``, ``pixel_accuracy``, depth, normal."""
        out: dict[str, float] = {}
        if self.confusion.matrix.any():
            miou, acc = self.confusion.compute(self.absent_classes)
            out.update(mean_iou=miou, pixel_accuracy=acc)
        if self._depth:
            out.update(self._depth_result())
        if self._normal:
            out.update(self._normal_result())
        return out


class F1Counts:
    """Per-attribute ``tp``, ``fp``, ``fn`` pooled over batches (authors' ``CelebaMetrics``)."""

    def __init__(self, num_attributes: int = 40) -> None:
        self.tp = np.zeros(num_attributes, np.float64)
        self.fp = np.zeros(num_attributes, np.float64)
        self.fn = np.zeros(num_attributes, np.float64)

    def update(self, probs: ArrayLike, targets: ArrayLike) -> None:
        """``probs`` and ``targets`` are ``(B, A)``; a prediction is positive iff prob > 0.5."""
        p, y = np.asarray(probs), np.asarray(targets, np.float64)
        if p.shape != y.shape or p.ndim != 2 or p.shape[1] != self.tp.shape[0]:
            raise ValueError(
                f"probs {p.shape} and targets {y.shape} must both be (B, {len(self.tp)})"
            )
        pred = (p > 0.5).astype(np.float64)
        self.tp += (pred * y).sum(axis=0)
        self.fp += (pred * (1 - y)).sum(axis=0)
        self.fn += ((1 - pred) * y).sum(axis=0)

    def compute(self) -> np.ndarray:
        """``(A,)`` F1 with the authors' 1e-8 in every denominator (0 where 0/0)."""
        precision = self.tp / (self.tp + self.fp + EPS)
        recall = self.tp / (self.tp + self.fn + EPS)
        return 2 * precision * recall / (precision + recall + EPS)


def attribute_f1(probs: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """``(A,)`` F1 per attribute of one batch (pool a split with ``F1Counts``)."""
    counts = F1Counts(np.shape(probs)[-1])
    counts.update(probs, targets)
    return counts.compute()


def delta_m(values: ArrayLike, base: ArrayLike, higher_is_better: ArrayLike) -> float:
    """Paper Eq. 4 in percent: ``100/K sum_k (-1)^{h_k} (M_k - B_k) / B_k``; lower is better.

    ``values``, ``base``: ``(K,)`` metric values of the method and of the single-task
    baseline; ``higher_is_better``: ``(K,)`` bools (``h_k``).
    """
    m, b = np.asarray(values, np.float64), np.asarray(base, np.float64)
    sign = np.where(np.asarray(higher_is_better, bool), -1.0, 1.0)
    if not m.shape == b.shape == sign.shape or m.ndim != 1:
        raise ValueError(f"values {m.shape}, base {b.shape}, higher_is_better {sign.shape}: (K,)")
    return float(np.mean(sign * (m - b) / b) * 100.0)


def delta_m_against_authors(dataset: str, values: Mapping[str, float]) -> float | None:
    """Eq. 4 (%) of ``values`` (column -> number) against the authors' single-task baselines.

    Over the columns present in ``values`` (a single-task run has its task's only); None for
    CelebA (the authors' code has no single-task F1 baseline) or when no column is present.
    """
    if dataset == "celeba":
        return None
    columns, base, higher = {
        "nyuv2": (NYUV2_COLUMNS, NYUV2_STL_BASE, NYUV2_HIGHER_IS_BETTER),
        "cityscapes": (CITYSCAPES_COLUMNS, CITYSCAPES_STL_BASE, CITYSCAPES_HIGHER_IS_BETTER),
    }[dataset]
    keep = [i for i, c in enumerate(columns) if c in values]
    if not keep:
        return None
    return delta_m(
        [values[columns[i]] for i in keep], [base[i] for i in keep], [higher[i] for i in keep]
    )


def _ranks(column: np.ndarray) -> np.ndarray:
    """1-based ranks of ``column`` in ascending order, ties sharing their average rank."""
    order = np.argsort(column, kind="stable")
    ranks = np.empty(len(column), np.float64)
    ranks[order] = np.arange(1, len(column) + 1)
    for value in np.unique(column):
        tied = column == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def mean_rank(table: ArrayLike, higher_is_better: Sequence[bool] | ArrayLike) -> np.ndarray:
    """``(M,)`` mean rank (MR) of ``M`` methods over ``K`` metrics; 1 is the best.

    ``table`` is ``(M, K)``. Each metric column ranks the methods (1 = best; ties share the
    average of their ranks); a method's MR is the mean of its ranks over the columns.
    """
    t = np.asarray(table, np.float64)
    sign = np.where(np.asarray(higher_is_better, bool), -1.0, 1.0)
    if t.ndim != 2 or sign.shape != (t.shape[1],):
        raise ValueError(f"table {t.shape} must be (M, K) and higher_is_better (K,)")
    ranks = np.stack([_ranks(sign[k] * t[:, k]) for k in range(t.shape[1])], axis=1)
    return ranks.mean(axis=1)
