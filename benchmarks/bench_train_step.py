"""One training step of SAM-GS against linear scalarisation (LS), time and peak memory.

Models (Flax NNX, shared ``encoder`` + one head per task, random data):

* ``multimnist``: the MultiLeNet of ``examples/multimnist_model.py`` (about 30k
  shared parameters), batch 256 of 28 x 28 images;
* ``mlp10m``: an MLP encoder 784-2048-2048-2048 (about 10M shared parameters)
  with a 2048-10 head per task, batch 64.

For K = 2 and K = 10 tasks, each step is ``jit``-compiled with the parameters and
optimizer state donated, and run as

* ``LS``: ``jax.value_and_grad`` of the summed losses, then ``optax.adam``;
* ``samgs/<mode>``: per-task gradients from ``samgs_optax.value_and_jacrev`` with
  ``mode`` in ``auto`` (the default: ``sequential`` on CPU, ``jacrev`` elsewhere),
  ``jacrev`` (one forward, K vectorised backwards), ``vmap`` (K forwards and
  backwards, vectorised) or ``sequential`` (one forward, K backwards one after the
  other, unrolled), then the authors' recipe ``samgs -> scale(K) -> clip -> adam``
  (``examples/multimnist_model.make_samgs_optimizer``).

A conv encoder (5.7M parameters, 64 x 64 RGB) and the authors' PyTorch trainer
flow, with the one-forward-plus-K-backward floor, are in
``benchmarks/bench_trainer_vs_authors.py``.

Every configuration runs in its own subprocess, so that its memory figures are its
own. Two peak-memory figures are reported:

* ``XLA MiB``: from the compiled step's ``memory_analysis()``: arguments +
  outputs - donated aliases + temporaries, i.e. the buffers XLA assigns for one
  step (exact, static, excludes the Python/runtime baseline);
* ``RSS MiB``: the growth of the process' peak resident set (``ru_maxrss``) from
  just before compiling to after the timed steps (includes compiled code,
  allocator slack and jax runtime caches; measured, so it is noisier).

Usage::

    python benchmarks/bench_train_step.py            # all configs, writes RESULTS.md
    python benchmarks/bench_train_step.py --quick    # MultiMNIST K=2, LS and auto only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import multimnist_model as mm  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

METHODS = ("LS", "samgs/auto", "samgs/jacrev", "samgs/vmap", "samgs/sequential")
QUICK_METHODS = ("LS", "samgs/auto")
MODELS = {"multimnist": 256, "mlp10m": 64}  # model -> batch size


def build(model: str, k: int, batch: int, method: str):
    """(step_fn, params, opt_state, batch_args) for one configuration."""
    if model == "multimnist":
        graphdef, params = mm.init_model(0, num_tasks=k)
    else:
        graphdef, params = nnx.split(Mlp(k, rngs=nnx.Rngs(0)))
    mask = mm.shared_mask(params)
    if method == "LS":
        tx = optax.adam(1e-3)
        step = mm.make_train_step(graphdef, tx, per_task=False)
    else:
        tx = mm.make_samgs_optimizer(k, mask)
        step = mm.make_train_step(graphdef, tx, jac_mode=method.split("/")[1])
    step = jax.jit(step, donate_argnums=(0, 1))
    images, labels, weights = mm.example_batch(batch, k)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
    shared = sum(x.size for x, is_shared in leaves if is_shared)
    total = sum(x.size for x in jax.tree.leaves(params))
    params = jax.tree.map(jnp.asarray, params)
    return step, params, tx.init(params), (images, labels, weights), shared, total


class MlpEncoder(nnx.Module):
    """784-2048-2048-2048 ReLU MLP on flattened images: about 10M parameters."""

    def __init__(self, *, rngs: nnx.Rngs):
        sizes = (784, 2048, 2048, 2048)
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


class Mlp(nnx.Module):
    """Shared MLP encoder and a 2048-10 linear head per task; logits of shape (K, B, 10)."""

    def __init__(self, num_tasks: int, *, rngs: nnx.Rngs):
        self.encoder = MlpEncoder(rngs=rngs)
        self.heads = nnx.List([nnx.Linear(2048, 10, rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.encoder(x)
        return jnp.stack([head(z) for head in self.heads])


def child(cfg: dict) -> dict:
    step, params, opt_state, batch, shared, total = build(
        cfg["model"], cfg["k"], cfg["batch"], cfg["method"]
    )
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, *batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = _common.xla_step_bytes(compiled)
    times = []
    for i in range(cfg["steps"] + 2):
        t0 = time.perf_counter()
        params, opt_state, losses = compiled(params, opt_state, *batch)
        jax.block_until_ready((params, opt_state, losses))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        **cfg,
        "shared_params": int(shared),
        "params": int(total),
        "step_ms": 1e3 * float(np.median(times)),
        "compile_s": compile_s,
        "xla_mib": xla_bytes / 2**20,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "rss_mib": _maxrss_mib() - rss0,
        "finite": bool(np.all(np.isfinite(np.asarray(losses)))),
    }


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_config(cfg: dict, jemalloc: bool = False) -> dict:
    env = dict(os.environ)
    if jemalloc:
        env.update(LD_PRELOAD=_common.JEMALLOC, MALLOC_CONF=_common.JEMALLOC_CONF)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"config {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--jemalloc", action="store_true", help="preload jemalloc in the configs' processes"
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = child(json.loads(args.child))
        print(json.dumps({**res, "allocator": _common.allocator(), "machine": _common.machine()}))
        return
    if args.jemalloc and not os.path.exists(_common.JEMALLOC):
        raise SystemExit(f"{_common.JEMALLOC} not found (apt-get install libjemalloc2)")
    names = ["multimnist"] if args.quick else args.models.split(",")
    models = {name: MODELS[name] for name in names}
    ks = (2,) if args.quick else (2, 10)
    steps = 3 if args.quick else args.steps
    methods = QUICK_METHODS if args.quick else METHODS
    rows = []
    for model, batch in models.items():
        for k in ks:
            base = None
            for method in methods:
                cfg = {"model": model, "k": k, "batch": batch, "method": method, "steps": steps}
                r = run_config(cfg, args.jemalloc)
                base = r if method == "LS" else base
                r["vs_ls"] = r["step_ms"] / base["step_ms"]
                rows.append(r)
                print(
                    f"{model:10s} K={k:2d} {method:17s} {r['step_ms']:9.2f} ms  x LS "
                    f"{r['vs_ls']:5.2f}  XLA {r['xla_mib']:8.1f} MiB (temp {r['temp_mib']:7.1f})"
                    f"  RSS +{r['rss_mib']:7.1f} MiB  compile {r['compile_s']:5.1f} s",
                    flush=True,
                )
    if args.quick or args.no_write:
        return
    table = [
        (
            r["model"],
            f"{r['shared_params']:,}",
            r["k"],
            r["batch"],
            r["method"],
            f"{r['step_ms']:.1f}",
            f"{r['vs_ls']:.2f}",
            f"{r['xla_mib']:.1f}",
            f"{r['temp_mib']:.1f}",
            f"{r['rss_mib']:.0f}",
            f"{r['compile_s']:.1f}",
        )
        for r in rows
    ]
    section = "bench_train_step" + ("-jemalloc" if args.jemalloc else "")
    body = [
        f"## {section}: one training step, SAM-GS against LS",
        "",
        f"- machine: {rows[0]['machine']}; allocator: {rows[0]['allocator']}",
        f"- command: `{_common.command()}`; date: {_common.now()}",
        f"- median of {steps} steps after 2 warm-up steps, each configuration in its own "
        "process; parameters and optimizer state donated. `XLA MiB`: arguments + outputs - "
        "aliases + temporaries of the compiled step (`memory_analysis()`); `temp`: the "
        "temporaries alone; `RSS MiB`: growth of the process' peak RSS over compile + steps.",
        "",
        _common.markdown_table(
            [
                "model",
                "shared params",
                "K",
                "batch",
                "method",
                "step ms",
                "x LS",
                "XLA MiB",
                "temp MiB",
                "RSS MiB",
                "compile s",
            ],
            table,
        ),
    ]
    _common.write_section(section, "\n".join(body))
    print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
