"""GradDrop (Chen et al. 2020): gradient sign dropout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split

PyTree = Any


def graddrop_leaf(
    g: jax.Array,
    uniform: jax.Array,
    leak: jax.Array | None = None,
    purity_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    r"""GradDrop on one stacked leaf ``g`` (K, ...) with uniform draws ``uniform`` (...).

    Per coordinate, the positive sign purity
    :math:`P = \tfrac12 (1 + \sum_k g_k / \sum_k |g_k|)`, passed through
    ``purity_fn`` :math:`f` (identity by default); task k's value is kept
    when it is positive and :math:`f(P) > U`, or negative and :math:`f(P) < U`
    (:math:`U \sim \mathcal U[0, 1)` shared by the tasks), and the kept values
    are summed: :math:`\sum_k (\ell_k + (1 - \ell_k) M_k)\, g_k` with leak
    :math:`\ell` (default 0). A coordinate where every task is 0 gives 0.
    """
    total = jnp.sum(g, axis=0)
    magnitude = jnp.sum(jnp.abs(g), axis=0)
    purity = 0.5 * (1 + total / jnp.where(magnitude > 0, magnitude, 1))
    if purity_fn is not None:
        purity = purity_fn(purity)
    keep = ((purity > uniform) & (g > 0)) | ((purity < uniform) & (g < 0))
    factor = keep.astype(g.dtype)
    if leak is not None:
        leak = jnp.asarray(leak, g.dtype).reshape((-1,) + (1,) * (g.ndim - 1))
        factor = leak + (1 - leak) * factor
    return jnp.sum(factor * g, axis=0)


class GradDropState(NamedTuple):
    """State of :func:`graddrop`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      key: PRNG key for the next step's uniform draws.
    """

    shared: PyTree
    key: chex.PRNGKey


def graddrop(
    num_tasks: int,
    *,
    leak: Sequence[float] | None = None,
    purity_fn: Callable[[jax.Array], jax.Array] | None = None,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""GradDrop: keeps, coordinate by coordinate, only the gradients of one sign, drawn at random.

    The sign is positive with probability equal to the positive sign purity
    :math:`P` of that coordinate (:func:`graddrop_leaf`). Elementwise, so it
    works leaf by leaf and needs no Gramian. Same semantics as TorchJD's
    ``GradDrop(f, leak)`` (uniform draws from a JAX key instead of
    ``torch.rand``). Like TorchJD it is applied to the parameter
    gradients; the paper applies it to gradients of a shared activation.

    Args:
      num_tasks: K >= 2.
      leak: optional K values in [0, 1]: how much of each task passes regardless (default none).
      purity_fn: optional monotonically increasing function applied elementwise to the
        purity P before it is compared with the uniform draws (TorchJD's ``f``); a
        jittable function of an array, e.g. ``jnp.square``. Default: identity.
      seed: seed of the PRNG key kept in the state (ignored if ``key`` is given).
      key: a ``jax.random`` key to start from.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, *Just Pick a Sign:
      Optimizing Deep Multitask Models with Gradient Sign Dropout*, NeurIPS 2020,
      https://arxiv.org/abs/2010.06808
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if leak is not None:
        leak = tuple(float(x) for x in leak)
        if len(leak) != num_tasks:
            raise ValueError(f"leak must have num_tasks={num_tasks} values, got {len(leak)}.")
        for x in leak:
            _validation.check_interval("leak", x, 0.0, 1.0, closed_high=True)
    if purity_fn is not None and not callable(purity_fn):
        raise TypeError(f"purity_fn must be callable or None, got {purity_fn!r}.")
    start = _validation.initial_key(seed, key)

    def init_fn(params: PyTree) -> GradDropState:
        return GradDropState(shared=resolve_layout(mask, params), key=start)

    def update_fn(updates: PyTree, state: GradDropState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        next_key, draw = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(shared)
        keys = jax.random.split(draw, max(len(leaves), 1))
        out = [
            graddrop_leaf(g, _uniform(kk, g), leak, purity_fn)
            for g, kk in zip(leaves, keys, strict=False)
        ]
        out = merge(jax.tree.unflatten(treedef, out), heads)
        return out, GradDropState(shared=state.shared, key=next_key)

    return optax.GradientTransformation(init_fn, update_fn)


def _uniform(key: chex.PRNGKey, g: jax.Array) -> jax.Array:
    """U[0, 1) draws shaped like one task's leaf, drawn in float32, in g's dtype."""
    return jax.random.uniform(key, g.shape[1:], jnp.float32).astype(g.dtype)
