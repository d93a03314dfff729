"""Baseline multi-task gradient aggregators, one module per method.

Every factory is called as ``NAME(num_tasks, **options)`` and returns an
``optax.GradientTransformation`` that consumes stacked per-task gradients (a
leading task axis of length K on every leaf) and returns one update shaped
like the parameters. :data:`AGGREGATORS` maps each method's name (and
``"samgs"``) to its factory, so that examples can loop over methods::

    for name, make in samgs_optax.AGGREGATORS.items():
        tx = samgs_optax.recipe(make, num_tasks)  # the authors' chain, see recipe

Every factory accepts ``mask=`` (shared leaves; task-specific leaves get the
plain sum over tasks). The Gramian-based ones also expose their weighting as a
pure function ``NAME_weights(G, ...)`` of the K x K Gramian.

:data:`AGGREGATOR_SPECS` is the one list every method is declared in: its
factory, whether the authors' recipe multiplies its output by K
(:func:`samgs_optax.recipe` reads it), its family, paper and TorchJD class
(``scripts/method_table.py`` prints the README's table from them). The rule:
for K copies of one gradient g, a method whose output is the size of g (a
*mean*, e.g. MGDA, UPGrad) is multiplied by K, so that the shared update
matches the gradient of the summed loss; a method that already *sums* over
tasks (LS, PCGrad, GradDrop) or whose output is *normalised* (Nash-MTL: its
size does not follow ``||g||``) is not. SAM-GS is multiplied by K because its
authors do so ("to match the sum loss").
``tests/test_recipe.py`` checks every declaration against that probe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from samgs_optax.aggregators.aligned_mtl import aligned_mtl, aligned_mtl_weights
from samgs_optax.aggregators.cagrad import cagrad, cagrad_weights
from samgs_optax.aggregators.con_fig import con_fig, con_fig_weights
from samgs_optax.aggregators.constant import constant, constant_is_mean
from samgs_optax.aggregators.cr_mogm import CRMOGMState, cr_mogm
from samgs_optax.aggregators.db_mtl import DBMTLState, db_mtl, db_mtl_weights
from samgs_optax.aggregators.dualproj import dualproj, dualproj_weights
from samgs_optax.aggregators.excess_mtl import ExcessMTLState, excess_mtl, excess_risks
from samgs_optax.aggregators.fairgrad import fairgrad, fairgrad_is_mean, fairgrad_weights
from samgs_optax.aggregators.graddrop import GradDropState, graddrop, graddrop_leaf
from samgs_optax.aggregators.gradnorm import GradNormState, gradnorm, gradnorm_logits_grad
from samgs_optax.aggregators.gradvac import (
    GradVacState,
    gradvac,
    gradvac_orders,
    gradvac_weights,
)
from samgs_optax.aggregators.imtl_g import imtl_g, imtl_g_weights
from samgs_optax.aggregators.krum import krum, krum_weights
from samgs_optax.aggregators.linear_scalarization import linear_scalarization
from samgs_optax.aggregators.mgda import mgda, mgda_weights
from samgs_optax.aggregators.moco import MoCoState, moco, moco_weights
from samgs_optax.aggregators.modo import MoDoState, modo, modo_weights, project_onto_simplex
from samgs_optax.aggregators.nash_mtl import NashMTLState, nash_mtl, nash_mtl_weights
from samgs_optax.aggregators.pcd import PCDState, pcd, pcd_qp_weights, pcd_weights
from samgs_optax.aggregators.pcgrad import PCGradState, pcgrad, pcgrad_weights
from samgs_optax.aggregators.random_weighting import (
    RandomWeightingState,
    random_weighting,
    random_weighting_weights,
)
from samgs_optax.aggregators.sdmgrad import SDMGradState, sdmgrad, sdmgrad_weights
from samgs_optax.aggregators.trimmed_mean import TrimmedMeanState, trimmed_mean, trimmed_mean_leaf
from samgs_optax.aggregators.upgrad import upgrad, upgrad_weights
from samgs_optax.samgs import samgs

Factory = Callable[..., optax.GradientTransformation]


class AggregatorSpec(NamedTuple):
    """One registered method: its factory, the recipe's scaling rule, family and reference.

    Attributes:
      name: the registry key.
      factory: ``factory(num_tasks, *, mask=None, **options)``.
      scale_by_tasks: whether :func:`samgs_optax.recipe` multiplies the output by
        K; a callable ``(**options) -> bool`` where an option changes the output's
        size (``linear_scalarization(reduction="mean")``).
      reason: one line saying why.
      family: what kind of method (``"Gramian weighting"``, ``"projection"``,
        ``"random"``, ``"stateful"``, ``"coordinate-wise"``, ``"fixed weights"``,
        ``"loss-aware"``, comma-separated where several fit).
      reference: the paper, short (authors, venue year).
      torchjd: the TorchJD 0.18 class it equals (``""`` if none).
      needs_losses: whether the update needs the per-task losses of the batch
        the gradients come from, passed as an extra argument
        ``tx.update(grads, state, params, task_losses=losses)`` (a (K,) array;
        ``optax.chain`` forwards it and drops it for transforms that do not
        take it, so a training step can always pass it). LibMTL's GradNorm,
        MoCo and DB-MTL do.

    ``family``, ``reference`` and ``torchjd`` have defaults only so that the
    positional form above keeps working; every registered method fills them
    (``tests/test_method_table.py``), and ``scripts/method_table.py`` prints the
    README's method table from them.
    """

    name: str
    factory: Factory
    scale_by_tasks: bool | Callable[..., bool]
    reason: str
    family: str = ""
    reference: str = ""
    torchjd: str = ""
    needs_losses: bool = False

    def scales(self, **options: Any) -> bool:
        """The declared rule for this method built with ``options``."""
        if callable(self.scale_by_tasks):
            return bool(self.scale_by_tasks(**options))
        return self.scale_by_tasks


def _mean_reduction(*, reduction: str = "sum", **_: Any) -> bool:
    return reduction == "mean"


AGGREGATOR_SPECS: tuple[AggregatorSpec, ...] = (
    AggregatorSpec(
        "samgs",
        samgs,
        True,
        "the authors multiply it by K 'to match the sum loss'; its size does not follow "
        "||g|| (momentum branch over sqrt(h))",
        family="stateful",
        reference="Borsani et al., ECML PKDD 2025",
        torchjd="",
    ),
    AggregatorSpec(
        "linear_scalarization",
        linear_scalarization,
        _mean_reduction,
        "the sum of the task gradients; with reduction='mean' the mean, times K",
        family="fixed weights",
        reference="the summed (or mean) loss",
        torchjd="Sum",
    ),
    AggregatorSpec(
        "pcgrad",
        pcgrad,
        False,
        "a sum over tasks, as the authors' PCGrad, which is not scaled",
        family="projection",
        reference="Yu et al., NeurIPS 2020",
        torchjd="PCGrad",
    ),
    AggregatorSpec(
        "mgda",
        mgda,
        True,
        "mean-sized (convex weights); the authors' MGDA weights sum to K",
        family="Gramian weighting",
        reference="Désidéri 2012; Sener & Koltun, NeurIPS 2018",
        torchjd="MGDA",
    ),
    AggregatorSpec(
        "cagrad",
        cagrad,
        True,
        "mean-sized (around the mean g0); the authors' CAGrad times K",
        family="Gramian weighting",
        reference="Liu et al., NeurIPS 2021",
        torchjd="CAGrad",
    ),
    AggregatorSpec(
        "imtl_g",
        imtl_g,
        True,
        "mean-sized (weights sum to 1); the authors' IMTL-G is unscaled",
        family="Gramian weighting",
        reference="Liu et al., ICLR 2021",
        torchjd="IMTLG",
    ),
    AggregatorSpec(
        "aligned_mtl",
        aligned_mtl,
        True,
        "mean-sized (TorchJD's mean weighting); the authors' version sums, then times K",
        family="Gramian weighting",
        reference="Senushkin et al., CVPR 2023",
        torchjd="AlignedMTL",
    ),
    AggregatorSpec(
        "nash_mtl",
        nash_mtl,
        False,
        "its size does not follow ||g|| (G alpha = 1/alpha, max_norm); the authors' unscaled",
        family="Gramian weighting, stateful",
        reference="Navon et al., ICML 2022",
        torchjd="NashMTL",
    ),
    AggregatorSpec(
        "upgrad",
        upgrad,
        True,
        "mean-sized (the mean of the projected gradients)",
        family="Gramian weighting",
        reference="Quinton & Rey, arXiv 2024",
        torchjd="UPGrad",
    ),
    AggregatorSpec(
        "dualproj",
        dualproj,
        True,
        "mean-sized (the projected mean gradient)",
        family="Gramian weighting",
        reference="Lopez-Paz & Ranzato, NeurIPS 2017",
        torchjd="DualProj",
    ),
    AggregatorSpec(
        "graddrop",
        graddrop,
        False,
        "a sum over tasks; the authors' GradDrop: mean times K",
        family="coordinate-wise, random",
        reference="Chen et al., NeurIPS 2020",
        torchjd="GradDrop",
    ),
    # Stateful methods of TorchJD 0.18 (issue 12).
    AggregatorSpec(
        "gradvac",
        gradvac,
        False,
        "a sum over tasks of the corrected gradients, as PCGrad",
        family="projection, stateful",
        reference="Wang et al., ICLR 2021",
        torchjd="GradVac",
    ),
    AggregatorSpec(
        "pcd",
        pcd,
        True,
        "mean-sized (rescaled to the primary gradient's norm)",
        family="Gramian weighting, stateful",
        reference="Varam et al., TMLR 2026",
        torchjd="PCD",
    ),
    AggregatorSpec(
        "cr_mogm",
        cr_mogm,
        True,
        "mean-sized (a moving average of a mean-sized weighting's weights)",
        family="Gramian weighting, stateful",
        reference="Zhou et al., NeurIPS 2022",
        torchjd="CRMOGMWeighting",
    ),
    AggregatorSpec(
        "excess_mtl",
        excess_mtl,
        True,
        "mean-sized (weights on the simplex)",
        family="stateful",
        reference="He et al., ICML 2024",
        torchjd="ExcessMTL",
    ),
    AggregatorSpec(
        "modo",
        modo,
        True,
        "mean-sized (weights on the simplex)",
        family="Gramian weighting, stateful",
        reference="Chen et al., JMLR 2024",
        torchjd="MoDoWeighting",
    ),
    AggregatorSpec(
        "sdmgrad",
        sdmgrad,
        True,
        "mean-sized (simplex weights and preference, over 1 + lambda)",
        family="Gramian weighting, stateful",
        reference="Xiao et al., NeurIPS 2023",
        torchjd="SDMGradWeighting",
    ),
    # Stateless methods of TorchJD 0.18 (issue 12, second part).
    AggregatorSpec(
        "constant",
        constant,
        constant_is_mean,
        "K copies give (sum of the weights) g: scaled when the weights sum to 1 (default 1/K)",
        family="fixed weights",
        reference="fixed user weights",
        torchjd="Constant",
    ),
    AggregatorSpec(
        "random_weighting",
        random_weighting,
        True,
        "mean-sized (softmax weights sum to 1)",
        family="random",
        reference="RLW, Lin et al., TMLR 2022",
        torchjd="Random",
    ),
    AggregatorSpec(
        "trimmed_mean",
        trimmed_mean,
        True,
        "mean-sized (coordinate-wise trimmed mean)",
        family="coordinate-wise",
        reference="Yin et al., ICML 2018",
        torchjd="TrimmedMean",
    ),
    AggregatorSpec(
        "krum",
        krum,
        True,
        "mean-sized (one gradient, or the mean of n_selected)",
        family="Gramian weighting",
        reference="Blanchard et al., NeurIPS 2017",
        torchjd="Krum",
    ),
    AggregatorSpec(
        "con_fig",
        con_fig,
        False,
        "K copies give K g (the sum of the projections)",
        family="Gramian weighting",
        reference="Liu et al., ICLR 2025",
        torchjd="ConFIG",
    ),
    AggregatorSpec(
        "fairgrad",
        fairgrad,
        fairgrad_is_mean,
        "alpha > 0: its size does not follow ||g|| (K^(1/(1+a)) ||g||^((1-a)/(1+a))); 0: mean",
        family="Gramian weighting",
        reference="Ban & Ji, ICML 2024",
        torchjd="FairGrad",
    ),
    # Loss-aware methods of LibMTL (issue 12): their update takes task_losses=.
    AggregatorSpec(
        "moco",
        moco,
        False,
        "normalised: its size follows the losses, not ||g|| (unit gradients times L_i)",
        family="stateful, loss-aware",
        reference="Fernando et al., ICLR 2023",
        torchjd="",
        needs_losses=True,
    ),
    AggregatorSpec(
        "db_mtl",
        db_mtl,
        False,
        "K copies give K (1 - beta^t) g / L: a sum over tasks; LibMTL does not scale",
        family="stateful, loss-aware",
        reference="Lin et al., 2023 (arXiv:2308.12029)",
        torchjd="",
        needs_losses=True,
    ),
    AggregatorSpec(
        "gradnorm",
        gradnorm,
        False,
        "weights sum to K, like the summed loss (K copies give K g)",
        family="stateful, loss-aware",
        reference="Chen et al., ICML 2018",
        torchjd="",
        needs_losses=True,
    ),
)
"""Every registered method, once: :data:`AGGREGATORS` and the recipe's rule come from here."""

AGGREGATORS: dict[str, Factory] = {spec.name: spec.factory for spec in AGGREGATOR_SPECS}
"""Name -> factory ``f(num_tasks, **options) -> optax.GradientTransformation``."""


def aggregator_spec(aggregator: str | Factory) -> AggregatorSpec:
    """The declaration of a registered method, looked up by name or by factory.

    Raises:
      ValueError: for an unknown name (listing the registered names), or for a
        callable that is no registered factory.
    """
    for spec in AGGREGATOR_SPECS:
        if aggregator == spec.name or aggregator is spec.factory:
            return spec
    what = f"name {aggregator!r}" if isinstance(aggregator, str) else f"factory {aggregator!r}"
    raise ValueError(f"unknown aggregator {what}; registered: {', '.join(AGGREGATORS)}.")


__all__ = [
    "AGGREGATORS",
    "AGGREGATOR_SPECS",
    "AggregatorSpec",
    "CRMOGMState",
    "DBMTLState",
    "ExcessMTLState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "RandomWeightingState",
    "SDMGradState",
    "TrimmedMeanState",
    "aggregator_spec",
    "aligned_mtl",
    "aligned_mtl_weights",
    "cagrad",
    "cagrad_weights",
    "con_fig",
    "con_fig_weights",
    "constant",
    "cr_mogm",
    "db_mtl",
    "db_mtl_weights",
    "dualproj",
    "dualproj_weights",
    "excess_mtl",
    "excess_risks",
    "fairgrad",
    "fairgrad_weights",
    "graddrop",
    "graddrop_leaf",
    "gradnorm",
    "gradnorm_logits_grad",
    "gradvac",
    "gradvac_orders",
    "gradvac_weights",
    "imtl_g",
    "imtl_g_weights",
    "krum",
    "krum_weights",
    "linear_scalarization",
    "mgda",
    "mgda_weights",
    "moco",
    "moco_weights",
    "modo",
    "modo_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcd",
    "pcd_qp_weights",
    "pcd_weights",
    "pcgrad",
    "pcgrad_weights",
    "project_onto_simplex",
    "random_weighting",
    "random_weighting_weights",
    "sdmgrad",
    "sdmgrad_weights",
    "trimmed_mean",
    "trimmed_mean_leaf",
    "upgrad",
    "upgrad_weights",
]
