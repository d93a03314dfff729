"""Krum and Multi-Krum (Blanchard et al. 2017): robust to a few Byzantine tasks."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax.gramian import Mask, gramian_weighting


def krum_weights(g: jax.Array, *, n_byzantine: int, n_selected: int = 1) -> jax.Array:
    r"""(Multi-)Krum weights: :math:`1/m` on the :math:`m` tasks with the lowest scores, else 0.

    Pairwise distances from the Gramian,
    :math:`d_{ij} = \sqrt{\max(G_{ii} + G_{jj} - 2 G_{ij}, 0)}`; task i's score
    is the sum of its distances to its :math:`K - f - 2` nearest other tasks
    (:math:`f` = ``n_byzantine``); the ``n_selected`` :math:`m` tasks with the
    smallest scores get weight :math:`1/m`. Ties go to the lower task index
    (TorchJD's ``topk`` leaves them unspecified). The weights are invariant to
    the scale of :math:`G` (a common factor scales every distance).
    """
    k = g.shape[0]
    diag = jnp.diagonal(g)
    dist = jnp.sqrt(jnp.maximum(diag[:, None] + diag[None, :] - 2 * g, 0))
    # Each row's smallest entry is the task itself (distance exactly 0), dropped.
    n_closest = k - n_byzantine - 2
    scores = jnp.sum(jnp.sort(dist, axis=1)[:, 1 : n_closest + 1], axis=1)
    chosen = jnp.argsort(scores, stable=True)[:n_selected]
    hits = jnp.zeros([k], g.dtype).at[chosen].set(1)
    return hits / n_selected


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    return int(value)


def krum(
    num_tasks: int,
    *,
    n_byzantine: int | None = None,
    n_selected: int = 1,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""Krum: the task gradient closest to its nearest neighbours (Multi-Krum: the mean of several).

    Task i's score is the sum of its Euclidean distances to the :math:`K - f - 2`
    task gradients nearest to it (:math:`f` = ``n_byzantine``); the update is the
    gradient with the lowest score or, for ``n_selected`` :math:`m > 1`
    (Multi-Krum), the mean of the :math:`m` gradients with the lowest scores
    (:func:`krum_weights`, from the Gramian only). Equal to TorchJD's
    ``Krum(n_byzantine, n_selected)``.

    What it is for: robustness to *Byzantine* tasks, i.e. up to :math:`f` task
    gradients that may be arbitrary (corrupted, adversarial or broken losses):
    an outlier is far from the others and gets a high score, so it is not
    selected, while a Byzantine gradient hiding among the honest ones can only
    be selected if it is close to them. Blanchard et al. prove this
    (:math:`(\alpha, f)`-Byzantine resilience) for :math:`K > 2f + 2`, with
    honest gradients i.i.d. estimates of one gradient. It is not a
    conflict-resolution method: it treats the tasks as noisy copies of one
    gradient and keeps one (or a few) of them.

    Constraints (checked here, with ``ValueError``, where TorchJD checks at the
    first call): :math:`f \ge 0`, :math:`K \ge f + 3` (TorchJD's condition: at
    least one neighbour per score), :math:`1 \le m \le K`. The paper's guarantee
    needs the stronger :math:`K \ge 2f + 3`. ``n_byzantine=None`` (TorchJD has no
    default) takes the largest :math:`f` the guarantee covers,
    :math:`\lfloor (K-3)/2 \rfloor`. So Krum needs K >= 3.

    Size: K copies of one gradient give that gradient (a mean):
    :func:`samgs_optax.recipe` multiplies it by K.

    Args:
      num_tasks: K >= 3.
      n_byzantine: :math:`f`, the number of tasks that may be Byzantine.
      n_selected: :math:`m`, how many of the best-scored gradients are averaged (default 1: Krum).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs` (heads get the plain sum).

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, *Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017;
      TorchJD's ``torchjd.aggregation.Krum``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if n_byzantine is None:
        if num_tasks < 3:
            raise ValueError(
                f"krum needs num_tasks >= 3 (a score sums the distances to num_tasks - "
                f"n_byzantine - 2 >= 1 neighbours), got num_tasks={num_tasks}."
            )
        n_byzantine = (num_tasks - 3) // 2
    n_byzantine = _check_int("n_byzantine", n_byzantine, 0)
    n_selected = _check_int("n_selected", n_selected, 1)
    if num_tasks < n_byzantine + 3:
        raise ValueError(
            f"krum needs num_tasks >= n_byzantine + 3 (a score sums the distances to "
            f"num_tasks - n_byzantine - 2 >= 1 neighbours), got num_tasks={num_tasks}, "
            f"n_byzantine={n_byzantine}."
        )
    if n_selected > num_tasks:
        raise ValueError(
            f"n_selected must be <= num_tasks={num_tasks}, got n_selected={n_selected}."
        )
    return gramian_weighting(
        num_tasks,
        lambda g: krum_weights(g, n_byzantine=n_byzantine, n_selected=n_selected),
        mask=mask,
    )


__all__ = ["krum", "krum_weights"]
