"""A finite-gradient guard that can wrap transforms which change the update shape."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a bool scalar; integer leaves,
    e.g. step counts in an optimizer state, are skipped)."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.ones([], bool)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite` (same fields as optax's).

    Attributes:
      notfinite_count: consecutive steps with a non-finite gradient.
      last_finite: whether the last step's gradient was finite.
      total_notfinite: total steps with a non-finite gradient.
      inner_state: the wrapped transform's state.
    """

    notfinite_count: chex.Array
    last_finite: chex.Array
    total_notfinite: chex.Array
    inner_state: Any


def apply_if_finite(
    inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose incoming gradient has a NaN or an infinity.

    On such a step every state inside ``inner`` is left unchanged and the
    update is zeros shaped like ``inner``'s output (so like the params when
    ``inner`` starts with :func:`samgs_optax.samgs`), unlike
    ``optax.apply_if_finite``, which returns zeros shaped like its input and so
    cannot wrap a transform that consumes stacked per-task gradients. As in
    optax, after ``max_consecutive_errors`` consecutive bad steps the next bad
    update is applied anyway, so that a run that is truly broken shows it.

    The inner update is always computed and then selected with ``jnp.where``;
    there is no host round-trip and no ``lax.cond``.

    Args:
      inner: the transform to guard (typically a whole ``optax.chain``).
      max_consecutive_errors: bad steps in a row that are skipped.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state: ApplyIfFiniteState, params=None, **extra_args):
        finite = tree_all_finite(updates)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        notfinite_count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
        accept = finite | (notfinite_count > max_consecutive_errors)
        out = jax.tree.map(lambda u: jnp.where(accept, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(accept, new, old), new_inner, state.inner_state
        )
        return out, ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=jnp.where(
                finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
            ),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
