"""examples/paper/data.py: synthetic files of the exact formats, loaders, errors, augmentation."""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import numpy as np
import pytest
from conftest import load_paper_module

pytest.importorskip("PIL")


pd = load_paper_module("data")
SMALL_NYU = dataclasses.replace(pd.NYUV2, height=12, width=16)


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    return pd.write_synthetic_dense(tmp_path_factory.mktemp("nyuv2"), pd.NYUV2, 3, 2, seed=1)


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    return pd.write_synthetic_celeba(tmp_path_factory.mktemp("celeba"), 20, seed=2)


# ----------------------------------------------------------------------------------------
# NYU-v2 / CityScapes
# ----------------------------------------------------------------------------------------
def test_synthetic_nyuv2_files_have_the_released_layout(nyu_root):
    for split, n in (("train", 3), ("val", 2)):
        for d in ("image", "label", "depth", "normal"):
            assert sorted(os.listdir(nyu_root / split / d)) == [f"{i}.npy" for i in range(n)]
    files = {d: np.load(nyu_root / "train" / d / "0.npy") for d in pd.NYUV2.dirs}
    assert files["image"].shape == (288, 384, 3) and files["image"].dtype == np.float64
    assert 0 <= files["image"].min() and files["image"].max() <= 1
    assert files["label"].shape == (288, 384)
    assert set(np.unique(files["label"])) <= set(range(-1, 13)) and (files["label"] == -1).any()
    assert files["depth"].shape == (288, 384, 1) and (files["depth"] == 0).any()
    assert files["depth"].min() >= 0
    normal = files["normal"]
    assert normal.shape == (288, 384, 3)
    norms = np.linalg.norm(normal, axis=-1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-6)  # unit, or all zero
    assert ((norms == 0) == (files["depth"][..., 0] == 0)).all()


def test_load_nyuv2_round_trip(nyu_root):
    data = pd.load_dense(nyu_root, pd.NYUV2, "train")
    assert {k: (v.shape, v.dtype) for k, v in data.items()} == {
        "image": ((3, 288, 384, 3), np.float32),
        "label": ((3, 288, 384), np.int8),
        "depth": ((3, 288, 384, 1), np.float32),
        "normal": ((3, 288, 384, 3), np.float32),
    }
    for d in pd.NYUV2.dirs:
        raw = np.load(nyu_root / "train" / d / "2.npy")
        np.testing.assert_array_equal(data[d][2], raw.astype(data[d].dtype))
    assert len(pd.load_dense(nyu_root, pd.NYUV2, "val")["image"]) == 2
    assert len(pd.load_dense(nyu_root, pd.NYUV2, "train", limit=1)["label"]) == 1
    same = pd.synthetic_dense(pd.NYUV2, 2)  # the in-memory source matches the loader's output
    assert {k: (v.shape[1:], v.dtype) for k, v in same.items()} == {
        k: (v.shape[1:], v.dtype) for k, v in data.items()
    }


def test_cityscapes_round_trip_serves_label_7_as_label(tmp_path):
    root = pd.write_synthetic_dense(tmp_path, pd.CITYSCAPES, 2, 1)
    assert sorted(os.listdir(root / "val")) == ["depth", "image", "label_7"]
    data = pd.load_split("cityscapes", "train", root)
    assert data["image"].shape == (2, 128, 256, 3) and data["depth"].shape == (2, 128, 256, 1)
    assert set(np.unique(data["label"])) <= set(range(-1, 7)) and "normal" not in data
    np.testing.assert_array_equal(data["label"][1], np.load(root / "train" / "label_7" / "1.npy"))


def test_missing_paths_are_named(tmp_path, nyu_root):
    with pytest.raises(FileNotFoundError, match=r"nowhere.train.image"):
        pd.load_dense(tmp_path / "nowhere", pd.NYUV2, "train")
    root = pd.write_synthetic_dense(tmp_path / "copy", SMALL_NYU, 3, 1)
    os.remove(root / "train" / "depth" / "1.npy")
    with pytest.raises(FileNotFoundError, match=r"train.depth.1\.npy"):
        pd.load_dense(root, SMALL_NYU, "train")
    os.rename(root / "val" / "normal", root / "val" / "normals")
    with pytest.raises(FileNotFoundError, match=r"val.normal "):
        pd.load_dense(root, SMALL_NYU, "val")
    with pytest.raises(ValueError, match="splits"):
        pd.load_dense(nyu_root, pd.NYUV2, "test")


def _bad_file_root(tmp_path, directory, array=None, raw=None):
    root = pd.write_synthetic_dense(tmp_path, SMALL_NYU, 2, 1)
    path = root / "train" / directory / "1.npy"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, array)
    return root, path


@pytest.mark.parametrize(
    ("directory", "array", "raw", "message"),
    [
        ("image", None, b"not a numpy file", "not a readable .npy"),
        ("image", np.zeros((12, 16)), None, r"shape \(12, 16\), expected \(12, 16, 3\)"),
        ("label", np.full((12, 16), 13.0), None, "label value 13.0"),
        ("label", np.full((12, 16), 0.5), None, "label value 0.5"),
        ("label", np.full((12, 16), -2), None, "label value -2"),
        ("depth", np.full((12, 16, 1), np.nan), None, "NaN"),
        ("normal", np.zeros((12, 16, 3), bool), None, "dtype bool"),
    ],
)
def test_malformed_files_are_named(tmp_path, directory, array, raw, message):
    root, path = _bad_file_root(tmp_path, directory, array, raw)
    with pytest.raises(pd.DatasetError, match=message) as info:
        pd.load_dense(root, SMALL_NYU, "train")
    assert str(path) in str(info.value)


def test_integer_label_files_are_accepted(tmp_path):
    labels = np.arange(12 * 16).reshape(12, 16) % 14 - 1
    root, _ = _bad_file_root(tmp_path, "label", labels.astype(np.int64))
    np.testing.assert_array_equal(pd.load_dense(root, SMALL_NYU, "train")["label"][1], labels)


# ----------------------------------------------------------------------------------------
# CelebA
# ----------------------------------------------------------------------------------------
def test_synthetic_celeba_files_and_round_trip(celeba_root):
    lines = (celeba_root / "Anno" / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == "20" and lines[1].split() == pd.CELEBA_ATTRIBUTES
    assert lines[2].split()[0] == "000001.jpg" and set(lines[2].split()[1:]) <= {"1", "-1"}
    ann = pd.read_celeba_annotations(celeba_root)
    assert np.bincount(ann.partition).tolist() == [12, 4, 4]
    train = pd.load_celeba(celeba_root, "train")
    assert train["image"].shape == (12, 64, 64, 3) and train["image"].dtype == np.uint8
    assert train["attributes"].shape == (12, 40) and train["attributes"].dtype == np.uint8
    signs = np.array([line.split()[1:] for line in lines[2:]], int)
    np.testing.assert_array_equal(train["attributes"], (signs[:12] == 1).astype(np.uint8))
    from PIL import Image

    with Image.open(celeba_root / "Img" / "img_align_celeba" / "000013.jpg") as im:
        assert im.size == (178, 218)
        want = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(pd.load_celeba(celeba_root, "val")["image"][0], want)
    assert len(pd.load_celeba(celeba_root, "test", limit=3)["image"]) == 3
    batch = pd.gather(train, np.array([0, 5]))
    assert batch["image"].dtype == np.float32 and batch["attributes"].dtype == np.float32
    np.testing.assert_allclose(batch["image"][1], train["image"][5] / 255.0, rtol=1e-6)


def test_celeba_cache_is_written_and_reused(celeba_root, tmp_path, monkeypatch):
    first = pd.load_celeba(celeba_root, "val", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("celeba_val_4_64_*.npy"))) == 1

    def fail(path, size=64):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(pd, "decode_celeba_image", fail)
    np.testing.assert_array_equal(
        pd.load_celeba(celeba_root, "val", cache_dir=tmp_path)["image"], first["image"]
    )


def _celeba_copy(tmp_path, celeba_root):
    import shutil

    return shutil.copytree(celeba_root, tmp_path / "celeba")


def test_celeba_errors_name_the_file(tmp_path, celeba_root):
    with pytest.raises(FileNotFoundError, match=r"Img.img_align_celeba"):
        pd.load_celeba(tmp_path, "train")
    (tmp_path / "Img" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"Anno.list_attr_celeba\.txt"):
        pd.load_celeba(tmp_path, "train")
    root = _celeba_copy(tmp_path, celeba_root)
    attr = root / "Anno" / "list_attr_celeba.txt"
    part = root / "Eval" / "list_eval_partition.txt"
    text, ptext = attr.read_text(), part.read_text()
    cases = [
        (attr, text.replace("20\n", "21\n", 1), "declares 21 images, found 20"),
        (attr, text.replace("000003.jpg -1", "000003.jpg  0", 1), "line 5: attribute values"),
        (attr, text.replace("000003.jpg -1", "\n000003.jpg  0", 1), "line 6: attribute values"),
        (attr, text.replace("000004.jpg ", "000004.jpg 1 ", 1), "line 6 has 42 fields"),
        (part, ptext.replace("000002.jpg 0", "000009.jpg 0"), "line 2 is '000009.jpg 0'"),
        (part, ptext.replace("000002.jpg 0", "000002.jpg 5"), "line 2 is '000002.jpg 5'"),
    ]
    if "000003.jpg -1" not in text or "000004.jpg " not in text:
        pytest.skip("the seed gave different signs")
    for path, bad, message in cases:
        original = path.read_text()
        path.write_text(bad)
        with pytest.raises(pd.DatasetError, match=message) as info:
            pd.load_celeba(root, "train")
        assert str(path) in str(info.value)
        path.write_text(original)
    os.remove(root / "Img" / "img_align_celeba" / "000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"img_align_celeba.000002\.jpg"):
        pd.load_celeba(root, "train")
    (root / "Img" / "img_align_celeba" / "000002.jpg").write_bytes(b"truncated")
    with pytest.raises(pd.DatasetError, match=r"000002\.jpg: not a readable image"):
        pd.load_celeba(root, "train")


def test_grayscale_jpeg_is_converted_to_rgb(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((218, 178), 77, np.uint8)).save(tmp_path / "g.jpg")
    image = pd.decode_celeba_image(tmp_path / "g.jpg")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert abs(int(image.mean()) - 77) <= 1


# ----------------------------------------------------------------------------------------
# Batches and prefetching
# ----------------------------------------------------------------------------------------
def test_epoch_batches_cover_each_sample_once_and_are_reproducible():
    arrays = {
        "image": np.arange(11, dtype=np.float32)[:, None],
        "label": np.arange(11, dtype=np.int8),
    }
    batches = list(pd.epoch_batches(arrays, 4, epoch=3, seed=5))
    assert [len(b["label"]) for b in batches] == [4, 4, 3] == [4] * 2 + [11 - 8]
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == list(range(11))
    assert batches[0]["label"].dtype == np.int32
    again = list(pd.epoch_batches(arrays, 4, epoch=3, seed=5))
    assert all((a["label"] == b["label"]).all() for a, b in zip(batches, again, strict=True))
    other = list(pd.epoch_batches(arrays, 4, epoch=4, seed=5))
    assert any((a["label"] != b["label"]).any() for a, b in zip(batches, other, strict=True))
    kept = list(pd.epoch_batches(arrays, 4, drop_last=True, shuffle=False))
    assert [b["label"].tolist() for b in kept] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pd.num_batches(11, 4) == 3 and pd.num_batches(11, 4, drop_last=True) == 2


def test_prefetch_keeps_order_raises_errors_and_stops():
    assert list(pd.prefetch(iter(range(20)), size=3, transfer=lambda x: 2 * x)) == list(
        range(0, 40, 2)
    )

    def broken():
        yield 1
        raise RuntimeError("disk on fire")

    stream = pd.prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(stream)

    def endless():
        while True:
            yield 0

    before = threading.active_count()
    stream = pd.prefetch(endless(), size=2)
    next(stream)
    stream.close()
    assert threading.active_count() == before


# ----------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------
def ref_bilinear(channel, top, left, ch, cw, out_h, out_w):
    """align_corners=True bilinear resize of channel[top:top+ch, left:left+cw], by loops."""
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = y * (ch - 1) / (out_h - 1)
        y0 = int(math.floor(sy))
        y1, ly = min(y0 + 1, ch - 1), sy - y0
        for x in range(out_w):
            sx = x * (cw - 1) / (out_w - 1)
            x0 = int(math.floor(sx))
            x1, lx = min(x0 + 1, cw - 1), sx - x0
            p = channel[top:, left:]
            upper = (1 - lx) * p[y0, x0] + lx * p[y0, x1]
            lower = (1 - lx) * p[y1, x0] + lx * p[y1, x1]
            out[y, x] = (1 - ly) * upper + ly * lower
    return out


def ref_nearest(channel, top, left, ch, cw, out_h, out_w):
    """PyTorch's legacy nearest: src = floor(dst * float32(in / out)), by loops."""
    out = np.zeros((out_h, out_w), channel.dtype)
    sh, sw = np.float32(ch) / np.float32(out_h), np.float32(cw) / np.float32(out_w)
    for y in range(out_h):
        for x in range(out_w):
            sy = min(int(math.floor(np.float32(y) * sh)), ch - 1)
            sx = min(int(math.floor(np.float32(x) * sw)), cw - 1)
            out[y, x] = channel[top + sy, left + sx]
    return out


def test_nearest_index_uses_pytorch_float32_arithmetic():
    # floorf(22 * float32(26 / 44)) = 12 in float32, where the exact floor(22 * 26 / 44) = 13.
    assert pd._nearest_index(np.array([26]), 44)[0, 22] == 12
    # At the benchmarks' sizes and scales the two agree.
    for size in (288, 384, 128, 256):
        crops = np.array([int(size / s) for s in pd.AUGMENT_SCALES])
        exact = (np.arange(size)[None, :] * crops[:, None]) // size
        np.testing.assert_array_equal(pd._nearest_index(crops, size), exact)


def test_scale_crop_flip_matches_loop_reference():
    batch = pd.gather(pd.synthetic_dense(SMALL_NYU, 3, seed=4), np.arange(3))
    scale, top, left = np.array([1.5, 1.2, 1.0]), np.array([3, 1, 0]), np.array([2, 3, 0])
    flipped = np.array([True, False, True])
    out = pd.scale_crop_flip(batch, scale, top, left, flipped)
    for b in range(3):
        ch, cw = int(12 / scale[b]), int(16 / scale[b])
        args = (top[b], left[b], ch, cw, 12, 16)

        def mirror(a, b=b):
            return a[:, ::-1] if flipped[b] else a

        for c in range(3):
            want = mirror(ref_bilinear(batch["image"][b, ..., c], *args))
            np.testing.assert_allclose(out["image"][b, ..., c], want, atol=2e-6)
            sign = -1 if (c == 0 and flipped[b]) else 1
            want = sign * mirror(ref_bilinear(batch["normal"][b, ..., c], *args))
            np.testing.assert_allclose(out["normal"][b, ..., c], want, atol=2e-6)
        want = mirror(ref_nearest(batch["label"][b], *args))
        np.testing.assert_array_equal(out["label"][b], want)
        want = mirror(ref_nearest(batch["depth"][b, ..., 0], *args)) / scale[b]
        np.testing.assert_allclose(out["depth"][b, ..., 0], want, rtol=1e-6)
    identity = pd.scale_crop_flip(
        batch, np.ones(3), np.zeros(3, int), np.zeros(3, int), np.zeros(3, bool)
    )
    for k, v in batch.items():
        np.testing.assert_allclose(identity[k], v, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        pd.scale_crop_flip(batch, np.full(3, 1.5), np.full(3, 5), np.zeros(3, int), flipped)


def test_random_augmentation_shapes_dtypes_and_valid_labels():
    data = pd.synthetic_dense(pd.CITYSCAPES, 8, seed=3)
    batch = pd.gather(data, np.arange(8))
    out = pd.random_scale_crop_flip(batch, np.random.default_rng(0))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (v.shape, v.dtype) for k, v in batch.items()
    }
    for b in range(8):  # nearest resampling: only values of the sample itself (-1 kept)
        assert set(np.unique(out["label"][b])) <= set(np.unique(batch["label"][b]))
    assert (out["label"] == -1).any()
    assert not np.array_equal(out["image"], batch["image"])
    again = pd.random_scale_crop_flip(batch, np.random.default_rng(0))
    assert all(np.array_equal(again[k], out[k]) for k in out)
    # Every scale: depth values are the sample's values divided by that scale.
    for s in pd.AUGMENT_SCALES:
        scaled = pd.random_scale_crop_flip(batch, np.random.default_rng(1), scales=(s,))
        allowed = (np.unique(batch["depth"][0]).astype(np.float64) / s).astype(np.float32)
        assert np.isin(scaled["depth"][0], allowed).all()


def test_epoch_batches_apply_the_augmentation_per_batch():
    data = pd.synthetic_dense(SMALL_NYU, 6)
    plain = list(pd.epoch_batches(data, 2, seed=0))
    aug = list(pd.epoch_batches(data, 2, seed=0, augment=pd.random_scale_crop_flip))
    assert [b["image"].shape for b in aug] == [b["image"].shape for b in plain]
    assert any(not np.array_equal(a["image"], p["image"]) for a, p in zip(aug, plain, strict=True))


def test_prefetched_augmented_batches_equal_the_direct_ones_and_reach_the_device():
    jax = pytest.importorskip("jax")
    data = pd.synthetic_dense(SMALL_NYU, 5)

    def stream():
        return pd.epoch_batches(data, 2, epoch=1, seed=3, augment=pd.random_scale_crop_flip)

    direct = list(stream())
    fetched = list(pd.prefetch(stream(), size=2, transfer=jax.device_put))
    assert len(fetched) == len(direct) == 3
    for a, b in zip(fetched, direct, strict=True):
        assert isinstance(a["image"], jax.Array)
        for key in b:
            np.testing.assert_array_equal(np.asarray(a[key]), b[key])


def test_load_split_synthetic_sources_and_errors():
    nyu = pd.load_split("nyuv2", "train", synthetic=2)
    assert nyu["normal"].shape == (2, 288, 384, 3) and nyu["label"].dtype == np.int8
    val = pd.load_split("nyuv2", "val", synthetic=2)
    assert not np.array_equal(val["image"], nyu["image"])  # a different stream per split
    celeba = pd.load_split("celeba", "test", synthetic=3)
    assert celeba["image"].shape == (3, 64, 64, 3) and celeba["image"].dtype == np.uint8
    assert celeba["attributes"].shape == (3, 40) and set(np.unique(celeba["attributes"])) <= {0, 1}
    with pytest.raises(ValueError, match="unknown dataset"):
        pd.load_split("mnist", "train", synthetic=1)
    with pytest.raises(ValueError, match="root or synthetic"):
        pd.load_split("cityscapes", "train")


def test_cli_writes_and_benchmarks(tmp_path, capsys):
    pd.main(["--dataset", "cityscapes", "--write-synthetic", str(tmp_path), "--samples", "4"])
    assert len(os.listdir(tmp_path / "train" / "label_7")) == 4
    assert len(os.listdir(tmp_path / "val" / "image")) == 1
    pd.main(
        [
            "--dataset",
            "cityscapes",
            "--root",
            str(tmp_path),
            "--bench",
            "--batches",
            "3",
            "--batch-size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "prefetch on" in out and "batches/s" in out
