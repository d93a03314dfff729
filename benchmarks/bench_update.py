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
    # On a GPU: XLA and the Pallas kernel side by side (kernel block and warps to tune)
    python benchmarks/bench_update.py --implementation both --ks 2,10,40 \\
        --ds 10000000,50000000 --allocators glibc [--pallas-block 2048 --pallas-warps 8]

``--implementation`` (``xla``, ``pallas`` or ``both``) selects
``samgs(implementation=...)``; with ``both`` the two are first checked to give the
same update. On CPU the kernel runs in Pallas' interpreter: that checks the script,
its times mean nothing. On a GPU the copy floor includes PyTorch's device copy when
torch with CUDA is importable.
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


def measure(
    k: int, d_target: int, budget: float, legacy: bool, implementations: tuple[str, ...] = ("xla",)
) -> dict:
    """Times one configuration; returns a dict of medians and ratios.

    The plain keys (``samgs_ms``, ``vs_copy``, ...) describe ``implementations[0]``;
    with a second implementation, ``{impl}_ms``, ``{impl}_vs_copy``,
    ``{impl}_vs_loop``, ``{impl}_vs_first`` and ``{impl}_hlo_traffic`` describe it,
    after both were checked to give the same update.
    """
    import jax
    import numpy as np
    import optax

    samgs_module = importlib.import_module("samgs_optax.samgs")  # the module, not the function

    params = make_params(d_target)
    leaves = jax.tree.leaves(params)
    d = sum(x.size for x in leaves)
    keys = jax.random.split(jax.random.key(k * 7919 + d), len(leaves))
    treedef = jax.tree.structure(params)
    g = jax.tree.unflatten(
        treedef, [jax.random.normal(kk, (k, *x.shape)) for kk, x in zip(keys, leaves, strict=True)]
    )

    steps = {impl: _Step(k, params, g, impl) for impl in implementations}
    _check_agreement(steps)

    n_copy = (3 * k * d + d) // 2
    copies = _common.copy_runners(n_copy)

    adam = optax.adam(1e-3)
    adam_update = jax.jit(adam.update, donate_argnums=(1,))
    g0 = jax.tree.map(lambda x: x[0] + 0, g)
    box = {"adam": adam.init(params)}

    def run_adam():
        u, box["adam"] = adam_update(g0, box["adam"])
        jax.block_until_ready((u, box["adam"]))

    fns = {f"samgs_{impl}": step.run for impl, step in steps.items()}
    fns |= {**copies, "adam": run_adam}
    if legacy:
        fns["legacy"] = _legacy_runner(k, params, g, samgs_module)

    # Rounds: as many as fit in the budget, between 5 and 40.
    warm = _common.interleaved(fns, rounds=1, warmup=1)
    per_round = sum(float(v[0]) for v in warm.values())
    rounds = int(min(40, max(5, budget / max(per_round, 1e-9))))
    for step in steps.values():
        step.faults.update(n=0, calls=0)
    t = _common.interleaved(fns, rounds=rounds, warmup=0)

    floor = _common.copy_floor(t)
    minimum = 4 * (3 * k * d + d)
    first = implementations[0]
    t_first = t[f"samgs_{first}"]
    out = {
        "K": k,
        "D": d,
        "leaves": len(leaves),
        "rounds": rounds,
        "implementation": first,
        "samgs_ms": 1e3 * float(np.median(t_first)),
        "copy_ms": 1e3 * float(np.median(floor)),
        "xla_copy_ms": 1e3 * float(np.median(t["xla_copy"])),
        "np_copy_ms": 1e3 * float(np.median(t["np_copy"])) if "np_copy" in t else None,
        "torch_copy_ms": (1e3 * float(np.median(t["torch_copy"])) if "torch_copy" in t else None),
        "loop_copy_ms": 1e3 * float(np.median(t["loop_copy"])),
        "stream_ms": 1e3 * float(np.median(t["stream"])),
        "adam_ms": 1e3 * float(np.median(t["adam"])),
        "vs_copy": _common.median_ratio(t_first, floor),
        "vs_loop": _common.median_ratio(t_first, t["loop_copy"]),
        "vs_stream": _common.median_ratio(t_first, t["stream"]),
        "vs_adam": _common.median_ratio(t_first, t["adam"]),
        "hlo_traffic": steps[first].traffic() / minimum,
        "faults_per_step": steps[first].faults_per_step(),
        "copy_gbs": 2 * 4 * n_copy / float(np.median(floor)) / 1e9,
    }
    for impl in implementations[1:]:
        ti = t[f"samgs_{impl}"]
        out[f"{impl}_ms"] = 1e3 * float(np.median(ti))
        out[f"{impl}_vs_copy"] = _common.median_ratio(ti, floor)
        out[f"{impl}_vs_loop"] = _common.median_ratio(ti, t["loop_copy"])
        # Head to head in their own interleaving: in the cyclic order above one step
        # runs right after the other and may find g in cache.
        ab = _common.interleaved({"first": steps[first].run, "other": steps[impl].run}, rounds)
        out[f"{impl}_vs_first"] = _common.median_ratio(ab["other"], ab["first"])
        out[f"{impl}_hlo_traffic"] = steps[impl].traffic() / minimum
    if legacy:
        out["legacy_vs_copy"] = _common.median_ratio(t["legacy"], floor)
    return out


class _Step:
    """A jitted ``samgs(k, implementation=impl).update`` with its state donated."""

    def __init__(self, k: int, params, g, implementation: str):
        import jax

        import samgs_optax

        tx = samgs_optax.samgs(k, implementation=implementation)
        self.g, self.faults = g, {"n": 0, "calls": 0}
        self.update = jax.jit(tx.update, donate_argnums=(1,))
        self.state = tx.init(params)
        self.first_update, self.state = self.update(g, self.state)

    def run(self) -> None:
        import jax

        f0 = _common.minor_faults()
        u, self.state = self.update(self.g, self.state)
        jax.block_until_ready((u, self.state))
        self.faults["n"] += _common.minor_faults() - f0
        self.faults["calls"] += 1

    def faults_per_step(self) -> float:
        """Minor page faults per timed call."""
        return self.faults["n"] / max(1, self.faults["calls"])

    def traffic(self) -> int:
        """HLO traffic of the compiled step (a Triton kernel counts as its operands + results)."""
        return _common.hlo_traffic_bytes(self.update.lower(self.g, self.state).compile().as_text())


def _check_agreement(steps: dict) -> None:
    """Every implementation's first update equals the first implementation's to 1e-5."""
    import jax
    import numpy as np

    def flat(tree):
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

    names = list(steps)
    want = flat(steps[names[0]].first_update)
    for name in names[1:]:
        got = flat(steps[name].first_update)
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        if not err <= 1e-5:
            raise SystemExit(f"{name} and {names[0]} disagree: relative error {err:.2e}")


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

    import jax

    implementations = _implementations(args.implementation)
    if "pallas" in implementations:
        from samgs_optax import _pallas_samgs

        _pallas_samgs.BLOCK = args.pallas_block or _pallas_samgs.BLOCK
        _pallas_samgs.NUM_WARPS = args.pallas_warps or _pallas_samgs.NUM_WARPS
        pallas = f"Pallas block {_pallas_samgs.BLOCK}, warps {_pallas_samgs.NUM_WARPS or 'default'}"
        if jax.default_backend() == "cpu":
            pallas += " (CPU: Pallas' interpreter, for testing only; its times mean nothing)"
    else:
        pallas = ""
    meta = {"machine": _common.machine(), "allocator": _common.allocator(), "pallas": pallas}
    print(json.dumps(meta), flush=True)
    for k in args.ks:
        for d in args.ds:
            if k * d > args.max_kd:
                continue
            legacy = args.legacy and k * d <= 10_000_000
            res = measure(k, d, args.budget, legacy, implementations)
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
            print(
                f"[{allocator}] {rec['allocator']}"
                + (f"; {rec['pallas']}" if rec["pallas"] else "")
            )
            continue
        rows.append(rec)
        legacy = (
            f"  before a1342b3 {rec['legacy_vs_copy']:5.1f}x" if "legacy_vs_copy" in rec else ""
        )
        pallas = (
            f"  | pallas {rec['pallas_ms']:8.2f} ms x{rec['pallas_vs_copy']:5.2f}"
            f"  loop x{rec['pallas_vs_loop']:5.2f}  vs xla x{rec['pallas_vs_first']:5.2f}"
            if "pallas_ms" in rec
            else ""
        )
        print(
            f"[{allocator}] K={rec['K']:3d} D={rec['D']:9d}  {rec['implementation']} "
            f"{rec['samgs_ms']:8.2f} ms  copy {rec['copy_ms']:8.2f} ms  x{rec['vs_copy']:5.2f}"
            f"  loop x{rec['vs_loop']:5.2f}  stream x{rec['vs_stream']:5.2f}"
            f"  adam x{rec['vs_adam']:5.2f}  HLO traffic {rec['hlo_traffic']:4.2f}"
            f"  faults/step {rec['faults_per_step']:7.0f}{legacy}{pallas}",
            flush=True,
        )
    if proc.wait() != 0:
        raise SystemExit(f"child ({allocator}) failed with code {proc.returncode}")
    return meta, rows


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--ks", ",".join(map(str, args.ks)), "--ds", ",".join(map(str, args.ds))]
    out += ["--max-kd", str(args.max_kd), "--budget", str(args.budget)]
    out += ["--implementation", args.implementation]
    out += ["--pallas-block", str(args.pallas_block), "--pallas-warps", str(args.pallas_warps)]
    return out + (["--legacy"] if args.legacy else [])


def _implementations(choice: str) -> tuple[str, ...]:
    return ("xla", "pallas") if choice == "both" else (choice,)


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
        f"- `samgs(implementation={args.implementation!r})`"
        + (f"; {first['pallas']}" if first.get("pallas") else "")
        + ". `x loop`: against XLA's elementwise copy of the same bytes. With `both`, the "
        "plain columns are XLA's and the `pallas` columns the kernel's (`vs xla`: per-round "
        "ratio of the two), after both gave the same first update (to 1e-5).",
    ]
    for name, (meta, rows) in results.items():
        lines += ["", f"### allocator: {meta.get('allocator', name)}", ""]
        header = ["K", "D", "samgs ms", "copy ms", "x copy", "x loop", "x stream", "x adam"]
        header += ["HLO traffic", "faults/step", "copy GB/s"]
        has_legacy = any("legacy_vs_copy" in r for r in rows)
        has_pallas = any("pallas_ms" in r for r in rows)
        if has_legacy:
            header.append("before a1342b3, x copy")
        if has_pallas:
            header += ["pallas ms", "pallas x copy", "pallas x loop", "pallas vs xla"]
        table = []
        for r in rows:
            row = [
                r["K"],
                f"{r['D']:,}",
                f"{r['samgs_ms']:.2f}",
                f"{r['copy_ms']:.2f}",
                f"{r['vs_copy']:.2f}",
                f"{r['vs_loop']:.2f}",
                f"{r['vs_stream']:.2f}",
                f"{r['vs_adam']:.2f}",
                f"{r['hlo_traffic']:.2f}",
                f"{r['faults_per_step']:.0f}",
                f"{r['copy_gbs']:.1f}",
            ]
            if has_legacy:
                row.append(f"{r['legacy_vs_copy']:.1f}" if "legacy_vs_copy" in r else "")
            if has_pallas:
                keys = ("pallas_ms", "pallas_vs_copy", "pallas_vs_loop", "pallas_vs_first")
                row += [f"{r[key]:.2f}" if key in r else "" for key in keys]
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
    parser.add_argument(
        "--implementation",
        choices=("xla", "pallas", "both"),
        default="xla",
        help="samgs(implementation=...) to time; both: XLA and the Pallas kernel side by side "
        "(on CPU the kernel runs in Pallas' interpreter: a smoke test, not a timing)",
    )
    parser.add_argument("--pallas-block", type=int, default=0, help="kernel block (power of 2)")
    parser.add_argument("--pallas-warps", type=int, default=0, help="Triton warps per program")
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
