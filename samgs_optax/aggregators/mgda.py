"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the convex hull."""

from __future__ import annotations

import jax
import optax

from samgs_optax.aggregators._solvers import in_canonical_order, min_norm_weights
from samgs_optax.gramian import Mask, gramian_weighting


def mgda_weights(g: jax.Array) -> jax.Array:
    r"""Exact :math:`\arg\min_{w \in \Delta_K} w^\top G w` (see
    :func:`~samgs_optax.aggregators._solvers.min_norm_weights`); invariant to the scale of G
    and, solved in :func:`~samgs_optax.aggregators._solvers.canonical_order`, to the order of
    the tasks (where the optimum is not unique, e.g. a strongly stationary J, the same optimal
    point is returned for every order)."""
    return in_canonical_order(lambda gc: min_norm_weights(gc)[0], g)


def mgda(num_tasks: int, *, mask: Mask = None) -> optax.GradientTransformation:
    r"""MGDA: the minimum-norm element of the convex hull of the task gradients.

    :math:`u = J^\top w^\star`, :math:`w^\star = \arg\min_{w \ge 0,\, \mathbf 1^\top w = 1}
    \|J^\top w\|^2`. :math:`-u` is a common descent direction of every task
    (or :math:`u = 0` at a Pareto-stationary point).

    The quadratic program is solved exactly (an active-set NNLS followed by an
    equality-constrained solve on the optimal face), not by Frank-Wolfe: TorchJD's
    ``MGDA()`` (Sener & Koltun's Algorithm 2, stopping when the step is below
    1e-3) can stop far from the optimum for K >= 3.

    Args:
      num_tasks: K >= 2.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    References:
      Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective
      optimization*, C. R. Math. 2012; Sener & Koltun, *Multi-Task Learning as
      Multi-Objective Optimization*, NeurIPS 2018.
    """
    return gramian_weighting(num_tasks, mgda_weights, mask=mask)
