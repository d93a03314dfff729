"""Gradient accumulation that can wrap transforms which consume stacked per-task gradients."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax.aggregators._losses import check_task_losses

PyTree = Any
Schedule = int | Callable[[chex.Array], chex.Numeric]


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps` (the fields of ``optax.MultiStepsState``, less ``skip_state``).

    Attributes:
      mini_step: micro-batches accumulated since the last inner step (int32).
      gradient_step: inner steps taken so far (int32).
      acc_grads: the sum of the stacked per-task gradients of the current
        micro-batches: the params' tree with a leading task axis of length K.
      inner_state: the wrapped transform's state.
      acc_losses: the sum of the per-task losses (``task_losses=``) of the
        current micro-batches, shape (K,); zeros when none are passed.
    """

    mini_step: chex.Array
    gradient_step: chex.Array
    acc_grads: PyTree
    inner_state: Any
    acc_losses: chex.Array


def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: Schedule,
    num_tasks: int,
    *,
    use_grad_mean: bool = True,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates stacked per-task gradients over micro-batches, then steps ``inner`` once.

    The equivalent of ``optax.MultiSteps`` for a transform whose input is
    stacked per-task gradients (every leaf has a leading task axis of length
    K, as :func:`samgs_optax.value_and_jacrev` returns them) and whose output
    is shaped like the params, e.g. a whole
    ``optax.chain(samgs_optax.samgs(K), ..., optax.adam(lr))``.
    ``optax.MultiSteps`` cannot wrap it: it builds its accumulator from the
    params and calls ``inner`` with params-shaped zeros.

    With :math:`k` = ``every_k_schedule(gradient_step)`` and :math:`g^{(j)}`
    the stacked gradients of micro-batch :math:`j`, the first :math:`k-1`
    micro-steps only accumulate :math:`a \leftarrow a + g^{(j)}` and return
    zeros shaped like ``inner``'s output, leaving ``inner``'s state unchanged;
    the :math:`k`-th calls ``inner`` once on

    .. math::

      \bar g = \frac{1}{k} \sum_{j=1}^{k} g^{(j)}
      \quad(\textstyle\sum_j g^{(j)} \text{ if not use\_grad\_mean}),

    returns its update and resets :math:`a` to zero. When each task loss is a
    mean over its batch, :math:`\bar g` is task by task the gradient on the
    :math:`k` micro-batches joined, so SAM-GS sees the per-task norms and the
    similarity of the large batch and takes the same step.

    The per-task losses that the loss-aware aggregators take
    (``task_losses=``, see ``AggregatorSpec.needs_losses``) are accumulated the
    same way: ``inner`` receives their mean over the :math:`k` micro-batches (their
    sum if not ``use_grad_mean``), the losses of the joined batch, so GradNorm,
    MoCo and DB-MTL take the large batch's step too. Other extra arguments are
    passed on as they come with the :math:`k`-th micro-batch.

    The two cases are selected with ``lax.cond``, not computed both and
    selected with ``jnp.where`` (as :func:`samgs_optax.apply_if_finite` does):
    ``inner`` (the surgery reading all K moments, a Gramian solver, the
    optimizer) then runs only on the :math:`k`-th micro-step and its state is
    passed through, not copied through a select, on the others. Under
    ``jax.vmap`` the cond becomes a select and both run. Nothing goes back to
    Python (XLA:GPU may itself read the one-byte predicate to pick the branch).
    Meant for ``jit``: called eagerly, each call compiles the two branches.
    The accumulator holds K times the params (as SAM-GS's moments do).

    ``should_skip_update_fn`` is not supported: to skip micro-batches with a
    NaN or an infinity, wrap this transform in
    :func:`samgs_optax.apply_if_finite`, which leaves the accumulator and the
    counters unchanged on a bad micro-step (as if it had not come).

    Args:
      inner: the transform to step every k micro-batches (typically a whole
        ``optax.chain`` that starts with an aggregator).
      every_k_schedule: k, a Python int >= 1, or a function of
        ``gradient_step`` (the number of inner steps taken) returning it, so
        that the effective batch size may change during training.
      num_tasks: K >= 2, the length of the leading task axis of every
        gradient leaf (``init`` only sees the params, so it cannot infer K).
      use_grad_mean: average the k micro-batch gradients (default, as
        ``optax.MultiSteps``) rather than summing them.
      accumulator_dtype: dtype of the accumulator; by default each param's
        dtype promoted to at least float32 (``optax.MultiSteps``: float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`MultiStepsState`; extra arguments are passed on to ``inner``.
      :func:`has_updated` tells whether the last call stepped ``inner``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    every_k = _check_schedule(every_k_schedule)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> MultiStepsState:
        def zeros(p):
            # zeros_like keeps p's sharding; the broadcast adds the task axis (as samgs's m).
            p = jnp.asarray(p)
            dtype = accumulator_dtype or jnp.promote_types(p.dtype, jnp.float32)
            return jnp.broadcast_to(jnp.zeros_like(p, dtype=dtype)[None], (num_tasks, *p.shape))

        loss_dtype = accumulator_dtype or jnp.promote_types(
            _validation.scalar_dtype(params), jnp.float32
        )
        return MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=jnp.zeros([], jnp.int32),
            acc_grads=jax.tree.map(zeros, params),
            inner_state=inner.init(params),
            acc_losses=jnp.zeros([num_tasks], loss_dtype),
        )

    def update_fn(updates: PyTree, state: MultiStepsState, params: PyTree = None, **extra_args):
        _validation.check_same_structure(updates, state.acc_grads)
        _validation.check_stacked(updates, num_tasks)
        k = jnp.asarray(every_k(state.gradient_step), jnp.int32)
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.acc_grads, updates)
        emit = state.mini_step + 1 >= k
        losses = extra_args.pop("task_losses", None)
        acc_losses = state.acc_losses
        if losses is not None:  # static: the keyword is given or not
            losses = jnp.asarray(losses)
            losses = check_task_losses("multi_steps", losses, num_tasks, losses.dtype)
            acc_losses = acc_losses + losses.astype(acc_losses.dtype)
            reduce = (lambda a: a / k.astype(a.dtype)) if use_grad_mean else (lambda a: a)
            extra_args["task_losses"] = reduce(acc_losses).astype(losses.dtype)

        def inner_step():
            # The mean (or sum) in the incoming gradients' dtype, as optax.MultiSteps does.
            grads = jax.tree.map(
                lambda a, g: (a / k.astype(a.dtype) if use_grad_mean else a).astype(g.dtype),
                acc,
                updates,
            )
            out, new_inner = inner.update(grads, state.inner_state, params, **extra_args)
            return out, jax.tree.map(_cast_like, new_inner, state.inner_state)

        def wait():
            out_shape = jax.eval_shape(inner_step)[0]
            return jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out_shape), state.inner_state

        out, inner_state = jax.lax.cond(emit, inner_step, wait)
        return out, MultiStepsState(
            mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
            gradient_step=jnp.where(
                emit, optax.safe_increment(state.gradient_step), state.gradient_step
            ),
            acc_grads=jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc),
            inner_state=inner_state,
            acc_losses=jnp.where(emit, jnp.zeros_like(acc_losses), acc_losses),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def has_updated(state: MultiStepsState) -> chex.Array:
    """True when the last :func:`multi_steps` update stepped the inner transform.

    As ``optax.MultiSteps.has_updated``: ``mini_step == 0`` after at least one
    inner step. Use it to log or evaluate only on real optimizer steps.
    """
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)


def _cast_like(new: Any, old: Any) -> Any:
    """``new`` in ``old``'s dtype (both cond branches must agree), PRNG keys untouched."""
    dtype = getattr(old, "dtype", None)
    if dtype is None or getattr(new, "dtype", None) == dtype:
        return new
    return jnp.asarray(new).astype(dtype)


def _check_schedule(every_k_schedule: Schedule) -> Callable[[chex.Array], chex.Numeric]:
    """Returns the schedule as a function of the gradient step; checks an int."""
    if callable(every_k_schedule):
        return every_k_schedule
    if isinstance(every_k_schedule, bool) or not isinstance(every_k_schedule, numbers.Integral):
        raise TypeError(
            "every_k_schedule must be a Python int or a function of the gradient step, "
            f"got {type(every_k_schedule).__name__} {every_k_schedule!r}."
        )
    if every_k_schedule < 1:
        raise ValueError(f"every_k_schedule must be >= 1, got {every_k_schedule}.")
    k = int(every_k_schedule)
    return lambda step: k
