"""A whole SAM-GS training step, ours against the authors' trainer flow, time and peak memory.

Same architecture, batch and K on both sides, on the backend each framework finds
(CPU here; CUDA when present):

* ``mlp``: a 1024-2048-2048-2048-2048 ReLU MLP encoder (14.7M shared parameters)
  and a 2048-10 head per task;
* ``conv``: a conv encoder on 64 x 64 RGB images, 4 blocks of 3x3 conv (64, 128,
  256, 512 channels) + ReLU + 2x2 max-pool, then a 8192-512 dense layer (5.7M
  shared parameters), and a 512-10 head per task. Our 2x2 max-pool is
  ``x.reshape(B, H/2, 2, W/2, 2, C).max((2, 4))`` by default (``--pool reshape``), the same
  function as ``nnx.max_pool`` (``--pool reduce_window``) with a backward pass that XLA:CPU
  runs faster and in less memory (docs/performance.md); PyTorch uses ``nn.MaxPool2d``.

Each task k has its own labels and a cross-entropy loss. Per configuration,
each in its own process so that its memory figures are its own:

* **ours** (JAX): ``samgs_optax.value_and_jacrev`` (``mode="auto"``: one forward,
  K backward passes) and ``chain(samgs(K, mask=encoder), scale(K),
  clip_by_global_norm(1), adam)`` on the heads-masked tree, jitted, parameters and
  optimizer state donated;
* **floor** (JAX, same process): one forward plus K backward passes, measured: the
  jitted ``value_and_jacrev`` of ours (same mode) with the K gradients summed over
  tasks instead of stacked, so XLA never forms the K x D array, and the program ends
  there (an earlier version estimated it as ``t_fwd + K (t_grad - t_fwd)`` from the
  jitted forward and the gradient of the summed loss; K times a difference of two
  timings, it moved by 2x between runs: still printed as ``est``); ``ours/floor``
  divides by it, ``ours/(floor+Adam)`` also adds the optimizer step every trainer pays
  (``t_LS - t_grad``), and ``ours/(floor+update)`` adds instead the whole optimizer
  chain of ours (SAM-GS, scale, clip, Adam, apply) timed alone on fixed stacked
  gradients (``t_update``): where the step is memory-bound (an MLP on CPU) that chain
  moves several K x D arrays and costs more than the backward passes, so
  ``ours/(floor+update)`` near 1 says the step costs no more than its parts (how the
  SAM-GS update compares with the memory floor is ``bench_update.py``'s subject);
* **LS** (JAX): the gradient of the summed loss and Adam;
* **authors** (PyTorch): their trainer's flow: forward, then for each task
  ``loss_k.backward(retain_graph=True)``, the shared gradients copied into a
  (D, K) matrix (their ``grad2vec``) and zeroed, the transcription of their
  ``balance_magnitude`` (``bench_torch_reference.TorchSamgs``), the result times K
  written back into ``.grad`` (their ``overwrite_grad``), ``clip_grad_norm_(1.0)``
  on the shared parameters, ``Adam.step()``; the heads keep the gradients their
  own task's backward left, as in their code.
* **torch LS** (PyTorch): the summed loss, one backward, Adam.

Peak memory: for JAX, XLA's buffers for one step (``memory_analysis()``: arguments +
outputs - donated aliases + temporaries); for PyTorch on CPU the growth of the
process' peak RSS over the timed steps, on CUDA ``torch.cuda.max_memory_allocated``.
The two CPU figures are measured differently (RSS also counts allocator slack):
read them as orders of magnitude, and the JAX one as exact.

Usage::

    python benchmarks/bench_trainer_vs_authors.py            # all, writes RESULTS.md
    python benchmarks/bench_trainer_vs_authors.py --quick    # mlp, K=2, no RESULTS.md
    python benchmarks/bench_trainer_vs_authors.py --models conv --ks 2,10
    python benchmarks/bench_trainer_vs_authors.py --jemalloc   # both sides on jemalloc (CPU)

PyTorch runs in this interpreter if ``import torch`` works, else in
``--torch-python`` (default ``/work/venv-torch/bin/python`` or
``$SAMGS_TORCH_PYTHON``); without it only the JAX columns are filled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TORCH_PYTHON = "/work/venv-torch/bin/python"
MLP_SIZES = (1024, 2048, 2048, 2048, 2048)
CONV_CHANNELS = (3, 64, 128, 256, 512)
IMAGE = 64
NUM_CLASSES = 10
BATCH = {"cpu": {"mlp": 64, "conv": 32}, "gpu": {"mlp": 256, "conv": 128}}
LR = 1e-3


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- torch side
# Imports only torch and the standard library: the torch venv may have no jax.


def torch_child(cfg: dict) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from bench_torch_reference import TorchSamgs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    k, batch = cfg["k"], cfg["batch"]
    if cfg["model"] == "mlp":
        layers = []
        for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        encoder = nn.Sequential(nn.Flatten(), *layers)
        width = MLP_SIZES[-1]
        x = torch.randn(batch, MLP_SIZES[0])
    else:
        layers = []
        for a, b in zip(CONV_CHANNELS[:-1], CONV_CHANNELS[1:], strict=True):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        side = IMAGE // 2 ** (len(CONV_CHANNELS) - 1)
        encoder = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(CONV_CHANNELS[-1] * side * side, 512), nn.ReLU()
        )
        width = 512
        x = torch.randn(batch, 3, IMAGE, IMAGE)
    heads = nn.ModuleList([nn.Linear(width, NUM_CLASSES) for _ in range(k)])
    encoder, heads, x = encoder.to(device), heads.to(device), x.to(device)
    y = torch.randint(0, NUM_CLASSES, (k, batch), device=device)
    shared = list(encoder.parameters())
    params = shared + list(heads.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    dims = [p.numel() for p in shared]
    surgery = TorchSamgs()

    def task_losses():
        z = encoder(x)
        return [nn.functional.cross_entropy(heads[i](z), y[i]) for i in range(k)]

    def authors_step():
        opt.zero_grad()
        losses = task_losses()
        grads = torch.zeros(sum(dims), k, device=device)
        for i in range(k):
            losses[i].backward(retain_graph=True)
            start = 0
            for p, n in zip(shared, dims, strict=True):  # grad2vec, then zero the shared grads
                grads[start : start + n, i].copy_(p.grad.reshape(-1))
                p.grad.zero_()
                start += n
        update, _ = surgery.step(grads)
        update = update * k  # "to match the sum loss"
        start = 0
        for p, n in zip(shared, dims, strict=True):  # overwrite_grad
            p.grad = update[start : start + n].reshape(p.shape).clone()
            start += n
        nn.utils.clip_grad_norm_(shared, 1.0)
        opt.step()
        return losses

    def ls_step():
        opt.zero_grad()
        loss = sum(task_losses())
        loss.backward()
        opt.step()
        return [loss]

    out = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, step in (("torch_ls", ls_step), ("authors", authors_step)):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss0 = _maxrss_mib()
        times = []
        for i in range(cfg["steps"] + 2):
            t0 = time.perf_counter()
            losses = step()
            float(losses[0])  # waits for the step
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1e3 * _median(times)
        out[f"{name}_mib"] = (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _maxrss_mib() - rss0
        )
    out["shared_params"] = sum(dims)
    return out


# --------------------------------------------------------------------------- jax side


def jax_child(cfg: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import samgs_optax

    sys.path.insert(0, str(HERE))
    import _common

    k, batch = cfg["k"], cfg["batch"]

    class Mlp(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.encoder = nnx.List(
                [
                    nnx.Linear(a, b, rngs=rngs)
                    for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True)
                ]
            )
            self.heads = nnx.List(
                [nnx.Linear(MLP_SIZES[-1], NUM_CLASSES, rngs=rngs) for _ in range(k)]
            )

        def __call__(self, x):
            for layer in self.encoder:
                x = nnx.relu(layer(x))
            return jnp.stack([head(x) for head in self.heads])

    class Conv(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            pairs = zip(CONV_CHANNELS[:-1], CONV_CHANNELS[1:], strict=True)
            side = IMAGE // 2 ** (len(CONV_CHANNELS) - 1)
            self.encoder = nnx.List(
                [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in pairs]
                + [nnx.Linear(CONV_CHANNELS[-1] * side * side, 512, rngs=rngs)]
            )
            self.heads = nnx.List([nnx.Linear(512, NUM_CLASSES, rngs=rngs) for _ in range(k)])

        def __call__(self, x):
            for conv in self.encoder[:-1]:
                x = pool(nnx.relu(conv(x)))
            x = nnx.relu(self.encoder[-1](x.reshape(x.shape[0], -1)))
            return jnp.stack([head(x) for head in self.heads])

    def pool(x):
        """2x2 max-pool, stride 2: ``--pool reduce_window`` (``nnx.max_pool``) or ``reshape``."""
        if cfg["pool"] == "reduce_window":
            return nnx.max_pool(x, (2, 2), (2, 2))
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    model = (Mlp if cfg["model"] == "mlp" else Conv)(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    mask = {
        "encoder": jax.tree.map(lambda _: True, params["encoder"]),
        "heads": jax.tree.map(lambda _: False, params["heads"]),
    }
    shape = (batch, MLP_SIZES[0]) if cfg["model"] == "mlp" else (batch, IMAGE, IMAGE, 3)
    x = jax.random.normal(jax.random.key(1), shape)
    y = jax.random.randint(jax.random.key(2), (k, batch), 0, NUM_CLASSES)

    def task_losses(p, x, y):
        state = nnx.State(p)
        logits = nnx.merge(graphdef, state)(x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1)[..., 0], axis=1)

    def summed(p, x, y):
        return jnp.sum(task_losses(p, x, y))

    samgs_tx = optax.chain(
        samgs_optax.samgs(k, mask=mask),
        optax.scale(k),
        optax.masked(optax.clip_by_global_norm(1.0), mask),
        optax.adam(LR),
    )
    ls_tx = optax.adam(LR)

    def samgs_step(p, s, x, y):
        losses, grads = samgs_optax.value_and_jacrev(task_losses, mode=cfg["mode"])(p, x, y)
        u, s = samgs_tx.update(grads, s, p)
        return optax.apply_updates(p, u), s, losses

    def ls_step(p, s, x, y):
        loss, grads = jax.value_and_grad(summed)(p, x, y)
        u, s = ls_tx.update(grads, s, p)
        return optax.apply_updates(p, u), s, loss

    out = {"device": jax.devices()[0].platform}
    gpu = out["device"] != "cpu"

    def timed(fn, *args, donate=()):
        compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        mib = _common.xla_step_bytes(compiled) / 2**20
        times = []
        for i in range(cfg["steps"] + 2):
            t0 = time.perf_counter()
            res = compiled(*args)
            jax.block_until_ready(res)
            if i >= 2:
                times.append(time.perf_counter() - t0)
            if donate:
                args = (*res[: len(donate)], *args[len(donate) :])
        return 1e3 * _median(times), mib

    def k_backward(p, x, y):
        """One forward and K backward passes as ours runs them, gradients summed, not stacked."""
        losses, grads = samgs_optax.value_and_jacrev(task_losses, mode=cfg["mode"])(p, x, y)
        return losses, jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

    out["fwd_ms"], _ = timed(task_losses, params, x, y)
    out["floor_ms"], _ = timed(k_backward, params, x, y)
    out["grad_ms"], _ = timed(jax.value_and_grad(summed), params, x, y)
    fresh = jax.tree.map(jnp.array, params)
    out["ls_ms"], out["ls_mib"] = timed(ls_step, fresh, ls_tx.init(fresh), x, y, donate=(0, 1))
    fresh = jax.tree.map(jnp.array, params)
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()
    out["ours_ms"], out["ours_mib"] = timed(
        samgs_step, fresh, samgs_tx.init(fresh), x, y, donate=(0, 1)
    )
    out["ours_wall_s"] = time.perf_counter() - t0

    def update_step(p, s, g):
        u, s = samgs_tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    grads = jax.jit(lambda p: samgs_optax.value_and_jacrev(task_losses, mode=cfg["mode"])(p, x, y))(
        params
    )[1]
    fresh = jax.tree.map(jnp.array, params)
    out["update_ms"], _ = timed(update_step, fresh, samgs_tx.init(fresh), grads, donate=(0, 1))
    del grads
    out["ours_rss_mib"] = _maxrss_mib() - rss0
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        out["gpu_peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    out["floor_est_ms"] = out["fwd_ms"] + k * (out["grad_ms"] - out["fwd_ms"])
    out["adam_ms"] = max(out["ls_ms"] - out["grad_ms"], 0.0)
    out["shared_params"] = sum(v.size for v in jax.tree.leaves(params["encoder"]))
    return out


# --------------------------------------------------------------------------- driver


def torch_python(option: str) -> str | None:
    try:
        import torch  # noqa: F401

        return sys.executable
    except ImportError:
        return option if option and os.path.exists(option) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="mlp, K=2, 2 steps, no RESULTS.md")
    parser.add_argument("--models", default="mlp,conv")
    parser.add_argument("--ks", default="2,10,40")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: per model and backend")
    parser.add_argument("--mode", default="auto", help="value_and_jacrev mode for ours")
    parser.add_argument(
        "--torch-python", default=os.environ.get("SAMGS_TORCH_PYTHON", DEFAULT_TORCH_PYTHON)
    )
    parser.add_argument(
        "--pool",
        default="reshape",
        choices=("reshape", "reduce_window"),
        help="how our conv model writes its 2x2 max-pool (same function; see docs/performance.md)",
    )
    parser.add_argument(
        "--jemalloc",
        action="store_true",
        help="preload jemalloc (page purging off) in both frameworks' processes",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--jax-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        print(json.dumps(torch_child(json.loads(args.torch_child))))
        return
    if args.jax_child:
        print(json.dumps(jax_child(json.loads(args.jax_child))))
        return

    import jax

    sys.path.insert(0, str(HERE))
    import _common

    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if args.jemalloc and not os.path.exists(_common.JEMALLOC):
        raise SystemExit(f"{_common.JEMALLOC} not found (apt-get install libjemalloc2)")
    models = ["mlp"] if args.quick else args.models.split(",")
    ks = [2] if args.quick else [int(k) for k in args.ks.split(",")]
    steps = 2 if args.quick else args.steps
    tpy = torch_python(args.torch_python)
    if tpy is None:
        print("no PyTorch interpreter found: only the JAX columns are measured")
    mall = args.jemalloc
    rows = []
    for model in models:
        for k in ks:
            batch = args.batch or BATCH[backend][model]
            cfg = {
                "model": model,
                "k": k,
                "batch": batch,
                "steps": steps,
                "mode": args.mode,
                "pool": args.pool,
            }
            r = {**cfg, **_common.run_child(__file__, "jax", cfg, sys.executable, jemalloc=mall)}
            if tpy is not None:
                t = _common.run_child(__file__, "torch", cfg, tpy, jemalloc=mall)
                r.update({f"torch_{key}": v for key, v in t.items() if key.endswith(("ms", "mib"))})
                r["torch_device"], r["torch_version"] = t["device"], t["torch"]
                r["torch_threads"] = t["threads"]
            rows.append(r)
            speed = (
                f"authors {r['torch_authors_ms']:9.1f} ms ({r['torch_authors_mib']:7.0f} MiB) "
                f"-> ours x{r['torch_authors_ms'] / r['ours_ms']:5.2f} faster; "
                f"torch LS {r['torch_torch_ls_ms']:8.1f} ms"
                if tpy
                else ""
            )
            print(
                f"{model:4s} K={k:2d} B={batch:3d}  ours {r['ours_ms']:9.1f} ms "
                f"({r['ours_mib']:7.0f} MiB)  floor {r['floor_ms']:9.1f} ms "
                f"(est {r['floor_est_ms']:.1f}; x{r['ours_ms'] / r['floor_ms']:4.2f}; "
                f"+Adam x{r['ours_ms'] / (r['floor_ms'] + r['adam_ms']):4.2f}; "
                f"+update {r['update_ms']:.1f} ms "
                f"x{r['ours_ms'] / (r['floor_ms'] + r['update_ms']):4.2f})"
                f"  LS {r['ls_ms']:8.1f} ms  {speed}",
                flush=True,
            )
    if args.quick or args.no_write:
        return
    header = [
        "model",
        "shared params",
        "K",
        "batch",
        "ours ms",
        "floor ms",
        "ours/floor",
        "ours/(floor+Adam)",
        "update ms",
        "ours/(floor+update)",
        "ours MiB",
        "JAX LS ms",
    ]
    if tpy:
        header += ["authors ms", "authors MiB", "authors/ours", "torch LS ms"]
    table = []
    for r in rows:
        row = [
            r["model"],
            f"{r['shared_params']:,}",
            r["k"],
            r["batch"],
            f"{r['ours_ms']:.1f}",
            f"{r['floor_ms']:.1f}",
            f"{r['ours_ms'] / r['floor_ms']:.2f}",
            f"{r['ours_ms'] / (r['floor_ms'] + r['adam_ms']):.2f}",
            f"{r['update_ms']:.1f}",
            f"{r['ours_ms'] / (r['floor_ms'] + r['update_ms']):.2f}",
            f"{r['ours_mib']:.0f}",
            f"{r['ls_ms']:.1f}",
        ]
        if tpy:
            row += [
                f"{r['torch_authors_ms']:.1f}",
                f"{r['torch_authors_mib']:.0f}",
                f"{r['torch_authors_ms'] / r['ours_ms']:.2f}x",
                f"{r['torch_torch_ls_ms']:.1f}",
            ]
        table.append(row)
    section = f"bench_trainer_vs_authors-{backend}" + ("-jemalloc" if mall else "")
    section += "-xla-flags" if os.environ.get("XLA_FLAGS", "").strip() else ""
    torch_line = (
        f"PyTorch {rows[0]['torch_version']} on {rows[0]['torch_device']} "
        f"({rows[0]['torch_threads']} threads)"
        if tpy
        else "PyTorch not measured"
    )
    body = [
        f"## {section}: a whole SAM-GS training step, ours against the authors' trainer flow",
        "",
        f"- machine: {_common.machine()}; {torch_line}; load {_common.load()}; "
        f"allocator: {'jemalloc (LD_PRELOAD, ' + _common.JEMALLOC_CONF + ')' if mall else 'glibc'}",
        f"- command: `{_common.command()}`; date: {_common.now()}",
        f"- medians of {steps} steps after 2 warm-up steps, each configuration in its own "
        f"processes; ours: `value_and_jacrev(mode={args.mode!r})` + the authors' recipe, "
        f"conv max-pool written as `--pool {args.pool}`; "
        "floor: one forward + K backward passes, measured (ours' `value_and_jacrev` with the "
        "gradients summed over tasks, not stacked; same process); "
        "update: our optimizer chain alone (SAM-GS, scale, clip, Adam, apply) on fixed "
        "stacked gradients; "
        "ours MiB: XLA's buffers for one step; authors MiB: peak RSS growth (CPU) or "
        "`max_memory_allocated` (CUDA).",
        "",
        _common.markdown_table(header, table),
    ]
    _common.write_section(section, "\n".join(body))
    print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
