"""Coordinate-wise trimmed mean (Yin et al. 2018): robust to a few Byzantine tasks."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split

PyTree = Any


def trimmed_mean_leaf(g: jax.Array, trim_number: int) -> jax.Array:
    r"""Trimmed mean over the task axis of one stacked leaf ``g`` (K, ...).

    Every coordinate's K values are sorted, the ``trim_number`` smallest and the
    ``trim_number`` largest are dropped and the :math:`K - 2t` others averaged.
    Computed in the leaf's dtype promoted to at least float32, returned in the
    leaf's dtype.
    """
    k = g.shape[0]
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    kept = jnp.sort(g.astype(dtype), axis=0)[trim_number : k - trim_number]
    return jnp.mean(kept, axis=0).astype(g.dtype)


class TrimmedMeanState(NamedTuple):
    """State of :func:`trimmed_mean`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
    """

    shared: PyTree


def check_trim_number(trim_number: Any, num_tasks: int) -> int:
    """``trim_number`` as an int with ``0 <= trim_number`` and ``2 trim_number + 1 <= K``."""
    if isinstance(trim_number, bool) or not isinstance(trim_number, numbers.Integral):
        raise TypeError(f"trim_number must be a Python int, got {trim_number!r}.")
    if trim_number < 0:
        raise ValueError(f"trim_number must be >= 0, got {trim_number}.")
    if 2 * trim_number + 1 > num_tasks:
        raise ValueError(
            f"trim_number={trim_number} leaves no task: it must satisfy 2 * trim_number + 1 <= "
            f"num_tasks (trim_number < num_tasks / 2), got num_tasks={num_tasks}; the largest "
            f"allowed is {(num_tasks - 1) // 2}."
        )
    return int(trim_number)


def trimmed_mean(
    num_tasks: int, *, trim_number: int | None = None, mask: Mask = None
) -> optax.GradientTransformation:
    r"""Coordinate-wise trimmed mean of the task gradients.

    For every coordinate (leaf by leaf, entry by entry) the K task values are
    sorted, the ``trim_number`` :math:`t` smallest and :math:`t` largest are
    dropped, and the remaining :math:`K - 2t` are averaged
    (:func:`trimmed_mean_leaf`). Equal to TorchJD's ``TrimmedMean(trim_number)``.

    What it is for: robustness to *Byzantine* tasks, i.e. up to :math:`t` task
    gradients that may be arbitrary (corrupted, adversarial or broken losses,
    huge outliers): whatever such tasks send, every coordinate of the output
    lies between the smallest and the largest value of the honest tasks (Yin et
    al. 2018 bound the error when honest gradients are i.i.d. estimates of one
    gradient). It is not a conflict-resolution method: it treats the task
    gradients as noisy copies of one gradient and discards what sticks out.

    Constraints: :math:`0 \le t` and :math:`2t + 1 \le K` (:math:`t < K/2`,
    TorchJD's condition); anything else is refused here with ``ValueError``.
    ``trim_number=None`` (TorchJD has no default) takes the largest allowed,
    :math:`t = \lfloor (K-1)/2 \rfloor`: the coordinate-wise median (for even K the
    mean of the two middle values). :math:`t = 0` is the plain mean.

    Size: K copies of one gradient give that gradient (a mean):
    :func:`samgs_optax.recipe` multiplies it by K. Needs no Gramian (elementwise).

    Args:
      num_tasks: K >= 2.
      trim_number: how many values to drop at each end of every coordinate.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`TrimmedMeanState`.

    References:
      Yin, Chen, Ramchandran, Bartlett, *Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates*, ICML 2018,
      https://proceedings.mlr.press/v80/yin18a.html; TorchJD's
      ``torchjd.aggregation.TrimmedMean``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    t = (num_tasks - 1) // 2 if trim_number is None else check_trim_number(trim_number, num_tasks)

    def init_fn(params: PyTree) -> TrimmedMeanState:
        return TrimmedMeanState(shared=resolve_layout(mask, params))

    def update_fn(updates: PyTree, state: TrimmedMeanState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        out = jax.tree.map(lambda g: trimmed_mean_leaf(g, t), shared)
        return merge(out, heads), state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["TrimmedMeanState", "trimmed_mean", "trimmed_mean_leaf"]
