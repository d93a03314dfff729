"""Times one jitted SAM-GS update against the memory-bandwidth floor.

SAM-GS is memory-bound. One step must read the stacked gradients g (K x D) and
the moments m (K x D) and write the moments (K x D) and the update u (D): at
least ``3KD + D`` floats through memory. The floor is the time a plain memory
copy takes to move as many bytes (read + write) on the same machine, i.e. a copy
of ``(3KD + D) / 2`` floats into a warm, preallocated buffer: the fastest, round
by round, of XLA's copy op, numpy's memcpy, and an XLA elementwise pass (a
sign-flipping copy, which XLA runs on all cores) into a donated buffer.

For every (K, D) the script builds an MLP-shaped parameter tree of about D
floats (8 leaves), jits ``samgs(K).update`` with the optimizer state donated (as
a training loop does), and times it interleaved with

* ``copy``: the floor above;
* ``stream``: an in-place read-modify-write of the same bytes (x <- x * c on a
  donated buffer), which needs no read-for-ownership of a separate destination
  and so is faster than a copy on most CPUs: a stricter reference;
* ``adam``: ``optax.adam(1e-3).update`` on the D parameters (state donated).

It also reports the traffic XLA scheduled (operand and result bytes of every
top-level op of the compiled HLO) in units of the minimum ``3KD + D`` floats,
and the minor page faults per SAM-GS step (first touches of freshly mapped
pages, i.e. the fresh D-float output).

Each allocator runs in its own child process: ``glibc`` (the default malloc)
and, when installed (Debian package ``libjemalloc2``), ``jemalloc`` preloaded
with page purging off, which keeps large freed buffers mapped.

Usage::

    python benchmarks/bench_update.py            # full sweep, writes RESULTS.md
    python benchmarks/bench_update.py --quick    # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

KS = (2, 3, 10, 40)
DS = (10_000, 100_000, 1_000_000, 4_000_000, 16_000_000)
QUICK_KS = (2, 10)
QUICK_DS = (100_000, 1_000_000)


def make_params(d: int) -> dict:
    """An MLP-shaped tree of about ``d`` float32 parameters in 8 leaves."""
    import jax.numpy as jnp

    h = max(4, int(math.sqrt(d / 2.5)))
    n_in = max(1, (d - 2 * h * h - 10 * h - 3 * h - 10) // h)
    shapes = {
        "dense_0": {"kernel": (n_in, h), "bias": (h,)},
        "dense_1": {"kernel": (h, h), "bias": (h,)},
        "dense_2": {"kernel": (h, h), "bias": (h,)},
        "head": {"kernel": (h, 10), "bias": (10,)},
    }
    return {
        layer: {name: jnp.zeros(shape, jnp.float32) for name, shape in leaves.items()}
        for layer, leaves in shapes.items()
    }


def measure(k: int, d_target: int, budget: float, legacy: bool) -> dict:
    """Times one configuration; returns a dict of medians and ratios."""
    import jax
    import numpy as np
    import optax

    import samgs_optax

    samgs_module = importlib.import_module("samgs_optax.samgs")  # the module, not the function

    params = make_params(d_target)
    leaves = jax.tree.leaves(params)
    d = sum(x.size for x in leaves)
    keys = jax.random.split(jax.random.key(k * 7919 + d), len(leaves))
    treedef = jax.tree.structure(params)
    g = jax.tree.unflatten(
        treedef, [jax.random.normal(kk, (k, *x.shape)) for kk, x in zip(keys, leaves, strict=True)]
    )

    tx = samgs_optax.samgs(k)
    update = jax.jit(tx.update, donate_argnums=(1,))
    box: dict = {"samgs": tx.init(params)}
    faults = {"n": 0, "calls": 0}

    def run_samgs():
        f0 = _common.minor_faults()
        u, box["samgs"] = update(g, box["samgs"])
        jax.block_until_ready((u, box["samgs"]))
        faults["n"] += _common.minor_faults() - f0
        faults["calls"] += 1

    n_copy = (3 * k * d + d) // 2
    copies = _common.copy_runners(n_copy)

    adam = optax.adam(1e-3)
    adam_update = jax.jit(adam.update, donate_argnums=(1,))
    g0 = jax.tree.map(lambda x: x[0] + 0, g)
    box["adam"] = adam.init(params)

    def run_adam():
        u, box["adam"] = adam_update(g0, box["adam"])
        jax.block_until_ready((u, box["adam"]))

    fns = {
        "samgs": run_samgs,
        **copies,
        "adam": run_adam,
    }
    if legacy:
        fns["legacy"] = _legacy_runner(k, params, g, samgs_module)

    # Rounds: as many as fit in the budget, between 5 and 40.
    warm = _common.interleaved(fns, rounds=1, warmup=1)
    per_round = sum(float(v[0]) for v in warm.values())
    rounds = int(min(40, max(5, budget / max(per_round, 1e-9))))
    faults.update(n=0, calls=0)
    t = _common.interleaved(fns, rounds=rounds, warmup=0)

    floor = _common.copy_floor(t)
    hlo = update.lower(g, box["samgs"]).compile().as_text()
    minimum = 4 * (3 * k * d + d)
    out = {
        "K": k,
        "D": d,
        "leaves": len(leaves),
        "rounds": rounds,
        "samgs_ms": 1e3 * float(np.median(t["samgs"])),
        "copy_ms": 1e3 * float(np.median(floor)),
        "xla_copy_ms": 1e3 * float(np.median(t["xla_copy"])),
        "np_copy_ms": 1e3 * float(np.median(t["np_copy"])) if "np_copy" in t else None,
        "torch_copy_ms": (1e3 * float(np.median(t["torch_copy"])) if "torch_copy" in t else None),
        "loop_copy_ms": 1e3 * float(np.median(t["loop_copy"])),
        "stream_ms": 1e3 * float(np.median(t["stream"])),
        "adam_ms": 1e3 * float(np.median(t["adam"])),
        "vs_copy": _common.median_ratio(t["samgs"], floor),
        "vs_stream": _common.median_ratio(t["samgs"], t["stream"]),
        "vs_adam": _common.median_ratio(t["samgs"], t["adam"]),
        "hlo_traffic": _common.hlo_traffic_bytes(hlo) / minimum,
        "faults_per_step": faults["n"] / max(1, faults["calls"]),
        "copy_gbs": 2 * 4 * n_copy / float(np.median(floor)) / 1e9,
    }
    if legacy:
        out["legacy_vs_copy"] = _common.median_ratio(t["legacy"], floor)
    return out


def _legacy_runner(k, params, g, samgs_module):
    """The update as it was before a1342b3: jnp.sum over the task axis (for comparison)."""
    import jax
    import jax.numpy as jnp

    def old_combine(gl, ml, a, c):
        expand = (slice(None),) + (None,) * (gl.ndim - 1)
        weight = a[expand] + c * jnp.abs(ml.astype(a.dtype))
        return jnp.sum(gl * weight, axis=0).astype(gl.dtype)

    new_combine = samgs_module._combine
    samgs_module._combine = old_combine
    try:
        tx = samgs_module.samgs(k)
        update = jax.jit(tx.update, donate_argnums=(1,))
        update.lower(g, tx.init(params)).compile()  # trace while patched
        box = {"state": tx.init(params)}

        def run():
            samgs_module._combine = old_combine
            try:
                u, box["state"] = update(g, box["state"])
            finally:
                samgs_module._combine = new_combine
            jax.block_until_ready((u, box["state"]))

        run()
        return run
    finally:
        samgs_module._combine = new_combine


def child(args: argparse.Namespace) -> None:
    """Runs the sweep in this process and prints one JSON line per configuration."""
    import gc

    print(json.dumps({"machine": _common.machine(), "allocator": _common.allocator()}), flush=True)
    for k in args.ks:
        for d in args.ds:
            if k * d > args.max_kd:
                continue
            legacy = args.legacy and k * d <= 10_000_000
            res = measure(k, d, args.budget, legacy)
            print(json.dumps(res), flush=True)
            gc.collect()


def run_child(args: argparse.Namespace, allocator: str) -> tuple[dict, list[dict]]:
    env = dict(os.environ)
    if allocator == "jemalloc":
        env["LD_PRELOAD"] = _common.JEMALLOC
        env["MALLOC_CONF"] = _common.JEMALLOC_CONF
    cmd = [sys.executable, __file__, "--child", *_forward(args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    meta, rows = {}, []
    assert proc.stdout is not None
    for line in proc.stdout:
        rec = json.loads(line)
        if "machine" in rec:
            meta = rec
            print(f"[{allocator}] {rec['allocator']}")
            continue
        rows.append(rec)
        legacy = (
            f"  before a1342b3 {rec['legacy_vs_copy']:5.1f}x" if "legacy_vs_copy" in rec else ""
        )
        print(
            f"[{allocator}] K={rec['K']:3d} D={rec['D']:9d}  samgs {rec['samgs_ms']:8.2f} ms  "
            f"copy {rec['copy_ms']:8.2f} ms  x{rec['vs_copy']:5.2f}"
            f"  stream x{rec['vs_stream']:5.2f}"
            f"  adam x{rec['vs_adam']:5.2f}  HLO traffic {rec['hlo_traffic']:4.2f}"
            f"  faults/step {rec['faults_per_step']:7.0f}{legacy}",
            flush=True,
        )
    if proc.wait() != 0:
        raise SystemExit(f"child ({allocator}) failed with code {proc.returncode}")
    return meta, rows


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--ks", ",".join(map(str, args.ks)), "--ds", ",".join(map(str, args.ds))]
    out += ["--max-kd", str(args.max_kd), "--budget", str(args.budget)]
    return out + (["--legacy"] if args.legacy else [])


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(","))


def report(results: dict[str, tuple[dict, list[dict]]], args: argparse.Namespace) -> str:
    first = next(iter(results.values()))[0]
    lines = [
        "## bench_update: one SAM-GS step against the memory-bandwidth floor",
        "",
        f"- machine: {first.get('machine', '?')}",
        f"- command: `{_common.command()}`; date: {_common.now()}; load average "
        f"{getattr(args, 'load', '?')}",
        "- `x copy`: median over interleaved rounds of t(samgs update) / t(copy of "
        "(3KD + D)/2 floats into a warm buffer, the fastest of XLA's copy, numpy's memcpy "
        "and an XLA elementwise copy), i.e. the same "
        "bytes read + written as the minimum 3KD + D floats a step must move. `x stream`: "
        "against an in-place read-modify-write of those bytes. `x adam`: against "
        "`optax.adam` on the D parameters. `HLO traffic`: operand + result bytes of the "
        "compiled program's top-level ops, in units of 3KD + D floats. `faults`: minor page "
        "faults per step.",
        "- Parameter trees are MLP-shaped, 8 leaves; float32; random gradients (the "
        "momentum branch; the equalisation branch is the same fused pass, selected "
        "arithmetically).",
    ]
    for name, (meta, rows) in results.items():
        lines += ["", f"### allocator: {meta.get('allocator', name)}", ""]
        header = ["K", "D", "samgs ms", "copy ms", "x copy", "x stream", "x adam", "HLO traffic"]
        header += ["faults/step", "copy GB/s"]
        has_legacy = any("legacy_vs_copy" in r for r in rows)
        if has_legacy:
            header.append("before a1342b3, x copy")
        table = []
        for r in rows:
            row = [
                r["K"],
                f"{r['D']:,}",
                f"{r['samgs_ms']:.2f}",
                f"{r['copy_ms']:.2f}",
                f"{r['vs_copy']:.2f}",
                f"{r['vs_stream']:.2f}",
                f"{r['vs_adam']:.2f}",
                f"{r['hlo_traffic']:.2f}",
                f"{r['faults_per_step']:.0f}",
                f"{r['copy_gbs']:.1f}",
            ]
            if has_legacy:
                row.append(f"{r['legacy_vs_copy']:.1f}" if "legacy_vs_copy" in r else "")
            table.append(row)
        lines.append(_common.markdown_table(header, table))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke sweep, no RESULTS.md")
    parser.add_argument("--ks", type=_ints, default=KS)
    parser.add_argument("--ds", type=_ints, default=DS)
    parser.add_argument(
        "--max-kd",
        type=int,
        default=700_000_000,
        help="skip K*D above this (K=40, D=1.6e7 peaks at 17 GiB of RAM)",
    )
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per config")
    parser.add_argument(
        "--allocators", default="glibc,jemalloc", help="comma list of glibc,jemalloc"
    )
    parser.add_argument("--legacy", action="store_true", help="also time the pre-a1342b3 update")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.ks, args.ds, args.budget = QUICK_KS, QUICK_DS, 0.5
        args.allocators, args.no_write = "glibc", True
    if args.child:
        child(args)
        return
    allocators = [a for a in args.allocators.split(",") if a]
    if "jemalloc" in allocators and not os.path.exists(_common.JEMALLOC):
        print(f"{_common.JEMALLOC} not found (apt-get install libjemalloc2): glibc only")
        allocators.remove("jemalloc")
    load_start = _common.load()
    results = {a: run_child(args, a) for a in allocators}
    args.load = f"{load_start} at start, {_common.load()} at end ({os.cpu_count()} cores)"
    if not args.no_write:
        _common.write_section("bench_update", report(results, args))
        print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
