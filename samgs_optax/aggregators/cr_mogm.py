"""CR-MOGM (Zhou et al. 2022): a moving average of any Gramian weighting's task weights."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.aggregators.aligned_mtl import aligned_mtl_weights
from samgs_optax.aggregators.cagrad import cagrad_weights
from samgs_optax.aggregators.dualproj import dualproj_weights
from samgs_optax.aggregators.imtl_g import imtl_g_weights
from samgs_optax.aggregators.mgda import mgda_weights
from samgs_optax.aggregators.upgrad import upgrad_weights
from samgs_optax.gramian import combine, scaled_gramian

PyTree = Any

WEIGHTINGS: dict[str, Callable[..., jax.Array]] = {
    "upgrad": upgrad_weights,
    "dualproj": dualproj_weights,
    "mgda": mgda_weights,
    "imtl_g": imtl_g_weights,
    "aligned_mtl": aligned_mtl_weights,
    "cagrad": cagrad_weights,
}
"""The Gramian weightings :func:`cr_mogm` accepts by name."""


class CRMOGMState(NamedTuple):
    """State of :func:`cr_mogm`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      count: number of steps taken (int32); at 0 the average starts.
      weights: the smoothed weights :math:`\\lambda_k` of the last step (applied), shape (K,).
      raw_weights: the wrapped weighting's own :math:`\\hat\\lambda_k` at the last step
        (diagnostic).
    """

    shared: PyTree
    count: chex.Array
    weights: chex.Array
    raw_weights: chex.Array


def _resolve(weighting: str | Callable[..., jax.Array], options: dict[str, Any]):
    """``(fn(G, t) -> weights)`` for a name or a callable, with ``options`` bound."""
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}; by name: {', '.join(WEIGHTINGS)} "
                "(or pass a function G -> weights)."
            )
        fn = WEIGHTINGS[weighting]
    elif callable(weighting):
        fn = weighting
    else:
        raise TypeError(f"weighting must be a name or a callable, got {type(weighting).__name__}.")
    try:
        takes_scale = "log2_scale" in inspect.signature(fn).parameters
        inspect.signature(fn).bind(None, **options)
    except (TypeError, ValueError) as err:
        if isinstance(err, TypeError):
            raise TypeError(f"options {sorted(options)} do not fit the weighting: {err}") from err
        takes_scale = False
    bound = functools.partial(fn, **options)
    if takes_scale:
        return lambda g, t: bound(g, log2_scale=t)
    return lambda g, t: bound(g)


def cr_mogm(
    num_tasks: int,
    *,
    weighting: str | Callable[..., jax.Array] = "upgrad",
    alpha: float = 0.9,
    initial_weights: chex.Array | None = None,
    mask: Mask = None,
    **weighting_options: Any,
) -> optax.GradientTransformation:
    r"""CR-MOGM: smooths the task weights of a Gramian weighting with a moving average.

    With :math:`\hat\lambda_k` the weights the wrapped ``weighting`` gives at
    step k, the update is :math:`J^\top \lambda_k` with

    .. math::

        \lambda_k = \alpha\, \lambda_{k-1} + (1 - \alpha)\, \hat\lambda_k,

    :math:`\lambda_0` = ``initial_weights`` if given, else :math:`\hat\lambda_1`
    (so that the first step is the wrapped method's own). Equal to TorchJD's
    ``GramianWeightedAggregator(CRMOGMWeighting(weighting, alpha, initial_weights))``.

    Args:
      num_tasks: K >= 2.
      weighting: one of ``"upgrad"`` (default), ``"dualproj"``, ``"mgda"``,
        ``"imtl_g"``, ``"aligned_mtl"``, ``"cagrad"`` (the library's
        ``NAME_weights``), or any jittable function ``f(G, **options) -> w``
        from the (K, K) Gramian to K weights. A function with a ``log2_scale``
        keyword is given the exponent of
        :func:`~samgs_optax.gramian.scaled_gramian` (see
        :func:`~samgs_optax.gramian.gramian_weighting`); others must be
        invariant to the scale of :math:`G`.
      alpha: weight of the previous weights, in [0, 1] (default 0.9; 0: the
        wrapped method itself, 1: frozen at :math:`\lambda_0`). May be injected
        with ``optax.inject_hyperparams`` (the paper lets it grow towards 1 as
        the learning rate decays).
      initial_weights: optional (K,) :math:`\lambda_0`.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.
      **weighting_options: passed to the weighting (e.g. ``c=0.4`` for ``"cagrad"``).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`CRMOGMState`.

    References:
      Zhou, Zhang, Jiang, Wu, Yao, Kwok, *On the Convergence of Stochastic
      Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022;
      TorchJD's ``CRMOGMWeighting``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("alpha", alpha, 0.0, 1.0, closed_high=True)
    # optax.inject_hyperparams re-calls the factory with the catch-all as one keyword.
    nested = weighting_options.pop("weighting_options", None)
    if isinstance(nested, dict):
        weighting_options = {**nested, **weighting_options}
    weigh = _resolve(weighting, weighting_options)
    if initial_weights is not None and np.shape(initial_weights) != (num_tasks,):
        raise ValueError(
            f"initial_weights has shape {np.shape(initial_weights)}, expected ({num_tasks},)."
        )

    def init_fn(params: PyTree) -> CRMOGMState:
        scalar = _validation.scalar_dtype(params)
        return CRMOGMState(
            shared=resolve_layout(mask, params),
            count=jnp.zeros([], jnp.int32),
            weights=jnp.zeros([num_tasks], scalar),
            raw_weights=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(updates: PyTree, state: CRMOGMState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.weights.dtype
        g_hat, log2_scale = scaled_gramian(shared, scalar)
        raw = weigh(g_hat, log2_scale).astype(scalar)
        first = raw if initial_weights is None else jnp.asarray(initial_weights, scalar)
        prev = jnp.where(state.count == 0, first, state.weights)
        weights = (alpha * prev + (1 - alpha) * raw).astype(scalar)
        out = merge(combine(shared, weights), heads)
        new_state = CRMOGMState(
            shared=state.shared,
            count=optax.safe_increment(state.count),
            weights=weights,
            raw_weights=raw,
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
