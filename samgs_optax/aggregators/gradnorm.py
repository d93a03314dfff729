"""GradNorm (Chen et al. 2018): learned task weights that balance the gradient norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.aggregators._losses import check_task_losses
from samgs_optax.finite import tree_all_finite
from samgs_optax.gramian import combine
from samgs_optax.similarity import task_norms

PyTree = Any

LR = 0.025
"""The default weight optimizer's (Adam) learning rate: Nash-MTL's ``method_params_lr``."""


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      count: number of updates taken (int32).
      logits: (K,) the learned logits :math:`s` (zeros at init); the weights
        are :math:`K\\,\\mathrm{softmax}(s)`.
      initial_losses: (K,) the reference losses :math:`L_i(0)`: the fixed
        ``initial_losses`` if given, else the first update's ``task_losses``
        (or their mean over the ``warmup_steps`` first updates); zeros until set.
      opt_state: the state of the weight optimizer (on ``logits``).
      weights: (K,) the task weights the last update used (diagnostic; they sum
        to K).
    """

    shared: PyTree
    count: chex.Array
    logits: chex.Array
    initial_losses: chex.Array
    opt_state: optax.OptState
    weights: chex.Array


def gradnorm_logits_grad(
    logits: jax.Array,
    norms: jax.Array,
    losses: jax.Array,
    initial_losses: jax.Array,
    alpha: float | jax.Array,
) -> jax.Array:
    r"""The gradient :math:`\partial L_\text{grad} / \partial s` of GradNorm's balancing loss.

    With :math:`w = K\,\mathrm{softmax}(s)`, :math:`G_i = w_i n_i` (``norms``
    :math:`n_i = \|g_i\|`), :math:`\tilde L_i = L_i / L_i(0)`,
    :math:`r_i = \tilde L_i / \overline{\tilde L}` and the target
    :math:`c_i = \bar G\, r_i^\alpha` held constant,

    .. math::

        L_\text{grad}(s) = \sum_i |G_i(s) - c_i|,

    differentiated by ``jax.grad`` (the derivative of :math:`|x|` at 0 is 0, as
    in PyTorch). With finite norms and losses the gradient is finite: a
    reference loss that is not positive and finite gives :math:`\tilde L_i = 1`;
    a mean :math:`\overline{\tilde L}` that is not positive and finite gives
    :math:`r = 1`; negative ratios count as 0.

    Args:
      logits: (K,) the logits :math:`s`.
      norms: (K,) the task gradients' norms over the shared leaves.
      losses: (K,) this batch's losses :math:`L_i`.
      initial_losses: (K,) the reference losses :math:`L_i(0)`.
      alpha: the restoring force :math:`\alpha \ge 0`.
    """
    k = logits.shape[0]
    dtype = logits.dtype
    usable = (initial_losses > 0) & jnp.isfinite(initial_losses)
    ratio = jnp.where(usable, losses / jnp.where(usable, initial_losses, 1), 1)
    ratio = jnp.maximum(ratio, 0)
    mean_ratio = jnp.mean(ratio)
    ok = (mean_ratio > 0) & jnp.isfinite(mean_ratio)
    r = jnp.where(ok, ratio / jnp.where(ok, mean_ratio, 1), 1)
    w0 = k * jax.nn.softmax(logits)
    target = jax.lax.stop_gradient(jnp.mean(w0 * norms) * r ** jnp.asarray(alpha, dtype))

    def balancing_loss(s: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(k * jax.nn.softmax(s) * norms - target))

    return jax.grad(balancing_loss)(logits)


def gradnorm(
    num_tasks: int,
    *,
    alpha: float | chex.Array = 1.5,
    lr: float | chex.Array = LR,
    weight_optimizer: optax.GradientTransformation | None = None,
    initial_losses: chex.ArrayLike | None = None,
    warmup_steps: int | chex.Array = 0,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: task weights learned so that the weighted gradient norms train at equal rates.

    Needs the per-task losses: ``tx.update(grads, state, params, task_losses=losses)``
    (``optax.chain`` forwards them). With learnable logits :math:`s` (zeros at
    init) and weights :math:`w = K\,\mathrm{softmax}(s)` (positive, summing to
    K), each update computes, over the shared leaves (leaf by leaf),

    .. math::

        G_i = w_i \|g_i\|, \quad
        \tilde L_i = \frac{L_i}{L_i(0)}, \quad
        r_i = \frac{\tilde L_i}{\tfrac1K \sum_j \tilde L_j}, \quad
        c_i = \Big(\tfrac1K \sum_j G_j\Big)\, r_i^{\alpha}, \quad
        L_\text{grad} = \sum_i |G_i - c_i|,

    with the targets :math:`c_i` held constant; it returns
    :math:`\sum_i w_i g_i` on the shared leaves with the weights *before* this
    update's weight step (the plain sum on task-specific leaves), then moves
    :math:`s` by one step of ``weight_optimizer`` along
    :math:`\partial L_\text{grad} / \partial s`
    (:func:`gradnorm_logits_grad`). A task that trains slower than the others
    (larger :math:`r_i`) is pulled towards a larger gradient norm.

    As LibMTL's ``GradNorm`` (its defaults: :math:`\alpha = 1.5`, weights
    :math:`K\,\mathrm{softmax}`, absolute-value balancing loss, the update
    with the weights before their step), with these choices:

    - **The weights' optimizer.** LibMTL trains its logits with the model's
      optimizer (Adam, lr 1e-4, L2 weight decay 1e-5 by default). Here the
      logits have their own ``weight_optimizer``, stepped inside ``update``
      and kept in the state; the default is Adam (betas 0.9/0.999, eps 1e-8)
      with learning rate ``lr`` = 0.025, the rate Nash-MTL's and the SAM-GS
      authors' trainers give method parameters (``method_params_lr``). LibMTL's
      setting is ``weight_optimizer=optax.chain(optax.add_decayed_weights(1e-5),
      optax.adam(1e-4))`` (its logits start at 1, not 0: the same weights, and
      the same steps up to that weight decay).
    - **The reference losses** :math:`L_i(0)`. The paper uses the initial
      loss; here they are the first update's ``task_losses`` (recorded at
      ``count == 0``), so the first update already takes a weight step (with
      :math:`r = 1`). LibMTL instead trains epoch 0 with equal weights and no
      weight step, and uses epoch 0's mean training losses: that is
      ``warmup_steps`` = the number of steps in an epoch (equal weights for
      those updates, :math:`L_i(0)` their losses' running mean, the weight
      optimizer untouched). ``initial_losses`` fixes :math:`L_i(0)` instead.
    - **The paper's weights** are renormalised to sum to K after a plain
      gradient step on :math:`w` itself, and its :math:`L_\text{grad}` is the
      same L1 sum; the softmax parametrisation is LibMTL's (it keeps the
      weights positive).
    - **The norms** are taken over all shared leaves (the ``mask``), as
      LibMTL does; the paper takes them over the last shared layer only, to
      save computation.

    Degenerate inputs: the weights stay finite and non-negative (positive
    unless a huge step saturates the softmax). Zero gradients
    give :math:`G_i = 0` (no pull from that task); a reference loss
    :math:`L_i(0) \le 0` or non-finite counts as :math:`\tilde L_i = 1`, all
    losses 0 as :math:`r = 1`, negative ratios as 0 (losses should be
    positive). When a norm or loss is non-finite, or the step would make the
    logits non-finite, the weight step is skipped (logits and optimizer state
    kept); the update is then :math:`\sum_i w_i g_i` (non-finite only where
    the gradients are).

    Sum-sized: the weights sum to K, so K copies of one gradient g give K g,
    like the gradient of the summed loss.

    Args:
      num_tasks: K >= 2.
      alpha: the restoring force :math:`\alpha \ge 0` (default 1.5, LibMTL's
        and the paper's NYUv2 value); 0 pulls all :math:`G_i` to their mean.
      lr: learning rate of the default Adam on the logits (default 0.025);
        ignored when ``weight_optimizer`` is given.
      weight_optimizer: an ``optax.GradientTransformation`` for the logits
        (its ``update`` gets ``params=logits``); ``None``: ``optax.adam(lr)``.
      initial_losses: optional (K,) fixed reference losses :math:`L_i(0)`
        (positive); ``None``: recorded from ``task_losses`` as described above.
      warmup_steps: number of first updates with equal weights (all 1) and no
        weight step, over which :math:`L_i(0)` is averaged (default 0: the
        first update's losses, the paper's choice; LibMTL: one epoch).
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`GradNormState`; its ``update`` requires ``task_losses`` ((K,)).

    Raises:
      TypeError: at ``update``, when ``task_losses`` is missing.
      ValueError: for bad options, or at ``update`` when ``task_losses`` does
        not have shape (K,).

    References:
      Chen, Badrinarayanan, Lee, Rabinovich, *GradNorm: Gradient Normalization
      for Adaptive Loss Balancing in Deep Multitask Networks*, ICML 2018,
      https://proceedings.mlr.press/v80/chen18a.html; LibMTL's
      ``LibMTL/weighting/GradNorm.py`` (no TorchJD counterpart).
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("alpha", alpha, 0.0, float("inf"), closed_high=True)
    _validation.check_interval("lr", lr, 0.0, float("inf"), closed_high=False)
    _validation.check_interval("warmup_steps", warmup_steps, 0, float("inf"), closed_high=False)
    if weight_optimizer is not None and not isinstance(
        weight_optimizer, optax.GradientTransformation
    ):
        raise TypeError(
            "weight_optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)) "
            f"or None, got {type(weight_optimizer).__name__}."
        )
    if initial_losses is not None:
        fixed = jnp.asarray(initial_losses)
        if fixed.shape != (num_tasks,):
            raise ValueError(f"initial_losses must have shape ({num_tasks},), got {fixed.shape}.")
        if not isinstance(fixed, jax.core.Tracer) and not bool(
            jnp.all((fixed > 0) & jnp.isfinite(fixed))
        ):
            raise ValueError(f"initial_losses must be positive and finite, got {initial_losses}.")
    optimizer = optax.adam(lr) if weight_optimizer is None else weight_optimizer

    def init_fn(params: PyTree) -> GradNormState:
        scalar = _validation.scalar_dtype(params)
        logits = jnp.zeros([num_tasks], scalar)
        start = (
            jnp.zeros([num_tasks], scalar)
            if initial_losses is None
            else jnp.asarray(initial_losses, scalar)
        )
        return GradNormState(
            shared=resolve_layout(mask, params),
            count=jnp.zeros([], jnp.int32),
            logits=logits,
            initial_losses=start,
            opt_state=optimizer.init(logits),
            weights=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(
        updates: PyTree,
        state: GradNormState,
        params: PyTree = None,
        *,
        task_losses: chex.Array | None = None,
        **extra_args: Any,
    ):
        del params, extra_args
        shared, heads = split(updates, state.shared, num_tasks)  # the gradients' errors first
        scalar = state.logits.dtype
        losses = check_task_losses("gradnorm", task_losses, num_tasks, scalar)
        losses = jax.lax.stop_gradient(losses)
        count = state.count
        warmup = jnp.asarray(warmup_steps, jnp.int32)

        # Reference losses: the running mean of the first max(warmup, 1) updates' losses.
        if initial_losses is None:
            recording = count < jnp.maximum(warmup, 1)
            n = count.astype(scalar) + 1
            mean = state.initial_losses + (losses - state.initial_losses) / n
            reference = jnp.where(recording, mean, state.initial_losses)
        else:
            reference = state.initial_losses
        active = count >= warmup

        weights = jnp.where(active, num_tasks * jax.nn.softmax(state.logits), 1).astype(scalar)
        out = merge(combine(shared, weights), heads)

        norms = task_norms(shared, scalar, rescale=True)
        grad = gradnorm_logits_grad(state.logits, norms, losses, reference, alpha)
        step, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        logits = optax.apply_updates(state.logits, step)
        take = (
            active
            & jnp.all(jnp.isfinite(norms))
            & jnp.all(jnp.isfinite(losses))
            & jnp.all(jnp.isfinite(grad))
            & jnp.all(jnp.isfinite(logits))
            & tree_all_finite(opt_state)
        )
        new_state = GradNormState(
            shared=state.shared,
            count=optax.safe_increment(count),
            logits=jnp.where(take, logits, state.logits),
            initial_losses=reference,
            opt_state=jax.tree.map(
                lambda new, old: jnp.where(take, new, old), opt_state, state.opt_state
            ),
            weights=weights,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
