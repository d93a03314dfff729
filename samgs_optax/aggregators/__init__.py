"""Baseline multi-task gradient aggregators, one module per method.

Every factory is called as ``NAME(num_tasks, **options)`` and returns an
``optax.GradientTransformation`` that consumes stacked per-task gradients (a
leading task axis of length K on every leaf) and returns one update shaped
like the parameters. :data:`AGGREGATORS` maps each method's name (and
``"samgs"``) to its factory, so that examples can loop over methods::

    for name, make in samgs_optax.AGGREGATORS.items():
        tx = optax.chain(make(num_tasks), optax.adam(1e-3))

Every factory accepts ``mask=`` (shared leaves; task-specific leaves get the
plain sum over tasks). The Gramian-based ones also expose their weighting as a
pure function ``NAME_weights(G, ...)`` of the K x K Gramian.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from samgs_optax.aggregators.aligned_mtl import aligned_mtl, aligned_mtl_weights
from samgs_optax.aggregators.cagrad import cagrad, cagrad_weights
from samgs_optax.aggregators.dualproj import dualproj, dualproj_weights
from samgs_optax.aggregators.graddrop import GradDropState, graddrop, graddrop_leaf
from samgs_optax.aggregators.imtl_g import imtl_g, imtl_g_weights
from samgs_optax.aggregators.linear_scalarization import linear_scalarization
from samgs_optax.aggregators.mgda import mgda, mgda_weights
from samgs_optax.aggregators.nash_mtl import NashMTLState, nash_mtl, nash_mtl_weights
from samgs_optax.aggregators.pcgrad import PCGradState, pcgrad, pcgrad_weights
from samgs_optax.aggregators.upgrad import upgrad, upgrad_weights
from samgs_optax.samgs import samgs

AGGREGATORS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "samgs": samgs,
    "linear_scalarization": linear_scalarization,
    "pcgrad": pcgrad,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "aligned_mtl": aligned_mtl,
    "nash_mtl": nash_mtl,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "graddrop": graddrop,
}
"""Name -> factory ``f(num_tasks, **options) -> optax.GradientTransformation``."""

__all__ = [
    "AGGREGATORS",
    "GradDropState",
    "NashMTLState",
    "PCGradState",
    "aligned_mtl",
    "aligned_mtl_weights",
    "cagrad",
    "cagrad_weights",
    "dualproj",
    "dualproj_weights",
    "graddrop",
    "graddrop_leaf",
    "imtl_g",
    "imtl_g_weights",
    "linear_scalarization",
    "mgda",
    "mgda_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "upgrad",
    "upgrad_weights",
]
