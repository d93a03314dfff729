"""examples/paper/metrics.py against loop transcriptions of the formulas and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_paper_module

pm = load_paper_module("metrics")


# ----------------------------------------------------------------------------------------
# Independent transcriptions: explicit loops over pixels / classes / methods.
# ----------------------------------------------------------------------------------------
def ref_iou_acc(pred, target, num_classes):
    """Per-class IoU (None where the union is empty) and pixel accuracy, by loops."""
    pairs = [
        (int(p), int(t))
        for p, t in zip(np.ravel(pred), np.ravel(target), strict=True)
        if 0 <= t < num_classes
    ]
    ious = []
    for c in range(num_classes):
        tp = sum(1 for p, t in pairs if p == c and t == c)
        fp = sum(1 for p, t in pairs if p == c and t != c)
        fn = sum(1 for p, t in pairs if p != c and t == c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    acc = sum(1 for p, t in pairs if p == t) / len(pairs)
    return ious, acc


def ref_depth(pred, target):
    abs_sum = rel_sum = 0.0
    n = 0
    for p, t in zip(pred.reshape(-1), target.reshape(-1), strict=True):
        if t != 0:
            abs_sum += abs(p - t)
            rel_sum += abs(p - t) / t
            n += 1
    return abs_sum / n, rel_sum / n


def ref_normal(pred, target):
    angles = []
    for p, t in zip(pred.reshape(-1, 3), target.reshape(-1, 3), strict=True):
        if t[0] + t[1] + t[2] != 0:
            dot = float(p[0] * t[0] + p[1] * t[1] + p[2] * t[2])
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, dot)))))
    angles.sort()
    n = len(angles)
    median = angles[n // 2] if n % 2 else 0.5 * (angles[n // 2 - 1] + angles[n // 2])
    frac = [sum(1 for a in angles if a < th) / n for th in (11.25, 22.5, 30)]
    return (sum(angles) / n, median, *frac)


def ref_f1(probs, targets):
    out = []
    for a in range(probs.shape[1]):
        tp = fp = fn = 0
        for b in range(probs.shape[0]):
            predicted, actual = probs[b, a] > 0.5, targets[b, a] == 1
            tp += predicted and actual
            fp += predicted and not actual
            fn += (not predicted) and actual
        precision = tp / (tp + fp + 1e-8)
        recall = tp / (tp + fn + 1e-8)
        out.append(2 * precision * recall / (precision + recall + 1e-8))
    return out


def ref_mean_rank(table, higher):
    m, k = len(table), len(table[0])
    out = []
    for i in range(m):
        total = 0.0
        for j in range(k):
            better = sum(
                1
                for o in range(m)
                if (table[o][j] > table[i][j] if higher[j] else table[o][j] < table[i][j])
            )
            ties = sum(1 for o in range(m) if o != i and table[o][j] == table[i][j])
            total += 1 + better + ties / 2
        out.append(total / k)
    return out


def random_dense(rng, b=2, h=6, w=7, c=5):
    target = rng.integers(-1, c, size=(b, h, w))
    pred = np.where(rng.random((b, h, w)) < 0.6, target, rng.integers(0, c, size=(b, h, w)))
    pred = np.clip(pred, 0, c - 1)
    return pred, target


def random_unit(rng, shape):
    v = rng.normal(size=(*shape, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------
def test_segmentation_hand_cases():
    target = np.array([[[0, 0], [1, 1]]])
    assert pm.segmentation_metrics(target, target, 2) == (1.0, 1.0)  # perfect
    pred = np.array([[[0, 1], [1, 1]]])  # one wrong pixel: M = [[1, 1], [0, 2]]
    miou, acc = pm.segmentation_metrics(pred, target, 2)
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 2) and acc == pytest.approx(3 / 4)
    # Ignored pixels (-1, and anything >= C) change nothing, whatever is predicted there.
    t_ign = np.array([[[0, 0, -1], [1, 1, 7]]])
    p_ign = np.array([[[0, 1, 0], [1, 1, 0]]])
    assert pm.segmentation_metrics(p_ign, t_ign, 2) == pytest.approx((miou, acc))
    # Float labels with -1 (as the authors' loaders give them) are accepted.
    assert pm.segmentation_metrics(p_ign, t_ign.astype(np.float32), 2) == pytest.approx((miou, acc))


def test_absent_class_is_nan_like_the_authors_or_ignored_on_request():
    target = np.array([[[0, 1], [1, 0]]])
    miou, acc = pm.segmentation_metrics(target, target, 3)  # class 2 nowhere
    assert math.isnan(miou) and acc == 1.0
    assert pm.segmentation_metrics(target, target, 3, absent_classes="ignore") == (1.0, 1.0)
    # A class only predicted (never in the target) has IoU 0 and counts in both modes.
    pred = np.array([[[0, 1], [1, 2]]])
    assert pm.segmentation_metrics(pred, target, 3)[0] == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="absent_classes"):
        pm.segmentation_metrics(pred, target, 3, absent_classes="skip")


@pytest.mark.parametrize("seed", range(4))
def test_segmentation_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    pred, target = random_dense(rng)
    ious, acc = ref_iou_acc(pred, target, 5)
    want = np.mean([np.nan if v is None else v for v in ious])
    got = pm.segmentation_metrics(pred, target, 5)
    np.testing.assert_allclose(got, (want, acc), rtol=1e-12)
    defined = [v for v in ious if v is not None]
    got_ignore = pm.segmentation_metrics(pred, target, 5, absent_classes="ignore")
    assert got_ignore[0] == pytest.approx(np.mean(defined), rel=1e-12)


def test_pooled_confusion_differs_from_the_mean_of_batches_and_matches_reference():
    rng = np.random.default_rng(7)
    batches = [random_dense(rng, b=1, h=4, w=5, c=4) for _ in range(3)]
    cm = pm.ConfusionMatrix(4)
    for p, t in batches:
        cm.update(p, t)
    pred = np.concatenate([p for p, _ in batches])
    target = np.concatenate([t for _, t in batches])
    ious, acc = ref_iou_acc(pred, target, 4)
    assert cm.compute(absent_classes="ignore") == pytest.approx(
        (np.mean([v for v in ious if v is not None]), acc), rel=1e-12
    )
    per_batch = np.mean([pm.segmentation_metrics(p, t, 4, "ignore")[0] for p, t in batches])
    assert per_batch != pytest.approx(cm.compute("ignore")[0])  # the two conventions differ
    cm.reset()
    assert not cm.matrix.any()


def test_segmentation_input_errors():
    t = np.zeros((1, 2, 2), np.int64)
    with pytest.raises(ValueError, match="shape"):
        pm.segmentation_metrics(np.zeros((1, 2, 2, 3)), t, 3)  # logits instead of labels
    with pytest.raises(ValueError, match="integer"):
        pm.segmentation_metrics(t.astype(np.float32), t, 3)
    with pytest.raises(ValueError, match="outside"):
        pm.segmentation_metrics(t + 3, t, 3)


def test_jax_arrays_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    target = jnp.array([[[0, 0], [1, 1]]])
    assert pm.segmentation_metrics(target, target, 2) == (1.0, 1.0)
    assert pm.depth_metrics(jnp.ones((1, 2, 2, 1)), 2 * jnp.ones((1, 2, 2, 1))) == (1.0, 0.5)


# ----------------------------------------------------------------------------------------
# Depth and normals
# ----------------------------------------------------------------------------------------
def test_depth_hand_case_and_empty_batch():
    target = np.array([2.0, 0.0, 4.0]).reshape(1, 1, 3, 1)
    pred = np.array([1.0, 5.0, 5.0]).reshape(1, 1, 3, 1)
    assert pm.depth_metrics(pred, target) == pytest.approx((1.0, (0.5 + 0.25) / 2))
    assert pm.depth_metrics(target, target) == (0.0, 0.0)
    assert all(math.isnan(v) for v in pm.depth_metrics(pred, np.zeros_like(target)))


@pytest.mark.parametrize("seed", range(3))
def test_depth_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.5, 10, size=(2, 5, 6, 1)) * (rng.random((2, 5, 6, 1)) < 0.7)
    pred = rng.uniform(0, 10, size=target.shape)
    np.testing.assert_allclose(pm.depth_metrics(pred, target), ref_depth(pred, target), 1e-12)


def test_normal_known_angles_and_the_channel_sum_mask():
    t60 = [math.cos(math.radians(60)), math.sin(math.radians(60)), 0.0]
    target = np.array([[t60, [0, 0, 1], [0, 0, 0], [2**-0.5, -(2**-0.5), 0]]]).reshape(1, 1, 4, 3)
    pred = np.array([[[1, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]]], float).reshape(1, 1, 4, 3)
    # Pixel 3 (all zero) is no measurement; pixel 4 is a unit normal whose components sum
    # to 0, which the authors' mask (channel sum != 0) drops as well.
    np.testing.assert_allclose(pm.normal_angles(pred, target), [60.0, 0.0], atol=1e-12)
    stats = pm.normal_metrics(pred, target)
    assert stats == pytest.approx((30.0, 30.0, 0.5, 0.5, 0.5))
    # Opposite vectors, and a dot product just above 1 that is clipped (no NaN).
    assert pm.normal_angles(-target[:, :, :1], target[:, :, :1]) == pytest.approx([180.0])
    assert pm.normal_angles(1.0000001 * target[:, :, 1:2], target[:, :, 1:2]) == [0.0]


@pytest.mark.parametrize("seed", range(3))
def test_normal_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    target = random_unit(rng, (2, 5, 6)) * (rng.random((2, 5, 6, 1)) < 0.8)
    pred = random_unit(rng, (2, 5, 6))
    np.testing.assert_allclose(pm.normal_metrics(pred, target), ref_normal(pred, target), 1e-12)


def test_normal_predictions_are_not_normalised_unless_asked():
    target = np.array([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    pred = np.array([0.0, 0.0, 0.5]).reshape(1, 1, 1, 3)  # right direction, norm 0.5
    assert pm.normal_angles(pred, target) == pytest.approx([60.0])  # arccos(0.5)
    assert pm.normal_angles(pred, target, normalize_pred=True) == pytest.approx([0.0])


def test_dense_evaluator_batch_average_vs_pixel_pooling():
    rng = np.random.default_rng(3)
    sizes = (2, 2, 1)  # unequal batches: the last one is smaller, as in the authors' loader
    data = []
    for b in sizes:
        seg = random_dense(rng, b=b, h=4, w=5, c=3)
        dt = rng.uniform(1, 5, size=(b, 4, 5, 1)) * (rng.random((b, 4, 5, 1)) < 0.8)
        dp = rng.uniform(1, 5, size=dt.shape)
        nt = random_unit(rng, (b, 4, 5))
        npred = random_unit(rng, (b, 4, 5))
        data.append((seg, (dp, dt), (npred, nt)))
    by_batch, by_pixel = pm.DenseEvaluator(3), pm.DenseEvaluator(3, average="pixel")
    for seg, depth, normal in data:
        by_batch.update(seg=seg, depth=depth, normal=normal)
        by_pixel.update(seg=seg, depth=depth, normal=normal)
    got_b, got_p = by_batch.compute(), by_pixel.compute()
    want_depth_b = np.mean([ref_depth(*d) for _, d, _ in data], axis=0)
    want_normal_b = np.mean([ref_normal(*n) for _, _, n in data], axis=0)
    cat = [
        np.concatenate(x) for x in zip(*[(d[0], d[1], n[0], n[1]) for _, d, n in data], strict=True)
    ]
    want_depth_p, want_normal_p = ref_depth(cat[0], cat[1]), ref_normal(cat[2], cat[3])
    names = ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30")
    np.testing.assert_allclose([got_b["abs_err"], got_b["rel_err"]], want_depth_b, 1e-12)
    np.testing.assert_allclose([got_b[k] for k in names], want_normal_b, 1e-6)  # f32 angles
    np.testing.assert_allclose([got_p["abs_err"], got_p["rel_err"]], want_depth_p, 1e-12)
    np.testing.assert_allclose([got_p[k] for k in names], want_normal_p, 1e-6)
    assert got_b["abs_err"] != pytest.approx(got_p["abs_err"])
    seg_p = np.concatenate([s[0] for s, _, _ in data])
    seg_t = np.concatenate([s[1] for s, _, _ in data])
    assert got_b["mean_iou"] == got_p["mean_iou"] == pm.segmentation_metrics(seg_p, seg_t, 3)[0]
    with pytest.raises(ValueError, match="average"):
        pm.DenseEvaluator(3, average="mean")


# ----------------------------------------------------------------------------------------
# CelebA F1
# ----------------------------------------------------------------------------------------
def test_f1_hand_cases():
    targets = np.array([[1, 0, 1, 1], [1, 0, 1, 0]], np.float32)
    probs = np.array([[0.9, 0.1, 0.5, 0.2], [0.7, 0.4, 0.6, 0.8]])
    f1 = pm.attribute_f1(probs, targets)
    # attr 0 perfect; attr 1 nothing present nor predicted (0/0 -> 0); attr 2: 0.5 is not
    # > 0.5 so tp 1, fn 1 (F1 2/3); attr 3: tp 0 -> 0.
    np.testing.assert_allclose(f1, [1.0, 0.0, 2 / 3, 0.0], atol=1e-7)
    assert f1[0] < 1.0  # the 1e-8 epsilons are there


@pytest.mark.parametrize("seed", range(3))
def test_f1_matches_loop_reference_and_pools_counts(seed):
    rng = np.random.default_rng(seed)
    probs = rng.random((37, 40))
    targets = (rng.random((37, 40)) < 0.3).astype(np.float32)
    np.testing.assert_allclose(pm.attribute_f1(probs, targets), ref_f1(probs, targets), 1e-12)
    counts = pm.F1Counts()
    for lo in range(0, 37, 8):
        counts.update(probs[lo : lo + 8], targets[lo : lo + 8])
    np.testing.assert_allclose(counts.compute(), ref_f1(probs, targets), 1e-12)
    with pytest.raises(ValueError, match="40"):
        counts.update(probs[:, :39], targets[:, :39])


# ----------------------------------------------------------------------------------------
# Delta m and mean rank
# ----------------------------------------------------------------------------------------
def test_delta_m_equation_4():
    base, higher = pm.NYUV2_STL_BASE, pm.NYUV2_HIGHER_IS_BETTER
    assert pm.delta_m(base, base, higher) == 0.0
    # +10 % on a higher-is-better column and +10 % on a lower-is-better one cancel.
    assert pm.delta_m([1.1, 2.2], [1.0, 2.0], [True, False]) == pytest.approx(0.0)
    assert pm.delta_m([1.1, 1.8], [1.0, 2.0], [True, False]) == pytest.approx(-10.0)
    values = np.array(base) * np.array([1.02, 0.99, 1.1, 0.9, 1.0, 1.05, 0.98, 1.01, 1.0])
    want = 0.0
    for v, b, h in zip(values, base, higher, strict=True):
        want += (-1 if h else 1) * (v - b) / b
    assert pm.delta_m(values, base, higher) == pytest.approx(100 * want / 9)
    assert len(pm.CITYSCAPES_STL_BASE) == len(pm.CITYSCAPES_HIGHER_IS_BETTER) == 4
    with pytest.raises(ValueError):
        pm.delta_m([1.0, 2.0], [1.0], [True, False])


def test_mean_rank_matches_loop_reference_with_ties():
    table = np.array([[0.5, 2.0, 10.0], [0.6, 2.0, 12.0], [0.4, 1.0, 12.0], [0.6, 3.0, 9.0]])
    higher = [True, False, True]
    got = pm.mean_rank(table, higher)
    np.testing.assert_allclose(got, ref_mean_rank(table.tolist(), higher))
    np.testing.assert_allclose(
        got, [(3 + 2.5 + 3) / 3, (1.5 + 2.5 + 1.5) / 3, (4 + 1 + 1.5) / 3, (1.5 + 4 + 4) / 3]
    )
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 4, size=(6, 5)).astype(float)
    flags = [True, False, True, True, False]
    np.testing.assert_allclose(pm.mean_rank(rand, flags), ref_mean_rank(rand.tolist(), flags))
    with pytest.raises(ValueError):
        pm.mean_rank(table, [True])
