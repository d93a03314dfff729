"""Preference-based (multi-objective) scalarizations: :func:`stch`, :func:`pbi`, :func:`cosmos`.

Each combines the losses along a preference vector. :func:`stch` uses a fixed
one (uniform by default); :func:`pbi` and :func:`cosmos`, by default, draw a
fresh preference from a Dirichlet distribution at every call, as COSMOS does to
cover the Pareto front, with the key kept in the state. Every ``scalarize``
also takes ``preference=`` to use a given vector for that call (the state is
then returned unchanged).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax._validation import initial_key
from samgs_optax.scalarizers._base import (
    Scalarizer,
    ScalarizeResult,
    check_losses,
    check_positive,
    check_vector,
    num_tasks_checked,
    value_and_weights,
)

PBI_EPSILON = 1e-12  # under PBI's square root, as TorchJD, to keep d2's gradient finite
COSINE_EPSILON = 1e-8  # lower bound of each norm in COSMOS's cosine (torch's default)


class PreferenceState(NamedTuple):
    """State of :func:`pbi` and :func:`cosmos`: the PRNG key of the next Dirichlet draw."""

    key: chex.PRNGKey


def stch(
    num_tasks: int,
    *,
    mu: float,
    preference: chex.ArrayLike | None = None,
    reference: chex.ArrayLike | None = None,
) -> Scalarizer:
    r"""Smooth Tchebycheff scalarization: :math:`\mu \log \sum_k \exp\big(\lambda_k (L_k -
    z_k^*) / \mu\big)`.

    A smooth maximum of the weighted, shifted losses, tighter as :math:`\mu`
    decreases. The weights of the losses are :math:`\lambda_k\,
    \mathrm{softmax}_k\big(\lambda (L - z^*) / \mu\big)`. Computed with the
    largest term factored out, so that a small :math:`\mu` cannot overflow.
    Nothing depends on a detached quantity. Stateless (``optax.EmptyState``).

    Equals TorchJD's ``scalarization.STCH(mu, weights, reference)``.

    Args:
      num_tasks: K >= 2.
      mu: the smoothing :math:`\mu > 0`, required (as in TorchJD; the paper
        tries 0.01, 0.1, 0.5 and 1 with no single best).
      preference: the (K,) preference :math:`\lambda` (default: uniform,
        :math:`1/K`). ``scalarize(..., preference=p)`` overrides it per call.
      reference: the (K,) ideal point :math:`z^*` (default: 0).

    Reference:
      Lin, Zhang, Liu, Zhang, Zhang, *Smooth Tchebycheff Scalarization for
      Multi-Objective Optimization*, ICML 2024, https://arxiv.org/abs/2402.19078
    """
    num_tasks = num_tasks_checked(num_tasks)
    check_positive("mu", mu)
    fixed = check_vector("preference", preference, num_tasks)
    ref = check_vector("reference", reference, num_tasks)

    def init_fn(losses: chex.ArrayLike | None = None) -> optax.EmptyState:
        if losses is not None:
            check_losses(losses, num_tasks)
        return optax.EmptyState()

    def scalarize_fn(
        losses: chex.Array, state: optax.EmptyState, *, preference: chex.Array | None = None
    ) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        lam = _preference(preference, fixed, num_tasks, losses.dtype)
        z = 0.0 if ref is None else ref.astype(losses.dtype)

        def total_fn(v: jax.Array) -> jax.Array:
            y = lam * (v - z)
            top = jax.lax.stop_gradient(jnp.max(y))
            return mu * jax.nn.logsumexp((y - top) / mu) + top

        total, weights = value_and_weights(total_fn, losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


def pbi(
    num_tasks: int,
    *,
    theta: float,
    preference: chex.ArrayLike | None = None,
    reference: chex.ArrayLike | None = None,
    concentration: float = 1.0,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
) -> Scalarizer:
    r"""Penalty-based boundary intersection: :math:`d_1 + \theta d_2`, with

    .. math::

      f = L - z^*, \quad \hat w = w / \|w\|, \quad d_1 = f^\top \hat w, \quad
      d_2 = \sqrt{\|f - d_1 \hat w\|^2 + 10^{-12}}.

    :math:`d_1` is the progress along the preference direction, :math:`d_2`
    the distance to it (the :math:`10^{-12}` keeps its gradient finite on the
    direction). The weights of the losses are :math:`\hat w + \theta (f - d_1
    \hat w) / d_2`. The preference is a constant (never differentiated).

    Equals TorchJD's ``scalarization.PBI(theta, weights, reference)``. TorchJD
    needs the preference at construction and suggests re-drawing it from a
    Dirichlet distribution before every call; here that is the default
    (``preference=None``).

    Args:
      num_tasks: K >= 2.
      theta: the penalty :math:`\theta \ge 0`, required (as in TorchJD; the
        paper uses 5).
      preference: a fixed (K,) preference :math:`w` (non-negative). ``None``:
        a new :math:`w \sim \mathrm{Dirichlet}(\text{concentration} \cdot
        \mathbf 1)` at every call, from the key in the state.
        ``scalarize(..., preference=p)`` overrides either for one call.
      reference: the (K,) ideal point :math:`z^*`, a lower bound of the losses
        (default: 0).
      concentration: the Dirichlet parameter (1: uniform on the simplex).
      seed, key: the state's starting key, as :func:`random`.

    State: :class:`PreferenceState` ``(key)``.

    Reference:
      Zhang, Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on
      Decomposition*, IEEE TEVC 2007, https://doi.org/10.1109/TEVC.2007.892759
    """
    num_tasks = num_tasks_checked(num_tasks)
    check_positive("theta", theta, strict=False)
    check_positive("concentration", concentration)
    fixed = check_vector("preference", preference, num_tasks)
    ref = check_vector("reference", reference, num_tasks)

    def total_of(w: jax.Array, losses: jax.Array) -> tuple[jax.Array, jax.Array]:
        direction = w / jnp.linalg.norm(w)
        z = 0.0 if ref is None else ref.astype(losses.dtype)

        def total_fn(v: jax.Array) -> jax.Array:
            f = v - z
            d1 = jnp.sum(f * direction)
            perpendicular = f - d1 * direction
            d2 = jnp.sqrt(jnp.sum(perpendicular * perpendicular) + PBI_EPSILON)
            return d1 + theta * d2

        return value_and_weights(total_fn, losses)

    return _drawn(num_tasks, fixed, concentration, seed, key, total_of)


def cosmos(
    num_tasks: int,
    *,
    lambda_: float,
    preference: chex.ArrayLike | None = None,
    concentration: float = 1.0,
    seed: int = 0,
    key: chex.PRNGKey | None = None,
) -> Scalarizer:
    r"""COSMOS: :math:`r^\top L - \lambda \cos(r, L)`.

    A linear scalarization along the preference :math:`r` minus a reward for
    aligning the loss vector with it, :math:`\cos(r, L) = \frac{r}{\max(\|r\|,
    \epsilon)} \cdot \frac{L}{\max(\|L\|, \epsilon)}` with :math:`\epsilon =
    10^{-8}` (as ``torch.nn.functional.cosine_similarity``). The weights of the
    losses are :math:`r - \lambda \nabla_L \cos(r, L)`. The preference is a
    constant (never differentiated). The full method also feeds :math:`r` to
    the model as an input; that part is the model's.

    Equals TorchJD's ``scalarization.COSMOS(lambda_, weights)``. TorchJD needs
    the preference at construction and suggests re-drawing it from a Dirichlet
    distribution before every call, as the paper; here that is the default
    (``preference=None``).

    Args:
      num_tasks: K >= 2.
      lambda_: the cosine penalty :math:`\lambda \ge 0`, required (as in
        TorchJD; the paper uses 0.01 to 8 depending on the data).
      preference: a fixed (K,) preference :math:`r`. ``None``: a new
        :math:`r \sim \mathrm{Dirichlet}(\text{concentration} \cdot \mathbf 1)`
        at every call, from the key in the state.
        ``scalarize(..., preference=p)`` overrides either for one call.
      concentration: the Dirichlet parameter (1: uniform on the simplex).
      seed, key: the state's starting key, as :func:`random`.

    State: :class:`PreferenceState` ``(key)``.

    Reference:
      Ruchte, Grabocka, *Scalable Pareto Front Approximation for Deep
      Multi-Objective Learning*, ICDM 2021, https://arxiv.org/abs/2103.13392
    """
    num_tasks = num_tasks_checked(num_tasks)
    check_positive("lambda_", lambda_, strict=False)
    check_positive("concentration", concentration)
    fixed = check_vector("preference", preference, num_tasks)

    def total_of(r: jax.Array, losses: jax.Array) -> tuple[jax.Array, jax.Array]:
        r_unit = r / jnp.maximum(jnp.linalg.norm(r), COSINE_EPSILON)

        def total_fn(v: jax.Array) -> jax.Array:
            v_unit = v / jnp.maximum(jnp.linalg.norm(v), COSINE_EPSILON)
            return jnp.sum(r * v) - lambda_ * jnp.sum(r_unit * v_unit)

        return value_and_weights(total_fn, losses)

    return _drawn(num_tasks, fixed, concentration, seed, key, total_of)


def _preference(
    given: chex.Array | None, fixed: jax.Array | None, num_tasks: int, dtype: jnp.dtype
) -> jax.Array:
    """The call's preference: ``given``, else the factory's, else uniform 1/K."""
    if given is not None:
        p = check_vector("preference", given, num_tasks)
    elif fixed is not None:
        p = fixed
    else:
        p = jnp.full([num_tasks], 1.0 / num_tasks)
    return jax.lax.stop_gradient(p).astype(dtype)


def _drawn(num_tasks, fixed, concentration, seed, key, total_of) -> Scalarizer:
    """A scalarizer whose preference is fixed, given per call, or drawn from a Dirichlet."""
    start = initial_key(seed, key)

    def init_fn(losses: chex.ArrayLike | None = None) -> PreferenceState:
        if losses is not None:
            check_losses(losses, num_tasks)
        return PreferenceState(key=start)

    def scalarize_fn(
        losses: chex.Array, state: PreferenceState, *, preference: chex.Array | None = None
    ) -> ScalarizeResult:
        losses = check_losses(losses, num_tasks)
        if preference is None and fixed is None:
            next_key, draw = jax.random.split(state.key)
            alpha = jnp.full([num_tasks], concentration, losses.dtype)
            w = jax.random.dirichlet(draw, alpha, dtype=losses.dtype)
            state = PreferenceState(key=next_key)
        else:
            w = _preference(preference, fixed, num_tasks, losses.dtype)
        total, weights = total_of(jax.lax.stop_gradient(w), losses)
        return total, (weights, state)

    return Scalarizer(init_fn, scalarize_fn)


__all__ = ["COSINE_EPSILON", "PBI_EPSILON", "PreferenceState", "cosmos", "pbi", "stch"]
