"""ExcessMTL (He et al. 2024): task weights driven by estimated excess risks."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, is_masked, merge, resolve_layout, split
from samgs_optax.gramian import combine

PyTree = Any
_H_EPS = 1e-7  # added to the accumulated squares, and to the baseline (as TorchJD, the authors)


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      count: number of steps taken (int32).
      weights: the task weights :math:`\\alpha` applied at the last step, shape (K,);
        :math:`1/K` at init.
      grad_root: a tree like the params: on shared leaves the root of the running
        sum of the squared task gradients, :math:`\\sqrt{\\sum_t g_t^2}` (AdaGrad's
        accumulator, kept as its root so that it cannot overflow), shape
        (K, *leaf.shape); ``MaskedNode()`` on heads.
      baseline: (K,) the excess risks the later ones are divided by (set at the
        first step after the warm-up).
      warmup_sum: (K,) sum of the excess risks seen during the warm-up.
    """

    shared: PyTree
    count: chex.Array
    weights: chex.Array
    grad_root: PyTree
    baseline: chex.Array
    warmup_sum: chex.Array


def excess_risks(stacked: PyTree, grad_root: PyTree) -> tuple[jax.Array, PyTree]:
    r"""Per-task excess risk estimates and the updated AdaGrad roots.

    With :math:`S` the running sum of the squared gradients (every task, every
    coordinate), :math:`S \leftarrow S + g \odot g`, the estimate is
    :math:`E_i = \sum (g_i \odot g_i) / \sqrt{S_i + 10^{-7}}`: the quadratic form
    :math:`g_i^\top H_i^{-1} g_i` with AdaGrad's diagonal :math:`H_i = \sqrt{S_i}`
    (He et al., eqs. 6-7). The state holds the root :math:`R = \sqrt S`, updated
    as :math:`R \leftarrow \mathrm{hypot}(R, g)`, and each term is computed as
    :math:`(g / \mathrm{hypot}(R, \sqrt{10^{-7}}))\, g`, so that neither
    :math:`g^2` nor :math:`S` can overflow (same values as TorchJD's to
    rounding). Summed leaf by leaf, in the dtype of ``grad_root``.
    """
    leaves, treedef = jax.tree.flatten(grad_root)  # MaskedNode heads have no leaves
    floor = jnp.sqrt(jnp.asarray(_H_EPS, leaves[0].dtype)) if leaves else None
    risks, new_leaves = [], []
    for g, r in zip(treedef.flatten_up_to(stacked), leaves, strict=True):
        g = g.astype(r.dtype)
        r = jnp.hypot(r, g)
        term = (g / jnp.hypot(r, floor)) * g
        risks.append(jnp.sum(term.reshape(r.shape[0], -1), axis=1))
        new_leaves.append(r)
    new_root = jax.tree.unflatten(treedef, new_leaves)
    return sum(risks[1:], risks[0]), new_root


def excess_mtl(
    num_tasks: int,
    *,
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""ExcessMTL: up-weights the tasks whose estimated excess risk is largest.

    Each step estimates every task's excess risk :math:`E_i` (a second-order
    Taylor proxy with AdaGrad's diagonal Hessian, :func:`excess_risks`),
    divides it by a baseline :math:`E_i^0` (scale processing, section 3.2) and
    takes an exponentiated-gradient step on the simplex (eq. 9):

    .. math::

        \alpha_i \leftarrow \frac{\alpha_i \exp(\eta E_i / (E_i^0 + 10^{-7}))}
        {\sum_k \alpha_k \exp(\eta E_k / (E_k^0 + 10^{-7}))},
        \qquad u = \sum_i \alpha_i g_i,

    starting from :math:`\alpha = 1/K`, in log space (a huge ratio saturates the
    weights instead of overflowing). With ``n_warmup_steps = 0`` the first
    step's :math:`E` is the baseline and is used undivided at that step (as the
    authors' code); otherwise the weights stay uniform for ``n_warmup_steps``
    steps and the baseline is the mean :math:`E` over them. Equal to TorchJD's
    ``ExcessMTL(robust_step_size, n_warmup_steps)``.

    Memory: the state holds the (root of the) sums of squares of every task's
    gradient, K times the shared parameters (as TorchJD's). The constant :math:`10^{-7}`
    is absolute (squared gradient units inside the root), as in TorchJD.

    Args:
      num_tasks: K >= 2.
      robust_step_size: :math:`\eta > 0` (default 1.0).
      n_warmup_steps: steps with uniform weights that only collect the
        baseline (default 0; the paper suggests three epochs).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ExcessMTLState`.

    References:
      He, Zhang, Sinha, Pan, Han, Zhao, *Robust Multi-Task Learning with Excess
      Risks*, ICML 2024, https://proceedings.mlr.press/v235/he24n.html; TorchJD's
      ``ExcessMTL``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    if isinstance(robust_step_size, (int, float)) and not robust_step_size > 0:
        raise ValueError(f"robust_step_size must be positive, got {robust_step_size}.")
    if (
        isinstance(n_warmup_steps, bool)
        or not isinstance(n_warmup_steps, int)
        or n_warmup_steps < 0
    ):
        raise ValueError(f"n_warmup_steps must be a non-negative int, got {n_warmup_steps!r}.")

    def init_fn(params: PyTree) -> ExcessMTLState:
        scalar = _validation.scalar_dtype(params)
        layout = resolve_layout(mask, params)
        sums = jax.tree.map(
            lambda s, p: s if is_masked(s) else jnp.zeros((num_tasks, *jnp.shape(p)), scalar),
            layout,
            params,
            is_leaf=is_masked,
        )
        return ExcessMTLState(
            shared=layout,
            count=jnp.zeros([], jnp.int32),
            weights=jnp.full([num_tasks], 1 / num_tasks, scalar),
            grad_root=sums,
            baseline=jnp.ones([num_tasks], scalar),
            warmup_sum=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(updates: PyTree, state: ExcessMTLState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        scalar = state.weights.dtype
        risk, roots = excess_risks(shared, state.grad_root)
        in_warmup = state.count < n_warmup_steps
        first = state.count == n_warmup_steps
        if n_warmup_steps > 0:
            baseline = jnp.where(first, state.warmup_sum / n_warmup_steps, state.baseline)
            ratio = risk / (baseline + _H_EPS)
        else:
            baseline = jnp.where(first, risk, state.baseline)
            ratio = jnp.where(first, risk, risk / (baseline + _H_EPS))
        ratio = jnp.minimum(ratio, jnp.finfo(scalar).max / 4)  # saturate, never inf - inf
        stepped = jax.nn.softmax(jnp.log(state.weights) + robust_step_size * ratio)
        weights = jnp.where(in_warmup, state.weights, stepped).astype(scalar)
        out = merge(combine(shared, weights), heads)
        new_state = ExcessMTLState(
            shared=state.shared,
            count=optax.safe_increment(state.count),
            weights=weights,
            grad_root=roots,
            baseline=baseline.astype(scalar),
            warmup_sum=jnp.where(in_warmup, state.warmup_sum + risk, state.warmup_sum).astype(
                scalar
            ),
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
