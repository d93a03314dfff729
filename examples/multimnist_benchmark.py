"""The MultiMNIST benchmark: every method x 3 seeds, plain and with task 2's loss x100.

    python examples/multimnist_benchmark.py            # ~15 min on 2 CPU cores
    python examples/multimnist_benchmark.py --smoke    # tiny sizes, checks the pipeline

Runs, in two worker processes with single-threaded XLA each (on 2 cores this beats one
process with two threads, and the results do not depend on the number of workers):

* every method of :func:`multimnist.method_names` (``ls``, ``samgs``, ``samgs_g09`` and
  the registered aggregators) with seeds 0, 1, 2, for the plain problem and for the
  variant where task 2's loss is multiplied by 100;
* SAM-GS with its moments stored in bfloat16 (``--m-dtype bfloat16``), plain problem only
  (with task 2's loss x100 SAM-GS equalises at every step, which does not read the
  moments);
* single-task models for each task, seeds 0, 1, 2 (the reference of Delta m%; a loss
  scale does not change a single-task model under Adam, so they serve both variants).

Writes ``docs/multimnist_results.json`` (every run, every epoch's validation accuracy),
``docs/multimnist_results.md`` (the tables) and
``docs/figures/multimnist_val_accuracy.png``.

Metrics: per-task test accuracy of the last epoch, mean and standard error over seeds;
Delta m% (Eq. 4 of the SAM-GS paper, after Nash-MTL): for accuracies (higher is
better) :math:`\\Delta m = -\\frac{100}{K}\\sum_k (a_k - a^{stl}_k) / a^{stl}_k`, so
lower is better and negative means better than the single-task models; computed from the
seed means, with the standard error over the method's seeds against the single-task
mean. Mean rank: the rank of the method's mean accuracy on each task among the
multi-task methods (1 = best), averaged over the tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multimnist as mn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
VARIANTS = {"plain": 1.0, "x100": 100.0}
SMOKE = {"epochs": 1, "n_train": 256, "n_val": 128, "n_test": 128}


def job_groups(base: mn.Config, methods: list[str], seeds=SEEDS) -> list[list[mn.Config]]:
    """Runs grouped so that one worker compiles each method's step once."""
    groups = []
    for method in methods:
        groups.append(
            [
                dataclasses.replace(base, method=method, seed=s, loss_scale=scale)
                for scale in VARIANTS.values()
                for s in seeds
            ]
        )
    groups.append(
        [dataclasses.replace(base, method="samgs", seed=s, m_dtype="bfloat16") for s in seeds]
    )
    groups.append(
        [dataclasses.replace(base, method="stl", seed=s, task=t) for t in (0, 1) for s in seeds]
    )
    return groups


def run_group(configs: list[mn.Config]) -> list[dict[str, Any]]:
    """Worker: trains a group of runs sharing one compiled step; returns their results."""
    cache: dict = {}
    out = []
    for cfg in configs:
        result = mn.public(mn.train(cfg, mn.load_data(cfg), cache=cache, progress=False))
        out.append(result)
    return out


def _worker_init() -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {mn.SINGLE_THREAD_FLAGS}"


# --------------------------------------------------------------------------------------
# Summaries.


def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se


def delta_m(acc: np.ndarray, stl: np.ndarray) -> float:
    """Eq. 4 for accuracies (higher is better, nu_k = 1): lower is better."""
    return float(-100.0 * np.mean((acc - stl) / stl))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and method: accuracy mean/se per task, Delta m%, mean rank."""
    stl_runs = [r for r in runs if r["method"] == "stl"]
    stl = np.array(
        [np.mean([r["test_accuracy"][0] for r in stl_runs if r["task"] == t]) for t in (0, 1)]
    )
    summary: dict[str, Any] = {
        "stl": {
            "test_accuracy": [
                _mean_se([r["test_accuracy"][0] for r in stl_runs if r["task"] == t])
                for t in (0, 1)
            ]
        },
        "variants": {},
    }
    for variant, scale in VARIANTS.items():
        rows: dict[str, Any] = {}
        mtl = [r for r in runs if r["method"] != "stl" and r["loss_scale"] == scale]
        names = sorted({_label(r) for r in mtl}, key=lambda n: _order(n, mtl))
        for name in names:
            mine = [r for r in mtl if _label(r) == name]
            accs = np.array([r["test_accuracy"] for r in mine])
            dms = [delta_m(a, stl) for a in accs]
            rows[name] = {
                "test_accuracy": [_mean_se(list(accs[:, t])) for t in (0, 1)],
                "delta_m": (delta_m(accs.mean(axis=0), stl), _mean_se(dms)[1]),
                "seeds": [r["seed"] for r in mine],
                "recipe": mine[0]["recipe"],
            }
        means = np.array([[rows[n]["test_accuracy"][t][0] for t in (0, 1)] for n in names])
        # rank 1 = highest accuracy; ties share the better rank
        ranks = np.stack([_rank(-means[:, t]) for t in (0, 1)], axis=1)
        for i, name in enumerate(names):
            rows[name]["mean_rank"] = float(ranks[i].mean())
        summary["variants"][variant] = rows
    return summary


def _label(run: dict[str, Any]) -> str:
    return run["method"] + (f" (m {run['m_dtype']})" if run.get("m_dtype") else "")


def _order(name: str, runs: list[dict[str, Any]]) -> tuple[int, str]:
    fixed = ["ls", "samgs", "samgs (m bfloat16)", "samgs_g09"]
    return (fixed.index(name), "") if name in fixed else (len(fixed), name)


def _rank(x: np.ndarray) -> np.ndarray:
    return np.array([1 + np.sum(x < v) for v in x], np.float64)


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The results tables as Markdown."""
    stl = summary["stl"]["test_accuracy"]
    lines = [
        "# MultiMNIST results",
        "",
        f"Generated by `python examples/multimnist_benchmark.py` in {meta['minutes']:.1f} min "
        f"({meta['workers']} worker processes, {meta['cpus']} CPUs). {meta['setup']}",
        "",
        "Test accuracy of the last epoch, mean ± standard error over seeds "
        f"{', '.join(map(str, SEEDS))}. Δm% (Eq. 4 of the paper): mean relative accuracy "
        "loss against the single-task models, lower is better, negative = better than "
        "single-task. MR: mean rank over the two tasks among the multi-task rows.",
        "",
        f"Single-task models: left {_fmt(stl[0])}, right {_fmt(stl[1])}.",
        "",
    ]
    for variant, rows in summary["variants"].items():
        title = "Plain (equal losses)" if variant == "plain" else "Task 2's loss x100"
        lines += [
            f"## {title}",
            "",
            "| method | left digit acc % | right digit acc % | Δm% ↓ | MR ↓ |",
            "|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            acc = row["test_accuracy"]
            dm, dm_se = row["delta_m"]
            lines.append(
                f"| {name} | {_fmt(acc[0])} | {_fmt(acc[1])} | {dm:+.2f} ± {dm_se:.2f} "
                f"| {row['mean_rank']:.1f} |"
            )
        lines.append("")
    lines += ["## Recipes", "", "| method | update |", "|---|---|"]
    first = next(iter(summary["variants"].values()))
    for name, row in first.items():
        lines.append(f"| {name} | {row['recipe']} |")
    lines.append("")
    return "\n".join(lines)


def _fmt(mean_se: tuple[float, float]) -> str:
    return f"{100 * mean_se[0]:.2f} ± {100 * mean_se[1]:.2f}"


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Validation accuracy per task against epochs, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True, sharey="row")
    stl = {
        t: np.mean([r["val_accuracy"] for r in runs if r["method"] == "stl" and r["task"] == t], 0)
        for t in (0, 1)
    }
    colors = plt.get_cmap("tab20").colors
    for row, (variant, scale) in enumerate(VARIANTS.items()):
        mtl = [r for r in runs if r["method"] != "stl" and r["loss_scale"] == scale]
        names = sorted({_label(r) for r in mtl}, key=lambda n: _order(n, mtl))
        for t in (0, 1):
            ax = axes[row, t]
            for i, name in enumerate(names):
                curve = np.mean([r["val_accuracy"] for r in mtl if _label(r) == name], axis=0)
                epochs = np.arange(1, len(curve) + 1)
                style = "-" if name.startswith(("samgs", "ls")) else "--"
                lw = 2.2 if name.startswith("samgs") else 1.2
                ax.plot(
                    epochs,
                    curve[:, t],
                    style,
                    color=colors[i % 20],
                    label=name,
                    lw=lw,
                    marker="o",
                    ms=2.5,
                )
            ax.plot(
                epochs,
                stl[t][:, 0],
                ":",
                color="black",
                label="single-task",
                lw=1.6,
                marker="o",
                ms=2.5,
            )
            side = "left" if t == 0 else "right"
            ax.set_title(f"{variant}: {side} digit", fontsize=10)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy")
    axes[0, 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; writes to /tmp")
    parser.add_argument("--methods", help="comma-separated subset of methods")
    parser.add_argument("--out", help="output prefix (default docs/multimnist_results)")
    args = parser.parse_args(argv)

    base = mn.Config(**(SMOKE if args.smoke else {}))
    methods = args.methods.split(",") if args.methods else mn.method_names()
    groups = job_groups(base, methods)
    groups.sort(key=len, reverse=True)
    prefix = args.out or (
        "/tmp/multimnist_smoke" if args.smoke else os.path.join(ROOT, "docs", "multimnist_results")
    )
    figure = (
        prefix + "_val_accuracy.png"
        if args.smoke
        else os.path.join(ROOT, "docs", "figures", "multimnist_val_accuracy.png")
    )

    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # no multiprocessing lock (its semaphore leaks)

    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    total = sum(len(g) for g in groups)
    with tqdm(total=total, desc="MultiMNIST runs") as bar:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_worker_init, maxtasksperchild=None) as pool:
            for results in pool.imap_unordered(run_group, groups):
                runs.extend(results)
                bar.update(len(results))
                r = results[0]
                bar.write(
                    f"{_label(r):28s} scale {r['loss_scale']:g}: {r['train_seconds']:.0f} s/run"
                )
    minutes = (time.perf_counter() - start) / 60
    runs.sort(
        key=lambda r: (r["method"], str(r["m_dtype"]), r["loss_scale"], r["task"] or 0, r["seed"])
    )
    summary = summarise(runs)
    setup = (
        f"Data: {base.n_train} train / {base.n_val} validation / {base.n_test} test images "
        f"(data seed {base.data_seed}); {base.epochs} epochs of batch {base.batch_size}, "
        f"Adam lr {base.learning_rate:g}."
    )
    meta = {"minutes": minutes, "workers": args.workers, "cpus": os.cpu_count(), "setup": setup}
    with open(prefix + ".json", "w") as f:
        json.dump(
            {"config": dataclasses.asdict(base), "meta": meta, "summary": summary, "runs": runs},
            f,
            indent=1,
        )
    with open(prefix + ".md", "w") as f:
        f.write(markdown(summary, meta))
    plot(runs, figure)
    print(markdown(summary, meta))
    print(json.dumps({"minutes": round(minutes, 2), "runs": len(runs), "results": prefix + ".md"}))


if __name__ == "__main__":
    main()
