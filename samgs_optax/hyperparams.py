"""``optax.inject_hyperparams`` with the non-numeric arguments of our factories kept static."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import optax

ALWAYS_STATIC = ("num_tasks", "mask", "m_dtype")
"""Arguments never injected: the task count (a shape), the mask (a tree or a callable
of params, which ``optax.inject_hyperparams`` would take for a schedule) and a dtype
(``jnp.bfloat16`` is callable too)."""


def inject_hyperparams(
    inner_factory: Callable[..., optax.GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` that keeps ``num_tasks``, ``mask`` and ``m_dtype`` static.

    ``optax.inject_hyperparams`` takes every callable argument for a schedule of the
    step count, so a callable ``mask=`` (or ``m_dtype=jnp.bfloat16``) is called
    with the count and breaks, and an int ``num_tasks`` becomes an array. This
    wrapper adds whichever of :data:`ALWAYS_STATIC` the factory takes to
    ``static_args``; everything else behaves as in optax (numbers are injected,
    callables are schedules)::

      tx = samgs_optax.inject_hyperparams(samgs_optax.samgs)(
          num_tasks=2, mask=lambda p: {"encoder": True, "head": False},
          gamma=optax.linear_schedule(0.1, 0.9, 1000))
      tx.init(params).hyperparams["gamma"]   # the current gamma

    Args:
      inner_factory: e.g. :func:`samgs_optax.samgs` or any entry of ``AGGREGATORS``.
      static_args: further arguments to keep static, as in optax.
      hyperparam_dtype: as in optax.

    Returns:
      What ``optax.inject_hyperparams`` returns.
    """
    extra = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    takes = inspect.signature(inner_factory).parameters
    static = tuple(dict.fromkeys([*extra, *(n for n in ALWAYS_STATIC if n in takes)]))
    return optax.inject_hyperparams(
        inner_factory, static_args=static, hyperparam_dtype=hyperparam_dtype
    )
