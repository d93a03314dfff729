"""The MultiMNIST benchmark: the methods x 3 seeds, plain and with task 2's loss x100.

    python examples/multimnist_benchmark.py                # the default methods, 11-17 min
    python examples/multimnist_benchmark.py --methods all  # every method, 21-33 min
    python examples/multimnist_benchmark.py --smoke        # tiny sizes, checks the pipeline
    python examples/multimnist_benchmark.py --estimate     # times each method, prints the total

Runs, in two worker processes with single-threaded XLA each (on 2 cores, about 10% more
throughput than one process; two multi-threaded processes would oversubscribe the cores; the
results do not depend on the number of workers):

* the methods (default :data:`DEFAULT_METHODS`, the paper's; ``--methods all``: every method
  of :func:`multimnist.method_names`, i.e. ``ls``, ``samgs``, ``samgs_g09``, every registered
  aggregator and every registered scalarizer; ``--methods a,b``: those) with seeds 0, 1, 2,
  for the plain problem and for the variant where task 2's loss is multiplied by 100;
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


# The default methods: the SAM-GS paper's rows (its Tables 1-3) and the earlier default
# set's linear_scalarization, upgrad, dualproj. Every
# registered method (--methods all) does not fit in 30 minutes on 2 shared cores; see
# docs/multimnist.md ("Sizes and timing").
DEFAULT_METHODS = (
    "ls", "samgs", "samgs_g09", "scale_invariant", "random", "dwa", "uw", "famo", "gradnorm",
    "mgda", "pcgrad", "graddrop", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl",
    "linear_scalarization", "upgrad", "dualproj",
)  # fmt: skip


def default_methods() -> list[str]:
    """:data:`DEFAULT_METHODS`, in :func:`multimnist.method_names`'s order."""
    return [m for m in mn.method_names() if m in DEFAULT_METHODS]


def select_methods(text: str | None) -> list[str]:
    """``--methods``: None -> :func:`default_methods`; ``all`` -> every method of
    :func:`multimnist.method_names` (every registered aggregator and scalarizer); else a
    comma-separated list, checked."""
    if not text:
        return default_methods()
    if text == "all":
        return mn.method_names()
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(mn.method_names()))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {mn.method_names()}")
    return methods


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


def time_group(configs: list[mn.Config]) -> dict[str, Any]:
    """Worker (``--estimate``): one-epoch runs of the group's first config, twice with one
    compiled step; the group's cost is estimated as compile + runs x epochs x epoch."""
    cfg = dataclasses.replace(configs[0], epochs=1)
    data = mn.load_data(cfg)
    cache: dict = {}
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        mn.train(cfg, data, cache=cache, progress=False)
        seconds.append(time.perf_counter() - start)
    first, epoch = seconds
    compile_s = max(first - epoch, 0.0)
    return {
        "label": _label({"method": cfg.method, "m_dtype": cfg.m_dtype}),
        "runs": len(configs),
        "compile_s": round(compile_s, 2),
        "epoch_s": round(epoch, 2),
        "group_s": round(compile_s + len(configs) * configs[0].epochs * epoch, 1),
    }


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


def markdown(summary: dict[str, Any], meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The results tables as Markdown."""
    stl = summary["stl"]["test_accuracy"]
    lines = [
        "# MultiMNIST results",
        "",
        f"Generated by `{meta.get('command', 'python examples/multimnist_benchmark.py')}` in "
        f"{meta['minutes']:.1f} min "
        f"({meta['workers']} worker processes on {meta['cpus']} shared CPUs; mean 1-minute load "
        f"average {meta.get('mean_load', float('nan')):.1f}, the benchmark's own share being "
        f"about {meta['workers']}); library at commit {meta.get('library_commit', 'unknown')}. "
        f"{meta['setup']}",
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
    lines += bf16_section(runs) + diagnostics_section(runs)
    lines += ["## Recipes", "", "| method | update |", "|---|---|"]
    first = next(iter(summary["variants"].values()))
    for name, row in first.items():
        lines.append(f"| {name} | {row['recipe']} |")
    lines.append("")
    return "\n".join(lines)


def _fmt(mean_se: tuple[float, float]) -> str:
    return f"{100 * mean_se[0]:.2f} ± {100 * mean_se[1]:.2f}"


FIXED_STYLES = {
    "ls": ("black", "-", 1.6),
    "samgs": ("tab:red", "-", 2.4),
    "samgs (m bfloat16)": ("tab:orange", "-", 1.6),
    "samgs_g09": ("darkred", "-", 1.6),
}


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Validation accuracy per task against epochs, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True, sharey="row")
    stl = {
        t: np.mean([r["val_accuracy"] for r in runs if r["method"] == "stl" and r["task"] == t], 0)
        for t in (0, 1)
    }
    others = plt.get_cmap("tab10").colors
    for row, (variant, scale) in enumerate(VARIANTS.items()):
        mtl = [r for r in runs if r["method"] != "stl" and r["loss_scale"] == scale]
        names = sorted({_label(r) for r in mtl}, key=lambda n: _order(n, mtl))
        baselines = [n for n in names if n not in FIXED_STYLES]
        for t in (0, 1):
            ax = axes[row, t]
            for name in names:
                curve = np.mean([r["val_accuracy"] for r in mtl if _label(r) == name], axis=0)
                epochs = np.arange(1, len(curve) + 1)
                if name in FIXED_STYLES:
                    color, style, lw = FIXED_STYLES[name]
                else:
                    color, style, lw = others[baselines.index(name) % 10], "--", 1.1
                ax.plot(epochs, curve[:, t], style, color=color, label=name, lw=lw, marker=".")
            ax.plot(epochs, stl[t][:, 0], ":", color="grey", label="single-task", lw=2, marker=".")
            side = "left (task 1)" if t == 0 else "right (task 2)"
            title = "plain" if variant == "plain" else "task 2's loss x100"
            ax.set_title(f"{title}: {side} digit", fontsize=10)
            ax.set_xticks(epochs)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=65)
    plt.close(fig)


def bf16_section(runs: list[dict[str, Any]]) -> list[str]:
    """Paired (same seed) comparison of SAM-GS with float32 and bfloat16 moments."""
    f32 = {r["seed"]: r for r in runs if _label(r) == "samgs" and r["loss_scale"] == 1.0}
    b16 = {r["seed"]: r for r in runs if _label(r) == "samgs (m bfloat16)"}
    seeds = sorted(set(f32) & set(b16))
    if not seeds:
        return []
    lines = [
        "## SAM-GS moments in bfloat16 (plain problem)",
        "",
        "Same seed = same initialisation and data order; only the storage of m differs.",
        "",
        "| seed | left f32 | left bf16 | right f32 | right bf16 |",
        "|---|---|---|---|---|",
    ]
    diffs = []
    for s in seeds:
        a, b = f32[s]["test_accuracy"], b16[s]["test_accuracy"]
        diffs.append(np.subtract(b, a))
        lines.append(
            f"| {s} | {100 * a[0]:.2f} | {100 * b[0]:.2f} | {100 * a[1]:.2f} | {100 * b[1]:.2f} |"
        )
    d = np.array(diffs) * 100
    spread = np.array([f32[s]["test_accuracy"] for s in seeds]).std(axis=0, ddof=1) * 100
    lines += [
        "",
        f"bf16 - f32, mean ± standard error over the seeds (percentage points): left "
        f"{d[:, 0].mean():+.2f} ± {d[:, 0].std(ddof=1) / np.sqrt(len(d)):.2f}, right "
        f"{d[:, 1].mean():+.2f} ± {d[:, 1].std(ddof=1) / np.sqrt(len(d)):.2f}; the seed-to-seed "
        f"standard deviation of float32 SAM-GS is {spread[0]:.2f} (left) and {spread[1]:.2f} "
        "(right).",
        "",
    ]
    return lines


def diagnostics_section(runs: list[dict[str, Any]]) -> list[str]:
    """Fraction of SAM-GS steps that took the equalisation branch, per epoch."""
    rows = []
    for variant, scale in VARIANTS.items():
        for name in ("samgs", "samgs_g09", "samgs (m bfloat16)"):
            mine = [
                r["samgs_diagnostics"]
                for r in runs
                if _label(r) == name and r["loss_scale"] == scale and r.get("samgs_diagnostics")
            ]
            if not mine:
                continue
            eq = np.mean([[e["equalised_fraction"] for e in d] for d in mine], axis=0)
            psi = np.mean([[e["mean_similarity"] for e in d] for d in mine], axis=0)
            rows.append(
                f"| {variant} | {name} | {' / '.join(f'{x:.2f}' for x in eq)} "
                f"| {' / '.join(f'{x:.3f}' for x in psi)} |"
            )
    if not rows:
        return []
    return [
        "## Which SAM-GS branch ran",
        "",
        "Per epoch, mean over seeds: the fraction of steps with Ψ < γ (gradient "
        "equalisation) and the mean similarity Ψ.",
        "",
        "| problem | method | equalised fraction | mean Ψ |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def git_commit() -> str:
    """HEAD of the repository, with "+dirty" if samgs_optax/ has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "samgs_optax"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; writes to /tmp")
    parser.add_argument(
        "--methods", help="'all' or comma-separated methods (default: DEFAULT_METHODS)"
    )
    parser.add_argument("--out", help="output prefix (default docs/multimnist_results)")
    parser.add_argument("--replot", action="store_true", help="only redo tables and figure")
    parser.add_argument(
        "--estimate", action="store_true", help="time each method briefly, print the full time"
    )
    args = parser.parse_args(argv)

    base = mn.Config(**(SMOKE if args.smoke else {}))
    methods = select_methods(args.methods)
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

    if args.replot:  # rebuild the tables and the figure from a previous run's JSON
        with open(prefix + ".json") as f:
            saved = json.load(f)
        write_outputs(saved["runs"], saved["meta"], saved["config"], prefix, figure)
        return

    if args.estimate:
        estimate(groups, args.workers)
        return

    library_commit = git_commit()  # before the workers import the library
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    loads = [os.getloadavg()[0]]
    total = sum(len(g) for g in groups)
    with tqdm(total=total, desc="MultiMNIST runs") as bar:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_worker_init, maxtasksperchild=None) as pool:
            for results in pool.imap_unordered(run_group, groups):
                runs.extend(results)
                loads.append(os.getloadavg()[0])
                bar.update(len(results))
                r = results[0]
                bar.write(
                    f"{_label(r):28s} scale {r['loss_scale']:g}: {r['train_seconds']:.0f} s/run"
                )
    meta = {
        "library_commit": library_commit,
        "minutes": (time.perf_counter() - start) / 60,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "mean_load": float(np.mean(loads)),
        "command": " ".join(["python", "examples/multimnist_benchmark.py", *sys.argv[1:]]),
    }
    write_outputs(runs, meta, dataclasses.asdict(base), prefix, figure)


def estimate(groups: list[list[mn.Config]], workers: int) -> None:
    """Prints per-method compile and epoch times and the estimated benchmark time."""
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        rows = []
        for row in pool.imap_unordered(time_group, groups):
            loads.append(os.getloadavg()[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
    total = sum(r["group_s"] for r in rows)
    print(
        json.dumps(
            {
                "estimated_minutes": round(total / workers / 60, 1),
                "groups": len(rows),
                "runs": sum(r["runs"] for r in rows),
                "workers": workers,
                "mean_load": round(float(np.mean(loads)), 1),
                "measured_in_minutes": round((time.perf_counter() - start) / 60, 1),
            }
        )
    )


def write_outputs(
    runs: list[dict[str, Any]],
    meta: dict[str, Any],
    config: dict[str, Any],
    prefix: str,
    figure: str,
) -> None:
    """Writes ``prefix.json``, ``prefix.md`` and the figure; prints the tables."""
    runs = sorted(
        runs,
        key=lambda r: (r["method"], str(r["m_dtype"]), r["loss_scale"], r["task"] or 0, r["seed"]),
    )
    summary = summarise(runs)
    meta = dict(meta)
    meta["setup"] = (
        f"Data: {config['n_train']} train / {config['n_val']} validation / {config['n_test']} "
        f"test images (data seed {config['data_seed']}); {config['epochs']} epochs of batch "
        f"{config['batch_size']}, Adam lr {config['learning_rate']:g}."
    )
    with open(prefix + ".json", "w") as f:
        json.dump({"config": config, "meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    text = markdown(summary, meta, runs)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    plot(runs, figure)
    print(text)
    print(
        json.dumps(
            {"minutes": round(meta["minutes"], 2), "runs": len(runs), "results": prefix + ".md"}
        )
    )


if __name__ == "__main__":
    main()
