"""SAM-GS: Similarity-Aware Momentum Gradient Surgery (Borsani et al., 2025).

Read side by side with ``SPEC.md``: each step of the algorithm is one marked
line of ``update_fn`` below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from samgs_optax import _validation
from samgs_optax._layout import (
    Mask,
    merge,
    resolve_layout,
    split,
    sum_over_tasks,
    task_zeros,
)
from samgs_optax.similarity import magnitude_similarity, task_norms

PyTree = Any
Implementation = Literal["auto", "xla", "pallas"]

AUTO_IMPLEMENTATION: dict[str, Literal["xla", "pallas"]] = {}
"""What ``implementation="auto"`` runs on each platform (names as in
``jax.lax.platform_dependent``: ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``);
every platform not listed runs ``"xla"``.

Empty: the Pallas kernel has not yet been measured faster than XLA on any GPU,
so ``"auto"`` is XLA everywhere. A GPU session that measures it faster
(``python benchmarks/bench_update.py --implementation both``) adds e.g.
``"cuda": "pallas"`` here, with the figures in ``docs/performance.md``.
"""


class SamgsState(NamedTuple):
    """State of :func:`samgs`.

    Attributes:
      count: number of steps taken, ``t`` (int32).
      m: per-task first moments ``m_k``: the shared parameters' tree with a
        leading task axis of length K; leaves masked out hold ``MaskedNode()``.
      h: EMA of the squared dissimilarity ``(1 - Psi)^2`` (scalar).
      similarity: ``Psi`` of the last step (diagnostic).
      equalised: True when the last step took the equalisation branch (diagnostic).
      norms: per-task gradient norms ``n_k`` of the last step, shape (K,) (diagnostic).
    """

    count: chex.Array
    m: PyTree
    h: chex.Array
    similarity: chex.Array
    equalised: chex.Array
    norms: chex.Array


def samgs(
    num_tasks: int,
    *,
    gamma: float | chex.Array = 0.1,
    b1: float | chex.Array = 0.9,
    b2: float | chex.Array = 0.99,
    eps: float | chex.Array = 1e-8,
    similarity: Literal["mean", "min"] = "mean",
    mask: Mask = None,
    m_dtype: Any | None = None,
    implementation: Implementation = "auto",
) -> optax.GradientTransformation:
    r"""SAM-GS: aggregates stacked per-task gradients into one update.

    ``update`` takes ``updates`` whose every leaf carries a leading task axis of
    length ``K = num_tasks`` (e.g. from :func:`samgs_optax.value_and_jacrev`)
    and returns one update shaped like the parameters. With :math:`n_k` the
    global L2 norm of task k's gradient over every shared leaf, each step does

    .. math::

      t &\leftarrow t + 1 \\
      \psi_{ij} &= \frac{2 n_i n_j}{n_i^2 + n_j^2}, \qquad
      \Psi = \operatorname{mean}_{i<j} \psi_{ij} \\
      m_k &\leftarrow \beta_1 m_k + (1-\beta_1) g_k \\
      h &\leftarrow \beta_2 h + (1-\beta_2)(1-\Psi)^2 + \epsilon \\
      \hat m_k &= m_k / (1-\beta_1^t), \qquad \hat h = h / (1-\beta_2^t) \\
      u &= \begin{cases}
        \sum_k g_k \, \bar n / n_k & \text{if } \Psi < \gamma
            \quad(\bar n = \operatorname{mean}_k n_k) \\
        \sum_k g_k \odot |\hat m_k| / \sqrt{\hat h} & \text{otherwise.}
      \end{cases}

    This is the authors' published code, which differs from the printed
    Algorithm 1 (mean over pairs i < j rather than over all i, j; bias
    correction with :math:`\beta^t`; no extra epsilon under the square root).
    Edge cases the code leaves undefined are made finite: :math:`\psi(0,0)=1`,
    :math:`\psi(0,x)=0`, and a task with :math:`n_k = 0` adds nothing to the
    equalised sum.

    The authors' training recipe multiplies the result by K, clips the global
    norm to 1 and steps Adam::

      optax.chain(samgs(K), optax.scale(K), optax.clip_by_global_norm(1.0),
                  optax.adam(1e-3))

    Both branches are computed in one fused pass and selected arithmetically,
    so there is no Python or ``lax.cond`` control flow on the branch.

    Range: the norms are :func:`~samgs_optax.similarity.task_norms` with
    ``rescale=True``, exact to rounding for any representable norm, so
    :math:`\Psi`, :math:`h` and the branch do not depend on the gradients'
    scale (float32 gradients from ~1e-30 to ~1e20 times a unit Jacobian are
    tested), at no extra pass: the sums of squares scaled by :math:`2^{\mp 64}`
    ride in the norms' own pass over g, then comes the fused moments-and-output
    pass. The equalisation branch is homogeneous of degree 1 in the gradients' scale
    and the momentum branch of degree 2: its update overflows (or underflows)
    float32 when the square of the scale does, e.g. for gradients ~1e20, while
    the state stays finite.

    Args:
      num_tasks: K >= 2, the length of the leading axis of every gradient leaf.
      gamma: similarity threshold in [0, 1]; equalise when ``Psi < gamma``.
      b1: decay of the per-task first moments, in [0, 1).
      b2: decay of the squared-dissimilarity average ``h``, in [0, 1).
      eps: added to ``h`` at every step (inside the EMA, as the authors do).
      similarity: ``"mean"`` (default) equalises when the mean pairwise
        similarity is below gamma; ``"min"`` (the authors' reinforcement
        learning variant) when any pair is. ``h`` always uses the mean.
      mask: optional pytree of bools (or a callable of params returning one)
        with the params' structure. True leaves are shared and get the surgery;
        False leaves (task heads) receive the plain sum over tasks, keep no
        moments and do not enter the norms. ``None`` means every leaf is shared.
      m_dtype: optional dtype (e.g. ``jnp.bfloat16``) in which to store ``m``.
      implementation: how the fused moments-and-output pass runs (the norms
        are always XLA's). ``"xla"``: the reference, fused by XLA.
        ``"pallas"``: a Pallas kernel (Triton on GPU) that reads g and m once
        and writes m and u once per leaf; on CPU it runs in Pallas'
        interpreter, for testing only (slow); not for TPU; not measured on a
        GPU yet. ``"auto"`` (default): per platform from
        :data:`AUTO_IMPLEMENTATION`, today ``"xla"`` on every platform. Both
        agree to rounding (``tests/test_pallas.py``; ``docs/performance.md``).

    Returns:
      An ``optax.GradientTransformation``; its state is a :class:`SamgsState`.
      With ``optax.inject_hyperparams`` pass ``static_args=("num_tasks",)``;
      ``gamma``, ``b1``, ``b2`` and ``eps`` may then be injected or scheduled.

    References:
      Borsani, Rosani, Nicosia, Di Fatta, *Gradient Similarity Surgery in
      Multi-Task Deep Learning*, ECML PKDD 2025, https://arxiv.org/abs/2506.06130
    """
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_interval("gamma", gamma, 0.0, 1.0, closed_high=True)
    _validation.check_interval("b1", b1, 0.0, 1.0, closed_high=False)
    _validation.check_interval("b2", b2, 0.0, 1.0, closed_high=False)
    _validation.check_interval("eps", eps, 0.0, float("inf"), closed_high=True)
    if similarity not in ("mean", "min"):
        raise ValueError(f"similarity must be 'mean' or 'min', got {similarity!r}.")
    if implementation not in ("auto", "xla", "pallas"):
        raise ValueError(
            f"implementation must be 'auto', 'xla' or 'pallas', got {implementation!r}."
        )

    def init_fn(params: PyTree) -> SamgsState:
        layout = resolve_layout(mask, params)
        scalar = _validation.scalar_dtype(params)
        return SamgsState(
            count=jnp.zeros([], jnp.int32),
            m=task_zeros(params, layout, num_tasks, m_dtype),
            h=jnp.zeros([], scalar),
            similarity=jnp.ones([], scalar),
            equalised=jnp.zeros([], jnp.bool_),
            norms=jnp.zeros([num_tasks], scalar),
        )

    def update_fn(updates: PyTree, state: SamgsState, params: PyTree = None):
        del params
        g, heads = split(updates, state.m, num_tasks)  # validates: structure, task axis, dtype
        scalar = state.h.dtype

        count = optax.safe_increment(state.count)  # t <- t + 1
        norms = task_norms(g, scalar, rescale=True)  # n_k = ||g_k||_2 over every shared leaf
        psi_mean, psi_min = magnitude_similarity(norms)  # Psi = mean_{i<j} psi_ij
        h = b2 * state.h + (1 - b2) * (1 - psi_mean) ** 2 + eps  # h <- b2 h + ... + eps
        m_hat_scale = 1 / (1 - jnp.asarray(b1, scalar) ** count)  # m^ = m / (1 - b1^t)
        h_hat = h / (1 - jnp.asarray(b2, scalar) ** count)  # h^ = h / (1 - b2^t)
        equalise = (psi_min if similarity == "min" else psi_mean) < gamma  # if Psi < gamma

        # Both branches as one weighted sum: u = sum_k g_k * (a_k + c |m_k|), with
        # a_k = mean(n) / n_k, c = 0 when equalising, else a_k = 0, c = 1/(1-b1^t)/sqrt(h^).
        safe_norms = jnp.where(norms > 0, norms, 1)
        equal_weights = jnp.where(norms > 0, jnp.mean(norms) / safe_norms, 0)
        a = jnp.where(equalise, equal_weights, 0).astype(scalar)
        c = jnp.where(equalise, 0, m_hat_scale / jnp.sqrt(h_hat)).astype(scalar)
        # m_k <- b1 m_k + (1-b1) g_k and u = sum_k g_k (a_k + c |m_k|): one pass per leaf.
        pass_fn = functools.partial(_moments_and_output, b1=b1, m_dtype=m_dtype)
        m, out = _per_platform(implementation, pass_fn)(g, state.m, a, c)
        new_state = SamgsState(
            count=count,
            m=m,
            h=h.astype(scalar),
            similarity=psi_mean.astype(scalar),
            equalised=equalise,
            norms=norms,
        )
        return merge(out, heads), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _ema(g: jax.Array, m: jax.Array, decay: Any) -> jax.Array:
    """decay * m + (1 - decay) * g, in at least float32 even when m is stored smaller."""
    dtype = jnp.promote_types(jnp.promote_types(g.dtype, m.dtype), jnp.float32)
    return decay * m.astype(dtype) + (1 - decay) * g.astype(dtype)


def _combine(g: jax.Array, m: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
    """sum_k g_k * (a_k + c |m_k|) over the leading task axis, in g's dtype."""

    def term(k):
        return g[k] * (a[k] + c * jnp.abs(m[k].astype(a.dtype)))

    return sum_over_tasks(term, g.shape[0]).astype(g.dtype)


def _moments_and_output(
    g: PyTree, m: PyTree, a: jax.Array, c: jax.Array, *, b1: Any, m_dtype: Any, kernel: str
) -> tuple[PyTree, PyTree]:
    """(m', u) over the shared leaves: m' in its storage dtype, u in g's dtype.

    ``kernel``: ``"xla"``, ``"pallas"`` (compiled) or ``"interpret"`` (Pallas'
    interpreter; empty leaves stay on XLA). The kernel module is imported only
    here, so the library does not need Pallas unless it is asked for.
    """
    if kernel == "xla":  # the tree at once, as before the kernel existed
        new = jax.tree.map(lambda gl, ml: _ema(gl, ml, b1), g, m)
        out = jax.tree.map(lambda gl, ml: _combine(gl, ml, a, c), g, new)
        return (optax.tree.cast(new, m_dtype) if m_dtype is not None else new), out
    from samgs_optax import _pallas_samgs

    def leaf(gl: jax.Array, ml: jax.Array) -> tuple[jax.Array, jax.Array]:
        if gl.size == 0:
            new = _ema(gl, ml, b1)
            return new.astype(m_dtype or new.dtype), _combine(gl, new, a, c)
        interpret = kernel == "interpret"
        return _pallas_samgs.moments_and_output(gl, ml, a, c, b1, m_dtype, interpret=interpret)

    g_leaves, treedef = jax.tree.flatten(g)
    pairs = [leaf(gl, ml) for gl, ml in zip(g_leaves, treedef.flatten_up_to(m), strict=True)]
    return tuple(jax.tree.unflatten(treedef, list(side)) for side in zip(*pairs, strict=True))


def _per_platform(implementation: Implementation, pass_fn: Callable) -> Callable:
    """``pass_fn`` with its ``kernel`` chosen per platform, at lowering time.

    ``"xla"`` everywhere; ``"pallas"`` compiled everywhere but on CPU, where it is
    interpreted; ``"auto"`` as :data:`AUTO_IMPLEMENTATION` says (read when traced).
    A single choice needs no ``jax.lax.platform_dependent``.
    """
    if implementation == "auto":
        chosen = {p: i for p, i in AUTO_IMPLEMENTATION.items() if i != "xla"}
        default = "xla"
    else:
        chosen, default = {}, implementation
    kernels = {p: "interpret" if p == "cpu" else i for p, i in chosen.items()}
    if default == "pallas":
        kernels.setdefault("cpu", "interpret")
    if not kernels:
        return functools.partial(pass_fn, kernel=default)

    def run(*operands):
        branches = {p: functools.partial(pass_fn, kernel=k) for p, k in kernels.items()}
        default_fn = functools.partial(pass_fn, kernel=default)
        return jax.lax.platform_dependent(*operands, default=default_fn, **branches)

    return run
