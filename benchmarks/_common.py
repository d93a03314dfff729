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


def command() -> str:
    """The command line that produced the figures, relative to the repository root."""
    return " ".join(["python", *map(shlex.quote, sys.argv)])


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


def median_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """Median over rounds of the per-round ratio num/den."""
    return float(np.median(num / den))


def hlo_traffic_bytes(hlo_text: str) -> int:
    """Bytes the compiled program's top-level ops read and write, operands counted once each.

    Sums, over every instruction of the ENTRY computation that does work (fusions,
    copies, custom calls; not parameters, constants, tuples or bitcasts), the sizes of
    its distinct operands and of its result. For a memory-bound program this is the
    traffic XLA scheduled, to set beside the algorithm's minimum.
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    shapes: dict[str, int] = {}
    total = 0
    skip = ("parameter(", "constant(", "tuple(", "bitcast(", "get-tuple-element(")
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) (\w[\w-]*)\((.*)", line)
        if not m:
            continue
        name, shape_text, opcode, rest = m.groups()
        size = _shape_bytes(shape_text)
        shapes[name] = size
        if any(f"{opcode}(" == s for s in skip):
            continue
        args = rest.split(")", 1)[0]
        operands = {a.strip().lstrip("%") for a in args.split(",") if a.strip().startswith("%")}
        total += size + sum(shapes.get(op, 0) for op in operands)
    return total


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
