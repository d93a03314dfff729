"""The authors' training recipe around any aggregator, as one optax transformation.

:func:`recipe` builds ``aggregator -> [scale(K)] -> [clip] -> Adam`` with the scale
and the clip restricted to the shared parameters, and the scaling decided by the
rule each registered method declares (:data:`samgs_optax.AGGREGATOR_SPECS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from samgs_optax import _validation
from samgs_optax._layout import is_masked, resolve_layout
from samgs_optax.aggregators import aggregator_spec
from samgs_optax.masks import Mask

PyTree = Any

Aggregator = str | Callable[..., optax.GradientTransformation] | optax.GradientTransformation
DEFAULT_LEARNING_RATE = 1e-3


def recipe(
    aggregator: Aggregator,
    num_tasks: int,
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    mask: Mask = None,
    max_norm: float | None = 1.0,
    scale_by_tasks: bool | None = None,
    optimizer: optax.GradientTransformation | None = None,
    **options: Any,
) -> optax.GradientTransformation:
    r"""The SAM-GS authors' training chain around ``aggregator``.

    With :math:`J` the stacked per-task gradients, :math:`S` the shared leaves
    (``mask``) and :math:`H` the task heads, one step computes

    .. math::

      u &= A(J) \qquad\text{(the aggregator; on } H \text{ the plain sum
           } \textstyle\sum_k g_k\text{)} \\
      u_S &\leftarrow c\, u_S \min\!\Big(1, \frac{\text{max\_norm}}{\|c\, u_S\|}\Big),
           \qquad c = K \text{ if the method scales, else } 1 \\
      \Delta &= \operatorname{Adam}(u) \quad(\text{or } \texttt{optimizer}),

    that is::

      optax.chain(
          aggregator,
          optax.masked(
              optax.chain(optax.scale(K), optax.clip_by_global_norm(max_norm)), shared
          ),
          optax.adam(learning_rate),
      )

    The scale and the clip (whose global norm is over the shared leaves only)
    never touch the heads: their update (their own task's gradient) goes from
    the aggregator straight to the optimizer, as in the authors' trainer, whose
    ``overwrite_grad`` multiplies only the shared gradient by K ("to match the
    sum loss") and whose ``clip_grad_norm_`` gets only the shared parameters.
    ``shared`` is ``mask`` resolved once, in ``init`` (:func:`on_shared`), so that
    NNX type filters keep working under ``nnx.Optimizer``. Without a mask (every
    leaf shared) the scale and the clip are chained unmasked.

    The rule (:data:`samgs_optax.AGGREGATOR_SPECS`, one declaration per method):
    for K copies of one gradient g, a method whose output is the size of g (a
    mean: MGDA, CAGrad, IMTL-G, Aligned-MTL, UPGrad, DualProj) is multiplied by
    K; one that already sums (linear scalarisation, PCGrad, GradDrop) or whose
    size does not follow g (Nash-MTL) is not; SAM-GS is, as its authors do.

    Args:
      aggregator: a registered name (``"upgrad"``), a registered factory
        (``samgs_optax.upgrad``), either built here as
        ``factory(num_tasks, mask=mask, **options)`` with its declared scaling;
        or an already built ``optax.GradientTransformation`` (any factory's
        output, yours included), which needs ``scale_by_tasks``. An unregistered
        factory also needs ``scale_by_tasks``.
      num_tasks: K, the length of the gradients' leading task axis.
      learning_rate: Adam's learning rate or schedule (default: 1e-3). Not with
        ``optimizer``.
      mask: the shared leaves, in any form
        :func:`samgs_optax.masks.resolve_mask` accepts (a bool tree, a pure dict
        or ``nnx.State`` matched by path, a callable of params, a path predicate
        such as ``nnx.Not(nnx.PathContains("head"))``). ``None``: all shared.
        Passed to the factory, and it restricts the scale and the clip.
      max_norm: the clip's global norm; ``None`` drops the clip.
      scale_by_tasks: multiply the shared update by K or not, overriding the
        declared rule; required for a built transformation.
      optimizer: replaces ``optax.adam(learning_rate)`` as the last link.
      **options: the factory's options (``gamma=0.5``, ``c=0.4``, ``seed=1``).

    Returns:
      An ``optax.GradientTransformation`` taking stacked per-task gradients;
      its state's first entry is the aggregator's.

    Raises:
      ValueError: an unknown name (the message lists the registered ones), a
        non-positive ``max_norm``, or both ``learning_rate`` and ``optimizer``.
      TypeError: a built transformation (or an unregistered factory) without
        ``scale_by_tasks``, or options for an already built transformation.

    Reference:
      the authors' trainer and methods, https://github.com/ThomBors/samgs
      (``methods/weight_methods.py``: ``overwrite_grad`` and ``backward``).
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    built, scale = _build(aggregator, num_tasks, mask, scale_by_tasks, options)
    post = _shared_post(num_tasks, scale, max_norm)
    parts = [built]
    if post is not None:
        parts.append(post if mask is None else on_shared(post, mask))
    parts.append(_optimizer(learning_rate, optimizer))
    return optax.chain(*parts)


def _build(
    aggregator: Aggregator,
    num_tasks: int,
    mask: Mask,
    scale_by_tasks: bool | None,
    options: dict[str, Any],
) -> tuple[optax.GradientTransformation, bool]:
    """The aggregator transformation and whether the shared update is scaled by K."""
    if isinstance(aggregator, optax.GradientTransformation):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given for an already built aggregator; "
                "pass a registered name or factory to have it built with them."
            )
        if scale_by_tasks is None:
            raise TypeError(
                "recipe() cannot know whether an already built aggregator's output must be "
                "multiplied by K: pass scale_by_tasks=True (its output is the size of one "
                "task's gradient, e.g. a mean) or False (a sum, or normalised), or pass a "
                "registered name or factory, whose declared rule decides."
            )
        return aggregator, bool(scale_by_tasks)
    if not isinstance(aggregator, str) and not callable(aggregator):
        raise TypeError(
            f"aggregator must be a name, a factory or a transformation, got {aggregator!r}."
        )
    factory, declared = _declared(aggregator, scale_by_tasks, options)
    built = factory(num_tasks, mask=mask, **options)
    return built, declared if scale_by_tasks is None else bool(scale_by_tasks)


def _declared(
    aggregator: str | Callable[..., optax.GradientTransformation],
    scale_by_tasks: bool | None,
    options: dict[str, Any],
) -> tuple[Callable[..., optax.GradientTransformation], bool]:
    """The factory and its declared rule; an unregistered factory needs ``scale_by_tasks``."""
    if isinstance(aggregator, str):
        spec = aggregator_spec(aggregator)  # ValueError listing the registered names
        return spec.factory, spec.scales(**options)
    try:
        spec = aggregator_spec(aggregator)
    except ValueError:
        if scale_by_tasks is None:
            raise TypeError(
                f"{aggregator!r} is not a registered factory, so it declares no scaling "
                "rule: pass scale_by_tasks=True or False."
            ) from None
        return aggregator, bool(scale_by_tasks)
    return spec.factory, spec.scales(**options)


def _shared_post(
    num_tasks: int, scale: bool, max_norm: float | None
) -> optax.GradientTransformation | None:
    """``scale(K)`` and/or ``clip_by_global_norm(max_norm)``, or None when neither."""
    links = []
    if scale:
        links.append(optax.scale(float(num_tasks)))
    if max_norm is not None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm!r}.")
        links.append(optax.clip_by_global_norm(max_norm))
    return optax.chain(*links) if links else None


class SharedOnlyState(NamedTuple):
    """State of :func:`on_shared`: the shared/head layout, then the inner state."""

    layout: PyTree  # params' tree: a scalar True on shared leaves, MaskedNode() on heads
    inner: optax.OptState


def on_shared(inner: optax.GradientTransformation, mask: Mask) -> optax.GradientTransformation:
    """``optax.masked(inner, shared)`` with the shared leaves resolved once, in ``init``.

    ``mask`` takes every form :func:`samgs_optax.masks.resolve_mask` accepts. It is
    resolved against the params given to ``init`` and the split is kept in the
    state's structure (as the aggregators keep theirs), so ``update`` needs no
    params. A callable mask given to ``optax.masked`` would instead be called on
    the *updates* at every step: under ``nnx.Optimizer`` those are plain arrays,
    not the ``nnx.Variable`` leaves ``init`` sees, and a type filter such as
    ``nnx.All(nnx.Param, ...)`` would then select nothing.
    """

    def init_fn(params: PyTree) -> SharedOnlyState:
        layout = resolve_layout(mask, params)
        return SharedOnlyState(layout, optax.masked(inner, _flags(layout)).init(params))

    def update_fn(
        updates: PyTree, state: SharedOnlyState, params: PyTree | None = None
    ) -> tuple[PyTree, SharedOnlyState]:
        masked = optax.masked(inner, _flags(state.layout))
        updates, inner_state = masked.update(updates, state.inner, params)
        return updates, SharedOnlyState(state.layout, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _flags(layout: PyTree) -> PyTree:
    """The layout as a tree of Python bools (True: shared), fixed by its structure alone."""
    return jax.tree.map(lambda s: not is_masked(s), layout, is_leaf=is_masked)


def _optimizer(
    learning_rate: optax.ScalarOrSchedule | None, optimizer: optax.GradientTransformation | None
) -> optax.GradientTransformation:
    if optimizer is None:
        lr = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
        return optax.adam(lr)
    if learning_rate is not None:
        raise ValueError(
            "learning_rate and optimizer were both given; the optimizer carries its own "
            "learning rate (learning_rate only configures the default Adam)."
        )
    return optimizer


__all__ = ["SharedOnlyState", "on_shared", "recipe"]
