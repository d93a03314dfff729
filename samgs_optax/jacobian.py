"""Per-task gradients, stacked along a leading task axis, in one call."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

PyTree = Any
Mode = Literal["auto", "jacrev", "vmap", "sequential"]
MODES = ("auto", "jacrev", "vmap", "sequential")

AUTO_MODE = {"cpu": "sequential"}
"""What ``mode="auto"`` runs on each platform; every other platform runs ``"jacrev"``."""

SEQUENTIAL_UNROLL = 32
"""Default ``unroll`` of ``mode="sequential"``: K up to this runs as straight-line code."""


def value_and_jacrev(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "auto",
    unroll: int = SEQUENTIAL_UNROLL,
) -> Callable[..., tuple[Any, PyTree]]:
    r"""Like ``jax.value_and_grad`` for a function returning the K task losses.

    ``fun(*args)`` must return a vector of shape (K,) (or ``(losses, aux)`` with
    ``has_aux=True``). The returned function gives ``(losses, grads)`` (or
    ``((losses, aux), grads)``) where ``grads`` has the structure of
    ``args[argnums]`` (a tuple of such trees when ``argnums`` is a tuple, as in
    ``jax.value_and_grad``) and every leaf an extra leading axis of length K:
    ``grads[k]`` is :math:`\nabla_x \ell_k`, the gradient of ``losses[k]``. This
    is the input :func:`samgs_optax.samgs` and the other aggregators expect.

    Modes, for a model with D parameters and K tasks (all give the same
    gradients up to floating-point rounding):

    * ``"auto"`` (default): ``"sequential"`` when compiled for CPU,
      ``"jacrev"`` elsewhere (GPU, TPU), per the table :data:`AUTO_MODE`,
      chosen at lowering time with ``jax.lax.platform_dependent``. On XLA:CPU
      the batched backward of ``"jacrev"`` is slower than K separate backward
      passes (batched matmuls and convolution weight gradients have no fast
      CPU kernel); on a GPU the batched backward is as fast or faster
      (``benchmarks/bench_train_step.py``).
    * ``"jacrev"``: one forward pass, then the K backward passes vectorised
      (``jax.vmap`` over the VJP, as ``jax.jacrev`` does). Peak memory holds the
      forward residuals once plus the backward intermediates of all K tasks.
    * ``"sequential"``: one forward pass, then the K backward passes (VJPs with
      the cotangents :math:`e_1, \dots, e_K`) one after the other: the K
      gradients cost exactly one forward plus K backward passes. For
      :math:`K \le` ``unroll`` the K VJPs are straight-line code, ordered by
      ``jax.lax.optimization_barrier`` so that no backend runs two at once;
      beyond, they run ``unroll`` at a time inside a ``jax.lax.map``. Memory:
      inside the loop the temporaries beyond the stacked output stay at one
      backward pass; unrolled, XLA keeps about one activation-sized buffer per
      pass (about half of ``"jacrev"``'s growth with K; measured in
      ``tests/test_jacobian.py``). Speed: XLA:CPU runs convolution weight
      gradients ~50x slower inside a loop, so on CPU keep ``unroll >= K``;
      the default unrolls up to 32 tasks (compile time grows with the count).
    * ``"vmap"``: K forward and K backward passes, vectorised over tasks
      (``jax.vmap`` of ``jax.value_and_grad`` of one task's loss). Pays K
      forwards; useful when a per-task forward is much cheaper than the full
      one (e.g. XLA prunes the other tasks' heads).

    ``aux``: with ``has_aux=True`` it is the ``aux`` of the one forward pass in
    ``"auto"``, ``"jacrev"`` and ``"sequential"`` modes, and task 0's forward
    pass in ``"vmap"`` mode (every task's forward computes the same ``aux``).

    The differentiated arguments must hold floating-point (or complex) arrays
    only, as ``jax.value_and_grad`` requires: an integer, boolean or PRNG-key leaf
    raises ``TypeError`` naming it. A Flax NNX module is refused too (its batch
    statistics and RNG counters would be "differentiated" and never updated): use
    :func:`samgs_optax.nnx.value_and_jacrev`, or split the module and
    differentiate its ``nnx.Param`` state.

    Inside ``jax.shard_map`` (default ``check_vma=True``) every mode behaves like
    ``jax.grad`` there: the gradients of parameters replicated over a mesh axis
    that the losses vary over come out summed over that axis.

    Args:
      fun: function of ``*args`` returning the K losses (and aux).
      argnums: which positional argument to differentiate: an int, or a tuple of
        ints for a tuple of gradient trees.
      has_aux: whether ``fun`` returns ``(losses, aux)``.
      mode: ``"auto"``, ``"jacrev"``, ``"sequential"`` or ``"vmap"``.
      unroll: in ``"sequential"`` mode (and ``"auto"`` on CPU), the number of
        backward passes written out as straight-line code: all K when
        ``K <= unroll``, else chunks of ``unroll`` inside a ``jax.lax.map``
        (compile time grows with the unrolled count). Default 32.

    Returns:
      A function of the same arguments as ``fun``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
    positions = _check_argnums(argnums)
    many = not isinstance(argnums, int)
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive int, got {unroll!r}.")

    def wrapped(*args):
        for i in positions:
            if i >= len(args):
                raise TypeError(
                    f"argnums={argnums!r} but the function was called with {len(args)} "
                    "positional arguments."
                )
            _check_differentiable(args[i], i)

        def fun_of_x(x):
            new_args = list(args)
            for i, xi in zip(positions, x if many else (x,), strict=True):
                new_args[i] = xi
            out = fun(*new_args)
            losses, aux = out if has_aux else (out, None)
            losses = jnp.asarray(losses)
            if losses.ndim != 1:
                raise ValueError(
                    f"fun must return a vector of task losses of shape (K,), got shape "
                    f"{losses.shape}."
                )
            return losses, aux

        x = tuple(args[i] for i in positions) if many else args[argnums]
        if mode == "auto":
            per_platform = {
                platform: functools.partial(_one_forward, fun_of_x, mode=chosen, unroll=unroll)
                for platform, chosen in AUTO_MODE.items()
            }
            default = functools.partial(_one_forward, fun_of_x, mode="jacrev", unroll=unroll)
            losses, aux, grads = jax.lax.platform_dependent(x, default=default, **per_platform)
        elif mode == "vmap":
            losses, aux, grads = _k_forwards(fun_of_x, x)
        else:
            losses, aux, grads = _one_forward(fun_of_x, x, mode, unroll)
        return ((losses, aux) if has_aux else losses), grads

    return wrapped


def _check_argnums(argnums: Any) -> tuple[int, ...]:
    """The positions to differentiate; ``argnums`` itself stays an int or becomes a tuple."""
    many = isinstance(argnums, (tuple, list))
    positions = tuple(argnums) if many else (argnums,)
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in positions)
    if not ok or (many and len(set(positions)) != len(positions)) or not positions:
        raise TypeError(
            f"argnums must be a non-negative int or a tuple of distinct ones, got {argnums!r}."
        )
    return positions


def _check_differentiable(arg: PyTree, position: int) -> None:
    """Refuses what ``jax.value_and_grad`` refuses (non-inexact leaves), and NNX modules."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(arg, nnx.Module):
        raise TypeError(
            f"argument {position} is a Flax NNX module ({type(arg).__name__}). Use "
            "samgs_optax.nnx.value_and_jacrev(fn)(model): it differentiates the nnx.Param "
            "state only and carries the other state (BatchNorm statistics, RNG counters) "
            "forward; or split the module with nnx.split(model, nnx.Param, ...) and "
            "differentiate the Param state."
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
        dtype = getattr(leaf, "dtype", None)
        dtype = jnp.result_type(leaf) if dtype is None else dtype  # Python scalars
        if not jnp.issubdtype(dtype, jnp.inexact):
            name = jax.tree_util.keystr(path) or "<root>"
            hint = (
                " It looks like Flax NNX state (RNG counts or keys): use "
                "samgs_optax.nnx.value_and_jacrev, which differentiates nnx.Param only."
                if any("rng" in str(k).lower() or "count" in str(k).lower() for k in path)
                else ""
            )
            raise TypeError(
                f"value_and_jacrev requires real- or complex-valued inputs (like "
                f"jax.value_and_grad), but argument {position} leaf {name} has dtype "
                f"{dtype}.{hint}"
            )


def _k_forwards(fun_of_x: Callable, x: PyTree) -> tuple[jax.Array, Any, PyTree]:
    """K forward and backward passes, vectorised over tasks (``mode="vmap"``)."""
    num_tasks = jax.eval_shape(fun_of_x, x)[0].shape[0]

    def task_value_and_grad(k):
        def task_loss(p):
            losses, aux = fun_of_x(p)
            return losses[k], aux

        return jax.value_and_grad(task_loss, has_aux=True)(x)

    (losses, aux), grads = jax.vmap(task_value_and_grad)(jnp.arange(num_tasks))
    aux = jax.tree.map(lambda a: a[0], aux)  # identical across tasks
    return losses, aux, grads


def _one_forward(
    fun_of_x: Callable, x: PyTree, mode: str, unroll: int
) -> tuple[jax.Array, Any, PyTree]:
    """One forward pass, then the K VJPs with cotangents e_1..e_K, batched or in sequence."""
    losses, vjp_fn, aux = jax.vjp(fun_of_x, x, has_aux=True)
    basis = _varying_like(jnp.eye(losses.shape[0], dtype=losses.dtype), losses)
    if mode == "jacrev":
        (grads,) = jax.vmap(vjp_fn)(basis)
    else:
        grads = _sequential_vjps(lambda e: vjp_fn(e)[0], basis, unroll)
    return losses, aux, grads


def _sequential_vjps(vjp: Callable[[jax.Array], PyTree], basis: jax.Array, unroll: int) -> PyTree:
    """``vjp(basis[k])`` for k = 0..K-1 one after the other, stacked along a new axis 0.

    Chunks of ``unroll`` VJPs are straight-line code; more than ``unroll`` run as
    a ``lax.map`` over full chunks, the remainder after it.
    """
    num = basis.shape[0]
    if num <= unroll:
        return _stack(_in_order(vjp, list(basis)))
    full = num // unroll
    chunks = basis[: full * unroll].reshape(full, unroll, *basis.shape[1:])
    mapped = jax.lax.map(lambda c: _stack(_in_order(vjp, list(c))), chunks)
    mapped = jax.tree.map(lambda a: a.reshape(full * unroll, *a.shape[2:]), mapped)
    if full * unroll == num:
        return mapped
    rest = _stack(_in_order(vjp, list(basis[full * unroll :])))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), mapped, rest)


def _in_order(vjp: Callable[[jax.Array], PyTree], cotangents: list[jax.Array]) -> list[PyTree]:
    """Applies ``vjp`` to each cotangent, each call starting after the previous one ended.

    An optimization barrier over (result k, cotangent k+1) makes cotangent k+1
    available only once result k exists, so no scheduler can run two backward
    passes at once. Only the cotangent is taken from the barrier: result k keeps
    its own type (inside ``shard_map`` the barrier's outputs would all become
    varying over the axes the cotangent varies over).
    """
    results = [vjp(cotangents[0])]
    for cot in cotangents[1:]:
        _, cot = jax.lax.optimization_barrier((results[-1], cot))
        results.append(vjp(cot))
    return results


def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _varying_like(cotangent: jax.Array, primal_out: jax.Array) -> jax.Array:
    """Marks ``cotangent`` as varying over the manual mesh axes ``primal_out`` varies over.

    Inside ``jax.shard_map`` (with its default ``check_vma=True``) the losses of a
    sharded batch vary over the data axis, and a VJP requires a cotangent of the
    same type. As with ``jax.grad`` there, the gradients of replicated parameters
    then come out summed over that axis. Outside ``shard_map`` this is a no-op.
    """
    aval = jax.typeof(primal_out)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier: aval.vma
    axes = tuple(sorted(manual.varying if manual is not None else getattr(aval, "vma", ())))
    return jax.lax.pcast(cotangent, axes, to="varying") if axes else cotangent
