"""Data-parallel SAM-GS: average the per-task gradients over the data shards, then do the surgery.

SAM-GS is a function of the *global* per-task gradients g_k (the gradient of
task k's loss over the whole batch): their norms n_k set the similarity Psi, the
branch, the EMA h and the equalisation weights mean(n)/n_k. With the batch split
over S devices, the right order is

    g_k = mean_s g_k^(s)          (an all-reduce of the K stacked gradients)
    u   = SAMGS(g_1, ..., g_K)    (same inputs, so same result and state, on every device)

which is what plain ``jax.jit`` does when the batch is sharded and the losses are
means over the global batch: XLA inserts the all-reduce inside the Jacobian. With
``jax.shard_map`` one writes it by hand (``jax.lax.pmean`` of the stacked
gradients, then the surgery). Both are checked here against one device.

The tempting alternative, surgery on each shard's gradients and then averaging
the updates (``mean_s SAMGS(g^(s))``), is *not* SAM-GS of the global gradient:

* the surgery is not linear: norms, Psi, the branch test and the weights
  mean(n)/n_k are computed from per-shard gradients, which are noisier (each
  shard's n_k is that of a smaller batch, typically larger than the global one)
  and may disagree on the branch from shard to shard;
* each device would update its own moments m_k and h from its own shard, so the
  optimizer state diverges across devices and is no longer one state;
* it changes with the number of devices, so results stop being reproducible
  across machines. This script prints the per-shard norms and branches, and the
  difference (about 50% of the update here).

Communication: the all-reduce carries K x D floats per step (the stacked
per-task gradients) instead of the D of single-task data parallelism; the surgery
itself then runs replicated (or sharded with the parameters, see
``tests/test_sharding.py``) and needs no communication except for the K norms
when the parameters are sharded.

Usage (one process, 8 host CPU devices)::

    python examples/data_parallel.py

Several processes (``jax.distributed``; here two on one machine, 4 devices each,
CPU collectives through gloo; on real hosts use their address)::

    python examples/data_parallel.py --devices 4 --num-processes 2 --process-id 0 \\
        --coordinator localhost:12355 &
    python examples/data_parallel.py --devices 4 --num-processes 2 --process-id 1 \\
        --coordinator localhost:12355
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="host CPU devices per process")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    # Must happen before jax is imported.
    flag = f"--xla_force_host_platform_device_count={ARGS.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import samgs_optax  # noqa: E402

K = 2
D_IN, HIDDEN = 16, 64
GAMMA = 0.1  # samgs' default threshold


def make_data(n: int, shards: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two regression tasks; task 1's scale varies from shard to shard (non-i.i.d. shards)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype(np.float32)
    y0 = np.sin(x @ rng.normal(size=D_IN) / 2)
    y1 = 10 * np.tanh(x @ rng.normal(size=D_IN) / 4)
    y1 = y1 * np.repeat(rng.uniform(0.2, 3.0, shards), n // shards)
    return x, np.stack([y0, y1], axis=1).astype(np.float32)


def init_params(seed: int = 0) -> dict:
    """A shared trunk and one linear head per task."""
    rng = np.random.default_rng(seed + 1)

    def dense(n_in, n_out):
        w = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
        return {"w": w.astype(np.float32), "b": np.zeros(n_out, np.float32)}

    return {
        "trunk": {"l1": dense(D_IN, HIDDEN), "l2": dense(HIDDEN, HIDDEN)},
        "heads": {f"task{k}": dense(HIDDEN, 1) for k in range(K)},
    }


def shared_mask(params: dict) -> dict:
    """True on the trunk (surgery), False on the heads (plain sum: their own task's gradient)."""
    return {
        "trunk": jax.tree.map(lambda _: True, params["trunk"]),
        "heads": jax.tree.map(lambda _: False, params["heads"]),
    }


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of each task over the batch, shape (K,)."""
    h = x
    for layer in ("l1", "l2"):
        h = jnp.tanh(h @ params["trunk"][layer]["w"] + params["trunk"][layer]["b"])
    preds = [
        h @ params["heads"][f"task{k}"]["w"] + params["heads"][f"task{k}"]["b"] for k in range(K)
    ]
    pred = jnp.concatenate(preds, axis=1)
    return jnp.mean((pred - y) ** 2, axis=0)


def make_optimizer(params: dict) -> optax.GradientTransformation:
    """The authors' recipe: surgery, times K, clip to 1 (both on the trunk only), Adam."""
    return samgs_optax.recipe("samgs", K, 1e-3, mask=shared_mask(params))


jacobian = samgs_optax.value_and_jacrev(task_losses)


def make_train_step(tx: optax.GradientTransformation):
    """Plain jit: with the batch sharded over "data", the per-task gradients of the global
    mean losses come out all-reduced, so the surgery sees the global norms."""

    @jax.jit
    def train_step(params, opt_state, x, y):
        losses, grads = jacobian(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    return train_step


def shard_map_grads(params, x, y):
    """The same by hand: local per-task gradients, then their mean over the data shards."""

    def local(p, xb, yb):
        losses, grads = jacobian(p, xb, yb)  # means over this shard's rows
        return jax.lax.pmean(losses, "data"), jax.lax.pmean(grads, "data")

    # check_vma=False: the per-shard gradients stay per-shard and pmean averages them.
    # With shard_map's default check_vma=True, JAX sums the gradients of replicated
    # parameters over "data" itself (as jax.grad does there): divide by the shard count
    # instead of the pmean (tests/test_sharding.py checks both).
    fn = jax.shard_map(
        local, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(fn)(params, x, y)


def per_shard_surgery(surgery, state, params, x, y):
    """The WRONG order: SAM-GS on each shard's per-task gradients, then the mean of the updates.

    Returns the averaged update and each shard's per-task norms, shape (shards * K,).
    """

    def local(p, s, xb, yb):
        _, grads = jacobian(p, xb, yb)
        u, _ = surgery.update(grads, s)
        return jax.lax.pmean(u, "data"), samgs_optax.task_norms(grads)

    fn = jax.shard_map(
        local,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P("data")),
        check_vma=False,
    )
    return jax.jit(fn)(params, state, x, y)


def rel(a, b) -> float:
    fa = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(a)])
    fb = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(b)])
    return float(np.abs(fa - fb).max() / np.abs(fb).max())


def main(args: argparse.Namespace) -> None:
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    lead = jax.process_index() == 0
    shards = jax.device_count()
    mesh = jax.make_mesh((shards,), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    # Every process builds the same global batch and contributes its own rows.
    x_all, y_all = make_data(args.batch, shards)
    rows = args.batch // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    x = jax.make_array_from_process_local_data(batch_sharding, x_all[mine])
    y = jax.make_array_from_process_local_data(batch_sharding, y_all[mine])

    params0 = init_params()
    tx = make_optimizer(params0)
    params = jax.device_put(params0, replicated)
    opt_state = jax.device_put(tx.init(params0), replicated)
    surgery = samgs_optax.samgs(K, mask=shared_mask(params0))

    with jax.set_mesh(mesh):
        # 1. Per-task gradients: jit on the sharded batch == shard_map + pmean.
        _, g_jit = jax.jit(jacobian)(params, x, y)
        _, g_sm = shard_map_grads(params, x, y)
        u_global, _ = jax.jit(surgery.update)(g_jit, opt_state[0])
        u_wrong, shard_norms = per_shard_surgery(surgery, opt_state[0], params, x, y)
    # Reference: the whole batch on one (local) device.
    one = jax.local_devices()[0]
    _, g_one = jax.jit(jacobian)(*jax.device_put((params0, x_all, y_all), one))

    norms = np.asarray(samgs_optax.task_norms(g_jit))
    psi, _ = samgs_optax.magnitude_similarity(jnp.asarray(norms))
    shard_norms = multihost_utils.process_allgather(shard_norms, tiled=True).reshape(shards, K)
    shard_psi = [float(samgs_optax.magnitude_similarity(jnp.asarray(n))[0]) for n in shard_norms]
    if lead:
        print(f"{jax.process_count()} process(es), {shards} devices, global batch {args.batch}")
        print(
            "per-task gradients vs one device, whole batch: "
            f"jit {rel(jax.device_get(g_jit), g_one):.1e}, "
            f"shard_map+pmean {rel(jax.device_get(g_sm), g_one):.1e} (rel. diff)"
        )
        branch = {True: "equalise", False: "momentum"}
        print(
            f"global per-task norms {np.round(norms, 4)}, Psi {float(psi):.4f} "
            f"-> {branch[float(psi) < GAMMA]}"
        )
        for s in range(shards):
            print(
                f"  shard {s}: norms {np.round(shard_norms[s], 4)}, Psi {shard_psi[s]:.4f} "
                f"-> {branch[shard_psi[s] < GAMMA]}"
            )
        print(
            "surgery per shard then mean vs surgery of the global gradient: "
            f"rel. diff {rel(u_wrong, u_global):.2f}  (not SAM-GS)"
        )

    # 2. Train with the right order.
    train_step = make_train_step(tx)
    # With several multi-device steps in flight, XLA:CPU's in-process collectives can
    # deadlock on a busy machine (one virtual device never joins the all-reduce and the
    # process aborts after a 40 s timeout); waiting for each step keeps one in flight.
    # GPUs and TPUs do not need this, so it is limited to the CPU backend.
    one_step_in_flight = jax.default_backend() == "cpu"
    with jax.set_mesh(mesh):
        for step in range(args.steps + 1):
            params, opt_state, losses = train_step(params, opt_state, x, y)
            if one_step_in_flight:
                jax.block_until_ready(losses)
            if lead and step % max(1, args.steps // 4) == 0:
                print(f"step {step:4d}  task losses {np.round(np.asarray(losses), 4)}")


if __name__ == "__main__":
    main(ARGS)
