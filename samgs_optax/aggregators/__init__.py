"""Baseline multi-task gradient aggregators, one module per method.

Every factory is called as ``NAME(num_tasks, **options)`` and returns an
``optax.GradientTransformation`` that consumes stacked per-task gradients (a
leading task axis of length K on every leaf) and returns one update shaped
like the parameters. :data:`AGGREGATORS` maps each method's name (and
``"samgs"``) to its factory, so that examples can loop over methods::

    for name, make in samgs_optax.AGGREGATORS.items():
        tx = optax.chain(make(num_tasks), optax.adam(1e-3))
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from samgs_optax.aggregators.linear_scalarization import linear_scalarization
from samgs_optax.samgs import samgs

AGGREGATORS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "samgs": samgs,
    "linear_scalarization": linear_scalarization,
}
"""Name -> factory ``f(num_tasks, **options) -> optax.GradientTransformation``."""

__all__ = ["AGGREGATORS", "linear_scalarization"]
