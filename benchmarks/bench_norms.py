"""What SAM-GS's range-safe per-task norms cost, alone, in the update and in a training step.

``samgs`` computes the per-task norms with ``task_norms(g, rescale=True)``: three sums of
squares (plain, and g scaled by 2^-64 and 2^64) in one variadic reduction, exact for every
representable norm in one read of g. This script compares four ways of computing them,
each traced into the same programs by patching ``samgs_optax.samgs.task_norms``:

* ``plain``: one sum of squares (``rescale=False``): fastest, but a norm below ~1e-19 or
  above ~1e19 is lost in float32 (not what the library ships; the baseline);
* ``variadic``: the library's ``rescale=True``;
* ``two_pass``: a per-task max-abs pass, then one sum of squares scaled per task by
  2^-e (e the max's exponent): exact, two reads of g, no branch;
* ``cond``: the plain sum, and ``two_pass`` under ``lax.cond`` when a task is out of range
  (the library's form before commit de4fb74).

Three programs, all jitted, each variant timed in turn (interleaved rounds, medians):
the norms alone on an 8-leaf tree (K, D); the SAM-GS update (state donated); and the MLP
training step of ``bench_trainer_vs_authors.py`` (1024-2048x4 ReLU encoder, 14.7M shared
parameters, batch 64, ``value_and_jacrev`` + ``chain(samgs, scale(K), clip, adam)``,
parameters and state donated) with XLA's buffers for one step (``memory_analysis()``).

Usage::

    python benchmarks/bench_norms.py            # K = 2 and 10; writes RESULTS.md
    python benchmarks/bench_norms.py --quick    # small, no RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samgs_optax
from samgs_optax.gramian import gramian_range, pow2_scale
from samgs_optax.similarity import task_norms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
from bench_trainer_vs_authors import MLP_SIZES  # noqa: E402  (the same encoder)

SAMGS_MODULE = importlib.import_module("samgs_optax.samgs")  # the module, not the function


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def two_pass(stacked, dtype=jnp.float32):
    """Per-task max |g| = f 2^e, then n_k = 2^e sqrt(sum (g_k 2^-e)^2): exact, two reads."""
    leaves = [x.astype(dtype) for x in jax.tree.leaves(stacked)]
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(x), axis=_reduce_axes(x)) for x in leaves]), 0)
    usable = jnp.isfinite(big) & (big > 0)
    _, e = jnp.frexp(jnp.where(usable, big, 1))
    e = jnp.where(usable, e, 0).astype(jnp.int32)
    factor = pow2_scale(jnp.ones_like(big), -e)
    sums = [
        jnp.sum(jnp.square(x * factor.reshape((-1,) + (1,) * (x.ndim - 1))), axis=_reduce_axes(x))
        for x in leaves
    ]
    return pow2_scale(jnp.sqrt(sum(sums[1:], sums[0])), e)


def cond(stacked, dtype=jnp.float32):
    """The plain sums; ``two_pass`` under ``lax.cond`` when any task is out of range."""
    leaves = [x.astype(dtype) for x in jax.tree.leaves(stacked)]
    sq = sum(jnp.sum(jnp.square(x), axis=_reduce_axes(x)) for x in leaves)
    lo, hi = gramian_range(sum(int(np.prod(x.shape[1:])) for x in leaves), dtype)
    out_of_range = ~((sq >= lo) & (sq <= hi))
    return jax.lax.cond(
        jnp.any(out_of_range), lambda: two_pass(stacked, dtype), lambda: jnp.sqrt(sq)
    )


VARIANTS = {
    "plain": lambda g, dtype=jnp.float32: task_norms(g, dtype),
    "variadic": lambda g, dtype=jnp.float32: task_norms(g, dtype, rescale=True),
    "two_pass": two_pass,
    "cond": cond,
}


def traced_with(variant: str, build):
    """``build()`` with ``samgs``'s norms replaced by ``variant`` while it traces."""
    original = SAMGS_MODULE.task_norms
    SAMGS_MODULE.task_norms = lambda g, dtype=jnp.float32, rescale=True: VARIANTS[variant](g, dtype)
    try:
        return build()
    finally:
        SAMGS_MODULE.task_norms = original


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each ``fn()`` (which blocks), timed in turn."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts[2:] if len(ts) > 4 else ts)) for name, ts in times.items()}


def tree(k: int, d: int) -> dict:
    return {f"l{i}": jax.random.normal(jax.random.key(i), (k, d // 8)) for i in range(8)}


def norms_and_update(k: int, d: int, rounds: int) -> dict[str, dict]:
    g = tree(k, d)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
    reference = np.asarray(VARIANTS["plain"](g))
    out = {}
    for name, fn in VARIANTS.items():
        norms = jax.jit(fn).lower(g).compile()
        np.testing.assert_allclose(np.asarray(norms(g)), reference, rtol=1e-5)

        def build():
            tx = samgs_optax.samgs(k)
            step = jax.jit(tx.update, donate_argnums=(1,)).lower(g, tx.init(params)).compile()
            return step, tx.init(params)

        step, state = traced_with(name, build)
        out[name] = {"norms": norms, "update": step, "state": state}

    def norms_call(name):
        return lambda: jax.block_until_ready(out[name]["norms"](g))

    def update_call(name):
        def run():
            u, out[name]["state"] = out[name]["update"](g, out[name]["state"])
            jax.block_until_ready(u)

        return run

    t_norms = interleaved({n: norms_call(n) for n in VARIANTS}, rounds)
    t_update = interleaved({n: update_call(n) for n in VARIANTS}, rounds)
    return {n: {"norms_ms": 1e3 * t_norms[n], "update_ms": 1e3 * t_update[n]} for n in VARIANTS}


def mlp_step(k: int, batch: int, rounds: int, sizes=MLP_SIZES) -> dict[str, dict]:
    keys = jax.random.split(jax.random.key(0), len(sizes) + k)
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    params = {
        "encoder": [
            {"w": jax.random.normal(keys[i], (a, b)) * a**-0.5, "b": jnp.zeros(b)}
            for i, (a, b) in enumerate(pairs)
        ],
        "heads": [
            {"w": jax.random.normal(keys[len(pairs) + i], (sizes[-1], 10)) * 0.02,
             "b": jnp.zeros(10)}
            for i in range(k)
        ],
    }  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    y = jax.random.randint(jax.random.key(2), (k, batch), 0, 10)
    mask = {
        "encoder": jax.tree.map(lambda _: True, params["encoder"]),
        "heads": jax.tree.map(lambda _: False, params["heads"]),
    }

    def task_losses(p, x, y):
        h = x
        for layer in p["encoder"]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = jnp.stack([h @ head["w"] + head["b"] for head in p["heads"]])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1)[..., 0], axis=1)

    runs = {}
    for name in VARIANTS:

        def build():
            tx = optax.chain(
                samgs_optax.samgs(k, mask=mask),
                optax.scale(k),
                optax.masked(optax.clip_by_global_norm(1.0), mask),
                optax.adam(1e-3),
            )

            def step(p, s, x, y):
                losses, g = samgs_optax.value_and_jacrev(task_losses)(p, x, y)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s, losses

            p = jax.tree.map(jnp.array, params)
            s = tx.init(p)
            return jax.jit(step, donate_argnums=(0, 1)).lower(p, s, x, y).compile(), p, s

        compiled, p, s = traced_with(name, build)
        runs[name] = {"step": compiled, "carry": (p, s)}

    def call(name):
        def run():
            p, s = runs[name]["carry"]
            p, s, losses = runs[name]["step"](p, s, x, y)
            jax.block_until_ready(losses)
            runs[name]["carry"] = (p, s)

        return run

    times = interleaved({n: call(n) for n in VARIANTS}, rounds)
    return {
        n: {"step_ms": 1e3 * times[n], "step_mib": _common.xla_step_bytes(runs[n]["step"]) / 2**20}
        for n in VARIANTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md")
    parser.add_argument("--ks", default="2,10")
    parser.add_argument("--d", type=float, default=4e6, help="D of the norms/update programs")
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    ks = [2] if args.quick else [int(k) for k in args.ks.split(",")]
    d = 4096 if args.quick else int(args.d)
    rounds = 3 if args.quick else args.rounds
    rows = []
    for k in ks:
        small = norms_and_update(k, d, rounds)
        sizes = (64, 128, 128) if args.quick else MLP_SIZES
        step = mlp_step(k, 8 if args.quick else 64, rounds, sizes)
        for name in VARIANTS:
            r = {"k": k, "variant": name, **small[name], **step[name]}
            rows.append(r)
            print(
                f"K={k:2d} {name:9s} norms {r['norms_ms']:8.2f} ms  update {r['update_ms']:8.2f} ms"
                f"  MLP step {r['step_ms']:8.1f} ms ({r['step_mib']:6.0f} MiB)",
                flush=True,
            )
    if args.quick or args.no_write:
        return
    header = ["K", "norms", "norms ms", "update ms", "MLP step ms", "MLP step MiB"]
    table = [
        [
            r["k"],
            r["variant"],
            f"{r['norms_ms']:.2f}",
            f"{r['update_ms']:.2f}",
            f"{r['step_ms']:.1f}",
            f"{r['step_mib']:.0f}",
        ]
        for r in rows
    ]
    body = [
        "## bench_norms: the per-task norms' variants, alone, in the update, in a training step",
        "",
        f"- machine: {_common.machine()}; load {_common.load()}",
        f"- command: `{_common.command()}`; date: {_common.now()}",
        f"- medians of {rounds} interleaved rounds (the first 2 dropped); norms and update: an "
        f"8-leaf tree, D = {d:,}; MLP step: 14.7M shared parameters, batch 64, "
        "`value_and_jacrev` + samgs, scale(K), clip, adam, donated; MiB: XLA's buffers for one "
        "step. `variadic` is what the library ships; `plain` is not range-safe.",
        "",
        _common.markdown_table(header, table),
    ]
    _common.write_section("bench_norms", "\n".join(body))
    print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
