"""The benchmark scripts keep working, and the traffic they count is right.

No timing is asserted here (the machines are shared); only the HLO traffic
counter of ``benchmarks/_common.py``, checked on programs whose traffic is known
by hand, and the traffic of the compiled SAM-GS step, which is a property of the
compiled program rather than of the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import samgs_optax

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402

N = 4096
F32 = 4


def _traffic(fn, *args) -> int:
    return _common.hlo_traffic_bytes(jax.jit(fn).lower(*args).compile().as_text())


def _run_script(name: str, *args: str, timeout: int = 300, env: dict | None = None) -> str:
    """stdout of ``python benchmarks/<name> *args``, which must exit with 0."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_traffic_of_elementwise_programs():
    x = jnp.ones(N)
    assert _traffic(lambda x: x * 2, x) == 2 * N * F32  # read x, write the result
    assert _traffic(lambda x, y: x * y + 1.0, x, x + 1) == 3 * N * F32


def test_traffic_of_a_reduction():
    g = jnp.ones((3, N))
    assert _traffic(lambda g: jnp.sum(g * g, axis=1), g) == 3 * N * F32 + 3 * F32


def test_traffic_of_a_conditional():
    """A cond counts one branch's ops: the cheaper by default, the dearer as "worst"."""
    x = jnp.ones(N)

    def fn(p, x, y):
        return jax.lax.cond(p, lambda: x * 2, lambda: x * y + 1.0)

    hlo = jax.jit(fn).lower(True, x, x + 1).compile().as_text()
    assert "conditional(" in hlo
    small = 64  # the predicate's conversion to a branch index
    common = _common.hlo_traffic_bytes(hlo)
    worst = _common.hlo_traffic_bytes(hlo, "worst")
    assert 2 * N * F32 <= common <= 2 * N * F32 + small
    assert 3 * N * F32 <= worst <= 3 * N * F32 + small


def _samgs_step_hlo(k: int, d: int, extra_pass: bool = False) -> str:
    params = {"w": jnp.zeros((d,))}
    tx = samgs_optax.samgs(k)
    g = {"w": jnp.ones((k, d))}

    def step(g, state):
        u, state = tx.update(g, state)
        if extra_pass:  # what the test below must catch: one more read of g
            return u, state, jnp.max(jnp.abs(g["w"]), axis=1)
        return u, state

    return jax.jit(step, donate_argnums=(1,)).lower(g, tx.init(params)).compile().as_text()


@pytest.mark.parametrize("k", [2, 3, 10])
def test_samgs_step_makes_three_passes(k):
    """norms (read g), moments (read g, m; write m), output (read g, m; write u).

    The norms' range fallback (``task_norms(rescale=True)``) adds two sums of squares of
    g scaled by 2^-64 and 2^64 to the same variadic reduction: no extra pass, and no
    branch (the counter's cheapest and dearest readings agree).
    """
    d = 1 << 16
    hlo = _samgs_step_hlo(k, d)
    algorithm_floor = (4 * k * d + d) * F32  # g read twice: the norms precede any output
    three_passes = (6 * k * d + d) * F32
    traffic = _common.hlo_traffic_bytes(hlo)
    assert algorithm_floor <= traffic <= 1.01 * three_passes, traffic / three_passes
    assert _common.hlo_traffic_bytes(hlo, "worst") == traffic


def test_samgs_step_makes_three_passes_catches_an_extra_pass():
    """The bound above fails for a step that reads g once more (the test can fail)."""
    k, d = 2, 1 << 16
    traffic = _common.hlo_traffic_bytes(_samgs_step_hlo(k, d, extra_pass=True))
    assert traffic > 1.1 * (6 * k * d + d) * F32


def test_bench_passes_quick_runs():
    """Also checks that the blocked variant computes the same u and m as the library."""
    out = _run_script("bench_passes.py", "--quick")
    assert "step x" in out and "blocked 16384 x" in out, out


def test_bench_norms_quick_runs():
    """Every norms variant agrees with the plain norms (checked inside) and is timed."""
    lines = _run_script("bench_norms.py", "--quick").strip().splitlines()
    for name in ("plain", "variadic", "two_pass", "cond"):
        assert any(line.startswith(f"K= 2 {name} ") and "MLP step" in line for line in lines)


def test_bench_update_times_both_implementations():
    """The GPU session's command, tiny: XLA and the Pallas kernel (interpreted on CPU)."""
    out = _run_script(
        "bench_update.py", "--implementation", "both", "--ks", "2", "--ds", "5000",
        "--budget", "0.1", "--allocators", "glibc", "--no-write",
    )  # fmt: skip
    line = out.strip().splitlines()[-1]
    assert "K=  2" in line and " xla " in line and "| pallas" in line and "vs xla" in line, line


def test_bench_trainer_vs_authors_quick_runs_without_torch():
    """The JAX side on whatever backend it finds; PyTorch absent is not an error."""
    env = dict(os.environ, SAMGS_TORCH_PYTHON="/nonexistent/python")
    out = _run_script(
        "bench_trainer_vs_authors.py", "--quick", "--torch-python", "/nonexistent/python",
        timeout=600, env=env,
    )  # fmt: skip
    line = out.strip().splitlines()[-1]
    assert line.startswith("mlp  K= 2") and "ours" in line and "floor" in line, out


def test_bench_paper_quick_runs():
    """examples/paper/train.py's step at CelebA's real image shape, timed (PyTorch not asked)."""
    for module in ("PIL", "tqdm"):  # the examples extra, which train.py needs
        pytest.importorskip(module)
    line = _run_script("bench_paper.py", "--quick", timeout=600).strip().splitlines()[-1]
    assert line.startswith("celeba:cnn:ls:8") and "s/step" in line and "GFLOP" in line, line
