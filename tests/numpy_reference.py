"""An independent NumPy transcription of SAM-GS as SPEC.md states it.

Written from SPEC (the authors' code), not from the library: the task gradients
are a (K, D) matrix (the flattening the authors do), every quantity is float64,
and the two branches are computed literally, with an ``if`` on Psi.
"""

from __future__ import annotations

import numpy as np


def similarity_pairs(norms: np.ndarray) -> np.ndarray:
    """psi_ij for i < j, with psi(0, 0) = 1 and psi(0, x) = 0 (SPEC's edge cases)."""
    k = len(norms)
    out = []
    for i in range(k):
        for j in range(i + 1, k):
            den = norms[i] ** 2 + norms[j] ** 2
            out.append(1.0 if den == 0 else 2 * norms[i] * norms[j] / den)
    return np.array(out)


class NumpySamgs:
    """SAM-GS on flattened (K, D) gradient matrices."""

    def __init__(self, num_tasks, dim, gamma=0.1, b1=0.9, b2=0.99, eps=1e-8, similarity="mean"):
        self.gamma, self.b1, self.b2, self.eps = gamma, b1, b2, eps
        self.similarity = similarity
        self.m = np.zeros((num_tasks, dim))
        self.h = 0.0
        self.t = 0
        self.last_equalised = None
        self.last_psi = None

    def step(self, grads: np.ndarray) -> np.ndarray:
        grads = np.asarray(grads, np.float64)
        self.t += 1
        norms = np.linalg.norm(grads, axis=1)
        pairs = similarity_pairs(norms)
        psi = pairs.mean()
        self.m = self.b1 * self.m + (1 - self.b1) * grads
        self.h = self.b2 * self.h + (1 - self.b2) * (1 - psi) ** 2 + self.eps
        m_hat = self.m / (1 - self.b1**self.t)
        h_hat = self.h / (1 - self.b2**self.t)
        criterion = pairs.min() if self.similarity == "min" else psi
        self.last_psi = psi
        self.last_equalised = bool(criterion < self.gamma)
        if self.last_equalised:
            out = np.zeros(grads.shape[1])
            for g_k, n_k in zip(grads, norms, strict=True):
                if n_k > 0:
                    out += g_k * norms.mean() / n_k
            return out
        return np.sum(grads * np.abs(m_hat) / np.sqrt(h_hat), axis=0)


class NumpyAdam:
    """Adam (Kingma & Ba) on a flat vector, as optax.adam computes it."""

    def __init__(self, dim, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.mu = np.zeros(dim)
        self.nu = np.zeros(dim)
        self.t = 0

    def step(self, g: np.ndarray) -> np.ndarray:
        self.t += 1
        self.mu = self.b1 * self.mu + (1 - self.b1) * g
        self.nu = self.b2 * self.nu + (1 - self.b2) * g**2
        mu_hat = self.mu / (1 - self.b1**self.t)
        nu_hat = self.nu / (1 - self.b2**self.t)
        return -self.lr * mu_hat / (np.sqrt(nu_hat) + self.eps)
