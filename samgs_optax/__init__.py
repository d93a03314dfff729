"""samgs_optax: SAM-GS and multi-task gradient aggregators as optax transforms.

Every aggregator consumes *stacked per-task gradients* (each leaf has a leading
task axis of length K, as :func:`value_and_jacrev` returns them) and produces
one update shaped like the parameters, ready to chain with any optax optimizer.
"""

from samgs_optax import (
    nnx,  # Flax NNX helpers; flax is imported only when they are called
    scalarizers,  # loss scalarizers (UW, DWA, FAMO, ...): see its docstring
)
from samgs_optax.accumulation import MultiStepsState, has_updated, multi_steps
from samgs_optax.aggregators import (
    AGGREGATOR_SPECS,
    AGGREGATORS,
    AggregatorSpec,
    CRMOGMState,
    DBMTLState,
    ExcessMTLState,
    GradDropState,
    GradNormState,
    GradVacState,
    MoCoState,
    MoDoState,
    NashMTLState,
    PCDState,
    PCGradState,
    RandomWeightingState,
    SDMGradState,
    TrimmedMeanState,
    aligned_mtl,
    cagrad,
    con_fig,
    constant,
    cr_mogm,
    db_mtl,
    dualproj,
    excess_mtl,
    fairgrad,
    graddrop,
    gradnorm,
    gradvac,
    imtl_g,
    krum,
    linear_scalarization,
    mgda,
    moco,
    modo,
    nash_mtl,
    pcd,
    pcgrad,
    random_weighting,
    sdmgrad,
    trimmed_mean,
    upgrad,
)
from samgs_optax.finite import ApplyIfFiniteState, apply_if_finite
from samgs_optax.gramian import GramianWeightingState, gramian, gramian_weighting
from samgs_optax.hyperparams import inject_hyperparams
from samgs_optax.jacobian import value_and_jacrev
from samgs_optax.masks import resolve_mask
from samgs_optax.recipe import recipe
from samgs_optax.samgs import SamgsState, samgs
from samgs_optax.scalarizers import SCALARIZERS
from samgs_optax.similarity import magnitude_similarity, pairwise_similarity, task_norms

__all__ = [
    "SCALARIZERS",
    "AGGREGATOR_SPECS",
    "AGGREGATORS",
    "AggregatorSpec",
    "CRMOGMState",
    "DBMTLState",
    "ExcessMTLState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "MoCoState",
    "MoDoState",
    "GramianWeightingState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "RandomWeightingState",
    "SDMGradState",
    "TrimmedMeanState",
    "aligned_mtl",
    "cagrad",
    "con_fig",
    "constant",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "excess_mtl",
    "fairgrad",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gramian",
    "gramian_weighting",
    "imtl_g",
    "krum",
    "linear_scalarization",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pcd",
    "pcgrad",
    "random_weighting",
    "sdmgrad",
    "trimmed_mean",
    "upgrad",
    "ApplyIfFiniteState",
    "MultiStepsState",
    "SamgsState",
    "apply_if_finite",
    "has_updated",
    "inject_hyperparams",
    "magnitude_similarity",
    "multi_steps",
    "nnx",
    "pairwise_similarity",
    "recipe",
    "resolve_mask",
    "samgs",
    "scalarizers",
    "task_norms",
    "value_and_jacrev",
]

__version__ = "0.1.0"
