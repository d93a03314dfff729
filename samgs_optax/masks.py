"""Which parameters are shared: every form of ``mask=`` resolved to a tree of bools.

Every aggregator (and :func:`samgs_optax.recipe`) takes ``mask=`` marking the
*shared* leaves (True: they get the surgery) apart from the task heads (False:
they receive the plain sum over tasks). Accepted forms:

* ``None``: every leaf is shared;
* a tree of bools with the params' structure (as ``optax.masked`` takes);
* a tree of bools with the params' *paths* but other containers, matched leaf by
  leaf or as a prefix: a plain dict for a Flax NNX ``nnx.State`` (e.g. from
  ``nnx.to_pure_dict``), an ``nnx.State`` of bools for params wrapped in
  ``nnx.Variable`` (what ``nnx.Optimizer`` passes to ``init``), or
  ``{"encoder": True, "heads": False}`` covering whole sub-trees;
* a callable ``params -> tree`` (as ``optax.masked`` takes), its result matched
  as above;
* a path predicate ``(path, leaf) -> bool`` with ``path`` a tuple of keys (str
  or int), such as a Flax NNX filter: ``nnx.Not(nnx.PathContains("head"))``.
  ``leaf`` is the ``nnx.Variable`` when the params hold Variables (so type
  filters such as ``nnx.Param`` work), else the array.

Flax is never imported here: Variables are recognised only when the caller has
already imported ``flax.nnx``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
Path = tuple[Any, ...]
Mask = PyTree | Callable[..., Any] | None

INJECT_HINT = (
    "optax.inject_hyperparams takes a callable mask for a schedule and calls it with the "
    "step count: pass static_args=('num_tasks', 'mask') to it, or use "
    "samgs_optax.inject_hyperparams, which keeps num_tasks and mask static."
)


def resolve_mask(mask: Mask, params: PyTree) -> PyTree:
    """A tree of Python bools with exactly ``params``' structure, from any accepted ``mask``.

    Raises:
      ValueError: naming the first parameter path the mask does not cover, or the
        first mask path that matches no parameter.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if _is_path_predicate(mask):
        return _map_with_paths(lambda path, leaf: _as_bool(mask(path, leaf), path), params)
    resolved = mask(params) if callable(mask) else mask
    if jax.tree.structure(resolved) == jax.tree.structure(params):
        return jax.tree.map(lambda m: _as_bool(m, None), resolved)
    return _match_by_path(resolved, params)


def _match_by_path(resolved: PyTree, params: PyTree) -> PyTree:
    """Matches each params leaf to the mask entry whose path is equal to or a prefix of its own."""
    entries = dict(_flatten(resolved))
    used: set[Path] = set()

    def lookup(path: Path, _leaf: Any) -> bool:
        for end in range(len(path), -1, -1):
            if path[:end] in entries:
                used.add(path[:end])
                return _as_bool(entries[path[:end]], path[:end])
        hint = f" {INJECT_HINT}" if _is_single_leaf(resolved) else ""
        raise ValueError(
            f"mask does not cover the parameter at {_show(path)}: no mask entry has that "
            f"path or a prefix of it (mask paths: {_show_some(entries)}).{hint}"
        )

    flags = _map_with_paths(lookup, params)
    unused = [p for p in entries if p not in used]
    if unused:
        raise ValueError(
            f"mask entry at {_show(unused[0])} matches no parameter (parameter paths: "
            f"{_show_some(dict(_flatten(params)))})."
        )
    return flags


def _flatten(tree: PyTree) -> list[tuple[Path, Any]]:
    """(path, leaf) pairs with plain keys; an ``nnx.Variable`` counts as one leaf."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return [(_plain_path(path), leaf) for path, leaf in pairs]


def _map_with_paths(fn: Callable[[Path, Any], Any], tree: PyTree) -> PyTree:
    """Like ``jax.tree.map`` with plain paths, returning ``tree``'s exact structure.

    A Variable is passed to ``fn`` whole; its result replaces the Variable's value,
    so the output keeps the Variable nodes (and their metadata).
    """

    def leaf_fn(path, leaf):
        out = fn(_plain_path(path), leaf)
        if _is_variable(leaf):
            return jax.tree.map(lambda _: out, leaf)
        return out

    return jax.tree_util.tree_map_with_path(leaf_fn, tree, is_leaf=_is_variable)


def _plain_path(path: tuple[Any, ...]) -> Path:
    """Key path -> tuple of str/int, the form Flax NNX filters and ``nnx.State`` use."""
    plain = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                plain.append(getattr(key, attr))
                break
        else:
            plain.append(str(key))
    return tuple(plain)


def _as_bool(value: Any, path: Path | None) -> bool:
    if _is_variable(value):
        value = value.get_value() if hasattr(value, "get_value") else value.value
    try:
        return bool(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        where = "" if path is None else f" at {_show(path)}"
        raise ValueError(
            f"mask entry{where} is {type(value).__name__}, not a bool. {INJECT_HINT}"
        ) from err


def _is_path_predicate(mask: Any) -> bool:
    """True for a callable taking two positional arguments ``(path, leaf)``."""
    if not callable(mask):
        return False
    try:
        signature = inspect.signature(mask)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 2


def _is_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _is_single_leaf(tree: PyTree) -> bool:
    return jax.tree.structure(tree, is_leaf=_is_variable).num_nodes == 1


def _show(path: Path) -> str:
    return "".join(f"[{key!r}]" for key in path) or "<root>"


def _show_some(entries: dict[Path, Any], limit: int = 4) -> str:
    shown = [_show(p) for p in list(entries)[:limit]]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")
