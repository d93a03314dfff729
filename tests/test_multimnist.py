"""MultiMNIST example: data determinism and disjointness, a --quick run, exact resume, Linen.

The data checks compare with an independent per-pixel transcription of the
construction (canvas, overlay, triangle-filter resampling) written with plain loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

for _module in ("mlxtend", "orbax.checkpoint", "tqdm", "flax"):  # the "examples" extra
    pytest.importorskip(_module)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import multimnist as mn  # noqa: E402
import multimnist_benchmark as mb  # noqa: E402
import multimnist_data as md  # noqa: E402

SIZES = (96, 32, 48)


@pytest.fixture(scope="module")
def splits():
    return md.make_multimnist(3, *SIZES)


def _reference_image(d0: np.ndarray, d1: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Per-pixel loops: overlay on a 36x36 canvas, then 36 -> 28 triangle resampling."""
    canvas = np.zeros((36, 36))
    ty, tx, by, bx = (int(s) for s in shifts)
    for r in range(28):
        for c in range(28):
            canvas[ty + r, tx + c] = max(canvas[ty + r, tx + c], d0[r, c])
            canvas[8 - by + r, 8 - bx + c] = max(canvas[8 - by + r, 8 - bx + c], d1[r, c])
    scale = 36 / 28
    weights = np.zeros((28, 36))
    for i in range(28):
        centre = (i + 0.5) * scale - 0.5
        for j in range(36):
            weights[i, j] = max(0.0, 1.0 - abs(j - centre) / scale)
        weights[i] /= weights[i].sum()
    out = np.zeros((28, 28))
    for i in range(28):
        for k in range(28):
            out[i, k] = sum(
                weights[i, j] * weights[k, l] * canvas[j, l]
                for j in range(36)
                if weights[i, j]
                for l in range(36)  # noqa: E741
                if weights[k, l]
            )
    return out / 255.0


def test_source_file_has_500_real_digits_per_class():
    digits, labels = md.load_mnist_5k()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
    assert digits.max() == 255 and 80 < digits.mean() / 255 * 1000 < 170  # ink ~13%


def test_splits_are_deterministic_and_seed_dependent(splits):
    again = md.make_multimnist(3, *SIZES)
    other = md.make_multimnist(4, *SIZES)
    for name in ("train", "val", "test"):
        for field in ("images", "labels", "sources", "shifts"):
            np.testing.assert_array_equal(getattr(splits[name], field), getattr(again[name], field))
        assert not np.array_equal(splits[name].sources, other[name].sources)


def test_source_digits_are_disjoint_and_stratified(splits):
    _, labels = md.load_mnist_5k()
    pools = md.split_sources(labels, 3)
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert sum(len(s) for s in sets.values()) == 5000 == len(set.union(*sets.values()))
    for name, per_class in (("train", 350), ("val", 50), ("test", 100)):
        np.testing.assert_array_equal(np.bincount(labels[pools[name]]), np.full(10, per_class))
        used = set(splits[name].sources.ravel().tolist())
        assert used <= sets[name]
    for split in splits.values():
        assert np.all(split.sources[:, 0] != split.sources[:, 1])
        np.testing.assert_array_equal(split.labels, labels[split.sources])
        assert split.shifts.min() >= 0 and split.shifts.max() <= 4


def test_images_match_a_per_pixel_reference(splits):
    digits, _ = md.load_mnist_5k()
    split = splits["val"]
    for i in (0, 7):
        d0, d1 = digits[split.sources[i, 0]], digits[split.sources[i, 1]]
        want = _reference_image(d0.astype(np.float64), d1.astype(np.float64), split.shifts[i])
        np.testing.assert_allclose(split.images[i], want, rtol=0, atol=1e-6)


def test_delta_m_matches_equation_4():
    # accuracies (higher is better, nu = 1): -(1/K) sum (m - m_stl) / m_stl * 100
    assert mb.delta_m(np.array([0.9, 0.8]), np.array([1.0, 0.8])) == pytest.approx(5.0)
    assert mb.delta_m(np.array([0.55, 0.5]), np.array([0.5, 0.5])) == pytest.approx(-5.0)
    np.testing.assert_array_equal(mb._rank(-np.array([0.7, 0.9, 0.7])), [2.0, 1.0, 2.0])


def test_quick_cli_run_prints_one_json_line():
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "multimnist.py"), "--method", "samgs",
         "--seed", "1", "--quick", "--no-progress"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["method"] == "samgs" and out["seed"] == 1
    assert len(out["test_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in out["test_accuracy"])
    assert out["epochs_done"] == mn.QUICK["epochs"] == len(out["val_accuracy"])


def _cli(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "multimnist.py"), *args, "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path):
    """Through the CLI with --deterministic (on a GPU, XLA's reductions are otherwise not
    deterministic and the resumed parameters differ in the 4th digit; on CPU it is a no-op),
    each run in a fresh process as a user would resume."""
    common = ["--method", "samgs", "--seed", "5", "--epochs", "2", "--n-train", "192",
              "--n-val", "64", "--n-test", "64", "--deterministic"]  # fmt: skip
    ckpt = str(tmp_path / "ckpt")
    straight = _cli(*common)
    half = _cli(*common, "--checkpoint-dir", ckpt, "--stop-after", "1")
    assert half["epochs_done"] == 1
    resumed = _cli(*common, "--checkpoint-dir", ckpt, "--resume")
    assert resumed["epochs_done"] == 2
    assert straight["params_sha256"] == resumed["params_sha256"]
    assert straight["val_accuracy"] == resumed["val_accuracy"]
    assert straight["test_accuracy"] == resumed["test_accuracy"]
    # and the half-way run really is different (the test can fail)
    assert half["params_sha256"] != straight["params_sha256"]


@pytest.mark.parametrize("method", mn.method_names())
def test_every_method_builds_and_initialises(method):
    """Every registered aggregator and scalarizer is a method (the list follows the registries)."""
    import multimnist_model as mm

    cfg = mn.Config(method=method)
    _, params = mm.init_model(0)
    built = mn.build_method(cfg, mm.shared_mask(params), 2)
    opt_state = mn.init_opt_state(built, params, 2)
    assert jax.tree.leaves(opt_state)
    assert (built.scalarizer is not None) == (method in mn.scalarizer_methods())
    assert built.per_task == (built.scalarizer is None and method != "ls")


def test_method_names_follow_the_registries():
    import multimnist_model as mm

    import samgs_optax

    names = mn.method_names()
    assert len(names) == len(set(names))
    skipped = mn.inapplicable_methods()  # e.g. Krum: needs 3 tasks
    assert set(samgs_optax.AGGREGATORS) == (set(names) | set(skipped)) - {"ls", "samgs_g09"} - set(
        mn.scalarizer_methods()
    )
    assert not set(skipped) & set(names) and "samgs" not in skipped
    assert set(mn.scalarizer_methods().values()) == set(samgs_optax.SCALARIZERS)
    _, params = mm.init_model(0)
    for name in skipped:
        with pytest.raises(ValueError, match="cannot run on MultiMNIST"):
            mn.build_method(mn.Config(method=name), mm.shared_mask(params), 2)


def test_benchmark_method_selection():
    assert mb.select_methods("all") == mn.method_names()
    default = mb.select_methods(None)
    assert default == [m for m in mn.method_names() if m in mb.DEFAULT_METHODS]
    paper_rows = {"ls", "samgs", "famo", "dwa", "uw", "random", "scale_invariant", "gradnorm"}
    assert paper_rows <= set(default)
    assert mb.select_methods("famo, ls") == ["famo", "ls"]
    with pytest.raises(SystemExit, match="unknown"):
        mb.select_methods("famo,nope")
    groups = mb.job_groups(mn.Config(), ["famo"])
    assert [c.loss_scale for c in groups[0]] == [1.0] * 3 + [100.0] * 3


@pytest.mark.parametrize("method", ["famo", "dwa"])
def test_scalarizer_runs_resume_bit_identically(method, tmp_path):
    """In process: FAMO's logits (and their Adam) and DWA's epoch averages are checkpointed;
    a run stopped after epoch 1 and resumed equals a straight one, and the scalarizer's state
    did move."""
    cfg = mn.Config(method=method, seed=2, epochs=2, n_train=128, n_val=64, n_test=64)
    data = mn.load_data(cfg)
    cache: dict = {}
    straight = mn.train(cfg, data, cache=cache, progress=False)
    ckpt = str(tmp_path / method)
    mn.train(cfg, data, checkpoint_dir=ckpt, stop_after=1, cache=cache, progress=False)
    resumed = mn.train(cfg, data, checkpoint_dir=ckpt, resume=True, cache=cache, progress=False)
    assert resumed["epochs_done"] == 2
    assert mn.params_digest(resumed["params"]) == mn.params_digest(straight["params"])
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    _, built, state = mn.init_state(cfg)
    manager = mn.checkpoint_manager(ckpt)
    final = mn.restore_checkpoint(manager, state)["opt_state"]["scalarizer"]
    initial = state["opt_state"]["scalarizer"]
    pairs = zip(jax.tree.leaves(final), jax.tree.leaves(initial), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)


def test_params_digest_sees_one_bit():
    params = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}
    flipped = {"a": np.array([0.0, np.float32(1e-45), 0.0], np.float32), "b": params["b"]}
    assert mn.params_digest(params) == mn.params_digest(jax.tree.map(np.copy, params))
    assert mn.params_digest(params) != mn.params_digest(flipped)


def test_heads_are_masked_out_of_the_surgery():
    import multimnist_model as mm

    _, params = mm.init_model(0)
    flags = jax.tree.leaves(mm.shared_mask(params))
    assert sum(flags) == 6 and len(flags) == 14  # encoder: 3 layers x (kernel, bias)


def test_linen_example_trains():
    import multimnist_linen

    out = multimnist_linen.main(["--epochs", "1", "--n-train", "256"])
    assert out["api"] == "linen" and len(out["test_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in out["test_accuracy"])
