"""Property tests (hypothesis) of the magnitude similarity and of SAM-GS's branches."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import samgs_optax

K, D = 4, 6
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
grad_matrices = arrays(np.float32, (K, D), elements=finite)
log_scales = arrays(np.float64, (K,), elements=st.floats(-3, 3))
SETTINGS = settings(max_examples=40, deadline=None)


@jax.jit
def _first_step(grads):
    tx = samgs_optax.samgs(K, gamma=1.0)  # gamma = 1: equalise unless all norms are equal
    out, state = tx.update({"w": grads}, tx.init({"w": grads[0]}))
    return out["w"], state


@jax.jit
def _similarity(grads):
    return samgs_optax.magnitude_similarity(samgs_optax.task_norms({"w": grads}))


@SETTINGS
@given(grads=grad_matrices, c=st.floats(1e-3, 1e3))
def test_common_scaling_leaves_similarity_unchanged(grads, c):
    # Away from float32 underflow: a norm whose square is below the smallest normal
    # float32 (~1.2e-38, here after scaling by c >= 1e-3) is flushed to zero, and a
    # zero task is not the scaled copy of a tiny one (hypothesis found 2.2e-20 * 5).
    norms = np.linalg.norm(grads.astype(np.float64), axis=1)
    assume(np.all((norms == 0) | (norms >= 1e-15)))
    psi, psi_min = _similarity(grads)
    psi_c, psi_min_c = _similarity((grads * np.float32(c)).astype(np.float32))
    np.testing.assert_allclose(psi_c, psi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(psi_min_c, psi_min, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(grads=grad_matrices, perm=st.permutations(range(K)))
def test_similarity_is_in_unit_interval_and_permutation_invariant(grads, perm):
    psi, psi_min = _similarity(grads)
    psi_p, _ = _similarity(grads[np.array(perm)])
    assert 0.0 <= float(psi_min) <= float(psi) <= 1.0 + 1e-6
    np.testing.assert_allclose(psi_p, psi, rtol=1e-5, atol=1e-7)


@SETTINGS
@given(direction=arrays(np.float64, (K, D), elements=st.floats(-1, 1)), scales=log_scales)
def test_equalised_contributions_have_the_mean_norm(direction, scales):
    norms0 = np.linalg.norm(direction, axis=1)
    if np.any(norms0 < 1e-3):
        return  # hypothesis shrinks to zero rows, covered by the zero-norm unit tests
    grads = (direction / norms0[:, None] * 10.0 ** scales[:, None]).astype(np.float32)
    norms = np.linalg.norm(grads.astype(np.float64), axis=1)
    out, state = _first_step(grads)
    if not bool(state.equalised):
        return  # all norms (nearly) equal: Psi = 1, not the branch under test
    # Each task's contribution is its unit direction times mean(n): their sum is
    # (sum_k g_k / n_k) * mean(n).
    want = (grads / norms[:, None]).sum(0) * norms.mean()
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4 * norms.mean())


@SETTINGS
@given(grads=grad_matrices)
def test_psi_pairs_match_definition(grads):
    norms = np.linalg.norm(grads.astype(np.float64), axis=1)
    # XLA on CPU flushes float32 subnormals to zero, so a norm below the smallest normal
    # float32 is a zero norm there (hypothesis found 1e-45 against 0: psi 1, not 0).
    assume(np.all((norms == 0) | (norms >= np.finfo(np.float32).tiny)))
    got = np.asarray(samgs_optax.pairwise_similarity(jax.numpy.asarray(norms, np.float32)))
    for i in range(K):
        for j in range(K):
            den = norms[i] ** 2 + norms[j] ** 2
            want = 1.0 if den == 0 else 2 * norms[i] * norms[j] / den
            assert abs(got[i, j] - want) < 1e-5


@jax.jit
def _rescaled_norms(grads):
    return samgs_optax.task_norms({"w": grads}, rescale=True)


@SETTINGS
@given(
    direction=arrays(np.float64, (K, D), elements=st.floats(-1, 1)),
    log_scales=arrays(np.float64, (K,), elements=st.floats(-36, 36)),
)
def test_rescaled_task_norms_match_float64(direction, log_scales):
    """task_norms(rescale=True): each task's norm to float32 rounding over 72 decades."""
    grads = (direction * 10.0 ** log_scales[:, None]).astype(np.float32)
    # Entries below the smallest normal float32 are flushed on CPU before any scaling.
    assume(np.all((grads == 0) | (np.abs(grads) >= np.finfo(np.float32).tiny)))
    want = np.linalg.norm(grads.astype(np.float64), axis=1)
    got = np.asarray(_rescaled_norms(grads), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
