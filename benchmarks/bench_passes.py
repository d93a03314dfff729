"""Where the time of one SAM-GS step goes: its passes over memory, each against a copy.

XLA:CPU compiles the SAM-GS update (``samgs_optax.samgs``) into three passes per
leaf (see ``docs/performance.md``):

1. norms: read g (K x D), K partial sums of squares (``task_norms(rescale=True)``,
   whose range fallback, a ``lax.cond``, does not run on these in-range gradients);
2. moments: read g and m, write m (donated, in place);
3. output: read g and the new m, write u (D).

For a single (K, D) leaf this script times the whole jitted step and each pass
on its own (the library's own functions, jitted separately), interleaved with a
copy that moves as many bytes as the pass must (read + write; the fastest of
numpy's memcpy and an XLA elementwise copy into a donated buffer). It also times
passes 2 and 3 done block by block in a ``fori_loop`` (each block of g and m
read from memory once, then re-read from cache), which is how one would try to
save the second read without a multi-output fusion; that variant is checked to
give the same u and m first. Last, it times the step with plain norms
(``task_norms(rescale=False)``, the library before the range fallback) beside the
step, to show what the fallback's test and ``lax.cond`` cost when they do not run.

Usage::

    python benchmarks/bench_passes.py           # writes its section of RESULTS.md
    python benchmarks/bench_passes.py --quick   # a smoke run, no RESULTS.md
    python benchmarks/bench_passes.py --ks 2,10 --ds 1048576 --no-write
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

KS = (2, 10)
DS = (1 << 20, 1 << 22, 1 << 24)
BLOCKS = (16_384, 65_536)
B1 = 0.9


def blocked_moments_and_output(T: int):
    """Passes 2 and 3 fused by hand: a fori_loop over blocks of T columns."""
    import jax.numpy as jnp
    from jax import lax

    samgs_module = importlib.import_module("samgs_optax.samgs")

    def run(g, m, a, c):
        k, d = g.shape

        def body(i, carry):
            m, u = carry
            start = i * T
            g_blk = lax.dynamic_slice_in_dim(g, start, T, axis=1)
            m_blk = samgs_module._ema(g_blk, lax.dynamic_slice_in_dim(m, start, T, axis=1), B1)
            # Read the new block back from m (behind a barrier, so that XLA does not
            # recompute it from the old m, which would force a copy of m per iteration).
            m = lax.optimization_barrier(lax.dynamic_update_slice_in_dim(m, m_blk, start, 1))
            m_blk = lax.dynamic_slice_in_dim(m, start, T, axis=1)
            u_blk = samgs_module._combine(g_blk, m_blk, a, c)
            return m, lax.dynamic_update_slice_in_dim(u, u_blk, start, 0)

        m, u = lax.fori_loop(0, d // T, body, (m, jnp.zeros((d,), g.dtype)))
        return u, m

    return run


def plain_norms_step(k: int, params: dict, g_tree: dict):
    """The jitted step traced with ``task_norms(rescale=False)``: no range fallback."""
    import jax

    samgs_module = importlib.import_module("samgs_optax.samgs")
    original = samgs_module.task_norms
    samgs_module.task_norms = lambda *a, **kw: original(*a, **{**kw, "rescale": False})
    try:
        tx = samgs_module.samgs(k)
        step = jax.jit(tx.update, donate_argnums=(1,))
        box = {"state": tx.init(params)}
        _, box["state"] = step(g_tree, box["state"])  # traced (and cached) while patched
    finally:
        samgs_module.task_norms = original

    def run():
        u, box["state"] = step(g_tree, box["state"])
        jax.block_until_ready((u, box["state"]))

    return run


def measure(k: int, d: int, budget: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import samgs_optax
    from samgs_optax.similarity import task_norms

    samgs_module = importlib.import_module("samgs_optax.samgs")
    ema, combine = samgs_module._ema, samgs_module._combine

    rng = np.random.default_rng(k * 7919 + d)
    g = jnp.asarray(rng.standard_normal((k, d), np.float32))
    a = jnp.asarray(rng.uniform(0.5, 2.0, k).astype(np.float32))
    c = jnp.float32(0.7)
    params = {"w": jnp.zeros((d,), jnp.float32)}
    tx = samgs_optax.samgs(k)
    step = jax.jit(tx.update, donate_argnums=(1,))
    norms = jax.jit(lambda g: task_norms(g, rescale=True))  # as samgs computes them
    moments = jax.jit(lambda g, m: ema(g, m, B1), donate_argnums=(1,))
    output = jax.jit(combine)
    fused_ref = jax.jit(lambda g, m, a, c: (combine(g, ema(g, m, B1), a, c), ema(g, m, B1)))
    blocked = {
        t: jax.jit(blocked_moments_and_output(t), donate_argnums=(1,)) for t in BLOCKS if d % t == 0
    }

    # The blocked variant computes what passes 2 and 3 compute.
    m0 = jnp.asarray(rng.standard_normal((k, d), np.float32))
    u_ref, m_ref = fused_ref(g, m0, a, c)
    for fn in blocked.values():
        u_b, m_b = fn(g, m0 + 0, a, c)
        np.testing.assert_allclose(np.asarray(u_b), np.asarray(u_ref), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(m_b), np.asarray(m_ref), rtol=1e-6, atol=1e-6)

    box = {"state": tx.init(params), "m": m0 + 0, "mb": {t: m0 + 0 for t in blocked}}
    g_tree = {"w": g}

    def run_step():
        u, box["state"] = step(g_tree, box["state"])
        jax.block_until_ready((u, box["state"]))

    run_plain = plain_norms_step(k, params, g_tree)

    def run_norms():
        norms(g).block_until_ready()

    def run_moments():
        box["m"] = moments(g, box["m"])
        box["m"].block_until_ready()

    def run_output():
        output(g, box["m"], a, c).block_until_ready()

    def blocked_runner(t):
        def run():
            u, box["mb"][t] = blocked[t](g, box["mb"][t], a, c)
            jax.block_until_ready((u, box["mb"][t]))

        return run

    # Floats each part must move (reads + writes), and a copy moving as many.
    traffic = {
        "step": 3 * k * d + d,
        "norms": k * d,
        "moments": 3 * k * d,
        "output": 2 * k * d + d,
        "passes 2+3": 3 * k * d + d,
    }
    copies = {name: _common.copy_runners(floats // 2) for name, floats in traffic.items()}

    fns = {"step": run_step, "norms": run_norms, "moments": run_moments, "output": run_output}
    fns |= {f"blocked {t}": blocked_runner(t) for t in blocked}
    for name, runners in copies.items():  # the floor: XLA elementwise copy, memcpy or torch's
        for runner in ("loop_copy", "np_copy", "torch_copy"):
            if runner in runners:
                fns[f"copy {name} {runner}"] = runners[runner]

    warm = _common.interleaved(fns, rounds=1, warmup=1)
    per_round = sum(float(v[0]) for v in warm.values())
    rounds = int(min(30, max(5, budget / max(per_round, 1e-9))))
    t = _common.interleaved(fns, rounds=rounds, warmup=0)

    def floor(name):
        return _common.copy_floor(t, prefix=f"copy {name} ")

    out = {"K": k, "D": d, "rounds": rounds}
    for name in ("step", "norms", "moments", "output"):
        out[f"{name}_ms"] = 1e3 * float(np.median(t[name]))
        out[f"{name}_vs_copy"] = _common.median_ratio(t[name], floor(name))
    passes = t["norms"] + t["moments"] + t["output"]
    out["passes_ms"] = 1e3 * float(np.median(passes))
    out["passes_vs_step"] = _common.median_ratio(passes, t["step"])
    # The fallback's cost, timed apart: in the cyclic order above a step placed after the
    # output pass would find g in cache. Two functions alternate symmetrically.
    ab = _common.interleaved({"step": run_step, "plain": run_plain}, rounds=4 * rounds)
    out["step_vs_plain_norms"] = _common.median_ratio(ab["step"], ab["plain"])
    out["step_minus_plain_us"] = 1e6 * float(np.median(ab["step"] - ab["plain"]))
    out["moments_output_vs_copy"] = _common.median_ratio(
        t["moments"] + t["output"], floor("passes 2+3")
    )
    for tb in blocked:
        out[f"blocked_{tb}_vs_copy"] = _common.median_ratio(t[f"blocked {tb}"], floor("passes 2+3"))
    return out


def report(rows: list[dict], args: argparse.Namespace, load_start: str) -> str:
    lines = [
        "## bench_passes: the passes of one SAM-GS step, each against a copy",
        "",
        f"- machine: {_common.machine()}; allocator: {_common.allocator()}",
        f"- command: `{_common.command()}`; date: {_common.now()}; load average "
        f"{load_start} at start, {_common.load()} at end (2 cores)",
        "- One (K, D) float32 leaf, momentum branch. Each ratio is the median over "
        "interleaved rounds of t(part) / t(a copy moving as many bytes as the part must: "
        "step 3KD + D floats, norms KD, moments 3KD, output 2KD + D, passes 2+3 3KD + D). "
        "`passes / step`: the three passes run as separate programs, over the whole step. "
        "`blocked T`: passes 2 and 3 as a `fori_loop` over blocks of T columns, against "
        "the copy floor of passes 2+3. `step / plain norms`: the step against the same step "
        "with `task_norms(rescale=False)` (no range fallback), and the median difference.",
        "",
    ]
    header = ["K", "D", "step ms", "step x copy", "norms x copy", "moments x copy"]
    header += ["output x copy", "passes / step", "passes 2+3 x copy", "step / plain norms"]
    header += [f"blocked {t} x copy" for t in BLOCKS]
    table = []
    for r in rows:
        row = [
            r["K"],
            f"{r['D']:,}",
            f"{r['step_ms']:.2f}",
            f"{r['step_vs_copy']:.2f}",
            f"{r['norms_vs_copy']:.2f}",
            f"{r['moments_vs_copy']:.2f}",
            f"{r['output_vs_copy']:.2f}",
            f"{r['passes_vs_step']:.2f}",
            f"{r['moments_output_vs_copy']:.2f}",
            f"{r['step_vs_plain_norms']:.3f} ({r['step_minus_plain_us']:+.0f} us)",
        ]
        for t in BLOCKS:
            key = f"blocked_{t}_vs_copy"
            row.append(f"{r[key]:.2f}" if key in r else "")
        table.append(row)
    lines.append(_common.markdown_table(header, table))
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small config, no RESULTS.md")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per config")
    parser.add_argument("--ks", type=_ints, default=KS, help="comma list of K")
    parser.add_argument("--ds", type=_ints, default=DS, help="comma list of D")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    ks, ds = ((2,), (1 << 18,)) if args.quick else (args.ks, args.ds)
    load_start = _common.load()
    rows = []
    for k in ks:
        for d in ds:
            r = measure(k, d, 0.5 if args.quick else args.budget)
            rows.append(r)
            blocked = "  ".join(
                f"blocked {t} x{r[f'blocked_{t}_vs_copy']:.2f}"
                for t in BLOCKS
                if f"blocked_{t}_vs_copy" in r
            )
            print(
                f"K={k:3d} D={d:9d}  step x{r['step_vs_copy']:.2f}  norms x{r['norms_vs_copy']:.2f}"
                f"  moments x{r['moments_vs_copy']:.2f}  output x{r['output_vs_copy']:.2f}"
                f"  passes/step {r['passes_vs_step']:.2f}"
                f"  passes 2+3 x{r['moments_output_vs_copy']:.2f}  {blocked}"
                f"  step/plain norms {r['step_vs_plain_norms']:.3f}"
                f" ({r['step_minus_plain_us']:+.0f} us)",
                flush=True,
            )
    if not (args.quick or args.no_write):
        _common.write_section("bench_passes", report(rows, args, load_start))
        print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
