"""samgs_optax.recipe and the scaling rule every registered method declares.

The declarations are checked against a probe of each method's output (K copies of
one gradient), the recipe against the same chain written by hand, and the heads
against the aggregator's own output (neither scaled, clipped nor counted in the
clip's norm). Flax NNX: ``nnx.Optimizer`` with every form of mask.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_aggregator

import samgs_optax
from samgs_optax.aggregators import AGGREGATOR_SPECS, aggregator_spec

K = 3
DOCS = Path(__file__).resolve().parents[1] / "docs" / "aggregators.md"


# ------------------------------------------------------------------ the declared rule


def output_size(name, ks=(2, 4), **options) -> str:
    """What a method returns for K copies of one gradient g, at K = 2 and 4, ||g|| = 1 and 100.

    "mean": ||u|| / ||g|| depends on neither K nor ||g|| (the size of one gradient);
    "sum": it grows as K; "normalised": it depends on ||g||; "other" otherwise.
    ``ks``: the two K (Krum needs K >= 3). A loss-aware method sees equal losses of 1.
    """
    params = {"w": jnp.zeros(3)}
    sizes = (1.0, 100.0)
    k0, k1 = ks

    @jax.jit
    def ratios(sizes):  # one compile: both K, the two sizes vmapped
        out = []
        for k in ks:
            tx = make_aggregator(name, k, **options)

            def one(size, k=k, tx=tx):
                g = size * jnp.array([0.48, -0.8, 0.36])  # norm = size
                u, _ = tx.update({"w": jnp.stack([g] * k)}, tx.init(params), params)
                return jnp.linalg.norm(u["w"]) / size

            out.append(jax.vmap(one)(sizes))
        return out

    got = np.asarray(ratios(jnp.asarray(sizes)), np.float64)
    ratio = {(k, size): got[i, j] for i, k in enumerate(ks) for j, size in enumerate(sizes)}
    close = lambda a, b: abs(a - b) <= 1e-3 * max(abs(a), abs(b))  # noqa: E731
    if not all(close(ratio[k, 1.0], ratio[k, 100.0]) for k in ks):
        return "normalised"
    if close(ratio[k1, 1.0], ratio[k0, 1.0]):
        return "mean"
    return "sum" if close(ratio[k1, 1.0], k1 / k0 * ratio[k0, 1.0]) else "other"


# Options that change a method's output size, probed besides the defaults.
VARIANTS = [(spec.name, {}) for spec in AGGREGATOR_SPECS] + [
    ("linear_scalarization", {"reduction": "mean"}),
    ("cagrad", {"rescale": 1}),
    ("cagrad", {"rescale": 2}),
    ("fairgrad", {"alpha": 0.0}),
    ("fairgrad", {"alpha": 1.0}),
    ("trimmed_mean", {"trim_number": 0}),
    ("krum", {"n_selected": 2}),
]


@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_every_declaration_matches_the_probe(name, options):
    """Scaled by K exactly when the output is mean-sized; SAM-GS is the one stated exception."""
    spec = aggregator_spec(name)
    size = output_size(name, ks=(3, 6) if name == "krum" else (2, 4), **options)
    if name == "samgs":  # the authors multiply it by K; its output does not follow ||g||
        assert size == "normalised" and spec.scales(**options) is True
    else:
        assert spec.scales(**options) == (size == "mean"), (name, options, size)


def test_registry_is_built_from_the_one_list():
    assert list(samgs_optax.AGGREGATORS) == [spec.name for spec in AGGREGATOR_SPECS]
    for spec in AGGREGATOR_SPECS:
        assert samgs_optax.AGGREGATORS[spec.name] is spec.factory
        assert aggregator_spec(spec.factory) is spec
        assert spec.reason and "\n" not in spec.reason


def test_docs_table_states_every_declaration():
    """docs/aggregators.md's "recipe scales by K" column says what the list declares."""
    text = DOCS.read_text()
    header = next(line for line in text.splitlines() if "recipe scales by K" in line)
    column = [c.strip() for c in header.strip("|").split("|")].index("recipe scales by K")
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)` \|", line)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if match and len(cells) > column and cells[column].split()[0] in ("yes", "no"):
            rows[match.group(1)] = cells[column].split()[0] == "yes"
    assert rows == {spec.name: spec.scales() for spec in AGGREGATOR_SPECS}


# ------------------------------------------------------------------ against the hand-written chain

PARAMS = {
    "trunk": {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)},
    "heads": {"a": jnp.zeros((4, 1)), "b": jnp.zeros((4, 1))},
}
FLAGS = {"trunk": {"w": True, "b": True}, "heads": {"a": False, "b": False}}
PREFIX = {"trunk": True, "heads": False}  # another accepted form of the same mask


def _grads(seed: int, scale: float = 10.0):
    """Stacked (K, ...) gradients whose norms make the clip bind, trunk and heads alike."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=(K, *p.shape)), jnp.float32), PARAMS
    )


# Gradient sizes of successive steps: the clip binds on some steps only, so that neither Adam
# (invariant to a constant factor) nor the clip (which undoes one) hides the scaling.
STEP_SCALES = (0.01, 0.1, 10.0, 0.03)


def _runs(*txs: optax.GradientTransformation) -> list[list]:
    """Each transform's updates over the steps of STEP_SCALES, from its initial state: one
    compiled call for all of them (a scan over the steps per transform)."""
    steps = [_grads(t, scale) for t, scale in enumerate(STEP_SCALES)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *steps)

    @jax.jit
    def run(stacked):
        outs = []
        for tx in txs:

            def step(state, g, tx=tx):
                u, state = tx.update(g, state, PARAMS)
                return state, u

            outs.append(jax.lax.scan(step, tx.init(PARAMS), stacked)[1])
        return outs

    return [
        [jax.tree.map(lambda x, t=t: x[t], us) for t in range(len(STEP_SCALES))]
        for us in run(stacked)
    ]


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))
    )


def _first_updates(grads, *txs):
    """Each transform's first update from its initial state, in one compiled call."""
    return jax.jit(lambda g: [tx.update(g, tx.init(PARAMS), PARAMS)[0] for tx in txs])(grads)


def _by_hand(name: str, scaled: bool, mask) -> optax.GradientTransformation:
    factory = samgs_optax.AGGREGATORS[name]
    post = [optax.scale(float(K))] if scaled else []
    post.append(optax.clip_by_global_norm(1.0))
    if mask is None:
        return optax.chain(factory(K), *post, optax.adam(1e-3))
    return optax.chain(
        factory(K, mask=mask), optax.masked(optax.chain(*post), mask), optax.adam(1e-3)
    )


@pytest.mark.parametrize("name, scaled", [("mgda", True), ("pcgrad", False), ("samgs", True)])
@pytest.mark.parametrize("masked", [True, False], ids=["heads-masked", "all-shared"])
def test_recipe_equals_the_hand_written_chain(name, scaled, masked):
    got, want, other = _runs(
        samgs_optax.recipe(name, K, mask=PREFIX if masked else None),
        _by_hand(name, scaled, FLAGS if masked else None),
        # and the test can fail: the other scaling gives other updates
        _by_hand(name, not scaled, FLAGS if masked else None),
    )
    _assert_trees_close(got, want)
    assert not np.allclose(got[-1]["trunk"]["w"], other[-1]["trunk"]["w"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", ["upgrad", "linear_scalarization", "samgs"])
def test_heads_are_neither_scaled_nor_clipped_nor_in_the_norm(name):
    """With the identity as optimizer the recipe's output is visible: heads = the aggregator's
    heads (their task's gradient), trunk = K (or 1) x the aggregator's trunk, clipped to norm
    exactly 1 over the trunk alone."""
    grads = _grads(0)
    agg = make_aggregator(name, K, mask=FLAGS)
    tx = samgs_optax.recipe(name, K, mask=PREFIX, optimizer=optax.identity())
    raw, out = _first_updates(grads, agg, tx)
    _assert_trees_close(out["heads"], raw["heads"])
    _assert_trees_close(raw["heads"], jax.tree.map(lambda g: g.sum(0), grads["heads"]))
    assert _norm(raw["heads"]) > 1.0  # a clip would have shown
    trunk_norm = _norm(raw["trunk"])
    assert trunk_norm > 1.0
    np.testing.assert_allclose(_norm(out["trunk"]), 1.0, rtol=1e-6)
    _assert_trees_close(out["trunk"], jax.tree.map(lambda x: x / trunk_norm, raw["trunk"]))


def test_scale_override_and_no_clip():
    grads = _grads(1)
    cases = ((None, 1.0), (True, float(K)), (False, 1.0))
    txs = [
        samgs_optax.recipe(
            samgs_optax.pcgrad,
            K,
            mask=FLAGS,
            max_norm=None,
            scale_by_tasks=scale_by_tasks,
            optimizer=optax.identity(),
        )
        for scale_by_tasks, _ in cases
    ]
    raw, *outs = _first_updates(grads, samgs_optax.pcgrad(K, mask=FLAGS), *txs)
    for (_, factor), out in zip(cases, outs, strict=True):
        _assert_trees_close(out["trunk"], jax.tree.map(lambda x, f=factor: f * x, raw["trunk"]))
        _assert_trees_close(out["heads"], raw["heads"])


def test_option_that_changes_the_size_changes_the_scaling():
    """linear_scalarization(reduction="mean") is mean-sized, so the recipe multiplies by K."""
    grads = _grads(2)
    outs = {}
    for reduction in ("sum", "mean"):
        tx = samgs_optax.recipe(
            "linear_scalarization",
            K,
            reduction=reduction,
            max_norm=None,
            optimizer=optax.identity(),
        )
        outs[reduction], _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    _assert_trees_close(outs["mean"], outs["sum"], rtol=1e-5, atol=1e-5)
    _assert_trees_close(outs["sum"], jax.tree.map(lambda g: g.sum(0), grads))


def test_built_transformation_needs_scale_by_tasks():
    built = samgs_optax.upgrad(K, mask=FLAGS)
    with pytest.raises(TypeError, match="scale_by_tasks=True"):
        samgs_optax.recipe(built, K, mask=FLAGS)
    with pytest.raises(TypeError, match="already built"):
        samgs_optax.recipe(built, K, mask=FLAGS, scale_by_tasks=True, norm_eps=1e-3)
    got, want = _runs(
        samgs_optax.recipe(built, K, mask=FLAGS, scale_by_tasks=True),
        samgs_optax.recipe("upgrad", K, mask=FLAGS),
    )
    _assert_trees_close(got, want)


def test_unregistered_factory_needs_scale_by_tasks():
    def mine(num_tasks, *, mask=None):
        return samgs_optax.linear_scalarization(num_tasks, mask=mask)

    with pytest.raises(TypeError, match="not a registered factory"):
        samgs_optax.recipe(mine, K)
    got, want = _runs(
        samgs_optax.recipe(mine, K, mask=FLAGS, scale_by_tasks=False),
        samgs_optax.recipe("linear_scalarization", K, mask=FLAGS),
    )
    _assert_trees_close(got, want)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="'upgrade'.*registered: samgs, linear_scalarization"):
        samgs_optax.recipe("upgrade", K)


def test_learning_rate_and_optimizer_and_max_norm_errors():
    with pytest.raises(ValueError, match="both given"):
        samgs_optax.recipe("mgda", K, 1e-2, optimizer=optax.sgd(1e-2))
    with pytest.raises(ValueError, match="max_norm must be positive"):
        samgs_optax.recipe("mgda", K, max_norm=0.0)
    with pytest.raises(TypeError, match="num_tasks must be a Python int"):
        samgs_optax.recipe("mgda", 2.0)
    default, explicit, sgd = _runs(
        samgs_optax.recipe("mgda", K),
        samgs_optax.recipe("mgda", K, 1e-3),
        samgs_optax.recipe("mgda", K, optimizer=optax.sgd(0.5)),
    )
    _assert_trees_close(default, explicit)
    assert not np.allclose(sgd[0]["trunk"]["w"], default[0]["trunk"]["w"])


def test_options_reach_the_factory():
    recipe = samgs_optax.recipe("samgs", K, mask=FLAGS, gamma=0.9, b1=0.5)
    by_hand = optax.chain(
        samgs_optax.samgs(K, gamma=0.9, b1=0.5, mask=FLAGS),
        optax.masked(optax.chain(optax.scale(K), optax.clip_by_global_norm(1.0)), FLAGS),
        optax.adam(1e-3),
    )
    got, want = _runs(recipe, by_hand)
    _assert_trees_close(got, want)


# ------------------------------------------------------------------ Flax NNX


def _nnx_case():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 6, rngs=rngs)
            self.head = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.trunk(x)))

    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32) * np.array([1.0, 50.0])

    def losses(model):
        return jnp.mean((model(x) - y) ** 2, axis=0)

    return nnx, Net, losses


def _nnx_masks(nnx, model):
    pure = jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key != "head", nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    return {
        "path-filter": nnx.Not(nnx.PathContains("head")),
        "type-filter": nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head"))),
        "pure-dict": pure,
        "nnx-state": nnx.State(pure),
        "prefix": {"trunk": True, "head": False},
    }


@functools.cache
def _nnx_by_hand() -> dict:
    """Three SGD steps of the hand-written chain on the plain parameters of ``_nnx_case``'s
    model: with the scale and clip masked to the trunk ("explicit"), on every leaf (None) and
    on none ("nothing"). Computed once for every mask form below."""
    nnx, Net, losses = _nnx_case()
    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    p = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
    explicit = _nnx_masks(nnx, model)["pure-dict"]
    fn = samgs_optax.value_and_jacrev(lambda q: losses(nnx.merge(graphdef, nnx.State(q))))

    def run(post_mask):
        post = optax.chain(optax.scale(2.0), optax.clip_by_global_norm(1.0))
        tx = optax.chain(
            samgs_optax.upgrad(2, mask=explicit),
            optax.masked(post, post_mask) if post_mask is not None else post,
            optax.sgd(0.05),
        )

        @jax.jit
        def three_steps(q):
            state = tx.init(q)
            for _ in range(3):
                _, g = fn(q)
                u, state = tx.update(g, state, q)
                q = optax.apply_updates(q, u)
            return q

        return three_steps(p)

    nothing = jax.tree.map(lambda _: False, explicit)
    return {"explicit": run(explicit), "all": run(None), "nothing": run(nothing)}


@pytest.mark.parametrize("form", ["path-filter", "type-filter", "pure-dict", "nnx-state", "prefix"])
def test_nnx_optimizer_with_every_mask_form(form):
    """nnx.Optimizer passes Variables to init and plain arrays to update: the recipe gives the
    steps of the hand-written chain on plain pytrees, the type filter included."""
    nnx, Net, losses = _nnx_case()
    model = Net(nnx.Rngs(0))
    mask = _nnx_masks(nnx, model)[form]
    tx = samgs_optax.recipe("upgrad", 2, mask=mask, optimizer=optax.sgd(0.05))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        _, grads = samgs_optax.nnx.value_and_jacrev(losses)(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)

    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    by_hand = _nnx_by_hand()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        got,
        by_hand["explicit"],
    )
    # the mask is visible: scaling and clipping every leaf, or none, gives other parameters
    for wrong in (by_hand["all"], by_hand["nothing"]):
        assert not all(jax.tree.leaves(jax.tree.map(np.allclose, got, wrong)))
