"""NYU-v2, CityScapes and CelebA for the SAM-GS paper: loaders, synthetic data, input pipeline.

Nothing is downloaded. The on-disk formats are those the authors' loaders read (ThomBors/samgs,
``experiments/{nyuv2,cityscapes}/data.py`` and ``experiments/celeba/data.py``):

* **NYU-v2** (MTAN preprocessing, 13 classes):
  ``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy`` for ``i = 0 .. n-1`` (``n`` =
  number of ``.npy`` files in ``image/``); image ``(288, 384, 3)`` float in [0, 1], label
  ``(288, 384)`` with integral values in ``{-1, 0, .., 12}`` (-1 = ignore; any int or float
  dtype), depth ``(288, 384, 1)`` in metres (0 = no measurement), normal ``(288, 384, 3)``
  (all zero = none). ``val`` is the split the paper reports.
* **CityScapes** (7 classes): ``ROOT/{train,val}/{image,label_7,depth}/{i}.npy``, ``128 x 256``;
  depth is the released inverse depth (disparity), 0 = none.
* **CelebA**: ``ROOT/Img/img_align_celeba/*.jpg``, ``ROOT/Anno/list_attr_celeba.txt`` (a count,
  the 40 attribute names, then ``name v_1 .. v_40`` with ``v = +-1``) and
  ``ROOT/Eval/list_eval_partition.txt`` (``name p``, ``p`` = 0 train, 1 val, 2 test, in the same
  order). Images are decoded with Pillow, converted to RGB and resized to 64 x 64 with
  ``Image.BILINEAR`` (what torchvision's ``Resize((64, 64))`` does to a PIL image); attributes
  are 1 for ``1`` and 0 otherwise.

Batches are dicts of NHWC NumPy arrays: ``image`` float32 ``(B, H, W, 3)``; dense sets add
``label`` int32 ``(B, H, W)``, ``depth`` float32 ``(B, H, W, 1)`` and (NYU-v2) ``normal``
float32 ``(B, H, W, 3)``; CelebA adds ``attributes`` float32 ``(B, 40)`` in {0, 1}.

A split is loaded once into memory (float32, labels int8, CelebA images uint8: NYU-v2 train
2.6 GB, CityScapes train 1.7 GB, CelebA train 2.0 GB); a batch is then one fancy-indexing
gather per array plus the vectorised augmentation, and ``prefetch`` runs the batch assembly
in a background thread. ``python examples/paper/data.py --bench DATASET`` measures it.

Malformed data raise ``DatasetError`` (a ``ValueError``) naming the file; missing paths raise
``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
Augment = Callable[[Batch, np.random.Generator], Batch]

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
CELEBA_SIZE = 64  # the authors' image_size=(64, 64)
CELEBA_RAW_SIZE = (178, 218)  # (width, height) of img_align_celeba
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}
AUGMENT_SCALES = (1.0, 1.2, 1.5)  # the authors' RandomScaleCrop


class DatasetError(ValueError):
    """A dataset file exists but is malformed (wrong shape, dtype, values or syntax)."""


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """Layout of a dense-prediction dataset (``dataclasses.replace`` it for other sizes)."""

    name: str
    height: int
    width: int
    num_classes: int
    label_dir: str
    has_normal: bool

    @property
    def dirs(self) -> tuple[str, ...]:
        """Sub-directories of a split, image first."""
        return ("image", self.label_dir, "depth") + (("normal",) if self.has_normal else ())

    def file_shape(self, directory: str) -> tuple[int, ...]:
        """Shape of one ``{i}.npy`` in ``directory``."""
        hw = (self.height, self.width)
        return {"image": (*hw, 3), "depth": (*hw, 1), "normal": (*hw, 3)}.get(directory, hw)


NYUV2 = DenseSpec("nyuv2", 288, 384, 13, "label", True)
CITYSCAPES = DenseSpec("cityscapes", 128, 256, 7, "label_7", False)
DENSE_SPECS = {"nyuv2": NYUV2, "cityscapes": CITYSCAPES}
# The authors' batch sizes (experiments/*/conf/config.yaml), used by --bench.
AUTHOR_BATCH_SIZE = {"nyuv2": 2, "cityscapes": 8, "celeba": 256}


def _key(directory: str) -> str:
    """Batch key of a sub-directory: ``label_7`` is served as ``label``."""
    return "label" if directory.startswith("label") else directory


# ---------------------------------------------------------------------------------------
# NYU-v2 / CityScapes files
# ---------------------------------------------------------------------------------------
def _split_dir(root: str | os.PathLike, spec: DenseSpec, split: str) -> Path:
    if split not in ("train", "val"):
        raise ValueError(f"{spec.name} has splits 'train' and 'val', got {split!r}")
    path = Path(root) / split
    for directory in spec.dirs:
        if not (path / directory).is_dir():
            raise FileNotFoundError(
                f"{spec.name}: missing directory {path / directory} (expected "
                f"ROOT/{{train,val}}/{{{','.join(spec.dirs)}}}/{{i}}.npy)"
            )
    return path


def dense_size(root: str | os.PathLike, spec: DenseSpec, split: str) -> int:
    """Number of samples of a split; checks that every ``{i}.npy``, ``i < n``, exists."""
    path = _split_dir(root, spec, split)
    names = {f for f in os.listdir(path / "image") if f.endswith(".npy")}
    n = len(names)
    if n == 0:
        raise DatasetError(f"{spec.name}: no .npy files in {path / 'image'}")
    for directory in spec.dirs:
        present = names if directory == "image" else set(os.listdir(path / directory))
        missing = [i for i in range(n) if f"{i}.npy" not in present]
        if missing:
            raise FileNotFoundError(
                f"{spec.name}: missing file {path / directory / f'{missing[0]}.npy'} "
                f"({len(missing)} of {n} missing; files must be named 0.npy .. {n - 1}.npy)"
            )
    return n


def _read_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable .npy file ({err})") from err
    if array.shape != shape:
        raise DatasetError(f"{path}: shape {array.shape}, expected {shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DatasetError(f"{path}: dtype {array.dtype}, expected an integer or float dtype")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DatasetError(f"{path}: contains NaN or infinite values")
    return array


def _to_label(array: np.ndarray, path: Path | str, num_classes: int) -> np.ndarray:
    """int8 labels; raises unless every value is an integer in ``{-1, .., C-1}``."""
    labels = array.astype(np.int64)
    bad = (labels != array) | (labels < -1) | (labels >= num_classes)
    if bad.any():
        raise DatasetError(
            f"{path}: label value {array[bad].flat[0].item()!r} is not an integer in "
            f"{{-1, 0, .., {num_classes - 1}}} (-1 = ignore)"
        )
    return labels.astype(np.int8)


def _storage(directory: str, array: np.ndarray, path: Path | str, spec: DenseSpec) -> np.ndarray:
    """In-memory form of one file: float32, or int8 for labels."""
    if directory == spec.label_dir:
        return _to_label(array, path, spec.num_classes)
    return array.astype(np.float32)


def load_dense(
    root: str | os.PathLike,
    spec: DenseSpec,
    split: str,
    *,
    limit: int | None = None,
    workers: int = 8,
) -> Batch:
    """Loads ``split`` (``train`` or ``val``) into memory as stacked arrays.

    Returns ``image`` float32 ``(N, H, W, 3)``, ``label`` int8 ``(N, H, W)``, ``depth``
    float32 ``(N, H, W, 1)`` and, for NYU-v2, ``normal`` float32 ``(N, H, W, 3)``; ``limit``
    keeps the first samples. Files are read by ``workers`` threads.
    """
    n = dense_size(root, spec, split)
    n = n if limit is None else min(n, limit)
    path = Path(root) / split
    out = {
        _key(d): np.empty((n, *spec.file_shape(d)), np.int8 if d == spec.label_dir else np.float32)
        for d in spec.dirs
    }

    def load_one(i: int) -> None:
        for d in spec.dirs:
            file = path / d / f"{i}.npy"
            out[_key(d)][i] = _storage(d, _read_npy(file, spec.file_shape(d)), file, spec)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(load_one, range(n)))
    return out


# ---------------------------------------------------------------------------------------
# CelebA files
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CelebaAnnotations:
    """``names`` (N,), ``attributes`` uint8 ``(N, 40)`` in {0, 1}, ``partition`` int8 (N,)."""

    names: tuple[str, ...]
    attributes: np.ndarray
    partition: np.ndarray


def _celeba_paths(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    paths = {
        "images": root / "Img" / "img_align_celeba",
        "attributes": root / "Anno" / "list_attr_celeba.txt",
        "partition": root / "Eval" / "list_eval_partition.txt",
    }
    for name, path in paths.items():
        exists = path.is_dir() if name == "images" else path.is_file()
        if not exists:
            raise FileNotFoundError(f"celeba: missing {path}")
    return paths


def _table(path: Path, skip: int, columns: int) -> tuple[list[int], list[list[str]]]:
    """(1-based line numbers, whitespace-split rows) after ``skip`` header lines, blank lines
    dropped; each row must have ``columns`` fields."""
    numbered = [
        (k + 1, line.split())
        for k, line in enumerate(path.read_text().splitlines())
        if k >= skip and line.strip()
    ]
    for number, row in numbered:
        if len(row) != columns:
            raise DatasetError(f"{path}: line {number} has {len(row)} fields, expected {columns}")
    return [number for number, _ in numbered], [row for _, row in numbered]


def _parse_attributes(path: Path) -> tuple[list[str], np.ndarray]:
    head = path.read_text().splitlines()[:2]
    if len(head) < 2 or not head[0].strip().isdigit():
        raise DatasetError(f"{path}: expected a count on line 1 and 40 names on line 2")
    if len(head[1].split()) != len(CELEBA_ATTRIBUTES):
        raise DatasetError(f"{path}: line 2 has {len(head[1].split())} names, expected 40")
    numbers, rows = _table(path, 2, 1 + len(CELEBA_ATTRIBUTES))
    if int(head[0]) != len(rows):
        raise DatasetError(f"{path}: line 1 declares {int(head[0])} images, found {len(rows)}")
    values = np.array([row[1:] for row in rows]).reshape(len(rows), -1)
    bad = (values != "1") & (values != "-1")
    if bad.any():
        line = numbers[int(np.argwhere(bad)[0, 0])]
        raise DatasetError(f"{path}: line {line}: attribute values must be 1 or -1")
    return [row[0] for row in rows], (values == "1").astype(np.uint8)


def read_celeba_annotations(root: str | os.PathLike) -> CelebaAnnotations:
    """Parses and cross-checks the attribute and partition files."""
    paths = _celeba_paths(root)
    names, attributes = _parse_attributes(paths["attributes"])
    numbers, rows = _table(paths["partition"], 0, 2)
    if len(rows) != len(names):
        raise DatasetError(
            f"{paths['partition']}: {len(rows)} rows, but {paths['attributes']} has {len(names)}"
        )
    for number, row, name in zip(numbers, rows, names, strict=True):
        if row[0] != name or row[1] not in ("0", "1", "2"):
            raise DatasetError(
                f"{paths['partition']}: line {number} is {' '.join(row)!r}; expected {name!r} "
                "(same order as the attribute file) and a partition 0, 1 or 2"
            )
    partition = np.array([int(row[1]) for row in rows], np.int8)
    return CelebaAnnotations(tuple(names), attributes, partition)


def decode_celeba_image(path: str | os.PathLike, size: int = CELEBA_SIZE) -> np.ndarray:
    """uint8 ``(size, size, 3)``: Pillow decode, RGB, ``resize((size, size), BILINEAR)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from err
    return np.asarray(resized, np.uint8)


def load_celeba(
    root: str | os.PathLike,
    split: str,
    *,
    limit: int | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Batch:
    """Decodes a split (``train``, ``val``, ``test``) into ``image`` uint8 ``(N, 64, 64, 3)``
    and ``attributes`` uint8 ``(N, 40)``.

    JPEGs are decoded once, by ``workers`` threads (Pillow releases the GIL); with
    ``cache_dir`` the decoded images are saved as ``.npy`` under a name that hashes the
    split's file names, and reused.
    """
    if split not in CELEBA_SPLITS:
        raise ValueError(f"celeba has splits {tuple(CELEBA_SPLITS)}, got {split!r}")
    ann = read_celeba_annotations(root)
    rows = np.flatnonzero(ann.partition == CELEBA_SPLITS[split])[:limit]
    names = [ann.names[r] for r in rows]
    image_dir = _celeba_paths(root)["images"]
    present = set(os.listdir(image_dir))
    missing = [name for name in names if name not in present]
    if missing:
        raise FileNotFoundError(f"celeba: missing image {image_dir / missing[0]}")
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"celeba_{split}_{len(names)}_{CELEBA_SIZE}_{digest}.npy"
    if cache is not None and cache.is_file():
        images = np.load(cache)
    else:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            decoded = list(pool.map(decode_celeba_image, [image_dir / n for n in names]))
        shape = (0, CELEBA_SIZE, CELEBA_SIZE, 3)
        images = np.stack(decoded) if decoded else np.zeros(shape, np.uint8)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, images)
    return {"image": images, "attributes": ann.attributes[rows]}


# ---------------------------------------------------------------------------------------
# Synthetic data of the exact formats
# ---------------------------------------------------------------------------------------
def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation matrix (align corners)."""
    src = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _smooth_fields(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """(count, H, W) smooth standard-normal-ish fields (a coarse grid, bilinearly upsampled)."""
    coarse = rng.normal(size=(count, max(2, height // 32), max(2, width // 32)))
    rows = _upsample_matrix(height, coarse.shape[1])
    cols = _upsample_matrix(width, coarse.shape[2])
    return rows @ coarse @ cols.T


def _synthetic_dense_sample(spec: DenseSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample in the on-disk format (float64 arrays, label float64 with -1)."""
    h, w, c = spec.height, spec.width, spec.num_classes
    fields = _smooth_fields(rng, c + 5, h, w)
    scores = fields[:c]
    top2 = np.partition(scores, c - 2, axis=0)[-2:]
    label = np.argmax(scores, axis=0).astype(np.float64)
    label[top2[1] - top2[0] < 0.03] = -1  # ignored pixels near class boundaries
    z = 1 / (1 + np.exp(-fields[c]))
    lo, hi = (0.5, 10.0) if spec.has_normal else (0.01, 0.4)  # metres / inverse depth
    depth = lo + (hi - lo) * z
    valid = fields[c + 1] < 1.5  # about 7 % of pixels without a measurement
    depth[~valid] = 0.0
    palette = np.random.default_rng(len(spec.name)).uniform(0.1, 0.9, size=(c + 1, 3))
    noise = 1 / (1 + np.exp(-fields[c + 2 : c + 5]))
    image = 0.5 * palette[label.astype(int)] + 0.3 * np.moveaxis(noise, 0, -1) + 0.2 * z[..., None]
    sample = {"image": np.clip(image, 0, 1), spec.label_dir: label, "depth": depth[..., None]}
    if spec.has_normal:
        dzdy, dzdx = np.gradient(depth * 20)
        normal = np.stack([-dzdx, -dzdy, np.ones_like(depth)], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        sample["normal"] = normal * valid[..., None]
    return sample


def synthetic_dense(spec: DenseSpec, n: int, seed: int = 0) -> Batch:
    """``n`` synthetic samples as ``load_dense`` returns them (same keys, shapes, dtypes)."""
    rng = np.random.default_rng([seed, 0])
    samples = [_synthetic_dense_sample(spec, rng) for _ in range(n)]
    return {
        _key(d): np.stack([_storage(d, s[d], "<synthetic>", spec) for s in samples])
        for d in spec.dirs
    }


def write_synthetic_dense(
    root: str | os.PathLike, spec: DenseSpec, n_train: int, n_val: int, seed: int = 0
) -> Path:
    """Writes ``ROOT/{train,val}/{dirs}/{i}.npy`` (float64, like the released files)."""
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        rng = np.random.default_rng([seed, 1, stream])
        for d in spec.dirs:
            (Path(root) / split / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for d, array in _synthetic_dense_sample(spec, rng).items():
                np.save(Path(root) / split / d / f"{i}.npy", array)
    return Path(root)


def _synthetic_celeba_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 40) {0, 1} attributes and (n, 218, 178, 3) uint8 images that depend on them."""
    rng = np.random.default_rng([seed, 2])
    attributes = (rng.random((n, 40)) < np.linspace(0.05, 0.8, 40)).astype(np.uint8)
    w, h = CELEBA_RAW_SIZE
    patterns = _smooth_fields(np.random.default_rng(40), 3 * 40, h, w).reshape(40, 3, h, w)
    images = np.empty((n, h, w, 3), np.uint8)
    for lo in range(0, n, 64):  # chunks keep the float64 temporaries small
        a = 2.0 * attributes[lo : lo + 64] - 1.0
        signal = (a @ patterns.reshape(40, -1)).reshape(len(a), 3, h, w) / np.sqrt(40)
        noise = _smooth_fields(rng, 3 * len(a), h, w).reshape(len(a), 3, h, w)
        image = np.moveaxis(127.5 + 60 * signal + 20 * noise, 1, -1)
        images[lo : lo + 64] = np.clip(image, 0, 255)
    return attributes, images


def write_synthetic_celeba(
    root: str | os.PathLike, n: int, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)
) -> Path:
    """Writes ``n`` JPEGs (178 x 218) and the two annotation files in CelebA's formats.

    The first ``fractions[0]`` of the images are train, the next ``fractions[1]`` val, the
    rest test; each attribute flips a fixed colour pattern so that the attributes are learnable.
    """
    from PIL import Image

    paths = {
        "images": Path(root) / "Img" / "img_align_celeba",
        "attributes": Path(root) / "Anno" / "list_attr_celeba.txt",
        "partition": Path(root) / "Eval" / "list_eval_partition.txt",
    }
    for path in (paths["images"], paths["attributes"].parent, paths["partition"].parent):
        path.mkdir(parents=True, exist_ok=True)
    attributes, images = _synthetic_celeba_arrays(n, seed)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image).save(paths["images"] / name, quality=95)
    signs = 2 * attributes.astype(np.int64) - 1
    rows = [
        f"{name} " + " ".join(f"{v:2d}" for v in a) for name, a in zip(names, signs, strict=True)
    ]
    header = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    paths["attributes"].write_text("\n".join(header + rows) + "\n")
    cuts = np.cumsum(np.round(np.array(fractions) * n).astype(int))
    part = np.searchsorted(cuts, np.arange(n), side="right")
    paths["partition"].write_text("".join(f"{a} {p}\n" for a, p in zip(names, part, strict=True)))
    return Path(root)


def synthetic_celeba(n: int, seed: int = 0) -> Batch:
    """``n`` samples as ``load_celeba`` returns them (images resized to 64 x 64, no JPEG)."""
    from PIL import Image

    attributes, images = _synthetic_celeba_arrays(n, seed)
    small = [
        np.asarray(Image.fromarray(im).resize((CELEBA_SIZE, CELEBA_SIZE), Image.BILINEAR))
        for im in images
    ]
    shape = (0, CELEBA_SIZE, CELEBA_SIZE, 3)
    return {
        "image": np.stack(small) if small else np.zeros(shape, np.uint8),
        "attributes": attributes,
    }


def load_split(
    dataset: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    synthetic: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> Batch:
    """One split of ``nyuv2``, ``cityscapes`` or ``celeba``: from ``root``, or ``synthetic``
    (the number of generated samples; the seed differs per split)."""
    stream = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    if dataset in DENSE_SPECS:
        spec = DENSE_SPECS[dataset]
        if synthetic is not None:
            return synthetic_dense(spec, synthetic, seed=seed * 4 + stream)
        if root is None:
            raise ValueError("pass root or synthetic")
        return load_dense(root, spec, split, limit=limit)
    if dataset == "celeba":
        if synthetic is not None:
            return synthetic_celeba(synthetic, seed=seed * 4 + stream)
        if root is None:
            raise ValueError("pass root or synthetic")
        return load_celeba(root, split, limit=limit)
    raise ValueError(f"unknown dataset {dataset!r}; expected nyuv2, cityscapes or celeba")


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------
def gather(arrays: Mapping[str, np.ndarray], indices: np.ndarray) -> Batch:
    """The batch ``indices`` of a loaded split, in model dtypes.

    One fancy-indexing copy per array; uint8 images become float32 ``x / 255`` (torchvision's
    ``ToTensor``), labels int32, attributes float32.
    """
    batch: Batch = {}
    for key, array in arrays.items():
        part = array[indices]
        if key == "image" and part.dtype == np.uint8:
            part = part.astype(np.float32) / np.float32(255)
        elif key == "label":
            part = part.astype(np.int32)
        elif key == "attributes":
            part = part.astype(np.float32)
        batch[key] = part
    return batch


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch (the authors' loaders keep the last, smaller batch)."""
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    augment: Augment | None = None,
) -> Iterator[Batch]:
    """Batches of one epoch; the order and the augmentation are functions of (seed, epoch).

    ``augment(batch, rng)`` gets a generator seeded by ``(seed, epoch, batch index)``, so a
    resumed epoch or a prefetching thread gives the same batches.
    """
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for b in range(num_batches(n, batch_size, drop_last)):
        batch = gather(arrays, order[b * batch_size : (b + 1) * batch_size])
        if augment is not None:
            batch = augment(batch, np.random.default_rng([seed, epoch, b, 1]))
        yield batch


# ---------------------------------------------------------------------------------------
# Augmentation: the authors' RandomScaleCrop + horizontal flip, vectorised over the batch
# ---------------------------------------------------------------------------------------
def _nearest_index(in_size: np.ndarray, out_size: int) -> np.ndarray:
    """(B, out) source indices of PyTorch's legacy ``nearest`` (float32 ``floor(d * in/out)``)."""
    scale = in_size.astype(np.float32) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    idx = np.floor(dst[None, :] * scale[:, None]).astype(np.int64)
    return np.minimum(idx, in_size[:, None] - 1)


def _bilinear_index(in_size: np.ndarray, out_size: int) -> tuple[np.ndarray, ...]:
    """(B, out) ``(i0, i1, weight of i1)`` of ``bilinear`` with ``align_corners=True``."""
    scale = (in_size - 1) / max(out_size - 1, 1)
    src = np.arange(out_size)[None, :] * scale[:, None]
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size[:, None] - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _take(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """``x[b, idx[b, k]]`` along ``axis`` (1 = rows, 2 = columns) of a (B, H, W, C) array.

    Rows are one advanced-indexing copy of whole rows; columns one ``np.take`` of flat pixel
    indices (4x faster than ``take_along_axis`` or three-array fancy indexing here).
    """
    b, h, w, c = x.shape
    batch = np.arange(b)[:, None]
    if axis == 1:
        return x[batch, idx]
    flat = (batch[:, :, None] * h + np.arange(h)[None, :, None]) * w + idx[:, None, :]
    return np.take(x.reshape(b * h * w, c), flat, axis=0)


def _lerp(x: np.ndarray, idx: tuple[np.ndarray, ...], axis: int) -> np.ndarray:
    i0, i1, t = idx
    shape = [t.shape[0], 1, 1, 1]
    shape[axis] = t.shape[1]
    t = t.reshape(shape)
    low, high = _take(x, i0, axis), _take(x, i1, axis)
    high -= low  # in place: low + (high - low) * t without further temporaries
    high *= t
    low += high
    return low


def scale_crop_flip(
    batch: Batch,
    scale: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    flipped: np.ndarray,
) -> Batch:
    """Crops and flips given per sample: ``(B,)`` scales, crop offsets and flip flags.

    Sample ``b`` keeps the ``int(H / s) x int(W / s)`` window at ``(top, left)``, resized back to
    ``H x W`` (``image`` and ``normal``: bilinear, ``align_corners=True``; ``label`` and
    ``depth``: PyTorch's legacy nearest, ``src = floor(dst * in / out)`` in float32) and
    ``depth / s``; a flipped sample is mirrored left-right and its normals' x component negated.
    """
    image = batch["image"]
    height, width = image.shape[1:3]
    s = np.asarray(scale, np.float64)
    crop_h, crop_w = (height / s).astype(np.int64), (width / s).astype(np.int64)
    top, left, flipped = np.asarray(top), np.asarray(left), np.asarray(flipped, bool)
    if np.any(top < 0) or np.any(top + crop_h > height) or np.any(left + crop_w > width):
        raise ValueError("crop window outside the image")

    def columns(idx: np.ndarray) -> np.ndarray:  # output column x reads input column W-1-x
        return np.where(flipped[:, None], idx[:, ::-1], idx)

    r0, r1, rt = _bilinear_index(crop_h, height)
    rows_b = (r0 + top[:, None], r1 + top[:, None], rt)
    c0, c1, ct = _bilinear_index(crop_w, width)
    cols_b = (columns(c0 + left[:, None]), columns(c1 + left[:, None]), columns(ct))
    rows_n = _nearest_index(crop_h, height) + top[:, None]
    cols_n = columns(_nearest_index(crop_w, width) + left[:, None])

    out = dict(batch)
    out["image"] = _lerp(_lerp(image, rows_b, 1), cols_b, 2).astype(image.dtype, copy=False)
    if "normal" in batch:
        normal = _lerp(_lerp(batch["normal"], rows_b, 1), cols_b, 2)
        normal[..., 0] *= np.where(flipped, -1, 1).astype(normal.dtype)[:, None, None]
        out["normal"] = normal.astype(batch["normal"].dtype, copy=False)
    if "label" in batch:
        out["label"] = _take(_take(batch["label"][..., None], rows_n, 1), cols_n, 2)[..., 0]
    if "depth" in batch:
        depth = _take(_take(batch["depth"], rows_n, 1), cols_n, 2) / s[:, None, None, None]
        out["depth"] = depth.astype(batch["depth"].dtype, copy=False)
    return out


def random_scale_crop_flip(
    batch: Batch,
    rng: np.random.Generator,
    scales: tuple[float, ...] = AUGMENT_SCALES,
    flip: bool = True,
) -> Batch:
    """The authors' NYU-v2 / CityScapes training augmentation, vectorised over the batch.

    Per sample, as their ``RandomScaleCrop`` and flip: a scale ``s`` uniform over ``scales``, a
    crop offset uniform over the valid ones, a flip with probability 1/2; ``scale_crop_flip``
    does the rest. Labels keep their values (-1 included).
    """
    b, height, width = batch["image"].shape[:3]
    s = np.asarray(scales, np.float64)[rng.integers(0, len(scales), size=b)]
    crop_h, crop_w = (height / s).astype(np.int64), (width / s).astype(np.int64)
    top = rng.integers(0, height - crop_h + 1)
    left = rng.integers(0, width - crop_w + 1)
    flipped = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
    return scale_crop_flip(batch, s, top, left, flipped)


# ---------------------------------------------------------------------------------------
# Background prefetching
# ---------------------------------------------------------------------------------------
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(
    iterable: Iterable[Any], size: int = 2, transfer: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
    """Iterates ``iterable`` in a background thread, ``size`` items ahead.

    ``transfer`` (e.g. ``jax.device_put``) runs in the thread too, so host-to-device copies
    overlap the training step. Errors are re-raised in the consumer; closing the returned
    generator (or leaving its loop) stops the thread.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(transfer(item) if transfer is not None else item):
                    return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(_Failure(err))

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------
# Throughput measurement (python examples/paper/data.py --bench nyuv2)
# ---------------------------------------------------------------------------------------
def measure_throughput(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    batches: int,
    augment: Augment | None,
    use_prefetch: bool = True,
) -> float:
    """Batches per second of ``epoch_batches`` (+ ``prefetch``) over ``batches`` batches."""
    n = len(next(iter(arrays.values())))
    per_epoch = num_batches(n, batch_size, drop_last=True)

    def stream() -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from epoch_batches(
                arrays, batch_size, epoch=epoch, drop_last=True, augment=augment
            )
            epoch += 1

    if per_epoch == 0:
        raise ValueError(f"{n} samples do not fill one batch of {batch_size}")
    source = prefetch(stream(), size=4) if use_prefetch else stream()
    next(source)  # warm up
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    elapsed = time.perf_counter() - start
    if use_prefetch:
        source.close()
    return batches / elapsed


def _bench(args: argparse.Namespace) -> None:
    batch_size = args.batch_size or AUTHOR_BATCH_SIZE[args.dataset]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        t0 = time.perf_counter()
        if root is None:
            root = tmp
            if args.dataset == "celeba":
                write_synthetic_celeba(root, int(args.samples / 0.6) + 1)
            else:
                write_synthetic_dense(root, DENSE_SPECS[args.dataset], args.samples, 0)
        t1 = time.perf_counter()
        arrays = load_split(args.dataset, "train", root, limit=args.samples)
        t2 = time.perf_counter()
    n = len(arrays["image"])
    augment = None if args.dataset == "celeba" or args.no_augment else random_scale_crop_flip
    print(f"{args.dataset}: {n} train samples; wrote in {t1 - t0:.1f} s, loaded in {t2 - t1:.1f} s")
    for use_prefetch in (False, True):
        rate = measure_throughput(arrays, batch_size, args.batches, augment, use_prefetch)
        print(
            f"batch {batch_size}, augmentation {'on' if augment else 'off'}, "
            f"prefetch {'on' if use_prefetch else 'off'}: {rate:.1f} batches/s "
            f"({rate * batch_size:.0f} samples/s)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("nyuv2", "cityscapes", "celeba"), required=True)
    parser.add_argument("--root", help="dataset root (default: synthetic files in a temp dir)")
    parser.add_argument("--write-synthetic", metavar="DIR", help="write a synthetic dataset")
    parser.add_argument("--samples", type=int, default=32, help="train samples (synthetic)")
    parser.add_argument("--bench", action="store_true", help="measure the input pipeline")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args(argv)
    if args.write_synthetic:
        if args.dataset == "celeba":
            write_synthetic_celeba(args.write_synthetic, args.samples)
        else:
            n_val = max(1, args.samples // 4)
            spec = DENSE_SPECS[args.dataset]
            write_synthetic_dense(args.write_synthetic, spec, args.samples, n_val)
        print(f"wrote a synthetic {args.dataset} to {args.write_synthetic}")
    if args.bench:
        _bench(args)


if __name__ == "__main__":
    main()
