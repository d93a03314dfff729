"""Train one method on NYU-v2, CityScapes or CelebA with the SAM-GS authors' recipe.

One run trains one method with one seed; it prints tqdm bars and per-epoch summaries on
stderr, writes an orbax checkpoint and ``results.json`` into its run directory after every
epoch, and ends by printing one JSON line on stdout::

    python examples/paper/train.py --dataset nyuv2 --method samgs --data /data/nyuv2
    python examples/paper/train.py --dataset cityscapes --method ls --data /data/cityscapes
    python examples/paper/train.py --dataset celeba --method pcgrad --data /data/celeba
    python examples/paper/train.py --dataset nyuv2 --method stl --task depth --data /data/nyuv2
    python examples/paper/train.py --dataset nyuv2 --method samgs --synthetic     # no data
    python examples/paper/train.py --dataset cityscapes --method samgs --quick    # seconds
    python examples/paper/train.py ... --resume                                   # continue

Methods (``--method``):

* ``ls``: Adam on the gradient of the summed loss, no clipping (the authors' ``ls``: their
  ``clip_grad_norm_`` runs before ``backward`` and so never clips).
* every name in ``samgs_optax.AGGREGATORS`` (``samgs``, ``pcgrad``, ``cagrad``, ...) in the
  authors' chain :func:`samgs_optax.recipe`: the aggregator on the per-task gradients of the
  shared parameters (:data:`models.SHARED`), the declared ``scale(K)`` and
  ``clip_by_global_norm(1)`` on the shared parameters, Adam with the recipe's learning-rate
  schedule; the heads get their own task's gradient. Options as the authors' configs
  (:data:`METHOD_OPTIONS`); SAM-GS: ``gamma 0.7, momentum 0.9, beta2 0.99``, the paper's
  ``--gamma 0.9`` as an option.
* every name in ``samgs_optax.SCALARIZERS`` (loss balancing; ``loss_NAME`` if an aggregator
  has the name): one backward pass of the scalarized loss, Adam with the recipe's schedule,
  no clip (as ``ls``), no per-task gradients. The paper's ``scale_invariant`` (their
  ``scaleinvls``), ``random`` (their ``rlw``), ``dwa`` (their per-step form: window 25,
  temperature 2, the total divided by K), ``uw`` (log-variances learned with their own Adam,
  lr 0.025 = Nash-MTL's ``method_params_lr``, ``--method-params-lr``; the authors' trainer
  never steps them: ``--method-params-lr 0``) and ``famo`` (w_lr 0.025, gamma
  :data:`FAMO_GAMMA`; after the model step the losses are recomputed on the same batch in
  training mode and ``update`` steps the logits; ``--famo-no-update``: the authors' NYU-v2
  and CelebA trainers, which skip it). Options: :data:`SCALARIZER_OPTIONS`, the registry's
  examples for required ones. The scalarizer's state is part of ``opt_state``, checkpointed.
* ``stl``: a single-task model trained on ``--task`` alone with Adam (dense: a SegNet with
  one head, ``--model split`` by default, like the MTAN/CAGrad single-task baselines;
  CelebA: the CNN with one head, like the authors' ``trainer_one_task.py``).

Recipes (:data:`RECIPES`, from ``experiments/*/conf/config.yaml``): NYU-v2: SegNet-MTAN,
Adam 1e-4 halved every 100 epochs, batch 2, 200 epochs, scale-crop-flip augmentation;
CityScapes: the same with batch 8; CelebA: Adam 3e-4, batch 256, 15 epochs. Reported numbers
as the authors': NYU-v2 and CityScapes: the validation-split metrics averaged over the last 10
epochs; CelebA: the test F1 at the epoch of best mean validation F1. ``delta_m`` (paper Eq. 4,
%) is against the authors' single-task baselines (:mod:`metrics`); CelebA has none.
``paper`` is the paper's row for the method (:mod:`reported`); ``table.py`` turns a set of
runs into a table with means over seeds, Delta m and mean ranks.

``--synthetic`` trains on generated data of the exact shapes (``data.synthetic_dense`` /
``data.synthetic_celeba``); ``--quick`` shrinks everything for a smoke run on CPU
(:data:`QUICK`: 2 epochs of 2 steps, 32x64 dense images, small batches; synthetic data
unless ``--data`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402
import reported  # noqa: E402

import samgs_optax  # noqa: E402

PyTree = Any
Batch = dict[str, Any]
DATASETS = ("nyuv2", "cityscapes", "celeba")
DETERMINISTIC_FLAGS = "--xla_gpu_deterministic_ops=true"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The authors' training recipe of one benchmark."""

    model: str
    epochs: int
    batch_size: int
    learning_rate: float
    lr_step_epochs: int | None  # StepLR(step_size) in epochs; None: constant
    lr_decay: float
    augment: bool


RECIPES = {
    "nyuv2": Recipe("mtan", 200, 2, 1e-4, 100, 0.5, True),
    "cityscapes": Recipe("mtan", 200, 8, 1e-4, 100, 0.5, True),
    "celeba": Recipe("cnn", 15, 256, 3e-4, None, 1.0, False),
}
# Default generated-set sizes of --synthetic: (train, val[, test]).
SYNTHETIC_SIZES = {"nyuv2": (32, 8, 0), "cityscapes": (64, 16, 0), "celeba": (1024, 256, 256)}
# --quick: what it changes (docs/paper_benchmarks.md lists it).
QUICK: dict[str, dict[str, Any]] = {
    "nyuv2": dict(epochs=2, batch_size=2, n_train=4, n_val=2, image_size=(32, 64)),
    "cityscapes": dict(epochs=2, batch_size=2, n_train=4, n_val=2, image_size=(32, 64)),
    "celeba": dict(epochs=2, batch_size=8, n_train=16, n_val=8, n_test=8),
}
# Aggregator options from the authors' experiments/*/conf/optimization/*.yaml. Their
# `max_norm: 1.0` (Nash-MTL, Aligned-MTL, GradDrop) is the recipe's clip (Config.max_norm);
# samgs_optax.nash_mtl's own max_norm keeps its default, 1.0.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "cagrad": {"c": 0.5, "rescale": 1},
    "nash_mtl": {"update_weights_every": 1, "optim_niter": 20},
    "aligned_mtl": {"scale_mode": "min"},
}
# Loss scalarizers (samgs_optax.SCALARIZERS): options from the authors' configs. DWA: their
# per-step window (iteration_window 25, temp 2.0); FAMO: w_lr 0.025 and gamma (the logits'
# weight decay) per dataset, FAMO_GAMMA.
SCALARIZER_OPTIONS: dict[str, dict[str, Any]] = {
    "dwa": {"window": 25, "temperature": 2.0},
    "famo": {"lr": 0.025},
}
FAMO_GAMMA = {"nyuv2": 0.001, "cityscapes": 0.01, "celeba": 0.001}
# Their trainers' loss is the MEAN of DWA's weighted losses (the scalarizer's total is the sum).
SCALARIZER_TOTAL_SCALE = {"dwa": "mean"}
# Scalarizers whose state is learnable parameters, stepped by their own Adam.
LEARNED_SCALARIZERS = ("uw", "imtl_l")
METHOD_PARAMS_LR = 0.025  # Nash-MTL's trainer's method_params_lr (UW's log-variances)
LAST_EPOCHS = 10  # NYU-v2 / CityScapes: report the mean over the last 10 epochs
MANY_TASKS_UNROLL = 8  # CelebA on an accelerator: backward passes unrolled per loop step


@dataclasses.dataclass(frozen=True)
class Config:
    """One run. ``None`` fields take the dataset's :data:`RECIPES` value."""

    dataset: str
    method: str = "samgs"
    seed: int = 42  # the authors' random_seed
    model: str | None = None
    task: str | None = None  # stl: a dense task name or a CelebA attribute (index or name)
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None  # default: batch_size (the authors' test loaders)
    learning_rate: float | None = None
    augment: bool | None = None
    gamma: float = 0.7  # SAM-GS: the authors' configs; the paper's tuned value is 0.9
    samgs_b1: float = 0.9
    samgs_b2: float = 0.99
    max_norm: float = 1.0
    data_root: str | None = None
    synthetic: bool = False
    n_train: int | None = None  # synthetic: set sizes; real data: keep the first n
    n_val: int | None = None
    n_test: int | None = None
    image_size: tuple[int, int] | None = None  # dense, synthetic only
    steps_per_epoch: int | None = None  # cap (smoke runs)
    width_divisor: int = 1  # dense: SegNet widths / this (CPU smoke tests; not the paper's)
    jac_mode: str = "auto"  # samgs_optax.value_and_jacrev mode; see jacobian_mode
    jac_unroll: int | None = None  # its unroll (sequential mode); see jacobian_mode
    method_params_lr: float = METHOD_PARAMS_LR  # uw / imtl_l: Adam on their parameters
    famo_update: bool = True  # FAMO's logit step after the model step (see the docstring)

    def resolved(self) -> Config:
        """A copy with every recipe default filled in and the options checked."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        recipe = RECIPES[self.dataset]
        model = self.model or ("split" if self.method == "stl" else recipe.model)
        if self.dataset == "celeba":
            model = "cnn"
        batch_size = self.batch_size or recipe.batch_size
        out = dataclasses.replace(
            self,
            model=model,
            epochs=self.epochs or recipe.epochs,
            batch_size=batch_size,
            eval_batch_size=self.eval_batch_size or batch_size,
            learning_rate=self.learning_rate or recipe.learning_rate,
            augment=recipe.augment if self.augment is None else self.augment,
        )
        _check(out)
        return out


def scalarizer_methods() -> dict[str, str]:
    """``--method`` name -> ``samgs_optax.SCALARIZERS`` name: the scalarizer's own name, or
    ``loss_NAME`` when an aggregator (or ``ls``/``stl``) already has that name."""
    taken = {"ls", "stl", *samgs_optax.AGGREGATORS}
    return {(f"loss_{n}" if n in taken else n): n for n in samgs_optax.SCALARIZERS}


def method_names() -> list[str]:
    """``ls``, every registered aggregator, every registered scalarizer, ``stl``."""
    return ["ls", *samgs_optax.AGGREGATORS, *scalarizer_methods(), "stl"]


def _check(cfg: Config) -> None:
    if cfg.method not in method_names():
        raise ValueError(f"unknown method {cfg.method!r}; known: {method_names()}")
    if cfg.method == "stl" and cfg.task is None:
        raise ValueError(f"--method stl needs --task (one of {task_names(cfg.dataset)})")
    if cfg.method != "stl" and cfg.task is not None:
        raise ValueError("--task is for --method stl")
    if cfg.image_size is not None and (cfg.dataset == "celeba" or not cfg.synthetic):
        raise ValueError("--image-size is for synthetic NYU-v2 / CityScapes data only")
    if cfg.width_divisor != 1 and cfg.dataset == "celeba":
        raise ValueError("--width-divisor is for the SegNets (NYU-v2, CityScapes)")
    if (cfg.data_root is None) == (not cfg.synthetic):
        raise ValueError("pass exactly one of --data ROOT and --synthetic")
    run_tasks(cfg)  # an unknown --task raises here
    if cfg.method in samgs_optax.AGGREGATORS:  # e.g. Krum needs 3 tasks: say so up front
        k = len(run_tasks(cfg))
        try:
            samgs_optax.AGGREGATORS[cfg.method](k, **method_options(cfg))
        except ValueError as err:
            raise ValueError(
                f"{cfg.method} cannot run on {cfg.dataset} ({k} tasks): {err}"
            ) from err


# ---------------------------------------------------------------------------------------
# Tasks and losses
# ---------------------------------------------------------------------------------------
def task_names(dataset: str) -> list[str]:
    """The dataset's tasks in the authors' order (CelebA: the 40 attribute names)."""
    if dataset == "celeba":
        return list(data.CELEBA_ATTRIBUTES)
    return [name for name, _ in models.DENSE_TASKS[dataset]]


def run_tasks(cfg: Config) -> list[str]:
    """The tasks this run trains: all of them, or the ``stl`` task."""
    names = task_names(cfg.dataset)
    if cfg.method != "stl":
        return names
    task = cfg.task
    if cfg.dataset == "celeba" and task is not None and task.isdigit():
        task = names[int(task)] if int(task) < len(names) else task
    if task not in names:
        raise ValueError(f"unknown task {cfg.task!r} for {cfg.dataset}; one of {names}")
    return [task]


def segmentation_loss(log_probs: jax.Array, label: jax.Array) -> jax.Array:
    """``F.nll_loss(ignore_index=-1)``: mean of ``-log p[label]`` over labelled pixels."""
    valid = label >= 0
    picked = jnp.take_along_axis(log_probs, jnp.maximum(label, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _valid(target: jax.Array) -> jax.Array:
    """(B, H, W, 1) float mask of pixels whose target channel sum is non-zero."""
    return (jnp.sum(target, axis=-1, keepdims=True) != 0).astype(target.dtype)


def depth_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``sum(|p - t| * mask) / count(mask)`` (the authors' L1 over measured pixels)."""
    mask = _valid(target)
    return jnp.sum(jnp.abs(pred - target) * mask) / jnp.maximum(jnp.sum(mask), 1)


def normal_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``1 - sum(p * t * mask) / count(mask)`` (one minus the mean cosine)."""
    mask = _valid(target)
    return 1 - jnp.sum(pred * target * mask) / jnp.maximum(jnp.sum(mask), 1)


DENSE_LOSSES: dict[str, tuple[Callable[[jax.Array, jax.Array], jax.Array], str]] = {
    "segmentation": (segmentation_loss, "label"),
    "depth": (depth_loss, "depth"),
    "normal": (normal_loss, "normal"),
}


def make_loss_fn(cfg: Config) -> Callable[[nnx.Module, Batch], jax.Array]:
    """``losses(model, batch) -> (K,)``: one loss per trained task, the authors' losses.

    CelebA: binary cross-entropy per attribute (``BCELoss`` of the sigmoid, computed from
    the logits; PyTorch clamps ``log`` at -100, which only matters for |logit| > 100).
    """
    tasks = run_tasks(cfg)
    if cfg.dataset == "celeba":
        columns = np.array([data.CELEBA_ATTRIBUTES.index(t) for t in tasks])

        def celeba_losses(model: nnx.Module, batch: Batch) -> jax.Array:
            logits = model.logits(batch["image"])
            targets = batch["attributes"][:, columns]
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=0)

        return celeba_losses

    def dense_losses(model: nnx.Module, batch: Batch) -> jax.Array:
        out = model(batch["image"])
        return jnp.stack([DENSE_LOSSES[t][0](out[t], batch[DENSE_LOSSES[t][1]]) for t in tasks])

    return dense_losses


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def split_names(dataset: str) -> tuple[str, ...]:
    """Evaluation splits: dense sets report ``val`` (the authors' test loader reads it)."""
    return ("val", "test") if dataset == "celeba" else ("val",)


def _sizes(cfg: Config) -> dict[str, int | None]:
    default = SYNTHETIC_SIZES[cfg.dataset] if cfg.synthetic else (None, None, None)
    given = (cfg.n_train, cfg.n_val, cfg.n_test)
    return {
        split: given[i] if given[i] is not None else default[i]
        for i, split in enumerate(("train", "val", "test"))
    }


def load_data(cfg: Config) -> dict[str, dict[str, np.ndarray]]:
    """The run's splits as in-memory arrays (:mod:`data`'s formats)."""
    sizes = _sizes(cfg)
    out = {}
    for stream, split in enumerate(("train", *split_names(cfg.dataset))):
        if cfg.synthetic:
            out[split] = _synthetic_split(cfg, sizes[split], seed=stream)
        elif cfg.dataset == "celeba":
            out[split] = data.load_celeba(cfg.data_root, split, limit=sizes[split])
        else:
            spec = data.DENSE_SPECS[cfg.dataset]
            out[split] = data.load_dense(cfg.data_root, spec, split, limit=sizes[split])
    return out


def _synthetic_split(cfg: Config, n: int | None, seed: int) -> dict[str, np.ndarray]:
    if not n:
        raise ValueError(f"synthetic {cfg.dataset}: a split needs at least one sample")
    if cfg.dataset == "celeba":
        return data.synthetic_celeba(n, seed=seed)
    spec = data.DENSE_SPECS[cfg.dataset]
    if cfg.image_size is not None:
        spec = dataclasses.replace(spec, height=cfg.image_size[0], width=cfg.image_size[1])
    return data.synthetic_dense(spec, n, seed=seed)


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    """Training steps of one epoch: every batch, the last one smaller (no ``drop_last``)."""
    steps = data.num_batches(n_train, cfg.batch_size)
    return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps


def train_batches(cfg: Config, arrays: Mapping[str, np.ndarray], epoch: int) -> Iterator[Batch]:
    """One epoch's device batches, shuffled and augmented as a function of (seed, epoch)."""
    augment = data.random_scale_crop_flip if cfg.augment else None
    batches = data.epoch_batches(
        arrays, cfg.batch_size, epoch=epoch, seed=cfg.seed, shuffle=True, augment=augment
    )
    steps = steps_per_epoch(cfg, len(arrays["image"]))
    limited = itertools.islice(batches, steps)
    return data.prefetch(limited, size=4, transfer=jax.device_put)


def eval_batches(cfg: Config, arrays: Mapping[str, np.ndarray]) -> Iterator[Batch]:
    """The split in order, in evaluation batches: images on the device, targets on the host."""
    batches = data.epoch_batches(arrays, cfg.eval_batch_size, shuffle=False)
    return data.prefetch(batches, size=4, transfer=_images_to_device)


def _images_to_device(batch: Batch) -> Batch:
    return {**batch, "image": jax.device_put(batch["image"])}


# ---------------------------------------------------------------------------------------
# Model, optimizer, steps
# ---------------------------------------------------------------------------------------
def build_model(cfg: Config) -> nnx.Module:
    """The run's model: all tasks, or the ``stl`` task's head only."""
    tasks = run_tasks(cfg) if cfg.method == "stl" else None
    if cfg.dataset == "celeba":
        return models.build_model(cfg.dataset, tasks=tasks, seed=cfg.seed)
    filters = tuple(f // cfg.width_divisor for f in models.FILTERS)
    return models.build_model(cfg.dataset, cfg.model, tasks=tasks, seed=cfg.seed, filters=filters)


def learning_rate(cfg: Config, steps: int, base: float | None = None) -> optax.Schedule:
    """The authors' ``StepLR(step_size, gamma)`` stepped once per epoch, in optimizer steps,
    from ``base`` (default: the run's learning rate)."""
    recipe = RECIPES[cfg.dataset]
    base = cfg.learning_rate if base is None else base
    if recipe.lr_step_epochs is None:
        return optax.constant_schedule(base)
    return optax.exponential_decay(
        base,
        transition_steps=recipe.lr_step_epochs * steps,
        decay_rate=recipe.lr_decay,
        staircase=True,
    )


def method_options(cfg: Config) -> dict[str, Any]:
    """The aggregator's options: the authors' config values, seeds for random methods."""
    if cfg.method == "samgs":
        return {"gamma": cfg.gamma, "b1": cfg.samgs_b1, "b2": cfg.samgs_b2}
    options = dict(METHOD_OPTIONS.get(cfg.method, {}))
    factory = samgs_optax.AGGREGATORS.get(cfg.method)
    if factory is not None and "seed" in inspect.signature(factory).parameters:
        options["seed"] = cfg.seed  # random methods (pcgrad, graddrop, gradvac, ...) follow --seed
    return options


def build_optimizer(cfg: Config, steps: int) -> tuple[optax.GradientTransformation, bool, str]:
    """``(tx, per_task, description)``; ``per_task``: tx takes stacked per-task gradients."""
    adam = optax.adam(learning_rate(cfg, steps))
    schedule = f"Adam({cfg.learning_rate:g}" + (
        f", x{RECIPES[cfg.dataset].lr_decay:g} every {RECIPES[cfg.dataset].lr_step_epochs} epochs)"
        if RECIPES[cfg.dataset].lr_step_epochs
        else ")"
    )
    if cfg.method in ("ls", "stl"):
        what = "summed loss" if cfg.method == "ls" else f"{run_tasks(cfg)[0]} loss alone"
        return adam, False, f"{schedule} on the {what}"
    if cfg.method in scalarizer_methods():
        return adam, False, f"{build_scalarizer(cfg, steps).note} + {schedule}"
    options = method_options(cfg)
    tx = samgs_optax.recipe(
        cfg.method,
        len(run_tasks(cfg)),
        mask=models.SHARED,
        max_norm=cfg.max_norm,
        optimizer=adam,
        **options,
    )
    scaled = samgs_optax.aggregators.aggregator_spec(cfg.method).scales(**options)
    args = ", ".join(f"{k}={v}" for k, v in options.items())
    note = f"{cfg.method}({args}) on shared{' + scale(K)' if scaled else ''}"
    return tx, True, f"{note} + clip({cfg.max_norm:g}) + {schedule}"


@dataclasses.dataclass(frozen=True)
class ScalarizerParts:
    """A loss-balancing method: the scalarizer and how the trainer drives it.

    ``learned_tx``: Adam on the scalarizer's state (UW, IMTL-L: learnable parameters), or
    None. ``mean``: divide the total by K (the authors' DWA). ``post_update``: call
    ``scalarizer.update`` with the losses recomputed after the model step (FAMO).
    """

    scalarizer: Any
    options: dict[str, Any]
    learned_tx: optax.GradientTransformation | None
    mean: bool
    post_update: bool
    note: str


def scalarizer_options(cfg: Config) -> dict[str, Any]:
    """The scalarizer's options: required ones from the registry's example, the authors'
    config values (:data:`SCALARIZER_OPTIONS`, :data:`FAMO_GAMMA`), the run's seed."""
    name = scalarizer_methods()[cfg.method]
    spec = samgs_optax.scalarizers.scalarizer_spec(name)
    options = {**spec.example(len(run_tasks(cfg))), **SCALARIZER_OPTIONS.get(name, {})}
    if name == "famo":
        options["weight_decay"] = FAMO_GAMMA[cfg.dataset]
    if "seed" in inspect.signature(spec.factory).parameters:
        options["seed"] = cfg.seed
    return options


def build_scalarizer(cfg: Config, steps: int) -> ScalarizerParts:
    """The loss-balancing method ``cfg.method`` (one backward pass of the scalarized loss)."""
    name = scalarizer_methods()[cfg.method]
    options = scalarizer_options(cfg)
    scalarizer = samgs_optax.SCALARIZERS[name](len(run_tasks(cfg)), **options)
    learned = name in LEARNED_SCALARIZERS
    learned_tx = optax.adam(learning_rate(cfg, steps, cfg.method_params_lr)) if learned else None
    post_update = hasattr(scalarizer, "update") and cfg.famo_update
    mean = SCALARIZER_TOTAL_SCALE.get(name) == "mean"
    shown = ", ".join(f"{k}={v}" for k, v in options.items() if k != "seed")
    note = f"{name}({shown}) on the losses{' / K' if mean else ''}"
    if learned:
        note += f", its parameters by Adam({cfg.method_params_lr:g})"
    if post_update:
        note += ", update() after the step on the same batch"
    return ScalarizerParts(scalarizer, options, learned_tx, mean, post_update, note)


def init_scalarizer_opt_state(
    parts: ScalarizerParts, tx: optax.GradientTransformation, params: PyTree, num_tasks: int
) -> dict[str, PyTree]:
    """The optimizer state of a loss-balancing run: the model's Adam (``tx``), the
    scalarizer's state (``scalarizer``) and, for learned ones, their Adam (``scalarizer_tx``)."""
    sc_state = parts.scalarizer.init(jnp.zeros([num_tasks], jnp.float32))
    out = {"tx": tx.init(params), "scalarizer": sc_state}
    if parts.learned_tx is not None:
        out["scalarizer_tx"] = parts.learned_tx.init(sc_state)
    return out


def make_scalarizer_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Batch], jax.Array],
    parts: ScalarizerParts,
) -> Callable[..., tuple[nnx.State, PyTree, jax.Array]]:
    """Jitted ``step(state, opt_state, batch) -> (state, opt_state, losses)`` of a
    loss-balancing method: one backward pass of the scalarized loss, Adam, no clip (as the
    authors' ``ls``: their clip runs before ``backward``). ``opt_state`` as
    :func:`init_scalarizer_opt_state`. Learned scalarizers (UW) get the gradient of their
    parameters from the same backward pass and their own Adam step; FAMO recomputes the
    losses on the same batch after the model step, in training mode like the authors'
    trainer (BatchNorm statistics move a second time), and takes its logit step."""
    scalarizer = parts.scalarizer
    learned = parts.learned_tx is not None

    def objective(model: nnx.Module, sc_state: PyTree, batch: Batch):
        losses = loss_fn(model, batch)
        total, (_, new_state) = scalarizer.scalarize(losses, sc_state)
        if parts.mean:
            total = total / losses.shape[0]
        return total, (losses, new_state)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state: nnx.State, opt_state: PyTree, batch: Batch):
        model = nnx.merge(graphdef, state)
        sc_state = opt_state["scalarizer"]
        out = dict(opt_state)
        if learned:
            grad_fn = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)
            (_, (losses, _)), (grads, sc_grads) = grad_fn(model, sc_state, batch)
            sc_updates, out["scalarizer_tx"] = parts.learned_tx.update(
                sc_grads, opt_state["scalarizer_tx"], sc_state
            )
            sc_state = optax.apply_updates(sc_state, sc_updates)
        else:
            grad_fn = nnx.value_and_grad(objective, has_aux=True)
            (_, (losses, sc_state)), grads = grad_fn(model, sc_state, batch)
        params = nnx.state(model, nnx.Param)
        updates, out["tx"] = tx.update(grads, opt_state["tx"], params)
        nnx.update(model, optax.apply_updates(params, updates))
        if parts.post_update:
            sc_state = scalarizer.update(sc_state, jax.lax.stop_gradient(loss_fn(model, batch)))
        out["scalarizer"] = sc_state
        return nnx.state(model), out, losses

    return step


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Batch], jax.Array],
    *,
    per_task: bool,
    jac_mode: str = "auto",
    jac_unroll: int = samgs_optax.jacobian.SEQUENTIAL_UNROLL,
) -> Callable[..., tuple[nnx.State, PyTree, jax.Array]]:
    """Jitted ``step(state, opt_state, batch) -> (state, opt_state, losses)``.

    ``state`` is the model's whole ``nnx.State`` (parameters and BatchNorm statistics). With
    ``per_task`` the K task gradients come from ``samgs_optax.nnx.value_and_jacrev``: one
    forward pass, so the BatchNorm statistics move once per step, not K times.
    """

    def summed(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
        losses = loss_fn(model, batch)
        return jnp.sum(losses), losses

    update = optax.with_extra_args_support(tx).update

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(state: nnx.State, opt_state: PyTree, batch: Batch):
        model = nnx.merge(graphdef, state)
        if per_task:
            grad_fn = samgs_optax.nnx.value_and_jacrev(loss_fn, mode=jac_mode, unroll=jac_unroll)
            losses, grads = grad_fn(model, batch)
        else:
            (_, losses), grads = nnx.value_and_grad(summed, has_aux=True)(model, batch)
        params = nnx.state(model, nnx.Param)
        # task_losses: for the loss-aware aggregators (GradNorm, MoCo, DB-MTL); chains drop it
        # for every other transform.
        updates, opt_state = update(grads, opt_state, params, task_losses=losses)
        nnx.update(model, optax.apply_updates(params, updates))
        return nnx.state(model), opt_state, losses

    return step


def make_predict(cfg: Config, graphdef_eval: nnx.GraphDef) -> Callable[..., Any]:
    """Jitted ``predict(state, images)`` in evaluation mode (BatchNorm running statistics):
    CelebA probabilities ``(B, K)``; dense outputs with segmentation arg-maxed."""

    @jax.jit
    def predict(state: nnx.State, images: jax.Array) -> Any:
        out = nnx.merge(graphdef_eval, state)(images)
        if cfg.dataset == "celeba":
            return out
        if "segmentation" in out:
            out = {**out, "segmentation": jnp.argmax(out["segmentation"], axis=-1)}
        return out

    return predict


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def evaluate_dense(
    cfg: Config, predict: Callable[..., Any], state: nnx.State, arrays: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """The authors' split metrics: pooled confusion matrix, per-batch-averaged errors."""
    num_classes = data.DENSE_SPECS[cfg.dataset].num_classes
    evaluator = metrics.DenseEvaluator(num_classes)
    for batch in eval_batches(cfg, arrays):
        out = jax.device_get(predict(state, batch["image"]))
        evaluator.update(
            seg=(out["segmentation"], batch["label"]) if "segmentation" in out else None,
            depth=(out["depth"], batch["depth"]) if "depth" in out else None,
            normal=(out["normal"], batch["normal"]) if "normal" in out else None,
        )
    return evaluator.compute()


def evaluate_celeba(
    cfg: Config, predict: Callable[..., Any], state: nnx.State, arrays: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Per-attribute F1 ``(K,)`` of the trained attributes over the split."""
    columns = [data.CELEBA_ATTRIBUTES.index(t) for t in run_tasks(cfg)]
    counts = metrics.F1Counts(len(columns))
    for batch in eval_batches(cfg, arrays):
        probs = jax.device_get(predict(state, batch["image"]))
        counts.update(probs, batch["attributes"][:, columns])
    return counts.compute()


def metric_columns(cfg: Config) -> tuple[str, ...]:
    """Names of the per-epoch evaluation numbers stored in the history."""
    if cfg.dataset == "celeba":
        return tuple(f"f1_{t}" for t in run_tasks(cfg))
    columns = metrics.NYUV2_COLUMNS if cfg.dataset == "nyuv2" else metrics.CITYSCAPES_COLUMNS
    wanted = {
        "segmentation": ("mean_iou", "pixel_accuracy"),
        "depth": ("abs_err", "rel_err"),
        "normal": ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30"),
    }
    keep = {c for t in run_tasks(cfg) for c in wanted[t]}
    return tuple(c for c in columns if c in keep)


def evaluate(
    cfg: Config, predict: Callable[..., Any], state: nnx.State, splits: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """``split -> (len(metric_columns),)`` float64 values for every evaluation split."""
    out = {}
    for split in split_names(cfg.dataset):
        if cfg.dataset == "celeba":
            out[split] = evaluate_celeba(cfg, predict, state, splits[split])
        else:
            values = evaluate_dense(cfg, predict, state, splits[split])
            out[split] = np.array([values[c] for c in metric_columns(cfg)], np.float64)
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def run_name(cfg: Config) -> str:
    task = f"-{cfg.task}" if cfg.task is not None else ""
    data_kind = "synthetic" if cfg.synthetic else "data"
    narrow = f"-w{cfg.width_divisor}" if cfg.width_divisor != 1 else ""
    return f"{cfg.dataset}-{cfg.model}{narrow}-{cfg.method}{task}-s{cfg.seed}-{data_kind}"


def checkpoint_manager(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_checkpoint(manager: Any, state: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state["epoch"]), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager: Any, like: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint, restored into the structure (and dtypes) of ``like``."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def params_digest(tree: PyTree) -> str:
    """SHA-256 of the leaves' bytes: equal digests mean bit-identical states."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """What a run builds once: model graphs, initial weights, optimizer, jitted steps.

    Reused through ``train(..., cache=...)`` by runs of an equal config (the tests).
    """

    graphdef: nnx.GraphDef
    graphdef_eval: nnx.GraphDef
    initial: nnx.State  # the initialised model state, on the host
    tx: optax.GradientTransformation
    note: str
    step: Callable[..., Any]
    predict: Callable[..., Any]
    init_opt: Callable[[PyTree], PyTree]  # params -> the run's opt_state


def jacobian_mode(cfg: Config) -> tuple[str, int]:
    """``(mode, unroll)`` of ``samgs_optax.nnx.value_and_jacrev`` for the run.

    ``--jac-mode`` / ``--jac-unroll`` when given. Otherwise the library's ``auto``
    (``sequential`` on CPU, ``jacrev`` on GPU), except beyond 32 tasks (CelebA's 40):
    ``jacrev``'s batched backward keeps 40 backward passes' intermediates (XLA plans 131 GB
    of temporaries for a batch of 256), so on an accelerator the tasks run ``sequential``,
    :data:`MANY_TASKS_UNROLL` at a time; on CPU, where XLA:CPU runs convolution weight
    gradients very slowly inside the loop that implies (a batch of 8: 179 s a step, against
    7 s), ``jacrev``.
    """
    unroll = cfg.jac_unroll or samgs_optax.jacobian.SEQUENTIAL_UNROLL
    if cfg.jac_mode != "auto" or len(run_tasks(cfg)) <= samgs_optax.jacobian.SEQUENTIAL_UNROLL:
        return cfg.jac_mode, unroll
    if jax.default_backend() == "cpu":
        return "jacrev", unroll
    return "sequential", cfg.jac_unroll or MANY_TASKS_UNROLL


def make_setup(cfg: Config, steps: int) -> Setup:
    """Initialises the model and builds the optimizer and the jitted functions of ``cfg``."""
    model = build_model(cfg)
    tx, per_task, note = build_optimizer(cfg, steps)
    graphdef, initial = nnx.split(model)
    model.eval()
    graphdef_eval, _ = nnx.split(model)
    predict = make_predict(cfg, graphdef_eval)
    if cfg.method in scalarizer_methods():
        parts = build_scalarizer(cfg, steps)
        step = make_scalarizer_step(graphdef, tx, make_loss_fn(cfg), parts)
        k = len(run_tasks(cfg))
        init_opt = functools.partial(init_scalarizer_opt_state, parts, tx, num_tasks=k)
    else:
        mode, unroll = jacobian_mode(cfg)
        step = make_train_step(
            graphdef, tx, make_loss_fn(cfg), per_task=per_task, jac_mode=mode, jac_unroll=unroll
        )
        init_opt = tx.init
    initial = jax.device_get(initial)
    return Setup(graphdef, graphdef_eval, initial, tx, note, step, predict, init_opt)


def initial_state(cfg: Config, setup: Setup) -> dict:
    """The checkpointed run state: model state, optimizer state, epoch, history."""
    model = nnx.merge(setup.graphdef, jax.device_put(setup.initial))  # fresh device buffers
    k, n_cols = len(run_tasks(cfg)), len(metric_columns(cfg))
    nan = functools.partial(jnp.full, fill_value=jnp.nan, dtype=jnp.float32)
    history = {"train_loss": nan((cfg.epochs, k)), "seconds": nan((cfg.epochs, 2))}
    history.update({split: nan((cfg.epochs, n_cols)) for split in split_names(cfg.dataset)})
    state = {
        "model": nnx.state(model),
        "opt_state": setup.init_opt(nnx.state(model, nnx.Param)),
        "epoch": jnp.zeros([], jnp.int32),
        "history": history,
    }
    # Committed to the device like restored checkpoints, so that a resumed run hits the
    # compiled step instead of compiling it again for differently placed arguments.
    return jax.device_put(state, jax.devices()[0])


def train_epoch(
    cfg: Config, setup: Setup, state: dict, arrays: Mapping[str, np.ndarray], bar: Any
) -> tuple[dict, np.ndarray]:
    """One epoch of steps; returns the new state and the epoch's mean task losses."""
    epoch = int(state["epoch"])
    model_state, opt_state = state["model"], state["opt_state"]
    total, count = None, 0
    for batch in train_batches(cfg, arrays, epoch):
        model_state, opt_state, losses = setup.step(model_state, opt_state, batch)
        total = losses if total is None else total + losses
        count += 1
        bar.update(1)
        if count % 10 == 1:
            bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in np.asarray(losses)[:3]))
    mean = np.asarray(total) / max(count, 1)
    return {**state, "model": model_state, "opt_state": opt_state}, mean


def _record(state: dict, epoch: int, values: Mapping[str, np.ndarray]) -> dict:
    history = dict(state["history"])
    for key, value in values.items():
        history[key] = history[key].at[epoch].set(jnp.asarray(value, jnp.float32))
    return {**state, "history": history, "epoch": jnp.asarray(epoch + 1, jnp.int32)}


def _summary(cfg: Config, epoch: int, losses: np.ndarray, scores: dict[str, np.ndarray]) -> str:
    loss = " ".join(f"{v:.4f}" for v in losses[:4]) + (" ..." if len(losses) > 4 else "")
    if cfg.dataset == "celeba":
        shown = " ".join(f"{s} F1 {np.mean(v):.4f}" for s, v in scores.items())
    else:
        shown = " ".join(
            f"{c} {v:.4f}" for c, v in zip(metric_columns(cfg), scores["val"], strict=True)
        )
    return f"epoch {epoch + 1}/{cfg.epochs} | train loss {loss} | {shown}"


def train(
    cfg: Config,
    splits: Mapping[str, Any] | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    checkpoints: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
    cache: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains one run and returns its results (:func:`report`), ``state`` included.

    Args:
      cfg: the run (``cfg.resolved()`` is applied).
      splits: the data from :func:`load_data` (loaded if omitted).
      run_dir: where ``results.json`` (rewritten every epoch) and ``checkpoints/`` go; None:
        no files.
      checkpoints: save an orbax checkpoint into ``run_dir/checkpoints`` every epoch.
      resume: continue from the latest checkpoint there.
      stop_after: stop after this many epochs in total (the run can be resumed).
      cache: dict reused across calls: runs of an equal config share the initial weights
        and the compiled steps.
      progress: tqdm bars and per-epoch summaries on stderr.
    """
    cfg = cfg.resolved()
    splits = splits if splits is not None else load_data(cfg)
    steps = steps_per_epoch(cfg, len(splits["train"]["image"]))
    cache = {} if cache is None else cache
    if cfg not in cache:
        cache[cfg] = make_setup(cfg, steps)
    setup = cache[cfg]
    state = initial_state(cfg, setup)
    manager = _manager(run_dir, resume) if run_dir is not None and checkpoints else None
    if manager is not None and resume:
        state = restore_checkpoint(manager, state) or state
    last = min(cfg.epochs, stop_after or cfg.epochs)
    for epoch in range(int(state["epoch"]), last):
        state = _run_epoch(cfg, setup, state, splits, epoch, steps, progress)
        if manager is not None:
            save_checkpoint(manager, state)
        if run_dir is not None:
            write_results(run_dir, report(cfg, setup, state, splits))
    return report(cfg, setup, state, splits) | {"state": state}


def _manager(run_dir: str | os.PathLike, resume: bool) -> Any:
    directory = Path(run_dir) / "checkpoints"
    if not resume and directory.exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or --restart to delete them"
        )
    return checkpoint_manager(directory)


def _run_epoch(
    cfg: Config,
    setup: Setup,
    state: dict,
    splits: Mapping[str, Any],
    epoch: int,
    steps: int,
    progress: bool,
) -> dict:
    bar = tqdm(total=steps, desc=f"{cfg.method} epoch {epoch + 1}", disable=not progress)
    start = time.perf_counter()
    state, losses = train_epoch(cfg, setup, state, splits["train"], bar)
    jax.block_until_ready(state["model"])
    bar.close()
    trained = time.perf_counter()
    scores = evaluate(cfg, setup.predict, state["model"], splits)
    seconds = np.array([trained - start, time.perf_counter() - trained])
    if progress:
        tqdm.write(_summary(cfg, epoch, losses, scores), file=sys.stderr)
    return _record(state, epoch, {"train_loss": losses, "seconds": seconds, **scores})


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------
def _number(value: float | None) -> float | None:
    """``value`` as a JSON number: NaN (e.g. the authors' mIoU with an absent class) -> null."""
    return None if value is None or math.isnan(value) else float(value)


def _rows(array: Any, done: int) -> list[list[float | None]]:
    return [[_number(round(float(v), 6)) for v in row] for row in np.asarray(array)[:done]]


def final_metrics(cfg: Config, history: Mapping[str, Any], done: int) -> dict[str, Any]:
    """The table's numbers: dense: mean of the last 10 epochs' ``val`` metrics; CelebA:
    test F1 at the epoch of best mean validation F1 (the authors' selection)."""
    if done == 0:
        return {"metrics": {}, "epochs_used": []}
    if cfg.dataset == "celeba":
        val = np.asarray(history["val"], np.float64)[:done]
        best = int(np.argmax(val.mean(axis=1)))
        test = np.asarray(history["test"], np.float64)[best]
        per_task = dict(zip(run_tasks(cfg), test.tolist(), strict=True))
        return {"metrics": {"f1_mean": float(test.mean())}, "f1": per_task, "best_epoch": best}
    first = max(0, done - LAST_EPOCHS)
    values = np.asarray(history["val"], np.float64)[first:done].mean(axis=0)
    return {
        "metrics": dict(zip(metric_columns(cfg), values.tolist(), strict=True)),
        "epochs_used": list(range(first + 1, done + 1)),
    }


def report(cfg: Config, setup: Setup, state: dict, splits: Mapping[str, Any]) -> dict[str, Any]:
    """The run's results (JSON-serialisable)."""
    done = int(state["epoch"])
    history = state["history"]
    final = final_metrics(cfg, history, done)
    seconds = np.asarray(history["seconds"], np.float64)[:done]
    return {
        "dataset": cfg.dataset,
        "method": cfg.method,
        "model": cfg.model,
        "task": cfg.task,
        "seed": cfg.seed,
        "metrics": {k: _number(v) for k, v in final["metrics"].items()},
        "delta_m": _number(metrics.delta_m_against_authors(cfg.dataset, final["metrics"])),
        "paper": reported.paper_row(cfg.dataset, cfg.method),
        **{k: v for k, v in final.items() if k != "metrics"},
        "epochs_done": done,
        "epochs": cfg.epochs,
        "recipe": setup.note,
        "params": models.param_counts(nnx.merge(setup.graphdef, state["model"])),
        "data": {split: len(arrays["image"]) for split, arrays in splits.items()},
        "synthetic": cfg.synthetic,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None},
        "columns": list(metric_columns(cfg)),
        "history": {key: _rows(history[key], done) for key in sorted(history)},
        "train_seconds_per_epoch": float(seconds[:, 0].mean()) if done else None,
        "state_sha256": params_digest(state["model"]),
    }


def write_results(run_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def _image_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--method", default="samgs", help=f"one of {method_names()}")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", dest="data_root", help="dataset root (data.py's layout)")
    source.add_argument("--synthetic", action="store_true", help="generated data, exact shapes")
    p.add_argument("--quick", action="store_true", help="smoke run: see QUICK")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", choices=("mtan", "split"), help="dense sets (default: mtan)")
    p.add_argument("--task", help="--method stl: segmentation/depth/normal or an attribute")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--gamma", type=float, help="SAM-GS gamma (configs 0.7; paper 0.9)")
    p.add_argument("--samgs-b2", type=float, help="SAM-GS beta2 (default 0.99)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--image-size", type=_image_size, help="HxW of synthetic dense data")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--steps-per-epoch", type=int, help="cap the steps of an epoch")
    p.add_argument(
        "--width-divisor", type=int, help="divide the SegNet widths (CPU smoke tests only)"
    )
    p.add_argument("--jac-mode", choices=("auto", "jacrev", "sequential", "vmap"))
    p.add_argument("--jac-unroll", type=int, help="sequential mode: tasks per loop step")
    p.add_argument(
        "--method-params-lr",
        type=float,
        help="uw/imtl_l: Adam lr of their parameters (default 0.025; 0: the authors' UW)",
    )
    p.add_argument(
        "--famo-no-update",
        dest="famo_update",
        action="store_false",
        default=None,
        help="famo: no logit step (the authors' NYU-v2 and CelebA trainers)",
    )
    p.add_argument("--out-dir", default="checkpoints/paper", help="parent of the run dir")
    p.add_argument("--no-checkpoint", action="store_true", help="results.json only")
    p.add_argument("--resume", action="store_true", help="continue the run's checkpoints")
    p.add_argument("--restart", action="store_true", help="delete the run's checkpoints")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs")
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    base = QUICK[args.dataset] if args.quick else {}
    synthetic = args.synthetic or (args.quick and args.data_root is None)
    if args.data_root is not None:
        base = {k: v for k, v in base.items() if k != "image_size"}
    return Config(**{**base, **given, "synthetic": synthetic}), args


def add_xla_flags(flags: str) -> None:
    """Appends to ``XLA_FLAGS`` (read when the first backend starts)."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def main(argv: list[str] | None = None, *, cache: dict | None = None) -> dict[str, Any]:
    """The command line; ``cache`` as in :func:`train` (tests share compiled steps)."""
    cfg, args = parse_args(argv)
    if args.deterministic:
        add_xla_flags(DETERMINISTIC_FLAGS)
    try:  # configuration and data errors: a message, not a traceback
        cfg = cfg.resolved()
        splits = load_data(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"train.py: error: {err}") from err
    run_dir = Path(args.out_dir) / run_name(cfg)
    if args.restart and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = train(
        cfg,
        splits,
        run_dir=run_dir,
        checkpoints=not args.no_checkpoint,
        resume=args.resume,
        stop_after=args.stop_after,
        cache=cache,
        progress=not args.no_progress,
    )
    result.pop("state")
    result["results_path"] = str(write_results(run_dir, result))
    keys = ("dataset", "method", "model", "task", "seed", "metrics", "delta_m", "best_epoch")
    keys += ("paper", "epochs_done", "recipe", "state_sha256", "results_path")
    line = {k: result[k] for k in keys if k in result}
    print(json.dumps(line), flush=True)
    return result


if __name__ == "__main__":
    main()
