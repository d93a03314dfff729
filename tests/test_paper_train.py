"""examples/paper/models.py and train.py: parameter counts, shared mask, losses, smoke runs, resume.

The full-size models are only built abstractly (``nnx.eval_shape``: no 44M-parameter
initialisation). The smoke runs are ``--quick`` (32x64 synthetic images, 2 epochs of 2 steps);
the CelebA one goes through a subprocess (the real command line, last stdout line parsed),
the dense ones call ``train.main(argv)`` in this process so that they share JAX's compiled
initialisers and, for the resume check, one compiled training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("PIL")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tqdm")
from conftest import load_paper_module  # noqa: E402
from flax import nnx  # noqa: E402

import samgs_optax  # noqa: E402

PAPER = os.path.join(os.path.dirname(__file__), "..", "examples", "paper")
TRAIN_SCRIPT = os.path.join(PAPER, "train.py")


train = load_paper_module("train")
models = train.models

# Head parameters of the authors' models: per head conv 3x3 (64 -> 64) + conv 1x1 (64 -> n).
HEAD_PARAMS = {"nyuv2": 111_889, "cityscapes": 74_376, "celeba": 20_520}


@pytest.fixture(scope="module")
def abstract_models():
    return {key: models.abstract_model(*key) for key in models.AUTHOR_PARAM_COUNTS}


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(models.AUTHOR_PARAM_COUNTS))
def test_parameter_counts_equal_the_authors(abstract_models, key):
    counts = models.param_counts(abstract_models[key])
    assert counts["total"] == models.AUTHOR_PARAM_COUNTS[key]
    assert counts["heads"] == HEAD_PARAMS[key[0]]
    assert counts["shared"] + counts["heads"] == counts["total"]


def _param_paths(module) -> dict[tuple, bool]:
    """Every parameter path -> whether the recipe's mask resolves it as shared."""
    params = nnx.state(module, nnx.Param)
    shared = samgs_optax.masks.resolve_mask(models.SHARED, params)
    flat = jax.tree_util.tree_flatten_with_path(shared)[0]
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): v for path, v in flat}


@pytest.mark.parametrize("key", list(models.AUTHOR_PARAM_COUNTS))
def test_shared_mask_is_exactly_the_non_head_parameters(abstract_models, key):
    resolved = _param_paths(abstract_models[key])
    heads = {p for p, shared in resolved.items() if not shared}
    assert heads and all(p[0] == "pred" for p in heads)
    assert all("pred" not in p for p, shared in resolved.items() if shared)
    if key[1] == "mtan":  # the authors' shared_parameters() includes the attention modules
        assert any(p[0] == "encoder_att" and resolved[p] for p in resolved)


def test_single_task_model_keeps_one_head():
    model = models.abstract_model("nyuv2", "split", tasks=["depth"])
    assert models.param_counts(model)["heads"] == (64 * 64 * 9 + 64) + (64 + 1)
    assert model.tasks == (("depth", 1),)


def test_mtan_forward_shapes():
    model = models.abstract_model("cityscapes", "mtan")
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 32, 64, 3), "f4"))
    assert {k: v.shape for k, v in out.items()} == {
        "segmentation": (1, 32, 64, 7),
        "depth": (1, 32, 64, 1),
    }


def test_max_pool_unpool_pick_the_first_maximum():
    x = np.array([[1, 3, 3, 0], [3, 2, 0, 0], [5, 5, 1, 2], [5, 4, 2, 1]], np.float32)
    x = jnp.asarray(np.stack([x, -x], axis=-1)[None])  # (1, 4, 4, 2)
    pooled, where = models.max_pool_with_argmax(x)
    np.testing.assert_array_equal(pooled[0, ..., 0], [[3, 3], [5, 2]])
    np.testing.assert_array_equal(pooled[0, ..., 1], [[-1, 0], [-4, -1]])
    restored = models.max_unpool(pooled, where)[0, ..., 0]
    expected = np.array([[0, 3, 3, 0], [0, 0, 0, 0], [5, 0, 0, 2], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(restored, expected)  # ties: first in row-major order
    grad = jax.grad(lambda v: models.max_pool_with_argmax(v)[0].sum())(x)[0, ..., 0]
    np.testing.assert_array_equal(grad, expected != 0)


def test_bilinear_upsampling_aligns_corners():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 4)), jnp.float32)
    y = np.asarray(models.upsample_bilinear_x2(x))
    assert y.shape == (2, 6, 10, 4)
    np.testing.assert_allclose(
        y[:, [0, -1]][:, :, [0, -1]], np.asarray(x)[:, [0, -1]][:, :, [0, -1]]
    )
    ramp = jnp.broadcast_to(jnp.arange(5, dtype=jnp.float32)[None, None, :, None], (1, 2, 5, 1))
    row = np.asarray(models.upsample_bilinear_x2(ramp))[0, 0, :, 0]
    np.testing.assert_allclose(row, np.arange(10) * 4 / 9, rtol=1e-6)  # src = dst (n-1)/(2n-1)


# ---------------------------------------------------------------------------------------
# Losses, schedule, step
# ---------------------------------------------------------------------------------------
def test_dense_losses_match_hand_computations():
    logp = jnp.log(jnp.asarray([[[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.3, 0.7]]]]))
    label = jnp.asarray([[[0, -1], [1, 0]]])  # one ignored pixel
    want = -(np.log(0.5) + np.log(0.8) + np.log(0.3)) / 3
    np.testing.assert_allclose(train.segmentation_loss(logp, label), want, rtol=1e-6)
    target = jnp.asarray([[[[2.0], [0.0]], [[1.0], [4.0]]]])  # depth 0 = no measurement
    pred = jnp.asarray([[[[1.0], [9.0]], [[1.5], [4.0]]]])
    np.testing.assert_allclose(train.depth_loss(pred, target), (1 + 0.5 + 0) / 3, rtol=1e-6)
    normal_t = jnp.asarray([[[[0.0, 0, 1], [0, 0, 0]]]])
    normal_p = jnp.asarray([[[[0.0, 0.6, 0.8], [1, 0, 0]]]])
    np.testing.assert_allclose(train.normal_loss(normal_p, normal_t), 1 - 0.8, rtol=1e-6)


def test_learning_rate_halves_every_100_epochs():
    cfg = train.Config("nyuv2", synthetic=True).resolved()
    schedule = train.learning_rate(cfg, steps=7)
    assert float(schedule(700 - 1)) == pytest.approx(1e-4)
    assert float(schedule(700)) == pytest.approx(5e-5)
    assert float(schedule(1400)) == pytest.approx(2.5e-5)
    celeba = train.Config("celeba", synthetic=True).resolved()
    assert float(train.learning_rate(celeba, steps=7)(10**6)) == pytest.approx(3e-4)


def _tiny_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(8, 3)) + 2, jnp.float32),
        "attributes": jnp.asarray(rng.integers(0, 2, (8, 2)), jnp.float32),
    }


@pytest.fixture(scope="module")
def samgs_step():
    """The trainer's SAM-GS step (CityScapes' 2-task recipe) on a tiny 2-head module."""
    model = _TinyTwoTask(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cfg = train.Config("cityscapes", method="samgs", synthetic=True).resolved()
    tx, per_task, note = train.build_optimizer(cfg, steps=1)
    assert per_task and note.startswith("samgs(gamma=0.7, b1=0.9, b2=0.99)")
    step = train.make_train_step(graphdef, tx, _bce, per_task=True)
    return graphdef, state, tx.init(nnx.state(model, nnx.Param)), step


@pytest.mark.parametrize("method", ["ls", *samgs_optax.AGGREGATORS])
def test_every_method_builds_and_initialises_its_optimizer(method):
    try:
        cfg = train.Config("cityscapes", method=method, synthetic=True).resolved()
    except ValueError as err:  # a method that needs more than CityScapes' 2 tasks (Krum)
        assert f"{method} cannot run on cityscapes (2 tasks)" in str(err)
        cfg = train.Config("nyuv2", method=method, synthetic=True).resolved()
    tx, per_task, note = train.build_optimizer(cfg, steps=3)
    assert per_task == (method != "ls") and "Adam(0.0001, x0.5 every 100 epochs)" in note
    params = nnx.state(_TinyTwoTask(rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.leaves(tx.init(params))


@pytest.mark.parametrize("method", list(train.scalarizer_methods()))
def test_every_scalarizer_builds_and_initialises(method):
    """Every registered scalarizer is a --method: Adam on one backward pass, no clip; its
    state (and, for UW/IMTL-L, the Adam of its parameters) is part of the optimizer state."""
    cfg = train.Config("cityscapes", method=method, synthetic=True).resolved()
    tx, per_task, note = train.build_optimizer(cfg, steps=3)
    assert not per_task and note.endswith("+ Adam(0.0001, x0.5 every 100 epochs)")
    parts = train.build_scalarizer(cfg, steps=3)
    params = nnx.state(_TinyTwoTask(rngs=nnx.Rngs(0)), nnx.Param)
    opt_state = train.init_scalarizer_opt_state(parts, tx, params, 2)
    assert jax.tree.leaves(opt_state["tx"])
    assert ("scalarizer_tx" in opt_state) == (method in ("uw", "imtl_l"))
    name = train.scalarizer_methods()[method]
    assert method == name or method == f"loss_{name}"


def test_scalarizer_options_are_the_authors():
    options = {
        d: train.scalarizer_options(train.Config(d, method="famo", synthetic=True).resolved())
        for d in train.DATASETS
    }
    assert options["cityscapes"] == {"lr": 0.025, "weight_decay": 0.01}
    assert options["nyuv2"]["weight_decay"] == options["celeba"]["weight_decay"] == 0.001
    cfg = train.Config("nyuv2", method="dwa", synthetic=True).resolved()
    parts = train.build_scalarizer(cfg, steps=3)
    assert parts.options == {"window": 25, "temperature": 2.0} and parts.mean
    assert not parts.post_update and parts.learned_tx is None
    cfg = train.Config("nyuv2", method="random", seed=3, synthetic=True).resolved()
    assert train.scalarizer_options(cfg) == {"seed": 3}
    for method in ("pcgrad", "graddrop", "gradvac", "random_weighting"):  # random aggregators
        cfg = train.Config("nyuv2", method=method, seed=3, synthetic=True).resolved()
        assert train.method_options(cfg)["seed"] == 3, method
    upgrad = train.Config("nyuv2", method="upgrad", synthetic=True)
    assert "seed" not in train.method_options(upgrad)


@pytest.mark.parametrize("method", ["gradnorm", "db_mtl"])
def test_loss_aware_methods_get_the_task_losses(method):
    """The trainer's step passes the per-task losses of its batch to the loss-aware methods
    (``task_losses=``): the method's state after one step (GradNorm's reference losses,
    DB-MTL's buffer g_i / L_i) equals a hand-written step's, and differs from a step given
    other losses (so the test can fail). The parameters are no witness: Adam's first step is
    about lr sign(g) whatever the losses."""
    model = _TinyTwoTask(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cfg = train.Config("cityscapes", method=method, synthetic=True).resolved()
    tx, per_task, _ = train.build_optimizer(cfg, steps=1)
    assert per_task
    opt_state = tx.init(nnx.state(model, nnx.Param))
    batch = _tiny_batch(0)
    step = train.make_train_step(graphdef, tx, _bce, per_task=True)
    _, new_opt, losses = step(*jax.tree.map(jnp.copy, (state, opt_state)), batch)

    def by_hand(task_losses):
        copy = nnx.merge(graphdef, state, copy=True)
        _, grads = samgs_optax.nnx.value_and_jacrev(_bce)(copy, batch)
        return tx.update(grads, opt_state, nnx.state(copy, nnx.Param), task_losses=task_losses)[1]

    def same(a, b) -> bool:  # within float32 rounding of the largest entry (the trunk's bias
        # gradient is rounding noise: the BatchNorm after it cancels it)
        scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b[0]))
        leaves = zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True)
        return all(np.allclose(x, y, rtol=1e-5, atol=1e-6 * scale) for x, y in leaves)

    assert same(new_opt, by_hand(losses))
    assert not same(new_opt, by_hand(jnp.asarray([1.0, 10.0]) * losses))


def _scalarizer_step(method: str, **config):
    model = _TinyTwoTask(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cfg = train.Config("cityscapes", method=method, synthetic=True, **config).resolved()
    parts = train.build_scalarizer(cfg, steps=1)
    tx = train.build_optimizer(cfg, steps=1)[0]
    opt_state = train.init_scalarizer_opt_state(parts, tx, nnx.state(model, nnx.Param), 2)
    step = train.make_scalarizer_step(graphdef, tx, _bce, parts)
    return graphdef, state, opt_state, step


def test_famo_logits_step_after_the_model_step():
    """After one step the logits are one Adam step (lr 0.025, from 0) along the softmax VJP
    of delta = log L(before) - log L(after), the losses recomputed on the same batch with the
    new parameters in training mode; the BatchNorm statistics moved twice (the two passes)."""
    graphdef, state, opt_state, step = _scalarizer_step("famo")
    batch = _tiny_batch(0)
    reference = nnx.merge(graphdef, state, copy=True)
    before = np.asarray(_bce(reference, batch), np.float64)  # also moves BN once
    new_state, new_opt, losses = step(*jax.tree.map(jnp.copy, (state, opt_state)), batch)
    np.testing.assert_allclose(losses, before, rtol=1e-6)
    after_model = nnx.merge(graphdef, new_state, copy=True)
    params_after = nnx.state(after_model, nnx.Param)
    nnx.update(reference, params_after)
    after = np.asarray(_bce(reference, batch), np.float64)  # the second pass, as theirs
    delta = np.log(before + 1e-8) - np.log(after + 1e-8)
    grad = (delta - delta.mean()) / 2  # softmax VJP at uniform weights
    want = -0.025 * grad / (np.abs(grad) + 1e-8)  # Adam's first step (weight decay x 0)
    logits = np.asarray(new_opt["scalarizer"].logits)
    assert np.all(logits != 0)
    np.testing.assert_allclose(logits, want, rtol=1e-4)
    want_stats = jax.tree.leaves(nnx.state(reference, nnx.BatchStat))
    got_stats = jax.tree.leaves(nnx.state(after_model, nnx.BatchStat))
    for w, g in zip(want_stats, got_stats, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_uw_learns_its_log_variances_unless_their_lr_is_zero():
    for lr, moves in ((0.025, True), (0.0, False)):
        _, state, opt_state, step = _scalarizer_step("uw", method_params_lr=lr)
        _, new_opt, losses = step(state, opt_state, _tiny_batch(0))
        log_var = np.asarray(new_opt["scalarizer"].log_var)
        # d/ds of 0.5 (exp(-s) L + s) at s = 0 is 0.5 (1 - L): Adam's first step, -lr * sign
        want = -lr * np.sign(0.5 * (1 - np.asarray(losses)))
        np.testing.assert_allclose(log_var, want, rtol=1e-4)
        assert np.any(log_var != 0) == moves


@pytest.mark.parametrize("method", ["famo", "uw"])
def test_scalarizer_state_checkpoint_round_trip_is_bit_identical(method, tmp_path):
    graphdef, state, opt_state, step = _scalarizer_step(method)
    run = {"model": state, "opt_state": opt_state, "epoch": jnp.zeros([], jnp.int32)}
    run = jax.device_put(jax.tree.map(jnp.copy, run), jax.devices()[0])
    for seed in (1, 2):
        model_state, opt, _ = step(run["model"], run["opt_state"], _tiny_batch(seed))
        run = {"model": model_state, "opt_state": opt, "epoch": run["epoch"] + 1}
    assert np.any(np.asarray(jax.tree.leaves(run["opt_state"]["scalarizer"])[0]) != 0)
    manager = train.checkpoint_manager(tmp_path / "ck")
    train.save_checkpoint(manager, run)
    restored = train.restore_checkpoint(manager, run)
    assert jax.tree.structure(restored) == jax.tree.structure(run)
    assert train.params_digest(restored) == train.params_digest(run)
    live = step(run["model"], run["opt_state"], _tiny_batch(3))
    again = step(restored["model"], restored["opt_state"], _tiny_batch(3))
    assert train.params_digest(live) == train.params_digest(again)


def test_step_moves_batchnorm_statistics_once(samgs_step):
    """SAM-GS's K task gradients come from one forward pass: the BatchNorm statistics after a
    step equal those of one training-mode forward pass, not of K."""
    graphdef, state, opt_state, step = samgs_step
    batch = _tiny_batch(0)
    reference = nnx.merge(graphdef, state, copy=True)
    reference(batch["image"])  # one training-mode forward pass
    copy = jax.tree.map(jnp.copy, (state, opt_state))
    new_state, _, losses = step(*copy, batch)
    stats = [
        nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, s), nnx.BatchStat))
        for s in (state, nnx.state(reference), new_state)
    ]
    before, want, got = (jax.tree.leaves(s) for s in stats)
    assert losses.shape == (2,)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(b, g) for b, g in zip(before, got, strict=True))


def test_samgs_state_checkpoint_round_trip_is_bit_identical(samgs_step, tmp_path):
    """SAM-GS's moments and step count survive save/restore: the next step is identical."""
    graphdef, state, opt_state, step = samgs_step
    run = {"model": state, "opt_state": opt_state, "epoch": jnp.zeros([], jnp.int32)}
    run = jax.device_put(jax.tree.map(jnp.copy, run), jax.devices()[0])
    for seed in (1, 2):  # two steps: the moments are non-zero
        model_state, opt, _ = step(run["model"], run["opt_state"], _tiny_batch(seed))
        run = {"model": model_state, "opt_state": opt, "epoch": run["epoch"] + 1}
    manager = train.checkpoint_manager(tmp_path / "ck")
    train.save_checkpoint(manager, run)
    restored = train.restore_checkpoint(manager, run)
    assert train.params_digest(restored) == train.params_digest(run)
    live = step(run["model"], run["opt_state"], _tiny_batch(3))
    again = step(restored["model"], restored["opt_state"], _tiny_batch(3))
    assert train.params_digest(live) == train.params_digest(again)


class _TinyTwoTask(nnx.Module):
    """A shared Linear + BatchNorm trunk and a two-column head named ``pred``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.trunk = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.pred = nnx.Linear(8, 2, rngs=rngs)

    def logits(self, x):
        return self.pred(nnx.relu(self.norm(self.trunk(x))))

    __call__ = logits


def _bce(model, batch):
    logits = model.logits(batch["image"])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["attributes"]), axis=0)


# ---------------------------------------------------------------------------------------
# Smoke runs
# ---------------------------------------------------------------------------------------
def _main(argv: list[str], capsys, cache: dict | None = None) -> dict:
    train.main(argv + ["--no-progress"], cache=cache)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_is_bit_identical_cityscapes(tmp_path, capsys):
    """Stop after epoch 1, resume: the same final state as an uninterrupted run. FAMO: one
    backward pass keeps the compile short, and its logits (moved by the first epoch's step)
    must come back from the checkpoint; SAM-GS's state is round-tripped above."""
    argv = ["--dataset", "cityscapes", "--method", "famo", "--model", "split", "--quick"]
    argv += ["--steps-per-epoch", "1", "--width-divisor", "8"]  # 1/8 widths: smaller files
    cache: dict = {}
    straight = _main(argv + ["--out-dir", str(tmp_path / "a"), "--no-checkpoint"], capsys, cache)
    first = _main(argv + ["--out-dir", str(tmp_path / "b"), "--stop-after", "1"], capsys, cache)
    assert first["epochs_done"] == 1
    with pytest.raises(FileExistsError, match="--resume"):
        train.main(argv + ["--out-dir", str(tmp_path / "b"), "--no-progress"], cache=cache)
    resumed = _main(argv + ["--out-dir", str(tmp_path / "b"), "--resume"], capsys, cache)
    assert resumed["epochs_done"] == 2
    assert resumed["state_sha256"] == straight["state_sha256"]
    assert resumed["metrics"] == straight["metrics"]
    assert list(straight["metrics"]) == list(train.metrics.CITYSCAPES_COLUMNS)
    assert straight["paper"]["label"] == "FAMO"  # the paper's row next to ours
    assert straight["paper"]["metrics"]["mean_iou"] == pytest.approx(0.745)
    assert straight["recipe"].startswith("famo(lr=0.025, weight_decay=0.01) on the losses")


def test_cli_quick_dwa(tmp_path, capsys):
    """The authors' DWA (per-step window 25, mean over tasks) through the command line."""
    argv = ["--dataset", "cityscapes", "--method", "dwa", "--model", "split", "--quick"]
    argv += ["--steps-per-epoch", "1", "--width-divisor", "8"]
    line = _main(argv + ["--out-dir", str(tmp_path), "--no-checkpoint"], capsys)
    assert line["recipe"].startswith("dwa(window=25, temperature=2.0) on the losses / K + Adam")
    assert line["paper"]["label"] == "DWA" and line["epochs_done"] == 2
    values = line["metrics"]
    assert all(np.isfinite(v) for k, v in values.items() if k != "mean_iou")


def test_cli_quick_nyuv2_per_task_gradients(tmp_path, capsys):
    """Three per-task gradients through an aggregator, all the table's columns, delta_m."""
    argv = ["--dataset", "nyuv2", "--method", "linear_scalarization", "--model", "split"]
    argv += ["--quick"]
    argv += ["--width-divisor", "8"]  # the resume test's backbone shapes: initialisers compiled
    line = _main(argv + ["--out-dir", str(tmp_path), "--no-checkpoint"], capsys)
    values = line["metrics"]
    assert list(values) == list(train.metrics.NYUV2_COLUMNS)
    assert all(np.isfinite(v) for k, v in values.items() if k != "mean_iou")
    if values["mean_iou"] is None:  # NaN (a class absent from 2 tiny images) -> null
        assert line["delta_m"] is None
    else:
        want = train.metrics.delta_m(
            list(values.values()),
            train.metrics.NYUV2_STL_BASE,
            train.metrics.NYUV2_HIGHER_IS_BETTER,
        )
        assert line["delta_m"] == pytest.approx(want)
    assert (
        not (tmp_path / train.run_name(train.parse_args(argv)[0].resolved()))
        .joinpath("checkpoints")
        .exists()
    )
    results = json.loads(open(line["results_path"]).read())
    assert results["data"] == {"train": 4, "val": 2} and results["synthetic"]
    assert line["recipe"].startswith("linear_scalarization() on shared + clip(1)")
    assert results["epochs_used"] == [1, 2]
    assert line["paper"] is None  # linear_scalarization: not a row of the paper


def test_cli_quick_celeba_subprocess(tmp_path):
    cmd = [sys.executable, TRAIN_SCRIPT, "--dataset", "celeba", "--method", "ls", "--quick"]
    cmd += ["--out-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["dataset"] == "celeba" and line["method"] == "ls"
    assert 0 <= line["metrics"]["f1_mean"] <= 1 and line["delta_m"] is None
    results = json.loads(open(line["results_path"]).read())
    assert results["epochs_done"] == 2 and len(results["history"]["test"]) == 2
    assert line["paper"] == {"label": "LS", "metrics": {}, "mean_rank": None, "delta_m": 6.28}
    assert len(results["history"]["test"][0]) == 40
    assert results["params"]["total"] == models.AUTHOR_PARAM_COUNTS[("celeba", "cnn")]
