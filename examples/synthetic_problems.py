"""The two synthetic two-task problems of the SAM-GS paper, in JAX.

Both map parameters ``x = (x1, x2)`` to the vector of the two task losses, shape (2,).
The formulas follow the authors' published code (``experiments/toy1o/problem.py`` and
``experiments/toy2o/problem.py`` of https://github.com/ThomBors/samgs), which is the ground
truth where the printed paper differs.

Problem 1 (paper Sec. 5.1, Fig. 2; the toy problem of CAGrad, Liu et al. 2021, reused by
Nash-MTL): with ``c1 = max(tanh(x2/2), 0)`` and ``c2 = max(tanh(-x2/2), 0)``,

    L1 = c1 [log max(|0.5(-x1 - 7) - tanh(-x2)|, 5e-6) + 6]
         + c2 [((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20]
    L2 = c1 [log max(|0.5(-x1 + 3) + tanh(-x2) + 2|, 5e-6) + 6]
         + c2 [((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20]

One minimiser of the summed loss, at x1 = 0, x2 ~ -8.35, where both losses are ~ -15.0916.

Problem 2 (paper Sec. 5.2, Fig. 4, appendix A.2): the same ``c1, c2`` and log terms on the
upper half-plane; on the lower half-plane the quadratics become sextic wells,

    g1 = 0.1 sum_i ((x_i - d1_i)/4)^6 - sum_i ((x_i - d2_i)/4)^4
         - 1.5 sum_i ((x_i - d2_i)/4)^2 + 1.5
    g2 = the same with x_i + d1_i and x_i + d2_i,         d1 = (5.45, 0), d2 = (5.5, 0)

Two global minimisers of the summed loss, at about (+-5.4546, -10.8426), and a saddle on the
x1 = 0 axis between them. NOTE: appendix A.2 prints the log term of L2 as
``0.5(-x1 + 3) - tanh(-x2) + 2``; the authors' code (used here) has ``+ tanh(-x2)``, as in
problem 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

LOWER = 5e-6  # the floor inside the logs (the authors' LOWER)

# Starting points, paper appendix A.1 and A.2. (The authors' toy1o config has (+-10, -3)
# for the last two starts of problem 1; the paper prints (+-10, -2.5), used here.)
STARTS: dict[str, np.ndarray] = {
    "problem1": np.array(
        [[-8.0, 5.0], [-3.0, 7.5], [0.0, 10.0], [3.0, 7.5], [8.0, 5.0], [-10.0, -2.5], [10.0, -2.5]]
    ),
    "problem2": np.array(
        [[-3.5, 5.5], [3.5, 5.5], [-6.5, 2.5], [6.5, 2.5], [0.0, 10.0], [0.0, -8.0]]
    ),
}

# Where to start the float64 search for the minimisers of the summed loss.
_OPTIMUM_GUESSES: dict[str, list[tuple[float, float]]] = {
    "problem1": [(0.0, -8.3)],
    "problem2": [(5.45, -10.8), (-5.45, -10.8)],
}


def _gates(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """c1 = max(tanh(x2/2), 0) (upper half-plane), c2 = max(tanh(-x2/2), 0) (lower)."""
    return jnp.maximum(jnp.tanh(0.5 * x2), 0.0), jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)


def _log_terms(x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two log-valley terms shared by both problems (upper half-plane)."""
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)), LOWER)) + 6.0
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0), LOWER)) + 6.0
    return f1, f2


def problem1(x: jax.Array) -> jax.Array:
    """Task losses (L1, L2) of problem 1 (one global optimum) at ``x`` of shape (2,)."""
    x1, x2 = x[0], x[1]
    c1, c2 = _gates(x2)
    f1, f2 = _log_terms(x1, x2)
    q1 = ((-x1 + 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    q2 = ((-x1 - 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    return jnp.stack([c1 * f1 + c2 * q1, c1 * f2 + c2 * q2])


def _sextic_well(x1: jax.Array, x2: jax.Array, s: float) -> jax.Array:
    """g1 (s = +1) or g2 (s = -1) of problem 2: a well centred near (s * 5.45, 0)."""
    a1, b1, y = (x1 - s * 5.45) / 4.0, (x1 - s * 5.5) / 4.0, x2 / 4.0
    return 0.1 * (a1**6 + y**6) - (b1**4 + y**4) - 1.5 * (b1**2 + y**2) + 1.5


def problem2(x: jax.Array) -> jax.Array:
    """Task losses (L1, L2) of problem 2 (two global optima) at ``x`` of shape (2,)."""
    x1, x2 = x[0], x[1]
    c1, c2 = _gates(x2)
    f1, f2 = _log_terms(x1, x2)
    return jnp.stack(
        [c1 * f1 + c2 * _sextic_well(x1, x2, 1.0), c1 * f2 + c2 * _sextic_well(x1, x2, -1.0)]
    )


PROBLEMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "problem1": problem1,
    "problem2": problem2,
}


def find_optima(name: str) -> np.ndarray:
    """Minimisers of the summed loss, found in float64 (BFGS with JAX gradients).

    Returns an array of shape (n_optima, 2).
    """
    problem = PROBLEMS[name]
    with jax.enable_x64(True):
        total = jax.jit(lambda x: jnp.sum(problem(x)))
        grad = jax.jit(jax.grad(lambda x: jnp.sum(problem(x))))
        optima = []
        for guess in _OPTIMUM_GUESSES[name]:
            res = scipy.optimize.minimize(
                lambda x: float(total(jnp.asarray(x))),
                np.asarray(guess, np.float64),
                jac=lambda x: np.asarray(grad(jnp.asarray(x))),
                method="BFGS",
                options={"gtol": 1e-12},
            )
            optima.append(res.x)
    return np.asarray(optima)


def losses_float64(name: str, x: np.ndarray) -> np.ndarray:
    """Task losses at points ``x`` of shape (..., 2), evaluated in float64."""
    with jax.enable_x64(True):
        fn = jax.vmap(PROBLEMS[name])
        flat = np.asarray(x, np.float64).reshape(-1, 2)
        return np.asarray(fn(jnp.asarray(flat))).reshape(*np.shape(x)[:-1], 2)
