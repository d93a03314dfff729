"""The per-task losses that loss-aware aggregators take as an extra ``update`` argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_task_losses(method: str, task_losses: Any, num_tasks: int, dtype: Any) -> jax.Array:
    """``task_losses`` as a (K,) array of ``dtype``, or a clear error.

    Raises:
      TypeError: when the losses were not passed (``None``), showing the call.
      ValueError: when their shape is not ``(num_tasks,)``.
    """
    if task_losses is None:
        raise TypeError(
            f"{method} needs the per-task losses: "
            "tx.update(grads, state, params, task_losses=losses), with losses a "
            f"({num_tasks},) array of the losses whose gradients are grads."
        )
    shape = tuple(np.shape(task_losses))
    if shape != (num_tasks,):
        raise ValueError(
            f"{method}: task_losses has shape {shape}; expected ({num_tasks},), one loss "
            f"per task (num_tasks={num_tasks})."
        )
    losses = jnp.asarray(task_losses)
    if not jnp.issubdtype(losses.dtype, jnp.floating) and not jnp.issubdtype(
        losses.dtype, jnp.integer
    ):
        raise TypeError(f"{method}: task_losses must be real numbers, got dtype {losses.dtype}.")
    return losses.astype(dtype)
