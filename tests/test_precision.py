"""Every matmul inside the library asks for float32 (``Precision.HIGHEST``).

On GPUs XLA runs float32 matmuls at its default precision in TF32 (10-bit
mantissa) and on TPUs in bfloat16 passes; the library's own contractions (the
Gramian, the weighted task sum, every solver's products) must not inherit that.
The check is structural, so it means the same on every backend: trace each
aggregator's update and require every ``dot_general`` (including those inside
loops and conditionals) to carry ``HIGHEST`` for both operands. The model's own
matmuls inside ``value_and_jacrev`` are the user's and follow their settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_aggregator

import samgs_optax

K = 3
PARAMS = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
HIGHEST = jax.lax.Precision.HIGHEST


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _dot_precisions(getattr(inner, "jaxpr", inner))
                elif hasattr(sub, "eqns"):
                    found += _dot_precisions(sub)
    return found


def _is_highest(precision) -> bool:
    if precision is None:
        return False
    if isinstance(precision, tuple):
        return all(p == HIGHEST for p in precision)
    return precision == HIGHEST


@pytest.mark.parametrize("name", sorted(samgs_optax.AGGREGATORS))
def test_every_library_matmul_is_highest(name):
    tx = make_aggregator(name, K)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(K, *p.shape)), p.dtype), PARAMS)
    state = tx.init(PARAMS)
    closed = jax.make_jaxpr(lambda g, s: tx.update(g, s, PARAMS))(grads, state)
    precisions = _dot_precisions(closed.jaxpr)
    if name not in ("samgs", "linear_scalarization", "graddrop", "trimmed_mean"):
        assert precisions, f"{name}: no matmul found (the check would be vacuous)"
    bad = [p for p in precisions if not _is_highest(p)]
    assert not bad, f"{name}: {len(bad)} of {len(precisions)} matmuls not at HIGHEST: {bad}"


def test_the_check_sees_a_default_precision_matmul():
    closed = jax.make_jaxpr(lambda a: jax.lax.fori_loop(0, 2, lambda i, x: x @ a, a))(jnp.eye(2))
    assert [_is_highest(p) for p in _dot_precisions(closed.jaxpr)] == [False]
