"""The scalarizer interface and the helpers every method shares."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp

from samgs_optax import _validation

State = Any
ScalarizeResult = tuple[jax.Array, tuple[jax.Array, State]]


class InitFn(Protocol):
    def __call__(self, losses: chex.ArrayLike | None = None) -> State: ...


class ScalarizeFn(Protocol):
    def __call__(self, losses: chex.Array, state: State, **extra: Any) -> ScalarizeResult: ...


class Scalarizer(NamedTuple):
    """A loss scalarizer: a pair of pure functions, as ``optax.GradientTransformation``.

    Attributes:
      init: ``init(losses=None) -> state``. ``losses`` is an example loss
        vector of shape (K,) (any values; only its dtype is used); without it
        the state takes JAX's default float dtype.
      scalarize: ``scalarize(losses, state, **extra) -> (total, (weights,
        new_state))``: the scalar to differentiate, the weights
        :math:`\\partial\\,\\text{total} / \\partial L` (detached) and the
        state for the next call.
    """

    init: InitFn
    scalarize: ScalarizeFn


def check_losses(losses: chex.Array, num_tasks: int) -> jax.Array:
    """``losses`` as an array of shape (K,) and floating dtype, else a clear error."""
    losses = jnp.asarray(losses)
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"losses must be floating, got dtype {losses.dtype}.")
    if losses.shape != (num_tasks,):
        raise ValueError(
            f"losses has shape {tuple(losses.shape)}; expected ({num_tasks},), one loss per "
            f"task (num_tasks={num_tasks})."
        )
    return losses


def state_dtype(losses: chex.ArrayLike | None, num_tasks: int) -> jnp.dtype:
    """The dtype of a state built by ``init(losses)``: the losses', else the default float."""
    if losses is None:
        return jnp.result_type(float)
    return check_losses(losses, num_tasks).dtype


def check_vector(name: str, value: chex.ArrayLike | None, num_tasks: int) -> jax.Array | None:
    """An optional per-task option (weights, reference point) as a (K,) array, or None."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.shape != (num_tasks,):
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}; expected ({num_tasks},) "
            f"(num_tasks={num_tasks})."
        )
    return value


def check_positive(name: str, value: Any, *, strict: bool = True) -> None:
    """Raises for a Python number that is negative (or zero when ``strict``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value < 0 or (strict and value == 0):
            bound = "strictly positive" if strict else "non-negative"
            raise ValueError(f"{name} must be {bound}, got {value}.")


def value_and_weights(
    total_fn: Callable[[jax.Array], jax.Array], losses: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``total_fn(losses)`` and its detached gradient with respect to ``losses``.

    The total keeps its dependence on the losses (and on anything ``total_fn``
    closes over, such as UW's log-variances), so an outer ``jax.grad`` sees it;
    the weights are for reading only.
    """
    total = total_fn(losses)
    weights = jax.grad(total_fn)(jax.lax.stop_gradient(losses))
    return total, jax.lax.stop_gradient(weights)


num_tasks_checked = _validation.check_num_tasks
