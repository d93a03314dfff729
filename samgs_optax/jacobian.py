"""Per-task gradients, stacked along a leading task axis, in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

PyTree = Any
Mode = Literal["jacrev", "vmap", "sequential"]


def value_and_jacrev(
    fun: Callable[..., Any],
    argnums: int = 0,
    *,
    has_aux: bool = False,
    mode: Mode = "jacrev",
) -> Callable[..., tuple[Any, PyTree]]:
    """Like ``jax.value_and_grad`` for a function returning the K task losses.

    ``fun(*args)`` must return a vector of shape (K,) (or ``(losses, aux)`` with
    ``has_aux=True``). The returned function gives ``(losses, grads)`` (or
    ``((losses, aux), grads)``) where ``grads`` has the structure of
    ``args[argnums]`` and every leaf an extra leading axis of length K:
    ``grads[k]`` is the gradient of ``losses[k]``. This is the input
    :func:`samgs_optax.samgs` and the other aggregators expect.

    Cost, for a model with D parameters and K tasks:

    * ``"jacrev"`` (default): one forward pass, then the K backward passes
      vectorised (``jax.vmap`` over the VJP, as ``jax.jacrev`` does). Fastest;
      peak memory holds the forward residuals once plus K gradients.
    * ``"sequential"``: one forward pass, then the K backward passes one after
      the other (``jax.lax.map`` over the VJP). Peak memory beyond the stacked
      output stays near one gradient; slowest on parallel hardware.
    * ``"vmap"``: K forward and K backward passes, vectorised over tasks
      (``jax.vmap`` of ``jax.value_and_grad`` of one task's loss). Pays K
      forwards; useful when a per-task forward is much cheaper than the full
      one (e.g. XLA prunes the other tasks' heads).

    Inside ``jax.shard_map`` (default ``check_vma=True``) every mode behaves like
    ``jax.grad`` there: the gradients of parameters replicated over a mesh axis
    that the losses vary over come out summed over that axis.

    Args:
      fun: function of ``*args`` returning the K losses (and aux).
      argnums: which positional argument to differentiate (an int).
      has_aux: whether ``fun`` returns ``(losses, aux)``.
      mode: ``"jacrev"``, ``"sequential"`` or ``"vmap"``.

    Returns:
      A function of the same arguments as ``fun``.
    """
    if mode not in ("jacrev", "vmap", "sequential"):
        raise ValueError(f"mode must be 'jacrev', 'vmap' or 'sequential', got {mode!r}.")
    if not isinstance(argnums, int):
        raise TypeError(f"argnums must be an int, got {argnums!r}.")

    def wrapped(*args):
        def fun_of_x(x):
            new_args = list(args)
            new_args[argnums] = x
            out = fun(*new_args)
            losses, aux = out if has_aux else (out, None)
            losses = jnp.asarray(losses)
            if losses.ndim != 1:
                raise ValueError(
                    f"fun must return a vector of task losses of shape (K,), got shape "
                    f"{losses.shape}."
                )
            return losses, aux

        x = args[argnums]
        if mode == "vmap":
            num_tasks = jax.eval_shape(fun_of_x, x)[0].shape[0]

            def task_value_and_grad(k):
                def task_loss(p):
                    losses, aux = fun_of_x(p)
                    return losses[k], aux

                return jax.value_and_grad(task_loss, has_aux=True)(x)

            (losses, aux), grads = jax.vmap(task_value_and_grad)(jnp.arange(num_tasks))
            aux = jax.tree.map(lambda a: a[0], aux)  # identical across tasks
        else:
            losses, vjp_fn, aux = jax.vjp(fun_of_x, x, has_aux=True)
            basis = _varying_like(jnp.eye(losses.shape[0], dtype=losses.dtype), losses)
            mapper = jax.vmap if mode == "jacrev" else _sequential_map
            (grads,) = mapper(vjp_fn)(basis)
        return ((losses, aux) if has_aux else losses), grads

    return wrapped


def _sequential_map(f: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    return lambda xs: jax.lax.map(f, xs)


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
