"""Loss scalarizers: multi-task methods that weight the task *losses*, not their gradients.

A scalarizer turns the vector of K task losses into the one scalar whose
ordinary gradient trains the model; no per-task gradients are needed. Like an
``optax.GradientTransformation``, it is a NamedTuple of pure functions,
built by a factory ``NAME(num_tasks, **options)``:

* ``init(losses=None) -> state``: a NamedTuple of arrays (checkpoint it with
  the rest). ``losses`` is an example (K,) loss vector, used for its dtype
  only; without it the state takes JAX's default float dtype.
* ``scalarize(losses, state, **extra) -> (total, (weights, new_state))``:
  ``total`` is the scalar to differentiate, ``weights`` the (K,) vector
  :math:`\\partial\\,\\text{total} / \\partial L` (so that the model's gradient
  is :math:`\\sum_k w_k \\nabla L_k`; detached, for logging) and ``new_state``
  the state for the next call. The second element is ready to be a
  ``has_aux`` output. ``extra`` is ``noise=`` for :func:`random` and
  ``preference=`` for :func:`stch`, :func:`pbi`, :func:`cosmos`, to replay
  given draws.

Call ``scalarize`` *inside* the loss function you differentiate, under ``jit``::

    sc = samgs_optax.scalarizers.dwa(K)
    def loss_fn(params, sc_state, batch):
        total, (weights, sc_state) = sc.scalarize(task_losses(params, batch), sc_state)
        return total, (weights, sc_state)
    (total, (weights, sc_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, sc_state, batch)

What is detached (``jax.lax.stop_gradient``), as in TorchJD: weights computed
from past or current loss *values* -- DWA's :math:`\\lambda`, FAMO's
:math:`z` and normaliser :math:`c` -- and every random or given weight or
preference. Nothing else is: in :func:`scale_invariant`,
:func:`geometric_mean`, :func:`stch`, :func:`pbi` and :func:`cosmos` the
weighting comes from differentiating the formula itself.

Learned and post-step parts, all functional:

* :func:`uw` and :func:`imtl_l`: the state *is* the learnable parameters
  (log-variances, log-scales); put it in the tree you differentiate and step
  with your optimizer, e.g. ``params = {"net": ..., "uw": sc.init()}`` and
  ``sc.scalarize(losses, params["uw"])`` (``scalarize`` returns it unchanged).
* :func:`famo` returns a :class:`FAMOScalarizer` whose
  ``update(state, new_losses)`` takes FAMO's step on its logits, after the
  model step, with the losses recomputed on the same batch.
* :func:`dwa` returns a :class:`DWAScalarizer` whose ``end_epoch(state)``
  closes an epoch (its average loss enters the next epochs' weights).

:data:`SCALARIZER_SPECS` declares every method once (factory, paper, TorchJD
class, options for a generic example); :data:`SCALARIZERS` maps name to
factory. The losses are a (K,) vector of floats (float32 or float64);
nothing is checked on their values, to stay jit-friendly (``scale_invariant``,
``geometric_mean`` and ``famo`` need positive losses, or above FAMO's
``min_losses``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from samgs_optax.scalarizers._base import Scalarizer
from samgs_optax.scalarizers.dwa import DWAScalarizer, DWAState, DWAWindowState, dwa
from samgs_optax.scalarizers.famo import FAMOScalarizer, FAMOState, famo
from samgs_optax.scalarizers.learned import IMTLLState, UWState, imtl_l, uw
from samgs_optax.scalarizers.linear import constant, mean, sum
from samgs_optax.scalarizers.log_losses import geometric_mean, scale_invariant
from samgs_optax.scalarizers.preference import PreferenceState, cosmos, pbi, stch
from samgs_optax.scalarizers.rlw import RandomState, random

Factory = Callable[..., Any]


class ScalarizerSpec(NamedTuple):
    """One registered scalarizer.

    Attributes:
      name: the registry key.
      factory: ``factory(num_tasks, **options)``.
      paper: the reference, short.
      torchjd: the TorchJD 0.18 class it equals (``""`` if none).
      example: options for a generic call ``factory(K, **example(K))``
        (the required ones, e.g. ``mu`` of STCH, get a value here).
    """

    name: str
    factory: Factory
    paper: str
    torchjd: str
    example: Callable[[int], dict[str, Any]] = lambda k: {}


SCALARIZER_SPECS: tuple[ScalarizerSpec, ...] = (
    ScalarizerSpec("mean", mean, "the mean of the losses", "Mean"),
    ScalarizerSpec("sum", sum, "linear scalarization", "Sum"),
    ScalarizerSpec(
        "constant",
        constant,
        "fixed user weights",
        "Constant",
        lambda k: {"weights": [float(i + 1) / k for i in range(k)]},
    ),
    ScalarizerSpec("random", random, "RLW, Lin et al., TMLR 2022", "Random"),
    ScalarizerSpec(
        "scale_invariant", scale_invariant, "SI, Navon et al. 2022 (the SAM-GS authors' 'si')", ""
    ),
    ScalarizerSpec(
        "geometric_mean", geometric_mean, "GLS, Chennupati et al., CVPRW 2019", "GeometricMean"
    ),
    ScalarizerSpec("uw", uw, "Kendall, Gal, Cipolla, CVPR 2018", "UW"),
    ScalarizerSpec("dwa", dwa, "Liu, Johns, Davison, CVPR 2019", "DWA"),
    ScalarizerSpec("famo", famo, "Liu, Feng, Stone, Liu, NeurIPS 2023", "FAMO"),
    ScalarizerSpec("imtl_l", imtl_l, "IMTL-L, Liu et al., ICLR 2021", "IMTLL"),
    ScalarizerSpec("stch", stch, "Lin et al., ICML 2024", "STCH", lambda k: {"mu": 0.1}),
    ScalarizerSpec("pbi", pbi, "MOEA/D, Zhang and Li, TEVC 2007", "PBI", lambda k: {"theta": 5.0}),
    ScalarizerSpec(
        "cosmos", cosmos, "Ruchte and Grabocka, ICDM 2021", "COSMOS", lambda k: {"lambda_": 1.0}
    ),
)
"""Every registered scalarizer, once; :data:`SCALARIZERS` comes from here."""

SCALARIZERS: dict[str, Factory] = {spec.name: spec.factory for spec in SCALARIZER_SPECS}
"""Name -> factory ``f(num_tasks, **options)``."""


def scalarizer_spec(name: str) -> ScalarizerSpec:
    """The declaration of a registered scalarizer; ValueError (listing them) if unknown."""
    for spec in SCALARIZER_SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown scalarizer {name!r}; registered: {', '.join(SCALARIZERS)}.")


__all__ = [
    "DWAScalarizer",
    "DWAState",
    "DWAWindowState",
    "FAMOScalarizer",
    "FAMOState",
    "IMTLLState",
    "PreferenceState",
    "RandomState",
    "SCALARIZERS",
    "SCALARIZER_SPECS",
    "Scalarizer",
    "ScalarizerSpec",
    "UWState",
    "constant",
    "cosmos",
    "dwa",
    "famo",
    "geometric_mean",
    "imtl_l",
    "mean",
    "pbi",
    "random",
    "scalarizer_spec",
    "scale_invariant",
    "stch",
    "sum",
    "uw",
]
