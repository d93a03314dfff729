"""Training steps of the paper's benchmarks at their real shapes: ours, and the authors' own code.

For each configuration (dataset, model, method, batch), on generated data of the exact
shapes, each side in its own process:

* **ours** (JAX): ``examples/paper/train.py``'s own jitted step (``train.make_setup``: the
  model, the authors' recipe through ``samgs_optax.recipe``, the per-task gradients of
  ``samgs_optax.nnx.value_and_jacrev``), compile time, the median step time after one warm-up
  step, XLA's buffers for one step (``memory_analysis``) and on a GPU the device's peak;
* **authors** (PyTorch, optional, ``--authors-repo PATH`` to a clone of ThomBors/samgs):
  *their* modules imported from that clone (``experiments/<dataset>/models.py``,
  ``methods/weight_methods.py``; nothing of theirs is copied here), the flow of their
  trainers: forward, the task losses, ``WeightMethods(method, ...).backward(...)`` with their
  config's options, ``Adam.step()``; peak memory as the growth of the process' peak RSS (CPU)
  or ``torch.cuda.max_memory_allocated`` (CUDA). The losses are written out here as their
  ``calc_loss`` (their trainers import hydra and wandb, so they are not imported).

Usage::

    python benchmarks/bench_paper.py --quick          # CelebA LS at batch 8, one step (a smoke run)
    python benchmarks/bench_paper.py                  # the default configurations
    python benchmarks/bench_paper.py --authors-repo ~/src/samgs --torch-python ~/torch/bin/python
    python benchmarks/bench_paper.py --configs nyuv2:mtan:samgs:2,celeba:cnn:ls:256

A configuration is ``dataset:model:method:batch``. Writes the ``bench_paper-<backend>``
section of ``benchmarks/RESULTS.md`` (not with ``--quick``/``--no-write``). On a CPU the
default set takes about 15 minutes (NYU-v2's SegNet-MTAN SAM-GS step alone is ~2 min);
CelebA's SAM-GS step runs at batch 32 there, because ``jacrev`` at batch 256 plans 131 GB of
temporaries on XLA:CPU (on a GPU the trainer runs it ``sequential``; see
docs/paper_benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER = HERE.parent / "examples" / "paper"
CPU_CONFIGS = (
    "celeba:cnn:ls:256",
    "celeba:cnn:samgs:32",
    "cityscapes:split:ls:8",
    "cityscapes:split:samgs:8",
    "cityscapes:mtan:ls:8",
    "cityscapes:mtan:samgs:8",
    "nyuv2:mtan:ls:2",
    "nyuv2:mtan:samgs:2",
)
GPU_CONFIGS = (
    "celeba:cnn:ls:256",
    "celeba:cnn:samgs:256",
    "cityscapes:mtan:ls:8",
    "cityscapes:mtan:samgs:8",
    "nyuv2:mtan:ls:2",
    "nyuv2:mtan:samgs:2",
    "nyuv2:split:samgs:2",
)
# Their experiments/*/conf/optimization/samgs.yaml (the same for the three datasets).
AUTHORS_OPTIONS = {"samgs": {"gamma": 0.7, "momentum": 0.9, "beta2": 0.99}, "ls": {}}
SHAPES = {"nyuv2": (288, 384, 13), "cityscapes": (128, 256, 7), "celeba": (64, 64, 40)}


def parse_config(text: str) -> dict:
    dataset, model, method, batch = text.split(":")
    if dataset not in SHAPES or method not in AUTHORS_OPTIONS:
        raise SystemExit(f"bad configuration {text!r}: dataset:model:method:batch")
    return {"dataset": dataset, "model": model, "method": method, "batch": int(batch)}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- ours (JAX)


def jax_child(cfg: dict) -> dict:
    import jax

    sys.path.insert(0, str(PAPER))
    sys.path.insert(0, str(HERE))
    import _common
    import train

    b = cfg["batch"]
    run = train.Config(
        cfg["dataset"],
        method=cfg["method"],
        model=None if cfg["dataset"] == "celeba" else cfg["model"],
        synthetic=True,
        batch_size=b,
        n_train=b,
        n_val=b,
        n_test=b if cfg["dataset"] == "celeba" else None,
        augment=False,
        epochs=1,
    ).resolved()
    setup = train.make_setup(run, steps=1)
    state = train.initial_state(run, setup)
    batch = next(train.train_batches(run, train.load_data(run)["train"], 0))
    model_state, opt_state = state["model"], state["opt_state"]
    t0 = time.perf_counter()
    compiled = setup.step.lower(model_state, opt_state, batch).compile()
    out = {"device": jax.devices()[0].platform, "compile_s": time.perf_counter() - t0}
    out["xla_mib"] = _common.xla_step_bytes(compiled) / 2**20
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["gflop"] = float(cost.get("flops", 0.0)) / 1e9
    times = []
    for i in range(cfg["steps"] + 1):
        t0 = time.perf_counter()
        model_state, opt_state, losses = compiled(model_state, opt_state, batch)
        jax.block_until_ready(losses)
        if i:
            times.append(time.perf_counter() - t0)
    out["step_s"] = _median(times)
    if out["device"] != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        out["peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    out["recipe"] = setup.note
    out["jax"] = jax.__version__
    return out


# --------------------------------------------------------------------------- theirs (PyTorch)


def _load(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_child(cfg: dict) -> dict:
    """The authors' modules and their trainers' flow, on random tensors of the real shapes."""
    import torch
    import torch.nn.functional as F

    repo = Path(cfg["authors_repo"])
    sys.path[:0] = [str(repo / "methods"), str(repo)]  # their `from utils import MinNormSolver`
    weight_methods = _load("authors_weight_methods", repo / "methods" / "weight_methods.py")
    models = _load("authors_models", repo / "experiments" / cfg["dataset"] / "models.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    b, (h, w, classes) = cfg["batch"], SHAPES[cfg["dataset"]]
    if cfg["dataset"] == "celeba":
        model = models.Network()
        x = torch.randn(b, 3, h, w)
        targets = [torch.randint(0, 2, (b, 1)).float() for _ in range(classes)]
    else:
        model = {"split": models.SegNet, "mtan": models.SegNetMtan}[cfg["model"]]()
        x = torch.randn(b, 3, h, w)
        label = torch.randint(-1, classes, (b, h, w))
        depth = torch.rand(b, 1, h, w) * (torch.rand(b, 1, h, w) > 0.1)
        normal = F.normalize(torch.randn(b, 3, h, w), dim=1)
        targets = [label, depth, normal][: 3 if cfg["dataset"] == "nyuv2" else 2]
    model = model.to(device)
    x = x.to(device)
    targets = [t.to(device) for t in targets]
    k = len(targets)
    method = weight_methods.WeightMethods(
        cfg["method"], n_tasks=k, device=device, **AUTHORS_OPTIONS[cfg["method"]]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def dense_losses(preds):
        # Their calc_loss: NLL (ignore -1), L1 and 1 - cosine over pixels with a target.
        out = [F.nll_loss(preds[0], targets[0], ignore_index=-1)]
        for pred, target, kind in zip(preds[1:], targets[1:], ("depth", "normal"), strict=False):
            mask = (target.sum(dim=1, keepdim=True) != 0).float()
            if kind == "depth":
                out.append((torch.abs(pred - target) * mask).sum() / mask.sum())
            else:
                out.append(1 - (pred * target * mask).sum() / mask.sum())
        return torch.stack(out)

    def step():
        model.train()
        optimizer.zero_grad()
        if cfg["dataset"] == "celeba":
            preds, features = model(x, return_representation=True)
            bce = torch.nn.BCELoss()
            losses = torch.stack([bce(p, t) for p, t in zip(preds, targets, strict=True)])
        else:
            preds, features = model(x, return_representation=True)
            losses = dense_losses(preds)
        method.backward(
            losses=losses,
            shared_parameters=list(model.shared_parameters()),
            task_specific_parameters=list(model.task_specific_parameters()),
            last_shared_parameters=list(model.last_shared_parameters()),
            representation=features,
        )
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    rss0 = _maxrss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(cfg["steps"] + 1):
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
    out = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out["step_s"] = _median(times)
    out["peak_mib"] = (
        torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _maxrss_mib() - rss0
    )
    return out


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CelebA LS at batch 8, one step")
    parser.add_argument("--configs", help="comma-separated dataset:model:method:batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--authors-repo", help="a clone of ThomBors/samgs: time their code too")
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("SAMGS_TORCH_PYTHON", sys.executable),
        help="interpreter with torch, scipy and cvxpy for their code (default: this one)",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--jax-child", help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_child:
        print(json.dumps(jax_child(json.loads(args.jax_child))))
        return []
    if args.torch_child:
        print(json.dumps(torch_child(json.loads(args.torch_child))))
        return []

    import jax

    sys.path.insert(0, str(HERE))
    import _common

    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if args.quick:
        texts = ["celeba:cnn:ls:8"]
    elif args.configs:
        texts = args.configs.split(",")
    else:
        texts = list(CPU_CONFIGS if backend == "cpu" else GPU_CONFIGS)
    steps = 1 if args.quick else args.steps
    rows = []
    for text in texts:
        cfg = {**parse_config(text), "steps": steps}
        r = {**cfg, **_common.run_child(__file__, "jax", cfg, sys.executable)}
        line = (
            f"{text:26s} ours {r['step_s']:8.3f} s/step (compile {r['compile_s']:5.1f} s, "
            f"{r['gflop']:8.0f} GFLOP, XLA {r['xla_mib']:7.0f} MiB)"
        )
        if args.authors_repo:
            t = _common.run_child(
                __file__, "torch", {**cfg, "authors_repo": args.authors_repo}, args.torch_python
            )
            r.update({f"torch_{key}": v for key, v in t.items()})
            line += (
                f"  authors {t['step_s']:8.3f} s/step ({t['peak_mib']:7.0f} MiB)"
                f" -> ours x{t['step_s'] / r['step_s']:.2f}"
            )
        print(line, flush=True)
        rows.append(r)
    if args.quick or args.no_write:
        return rows
    header = ["configuration", "ours s/step", "steps/s", "compile s", "GFLOP/step", "XLA MiB"]
    if backend != "cpu":
        header.append("device peak MiB")
    if args.authors_repo:
        header += ["authors s/step", "authors MiB", "authors/ours"]
    table = []
    for r in rows:
        row = [
            f"{r['dataset']} {r['model']} {r['method']} (batch {r['batch']})",
            f"{r['step_s']:.3f}",
            f"{1 / r['step_s']:.2f}",
            f"{r['compile_s']:.0f}",
            f"{r['gflop']:.0f}",
            f"{r['xla_mib']:.0f}",
        ]
        if backend != "cpu":
            row.append(f"{r.get('peak_mib', 0):.0f}")
        if args.authors_repo:
            row += [
                f"{r['torch_step_s']:.3f}",
                f"{r['torch_peak_mib']:.0f}",
                f"{r['torch_step_s'] / r['step_s']:.2f}x",
            ]
        table.append(row)
    section = f"bench_paper-{backend}"
    torch_line = (
        f"their code: PyTorch {rows[0]['torch_torch']} on {rows[0]['torch_device']} "
        f"({rows[0]['torch_threads']} threads)"
        if args.authors_repo
        else "their code not measured"
    )
    body = [
        f"## {section}: the paper benchmarks' training steps at the real shapes",
        "",
        f"- machine: {_common.machine()}; {torch_line}; load {_common.load()}",
        f"- command: `{_common.command()}`; date: {_common.now()}",
        f"- medians of {steps} steps after one warm-up step, each configuration in its own "
        "processes, generated data of the exact shapes; ours: examples/paper/train.py's step "
        "(recipe: " + rows[0]["recipe"] + " for the first row); their code: their modules and "
        "`WeightMethods.backward`; XLA MiB: XLA's buffers for one step; authors MiB: peak RSS "
        "growth (CPU) or `max_memory_allocated` (CUDA).",
        "",
        _common.markdown_table(header, table),
    ]
    _common.write_section(section, "\n".join(body))
    print(f"wrote {_common.RESULTS}")
    return rows


if __name__ == "__main__":
    main()
