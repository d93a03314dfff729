"""SAM-GS on parameters sharded over an 8-device mesh, and data-parallel per-task gradients.

XLA's host-device count must be set before jax is imported, so the checks run in
one subprocess (this file run as a script with ``--child``) that prints its
measurements as JSON; the tests below assert on them. The rest of the suite keeps
its single device.

What is checked, on a 2 x 4 ("data", "model") mesh of host CPU devices:

* the update of sharded parameters equals the single-device update of the same
  values (float32, relative 1e-5) and the float64 NumPy transcription of SPEC
  (relative 5e-4), over steps that take both branches, with a masked head leaf;
* the update is sharded like the parameters and the moments like the stacked
  gradients (``P(None, *param_spec)``), right from ``init``; each device holds
  only its shard; the compiled step gathers nothing: its only collectives are
  all-reduces of K-element norm partial sums;
* data parallelism: per-task gradients of the global batch (plain ``jit`` on a
  sharded batch, or ``shard_map`` + ``pmean``) equal the single-device ones, so
  SAM-GS sees the global norms; doing the surgery per shard and averaging the
  updates instead gives a different result (the surgery is not linear).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import relative_error

DEVICES = 8
STEPS = 6
K = 3
TOL_DEVICE = 1e-5
TOL_NUMPY = 5e-4


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_child_sees_eight_devices(report):
    assert report["devices"] == DEVICES


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_sharded_update_matches_one_device_and_numpy(report, axis_types):
    run = report[axis_types]
    assert set(run["branches"]) == {True, False}  # both the equalisation and momentum steps
    assert max(run["err_vs_device"]) < TOL_DEVICE
    assert max(run["err_m_vs_device"]) < TOL_DEVICE
    assert max(run["err_vs_numpy"]) < TOL_NUMPY


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_update_and_moments_stay_sharded(report, axis_types):
    run = report[axis_types]
    for name, spec in run["param_specs"].items():
        assert _canonical(run["update_specs"][name]) == _canonical(spec), name
        if name == "head":  # masked out: no moments
            continue
        assert _canonical(run["moment_specs_init"][name]) == _canonical([None, *spec]), name
        assert _canonical(run["moment_specs"][name]) == _canonical([None, *spec]), name
    # Per-device bytes of the moments: K times one shard of the parameters, not the model.
    assert run["moment_shard_shapes"]["dense_w"] == [K, 32 // 2, 16 // 4]
    assert run["moment_shard_shapes"]["conv"] == [K, 3, 3, 4, 8 // 4]


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_compiled_step_gathers_nothing(report, axis_types):
    ops = report[axis_types]["collectives"]
    assert ops, "expected the norm partial sums to be combined across devices"
    for op, elements in ops:
        # The norms' variadic reduction (plain, 2^-64- and 2^64-scaled sums of squares)
        # is combined by XLA's SPMD partitioner as all-gathers of each shard's K partial
        # sums (at most 8 devices x K floats), the rest as all-reduces: never a parameter.
        assert op in ("all-reduce", "all-gather"), ops
        assert elements <= 8 * K, ops


def test_blocked_norms_of_large_sharded_leaves(report):
    """Large leaves are summed in blocks (accuracy), never along a sharded axis: the norms
    match float64 and only K partial sums per device cross devices."""
    assert len(report["large_leaf_norms"]) == 3
    for err, ops in report["large_leaf_norms"]:
        assert err < 5e-6
        assert ops and all(op in ("all-reduce", "all-gather") and n <= 8 * K for op, n in ops)


def test_data_parallel_gradients_are_the_global_ones(report):
    dp = report["data_parallel"]
    assert dp["err_jit_vs_device"] < TOL_DEVICE
    assert dp["err_shard_map_vs_device"] < TOL_DEVICE
    assert dp["err_shard_map_vma_vs_device"] < TOL_DEVICE
    assert dp["err_update_vs_device"] < TOL_DEVICE


def test_per_shard_surgery_then_average_is_not_samgs(report):
    dp = report["data_parallel"]
    # The wrong order differs from SAM-GS of the global gradient far beyond rounding.
    assert dp["err_per_shard_surgery"] > 1e-2
    assert dp["err_per_shard_surgery"] > 1e3 * dp["err_update_vs_device"]


def _canonical(spec: list) -> list:
    """A PartitionSpec as a list without trailing Nones (P(None) == P(): replicated)."""
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


# ---------------------------------------------------------------------------- child


def _child() -> dict:  # pragma: no cover - runs in the subprocess
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from numpy_reference import NumpySamgs

    import samgs_optax

    out = {"devices": jax.device_count()}
    shapes = {"conv": (3, 3, 4, 8), "dense_w": (32, 16), "dense_b": (16,), "scale": ()}
    shapes["head"] = (16, 4)
    specs = {
        "conv": P(None, None, None, "model"),
        "dense_w": P("data", "model"),
        "dense_b": P("model"),
        "scale": P(),
        "head": P(None, "model"),
    }
    mask = {name: name != "head" for name in shapes}
    names = sorted(shapes)
    sizes = {n: int(np.prod(shapes[n])) for n in names}
    rng = np.random.default_rng(0)

    def grads_at(step):
        """(K, D) float64 matrices; even steps: similar magnitudes, odd: 1e4 apart."""
        scales = rng.uniform(1, 2, K) if step % 2 == 0 else 10.0 ** np.array([-2.0, 0.0, 2.0])
        mats = {}
        for n in names:
            x = rng.normal(size=(K, sizes[n]))
            mats[n] = x
        total = np.sqrt(sum(np.sum(mats[n] ** 2, axis=1) for n in names if mask[n]))
        return {n: mats[n] * (scales / total)[:, None] for n in names}

    seq = [grads_at(s) for s in range(STEPS)]

    def tree_of(mats, dtype=np.float32):
        return {n: mats[n].reshape(K, *shapes[n]).astype(dtype) for n in names}

    def spec_list(sharding):
        if not isinstance(sharding, NamedSharding):
            return [type(sharding).__name__]  # e.g. the whole array on one device
        return [list(p) if isinstance(p, tuple) else p for p in sharding.spec]

    # float64 reference over the shared leaves, in sorted-name order (the tree order).
    shared = [n for n in names if mask[n]]
    ref = NumpySamgs(K, sum(sizes[n] for n in shared), gamma=0.5)
    ref_out = []
    for mats in seq:
        flat = np.concatenate([mats[n].astype(np.float32).astype(np.float64) for n in shared], 1)
        ref_out.append(ref.step(flat))

    tx = samgs_optax.samgs(K, gamma=0.5, mask=mask)
    one = jax.devices()[0]
    params_one = {n: jax.device_put(jnp.zeros(shapes[n]), one) for n in names}
    update_one = jax.jit(tx.update)
    state_one = tx.init(params_one)
    one_out, one_m = [], []
    for mats in seq:
        u, state_one = update_one(jax.device_put(tree_of(mats), one), state_one)
        one_out.append({n: np.asarray(u[n]) for n in names})
        one_m.append({n: np.asarray(state_one.m[n]) for n in shared})

    for label, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
        put = {n: NamedSharding(mesh, specs[n]) for n in names}
        put_stacked = {n: NamedSharding(mesh, P(None, *specs[n])) for n in names}
        params = {n: jax.device_put(jnp.zeros(shapes[n]), put[n]) for n in names}
        state = tx.init(params)
        res = {
            "param_specs": {n: spec_list(put[n]) for n in names},
            "moment_specs_init": {n: spec_list(state.m[n].sharding) for n in shared},
        }
        with jax.set_mesh(mesh):
            update = jax.jit(tx.update)
            errs, errs_m, errs_np, branches = [], [], [], []
            for step, mats in enumerate(seq):
                g = jax.device_put(tree_of(mats), put_stacked)
                u, state = update(g, state)
                got = np.concatenate([np.asarray(u[n]).ravel() for n in shared])
                want = np.concatenate([one_out[step][n].ravel() for n in shared])
                errs.append(relative_error(got, want))
                errs.append(relative_error(np.asarray(u["head"]), one_out[step]["head"]))
                errs_m.append(
                    max(relative_error(np.asarray(state.m[n]), one_m[step][n]) for n in shared)
                )
                errs_np.append(relative_error(got, ref_out[step]))
                branches.append(bool(state.equalised))
            hlo = update.lower(g, state).compile().as_text()
        res.update(
            err_vs_device=errs,
            err_m_vs_device=errs_m,
            err_vs_numpy=errs_np,
            branches=branches,
            update_specs={n: spec_list(u[n].sharding) for n in names},
            moment_specs={n: spec_list(state.m[n].sharding) for n in shared},
            moment_shard_shapes={
                n: list(state.m[n].addressable_shards[0].data.shape) for n in shared
            },
            collectives=_collectives(hlo),
        )
        out[label] = res

    out["data_parallel"] = _data_parallel(jax, jnp, optax, samgs_optax, P, NamedSharding)
    out["large_leaf_norms"] = _large_leaf_norms(jax, jnp, samgs_optax, P, NamedSharding, AxisType)
    return out


def _large_leaf_norms(jax, jnp, samgs_optax, P, NamedSharding, AxisType) -> list:
    """task_norms(rescale=True) of leaves large enough to be summed in blocks, explicitly
    sharded on each axis: (relative error vs float64, collectives of the compiled norms)."""
    mesh = jax.make_mesh((DEVICES,), ("m",), axis_types=(AxisType.Explicit,))
    cases = [((K, 16384, 64), P(None, "m", None)), ((K, 16384, 64), P(None, None, "m"))]
    cases.append(((K, 40000), P(None, "m")))
    found = []
    for shape, spec in cases:
        x = np.random.default_rng(len(found)).standard_normal(shape).astype(np.float32)
        want = np.sqrt((x.astype(np.float64) ** 2).reshape(K, -1).sum(axis=1))
        with jax.set_mesh(mesh):
            leaf = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
            norms = jax.jit(lambda t: samgs_optax.task_norms(t, rescale=True))
            got = np.asarray(norms({"w": leaf}))
            hlo = norms.lower({"w": leaf}).compile().as_text()
        found.append([relative_error(got, want), _collectives(hlo)])
    return found


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(opcode, elements of the result) of every cross-device op of the compiled module."""
    found = []
    ops = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
    pattern = rf"= (\w+)\[([\d,]*)\][^=]*? ({ops})(?:-start)?\("
    for dtype, dims, op in re.findall(pattern, hlo):
        del dtype
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        found.append((op, n))
    # Tuple-shaped (combined) all-reduces: count every element of the tuple.
    for shapes, op in re.findall(r"= \(([^)]*)\) (all-reduce|all-gather)(?:-start)?\(", hlo):
        n = 0
        for dims in re.findall(r"\w+\[([\d,]*)\]", shapes):
            size = 1
            for d in dims.split(","):
                if d:
                    size *= int(d)
            n = max(n, size)
        found.append((op, n))
    return found


def _data_parallel(jax, jnp, optax, samgs_optax, P, NamedSharding) -> dict:
    """Per-task gradients over a batch sharded 8 ways, three ways, and the wrong order."""
    from jax.sharding import AxisType

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(1)
    n, d_in, hidden = 64, 6, 12
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    # Two tasks whose targets differ in scale and, shard to shard, in difficulty.
    y = np.stack([np.sin(x[:, 0]), 10 * np.tanh(x @ rng.normal(size=d_in))], 1)
    y = (y * np.repeat(rng.uniform(0.2, 3.0, devices), n // devices)[:, None]).astype(np.float32)
    params = {
        "w1": (rng.normal(size=(d_in, hidden)) / np.sqrt(d_in)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.normal(size=(hidden, 2)) / np.sqrt(hidden)).astype(np.float32),
    }

    def task_losses(p, xb, yb):
        pred = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean((pred - yb) ** 2, axis=0)  # (K=2,), means over the batch

    jac = samgs_optax.value_and_jacrev(task_losses)
    tx = samgs_optax.samgs(2)
    state0 = tx.init(params)

    # Reference: one device, the whole batch.
    _, g_one = jax.jit(jac)(params, x, y)
    u_one, _ = jax.jit(tx.update)(g_one, state0)

    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
        rep = NamedSharding(mesh, P())
        p_rep = jax.device_put(params, rep)
        s_rep = jax.device_put(state0, rep)

        # (1) plain jit on the sharded batch: XLA all-reduces the per-task gradients.
        @jax.jit
        def step_jit(p, s, xb, yb):
            _, g = jac(p, xb, yb)
            return (g, *tx.update(g, s))

        g_jit, u_jit, _ = step_jit(p_rep, s_rep, xs, ys)

        # (2) shard_map: local per-task gradients, pmean over "data", then the surgery.
        def local_grads(p, xb, yb):
            _, g = jac(p, xb, yb)
            return jax.lax.pmean(g, "data")

        g_sm = jax.jit(
            jax.shard_map(
                local_grads, in_specs=(P(), P("data"), P("data")), out_specs=P(), check_vma=False
            )
        )(p_rep, xs, ys)

        # (2b) shard_map with its default check_vma=True: as with jax.grad there, the
        # gradients of the replicated parameters come out summed over "data", so the
        # mean over shards is that sum divided by the number of shards.
        def local_grads_vma(p, xb, yb):
            _, g = jac(p, xb, yb)
            return jax.tree.map(lambda x: x / devices, g)

        g_vma = jax.jit(
            jax.shard_map(local_grads_vma, in_specs=(P(), P("data"), P("data")), out_specs=P())
        )(p_rep, xs, ys)

        # (3) the wrong order: surgery on each shard's gradients, then average the updates.
        def per_shard_surgery(p, s, xb, yb):
            _, g = jac(p, xb, yb)
            u, _ = tx.update(g, s)
            return jax.lax.pmean(u, "data")

        u_wrong = jax.jit(
            jax.shard_map(
                per_shard_surgery,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=P(),
                check_vma=False,
            )
        )(p_rep, s_rep, xs, ys)

    def err(a, b):
        fa = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(a)])
        fb = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(b)])
        return relative_error(fa, fb)

    return {
        "err_jit_vs_device": err(g_jit, g_one),
        "err_shard_map_vs_device": err(g_sm, g_one),
        "err_shard_map_vma_vs_device": err(g_vma, g_one),
        "err_update_vs_device": err(u_jit, u_one),
        "err_per_shard_surgery": err(u_wrong, u_one),
    }


def test_data_parallel_example_trains():
    """examples/data_parallel.py end to end on 8 host devices, 8 steps: both losses fall."""
    example = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(example), "--steps", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 process(es), 8 devices" in proc.stdout
    wrong = re.search(r"rel\. diff ([0-9.]+)\s+\(not SAM-GS\)", proc.stdout)
    assert wrong and float(wrong.group(1)) > 0.1, proc.stdout
    losses = {
        int(step): np.array(values.split(), float)
        for step, values in re.findall(r"step\s+(\d+)\s+task losses \[([^\]]+)\]", proc.stdout)
    }
    assert set(losses) >= {0, 8}, proc.stdout
    assert np.all(losses[8] < losses[0]), losses


if __name__ == "__main__" and "--child" in sys.argv:  # pragma: no cover
    print(json.dumps(_child()))
