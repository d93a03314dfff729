"""Flax NNX helpers: per-task gradients of a module, its other state carried forward.

Flax stays an optional dependency: this module imports ``flax.nnx`` only when one
of its functions is called.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from samgs_optax import jacobian

PyTree = Any


def value_and_jacrev(
    fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    *,
    has_aux: bool = False,
    mode: jacobian.Mode = "auto",
    unroll: int = jacobian.SEQUENTIAL_UNROLL,
    wrt: Any = None,
) -> Callable[..., tuple[Any, PyTree]]:
    r"""Like ``nnx.value_and_grad`` for a function of modules returning the K task losses.

    ``fn(*args)`` takes Flax NNX modules (and any other arguments) and returns the
    task losses, shape (K,) (or ``(losses, aux)`` with ``has_aux=True``). The
    returned function gives ``(losses, grads)`` (or ``((losses, aux), grads)``)
    where ``grads`` is the ``nnx.State`` of the ``wrt`` variables of
    ``args[argnums]`` with every leaf an extra leading axis of length K:
    ``grads[k]`` is :math:`\nabla_\theta \ell_k`. That is the input of
    ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)`` with an
    aggregator at the head of ``tx``. With a tuple ``argnums`` it is a tuple of
    such States.

    Only the ``wrt`` state (default ``nnx.Param``) is differentiated. Every other
    update ``fn`` makes to the modules' state (BatchNorm's running statistics,
    the RNG counters that Dropout advances, any other ``nnx.Variable``) is
    written back into the argument modules exactly as one call of ``fn`` makes
    it, however many tasks there are: in ``"auto"``, ``"jacrev"`` and
    ``"sequential"`` modes there is one forward pass; in ``"vmap"`` mode task 0's
    forward pass is kept (all K compute the same updates). So two calls draw two
    different dropout masks, and the batch statistics move once per step.

    Every argument that is an NNX graph node (a module) is split with
    ``nnx.split`` and rebuilt inside the differentiated function with
    ``nnx.merge``; modules that share variables should be passed as one
    argument (e.g. a container module). See
    :func:`samgs_optax.value_and_jacrev` for ``mode`` and ``unroll``.

    Example, inside ``nnx.jit``::

      @nnx.jit
      def train_step(model, optimizer, x, y):
          def task_losses(model):
              return jnp.stack([loss(model(x)[:, k], y[:, k]) for k in range(K)])

          losses, grads = samgs_optax.nnx.value_and_jacrev(task_losses)(model)
          optimizer.update(model, grads)
          return losses

    Args:
      fn: function of ``*args`` returning the K losses (and aux).
      argnums: position of the module to differentiate (an int), or a tuple.
      has_aux: whether ``fn`` returns ``(losses, aux)``.
      mode: as in :func:`samgs_optax.value_and_jacrev`.
      unroll: as in :func:`samgs_optax.value_and_jacrev`.
      wrt: an NNX filter of the variables to differentiate; ``nnx.Param`` if None.

    Returns:
      A function of the same arguments as ``fn``.
    """
    from flax import nnx

    wrt = nnx.Param if wrt is None else wrt
    positions = jacobian._check_argnums(argnums)
    many = not isinstance(argnums, int)
    merge = _merge_copying(nnx)

    def wrapped(*args):
        modules = [i for i, a in enumerate(args) if nnx.graph.is_graph_node(a)]
        for i in positions:
            if i >= len(args) or i not in modules:
                got = type(args[i]).__name__ if i < len(args) else "nothing"
                raise TypeError(
                    f"argnums={argnums!r}: argument {i} must be a Flax NNX module, got {got}. "
                    "For arrays or pytrees use samgs_optax.value_and_jacrev."
                )
        graphdefs, diffs, rests = {}, [], {}
        for i in modules:
            if i in positions:
                graphdefs[i], diff, rests[i] = nnx.split(args[i], wrt, ...)
                diffs.append(diff)
            else:
                graphdefs[i], rests[i] = nnx.split(args[i])

        def losses_of(diff_states, rest_states):
            new_args = list(args)
            by_position = dict(zip(positions, diff_states, strict=True))
            for i in modules:
                states = (by_position[i], rest_states[i]) if i in by_position else (rest_states[i],)
                new_args[i] = merge(graphdefs[i], *states)
            out = fn(*new_args)
            losses, aux = out if has_aux else (out, None)
            rest_filter = {i: nnx.Not(wrt) if i in by_position else ... for i in modules}
            new_rests = {i: nnx.state(new_args[i], rest_filter[i]) for i in modules}
            return losses, (aux, new_rests)

        (losses, (aux, new_rests)), grads = jacobian.value_and_jacrev(
            losses_of, has_aux=True, mode=mode, unroll=unroll
        )(tuple(diffs), rests)
        for i in modules:
            nnx.update(args[i], new_rests[i])
        grads = grads if many else grads[0]
        return ((losses, aux) if has_aux else losses), grads

    return wrapped


def _merge_copying(nnx: Any) -> Callable[..., Any]:
    """``nnx.merge`` into fresh Variables, so tracing never writes into the caller's state."""
    if "copy" in inspect.signature(nnx.merge).parameters:
        return lambda graphdef, *states: nnx.merge(graphdef, *states, copy=True)

    import jax

    return lambda graphdef, *states: nnx.merge(graphdef, *jax.tree.map(lambda x: x, states))
