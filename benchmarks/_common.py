"""Shared helpers of the benchmarks: machine description, timing, HLO traffic, RESULTS.md.

Not part of the library. Every benchmark writes its own section of
``benchmarks/RESULTS.md`` between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
markers, replacing a previous run's section and leaving the others alone.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}


def machine() -> str:
    """One line: CPU model, cores, memory, Python and library versions."""
    import jax
    import jaxlib
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        mem = "?"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem} RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"optax {optax.__version__}, numpy {np.__version__}; device {jax.devices()[0].platform}"
    )


def allocator() -> str:
    """Which malloc serves this process (jemalloc when preloaded, else glibc)."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return f"jemalloc (LD_PRELOAD, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
    return "glibc malloc (default)"


def load() -> str:
    """The 1-minute load average (the machine may be shared: noise indicator)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def command() -> str:
    """The command line that produced the figures, relative to the repository root, after
    the ``XLA_FLAGS`` it ran under, if any (they change the compiled programs)."""
    flags = os.environ.get("XLA_FLAGS", "").strip()
    env = [f"XLA_FLAGS={shlex.quote(flags)}"] if flags else []
    return " ".join([*env, "python", *map(shlex.quote, sys.argv)])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2
) -> dict[str, np.ndarray]:
    """Times every function once per round, rotating the order each round.

    Each function must block until its result is ready. Returns the seconds of
    each round per name; ratios are best taken round by round (same machine
    load) and then the median over rounds.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(ts) for name, ts in times.items()}


COPY_FLOORS = ("xla_copy", "np_copy", "torch_copy", "loop_copy")
"""The runners whose fastest time is a benchmark's copy floor (those present)."""


def copy_runners(n: int) -> dict[str, Callable[[], None]]:
    """Ways to move n float32 into a warm, preallocated buffer (each blocks until done).

    On the default JAX backend (CPU, or a GPU's memory when JAX finds one):

    * ``xla_copy``: XLA's copy op (one memcpy) into a donated buffer;
    * ``loop_copy``: the same bytes through XLA's elementwise emitter (a copy
      that flips the sign bit), into the same donated buffer;
    * ``stream``: an in-place read-modify-write (x <- x * c) of that buffer, which
      needs no read-for-ownership of a separate destination: a stricter reference;
    * on CPU, ``np_copy``: numpy's memcpy between two arrays;
    * on a GPU, ``torch_copy``: PyTorch's device-to-device ``copy_`` of n floats,
      when torch with CUDA is importable.
    """
    from functools import partial

    import jax
    import jax.numpy as jnp

    src = jnp.ones(n, jnp.float32)
    box = {"dst": jnp.zeros(n, jnp.float32)}

    @partial(jax.jit, donate_argnums=(1,))
    def xla_copy(s, t):
        return jax.lax.dynamic_update_slice(t, s, (0,))

    @partial(jax.jit, donate_argnums=(1,))
    def loop_copy(s, t):
        return jax.lax.dynamic_update_slice(t, -s, (0,))

    @partial(jax.jit, donate_argnums=(0,))
    def stream(x):
        return x * jnp.float32(1.0000001)

    def into_dst(fn, *args):
        def run():
            box["dst"] = fn(*args, box["dst"])
            box["dst"].block_until_ready()

        return run

    runners = {
        "xla_copy": into_dst(xla_copy, src),
        "loop_copy": into_dst(loop_copy, src),
        "stream": into_dst(stream),
    }
    if jax.default_backend() == "cpu":
        src_np = np.asarray(src)  # zero-copy view of the same buffer
        dst_np = np.zeros_like(src_np)
        runners["np_copy"] = lambda: np.copyto(dst_np, src_np)
    else:
        torch_copy = _torch_device_copy(n)
        if torch_copy is not None:
            runners["torch_copy"] = torch_copy
    return runners


def _torch_device_copy(n: int) -> Callable[[], None] | None:
    """PyTorch's device-to-device copy of n float32 on CUDA, or None without it."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    return run


def copy_floor(times: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
    """Per round, the fastest of the copy runners present (``COPY_FLOORS``) in ``times``."""
    present = [times[prefix + name] for name in COPY_FLOORS if prefix + name in times]
    return np.min(np.stack(present), axis=0)


def xla_step_bytes(compiled) -> int:
    """Bytes XLA assigns for one call of a compiled function (``memory_analysis()``):
    arguments + outputs - donated aliases + temporaries."""
    mem = compiled.memory_analysis()
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def median_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """Median over rounds of the per-round ratio num/den."""
    return float(np.median(num / den))


Branches = Literal["common", "worst"]
"""How :func:`hlo_traffic_bytes` counts a ``conditional``: its cheapest or its dearest branch."""


def hlo_traffic_bytes(hlo_text: str, branches: Branches = "common") -> int:
    """Bytes the compiled program's ops read and write, each operand counted once per op.

    Sums, over every instruction of the ENTRY computation that does work (fusions,
    copies, custom calls; not parameters, constants, tuples or bitcasts), the size of
    its result and of its distinct operands. A fusion operand that the fused
    computation only slices counts as the slices it reads; a ``while`` loop counts its
    body times its known trip count. For a memory-bound program this is the traffic
    XLA scheduled, to set beside the algorithm's minimum.

    A ``conditional`` runs one of its branches, which receive the operands by
    reference: it counts as the traffic of the ops inside one branch (recursively, so
    a cond nested in a branch counts one of its own branches), never as its operands
    or result. ``branches="common"`` (default) takes the cheapest branch: the path that
    runs in the common case of the library's range fallbacks (e.g.
    ``task_norms(rescale=True)``, whose dearer branch runs only when a squared norm
    under- or overflows float32). ``branches="worst"`` takes the dearest branch: an
    upper bound whatever the predicate. A program whose common case is not its
    cheapest branch needs ``"worst"``; the counter cannot tell predicates apart.
    """
    comps, entry = _parse_hlo(hlo_text)
    pick = {"common": min, "worst": max}[branches]
    return _traffic(comps, entry, pick)


_SKIP = {"parameter", "constant", "tuple", "bitcast", "get-tuple-element"}
_INSTR = re.compile(r"\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\(([^)]*)\)(.*)$")
_NAME = r"%([\w.\-]+)"


def _parse_hlo(text: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation: [(name, bytes, opcode, operands, attributes)]}, ENTRY's name."""
    comps: dict[str, list[tuple]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = re.match(r"(ENTRY )?%(\S+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, args, attrs = m.groups()
            operands = [a.strip().lstrip("%") for a in args.split(",") if a.strip()]
            comps[current].append((name, _shape_bytes(shape), opcode, operands, attrs))
    return comps, entry


def _branch_names(attrs: str) -> list[str]:
    """The computations a ``conditional`` may run (indexed or true/false form)."""
    listed = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if listed:
        return re.findall(_NAME, listed.group(1))
    return [
        re.search(rf"{key}={_NAME}", attrs).group(1)
        for key in ("true_computation", "false_computation")
    ]


def _traffic(comps: dict[str, list[tuple]], comp: str, pick: Callable) -> int:
    sizes: dict[str, int] = {}
    total = 0
    for name, size, opcode, operands, attrs in comps[comp]:
        sizes[name] = size
        if opcode in _SKIP:
            continue
        if opcode == "while":
            body = re.search(rf"body={_NAME}", attrs).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
            total += (int(trips.group(1)) if trips else 1) * _traffic(comps, body, pick)
            continue
        if opcode == "conditional":
            total += pick(_traffic(comps, b, pick) for b in _branch_names(attrs))
            continue
        called = re.search(rf"calls={_NAME}", attrs)
        reads = 0
        seen: set[str] = set()
        for i, op in enumerate(operands):
            if op in seen:
                continue
            seen.add(op)
            full = sizes.get(op, 0)
            if opcode == "fusion" and called:
                full = _param_reads(comps[called.group(1)], i, full)
            reads += full
        total += size + reads
    return total


def _param_reads(body: list[tuple], index: int, full: int) -> int:
    """Bytes a fused computation reads of its parameter ``index``: the slices if only sliced."""
    param = next(
        (n for n, _, op, args, _ in body if op == "parameter" and args == [str(index)]), None
    )
    users = [(size, op) for _, size, op, args, _ in body if param in args]
    if users and all(op in ("slice", "dynamic-slice") for _, op in users):
        return min(full, sum(size for size, _ in users))
    return full


def _shape_bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the ``name`` section of RESULTS.md with ``body``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_HEADER = """# Benchmark results

Written by the scripts in `benchmarks/` (each replaces its own section). Figures are
medians over interleaved rounds on a shared machine; compare ratios within one
section, not absolute times across sections.
"""


def run_child(script: str, kind: str, cfg: dict, python: str, *, jemalloc: bool = False) -> dict:
    """Runs ``python script --{kind}-child JSON(cfg)`` in its own process (so that its memory
    figures are its own) and returns the JSON object its last stdout line holds; with
    ``jemalloc`` the child runs with :data:`JEMALLOC` preloaded (:data:`JEMALLOC_CONF`)."""
    import json
    import subprocess

    env = dict(os.environ)
    if jemalloc:
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    proc = subprocess.run(
        [python, script, f"--{kind}-child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
