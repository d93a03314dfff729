"""Times the authors' PyTorch SAM-GS aggregation step against ours, on the same shapes.

The PyTorch side is a transcription of the authors' ``SAMGS.balance_magnitude``
(``methods/weight_methods.py`` of their repository): per step it clones the
(D, K) gradient matrix, takes the column norms, builds the K x K similarity
matrix, updates the moments out of place, and forms the update (plus the K x D
weighted-gradient matrix the method also returns). The flattening of the
parameters into that matrix (their ``grad2vec``) is *not* timed, which favours
PyTorch. Our side is the jitted ``samgs(K).update`` with the state donated, on an
MLP-shaped tree of the same D floats (8 leaves).

PyTorch is optional: the PyTorch part runs in this interpreter if ``import
torch`` works, else in ``--torch-python`` (default ``/work/venv-torch/bin/python``
when it exists, or ``$SAMGS_TORCH_PYTHON``); without either the script prints a
message and exits 0. Before timing, both sides run three steps on a small shared
input and must agree (the transcription is checked against the library).

Usage::

    python benchmarks/bench_torch_reference.py [--quick] [--torch-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((2, 1_000_000), (4, 1_000_000), (4, 4_000_000), (10, 4_000_000))
QUICK_SHAPES = ((4, 1_000_000),)
DEFAULT_TORCH_PYTHON = "/work/venv-torch/bin/python"


# --------------------------------------------------------------------------- torch side
# Imports only torch and the standard library: the torch venv may have no numpy or jax.


class TorchSamgs:
    """The authors' aggregation step, re-expressed: gradients as a (D, K) matrix."""

    def __init__(self, b1: float = 0.9, b2: float = 0.99, gamma: float = 0.1):
        self.b1, self.b2, self.gamma = b1, b2, gamma
        self.m = 0.0
        self.v = 0.0
        self.t = 0

    def step(self, grads):
        import torch

        self.t += 1
        w = grads.clone().detach()
        norms = torch.linalg.norm(w, dim=0)
        col = norms.unsqueeze(1)
        sim = 2 * (col @ col.T) / (col**2 + col.T**2)
        upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
        pairs = sim[upper]
        self.m = self.b1 * self.m + (1 - self.b1) * w
        self.v = self.b2 * self.v + (1 - self.b2) * (1 - pairs.mean()) ** 2 + 1e-8
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        if pairs.mean() < self.gamma:
            unit = w / torch.norm(w, dim=0, p=2)
            weighted = unit * torch.norm(w, dim=0, p=2).mean()
        else:
            weighted = w * torch.abs(m_hat) / torch.sqrt(v_hat)
        return weighted.sum(1), weighted


def torch_child(request: dict) -> dict:
    """Runs in the torch interpreter: the agreement check, then the timings."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    # Agreement: the steps given as (K, D) nested lists.
    agg = TorchSamgs(gamma=request["gamma"])
    check = []
    for g in request["check"]:
        u, _ = agg.step(torch.tensor(g, dtype=torch.float32, device=device).T.contiguous())
        check.append(u.cpu().tolist())
    out["check"] = check
    times = {}
    for k, d in request["shapes"]:
        torch.manual_seed(0)
        grads = torch.randn(d, k, dtype=torch.float32, device=device)
        agg = TorchSamgs()
        for _ in range(2):
            agg.step(grads)
        sync()
        ts = []
        for _ in range(request["reps"]):
            t0 = time.perf_counter()
            agg.step(grads)
            sync()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        times[f"{k},{d}"] = ts[len(ts) // 2]
        del grads, agg
    out["times"] = times
    return out


# --------------------------------------------------------------------------- jax side


def run_torch(request: dict, torch_python: str | None) -> dict | None:
    try:
        import torch  # noqa: F401

        return torch_child(request)
    except ImportError:
        pass
    if not torch_python or not os.path.exists(torch_python):
        return None
    proc = subprocess.run(
        [torch_python, __file__, "--torch-child"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"torch child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_inputs():
    """Three (K=3, D=500) steps: similar magnitudes, then 1e3 apart (both branches)."""
    import numpy as np

    rng = np.random.default_rng(0)
    steps = []
    for scales in ([1.0, 1.5, 1.2], [1e-2, 1.0, 10.0], [1.0, 1.1, 0.9]):
        g = rng.normal(size=(3, 500))
        g = g / np.linalg.norm(g, axis=1, keepdims=True) * np.asarray(scales)[:, None]
        steps.append(g.astype(np.float32))
    return steps


def jax_check(steps, gamma):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import samgs_optax

    tx = samgs_optax.samgs(3, gamma=gamma)
    state = tx.init(jnp.zeros(500))
    outs = []
    for g in steps:
        u, state = jax.jit(tx.update)(jnp.asarray(g), state)
        outs.append(np.asarray(u))
    return outs


def jax_times(shapes, reps):
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common
    from bench_update import make_params

    import samgs_optax

    times = {}
    for k, d in shapes:
        params = make_params(d)
        leaves = jax.tree.leaves(params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        g = jax.tree.unflatten(
            jax.tree.structure(params),
            [jax.random.normal(kk, (k, *x.shape)) for kk, x in zip(keys, leaves, strict=True)],
        )
        tx = samgs_optax.samgs(k)
        update = jax.jit(tx.update, donate_argnums=(1,))
        box = {"s": tx.init(params)}

        def run(update=update, box=box, g=g):
            u, box["s"] = update(g, box["s"])
            jax.block_until_ready((u, box["s"]))

        t = _common.interleaved({"samgs": run}, rounds=reps, warmup=2)["samgs"]
        times[f"{k},{d}"] = (float(np.median(t)), sum(x.size for x in leaves))
        del g, box
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, no RESULTS.md")
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("SAMGS_TORCH_PYTHON", DEFAULT_TORCH_PYTHON),
        help="interpreter with torch installed, used when this one has none",
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        print(json.dumps(torch_child(json.loads(sys.stdin.read()))))
        return

    import numpy as np

    shapes = QUICK_SHAPES if args.quick else SHAPES
    reps = 5 if args.quick else args.reps
    gamma = 0.1
    steps = check_inputs()
    request = {
        "shapes": shapes,
        "reps": reps,
        "gamma": gamma,
        "check": [g.tolist() for g in steps],
    }
    torch_res = run_torch(request, args.torch_python)
    if torch_res is None:
        print(
            "PyTorch is not installed here and no --torch-python interpreter was found: "
            "nothing to compare (install torch, or pass --torch-python)."
        )
        return

    ours = jax_check(steps, gamma)
    errs = [
        float(np.abs(np.asarray(t) - o).max() / np.abs(o).max())
        for t, o in zip(torch_res["check"], ours, strict=True)
    ]
    print(
        f"agreement with the authors' step (3 steps, both branches): max rel. err {max(errs):.1e}"
    )
    if max(errs) > 1e-4:
        raise SystemExit("the PyTorch transcription and samgs_optax disagree")

    jt = jax_times(shapes, reps)
    rows = []
    for k, d in shapes:
        t_torch = torch_res["times"][f"{k},{d}"]
        t_jax, d_exact = jt[f"{k},{d}"]
        rows.append((k, d_exact, 1e3 * t_torch, 1e3 * t_jax, t_torch / t_jax))
        print(
            f"K={k:3d} D={d_exact:9d}  torch {1e3 * t_torch:8.2f} ms  samgs_optax "
            f"{1e3 * t_jax:7.2f} ms  speed-up x{t_torch / t_jax:5.1f}"
        )
    if args.quick or args.no_write:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    body = [
        "## bench_torch_reference: the authors' PyTorch step against ours",
        "",
        f"- machine: {_common.machine()}; PyTorch {torch_res['torch']} "
        f"({torch_res['threads']} threads, {torch_res.get('device', 'cpu')}); "
        f"allocator: {_common.allocator()}",
        f"- command: `{_common.command()}`; date: {_common.now()}",
        "- PyTorch: a transcription of the authors' `balance_magnitude` on a (D, K) float32 "
        "matrix (flattening not timed); ours: jitted `samgs(K).update`, state donated, "
        "8-leaf MLP-shaped tree of D floats. Medians of "
        f"{reps} steps after 2 warm-up steps; random gradients (momentum branch).",
        f"- agreement on 3 shared steps (both branches): max relative error {max(errs):.1e}",
        "",
        _common.markdown_table(
            ["K", "D", "PyTorch ms", "samgs_optax ms", "speed-up"],
            [(k, f"{d:,}", f"{a:.1f}", f"{b:.2f}", f"{s:.1f}x") for k, d, a, b, s in rows],
        ),
    ]
    _common.write_section("bench_torch_reference", "\n".join(body))
    print(f"wrote {_common.RESULTS}")


if __name__ == "__main__":
    main()
