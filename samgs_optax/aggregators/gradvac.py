"""GradVac (Wang et al. 2021): Gradient Vaccine, towards adaptive similarity targets."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import Mask, merge, resolve_layout, split
from samgs_optax.gramian import combine, pow2_scale, scaled_gramian

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def gradvac_weights(
    g: jax.Array,
    phi_hat: jax.Array,
    orders: jax.Array,
    *,
    beta: float | jax.Array = 0.5,
    eps: float | jax.Array = 1e-8,
    log2_scale: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    r"""GradVac weights and the updated similarity targets, for given task orders.

    Every modified gradient is tracked by its coefficients on the original
    ones, :math:`g_i^{V} = \sum_k c_{ik} g_k` (:math:`c_i = e_i` at first), so
    that everything needed comes from the Gramian: :math:`\|g_i^V\|^2 = c_i^\top G
    c_i` and :math:`g_i^V \cdot g_j = (G c_i)_j`. For each task i, for the
    other tasks j in the order ``orders[i]``:

    .. math::

        \phi_{ij} = \frac{g_i^V \cdot g_j}{\|g_i^V\|\,\|g_j\| + \epsilon},\qquad
        \text{if } \phi_{ij} < \hat\phi_{ij}:\;
        c_{ij} \mathrel{+}= \|g_i^V\|\,
        \frac{\hat\phi_{ij}\sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}}
             {\|g_j\|\sqrt{1-\hat\phi_{ij}^2} + \epsilon},

    (the correction that raises the cosine to the target
    :math:`\hat\phi_{ij}`, Wang et al. eq. 3), and in every case the target
    moves towards the similarity seen, :math:`\hat\phi_{ij} \leftarrow
    (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}` (before the correction). The
    weights are :math:`w = \sum_i c_i`, so the update is
    :math:`\sum_i g_i^V = J^\top w`. Same arithmetic as TorchJD's
    ``GradVacWeighting`` (square roots of negative rounding errors clamped to 0).

    Args:
      g: (K, K) Gramian (or :math:`\hat G = 2^{-t} G`, see ``log2_scale``).
      phi_hat: (K, K) similarity targets :math:`\hat\phi` (zeros at the start;
        the diagonal is unused).
      orders: (K, K - 1) integers, row i a permutation of ``range(K - 1)``
        indexing the other tasks in increasing order (the tasks :math:`j \ne i`
        are visited in the order ``others[orders[i]]``), as ``torch.randperm(K - 1)``
        draws them in TorchJD.
      beta: EMA rate of the targets, in [0, 1] (default 0.5).
      eps: the absolute constant added to both denominators (default 1e-8, in
        squared and in plain gradient units respectively, as in TorchJD).
      log2_scale: :math:`t` when ``g`` is :math:`2^{-t} G`
        (:func:`~samgs_optax.gramian.scaled_gramian`): ``eps`` is then scaled so
        that the result is the one for :math:`G` itself.

    Returns:
      ``(weights, phi_hat)``: (K,) weights and the (K, K) updated targets.
    """
    k = g.shape[0]
    dtype = g.dtype
    t = jnp.asarray(log2_scale, jnp.int32)
    eps = jnp.asarray(eps, dtype)
    # eps against products of two norms; kept >= the smallest normal float where the scaling
    # would flush it to zero (then 0 / (0 + eps) stays 0, as unscaled, instead of NaN).
    tiny = jnp.finfo(dtype).tiny
    eps_sq = jnp.where(eps > 0, jnp.maximum(pow2_scale(eps, -t), tiny), 0)
    eps_n = pow2_scale(eps, -(t // 2))  # eps against one norm (t is even)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))

    def one(i, order, phi_row):
        others = order + (order >= i)  # positions among the others -> task indices

        def visit(s, carry):
            c, cg, phi_row = carry
            j = others[s]
            dot = cg[j]
            norm_i = jnp.sqrt(jnp.maximum(jnp.dot(cg, c, precision=_HIGHEST), 0))
            norm_j = norms[j]
            phi = dot / (norm_i * norm_j + eps_sq)
            target = phi_row[j]
            below = phi < target
            root_phi = jnp.sqrt(jnp.maximum(1 - phi * phi, 0))
            root_target = jnp.sqrt(jnp.maximum(1 - target * target, 0))
            w = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + eps_n)
            w = jnp.where(below, w, 0)
            c = c.at[j].add(w)
            cg = cg + w * g[j]
            phi_row = phi_row.at[j].set((1 - beta) * target + beta * phi)
            return c, cg, phi_row

        c0 = (jnp.arange(k) == i).astype(dtype)
        c, _, phi_row = jax.lax.fori_loop(0, k - 1, visit, (c0, g[i], phi_row))
        return c, phi_row

    coeffs, phi_new = jax.vmap(one)(jnp.arange(k), orders, phi_hat.astype(dtype))
    return jnp.sum(coeffs, axis=0), phi_new


def gradvac_orders(key: chex.PRNGKey, num_tasks: int) -> jax.Array:
    """(K, K - 1) random orders of the other tasks, one independent permutation per task."""
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda kk: jax.random.permutation(kk, num_tasks - 1))(keys)


class GradVacState(NamedTuple):
    """State of :func:`gradvac`.

    Attributes:
      shared: shared-leaf layout (see :class:`~samgs_optax.gramian.GramianWeightingState`).
      weights: task weights of the last step, shape (K,) (diagnostic).
      phi_hat: (K, K) EMA similarity targets :math:`\\hat\\phi_{ij}` (zeros at init).
      key: PRNG key for the next step's random task orders.
    """

    shared: PyTree
    weights: chex.Array
    phi_hat: chex.Array
    key: chex.PRNGKey


def gradvac(
    num_tasks: int,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
    mask: Mask = None,
) -> optax.GradientTransformation:
    r"""GradVac: raises each pair's cosine similarity to an adaptive target.

    Like PCGrad, every task gradient :math:`g_i` is corrected against the
    other tasks, in an order drawn at random each step; unlike PCGrad, the
    correction is applied whenever the cosine :math:`\phi_{ij}` between the
    (already corrected) :math:`g_i^V` and :math:`g_j` falls below a target
    :math:`\hat\phi_{ij}`, which is an exponential moving average of the
    cosines seen so far (so the method is stateful); it then adds
    the multiple of :math:`g_j` that brings the cosine to exactly
    :math:`\hat\phi_{ij}`. The update is :math:`\sum_i g_i^V`
    (:func:`gradvac_weights`, on the Gramian; the model is never flattened).
    Equal to TorchJD's ``GradVac(beta, eps)`` (the "whole model" grouping;
    random orders from a JAX key instead of ``torch.randperm``; targets start at 0).

    Args:
      num_tasks: K >= 2.
      beta: EMA rate of the targets, in [0, 1] (default 0.5, as TorchJD; the
        paper's is 0.01).
      eps: absolute constant in the denominators (default 1e-8).
      seed: seed of the PRNG key kept in the state (ignored if ``key`` is given).
      key: a ``jax.random`` key to start from. The state carries the key, so
        runs are reproducible and resuming from a checkpoint continues the stream.
      mask: shared-leaf mask, as in :func:`samgs_optax.samgs`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`GradVacState`.

    References:
      Wang, Tsvetkov, Firat, Cao, *Gradient Vaccine: Investigating and Improving
      Multi-task Optimization in Massively Multilingual Models*, ICLR 2021,
      https://arxiv.org/abs/2010.05874; TorchJD's ``GradVac``.
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("beta", beta, 0.0, 1.0, closed_high=True)
    _validation.check_interval("eps", eps, 0.0, float("inf"), closed_high=True)
    start = _validation.initial_key(seed, key)

    def init_fn(params: PyTree) -> GradVacState:
        scalar = _validation.scalar_dtype(params)
        return GradVacState(
            shared=resolve_layout(mask, params),
            weights=jnp.zeros([num_tasks], scalar),
            phi_hat=jnp.zeros([num_tasks, num_tasks], scalar),
            key=start,
        )

    def update_fn(updates: PyTree, state: GradVacState, params: PyTree = None):
        del params
        shared, heads = split(updates, state.shared, num_tasks)
        next_key, draw = jax.random.split(state.key)
        orders = gradvac_orders(draw, num_tasks)
        scalar = state.weights.dtype
        g_hat, log2_scale = scaled_gramian(shared, scalar)
        weights, phi_hat = gradvac_weights(
            g_hat, state.phi_hat, orders, beta=beta, eps=eps, log2_scale=log2_scale
        )
        weights = weights.astype(scalar)
        out = merge(combine(shared, weights), heads)
        new_state = GradVacState(
            shared=state.shared, weights=weights, phi_hat=phi_hat.astype(scalar), key=next_key
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
