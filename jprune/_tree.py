"""Params, masks and scores as aligned lists of leaves, addressed by path ("conv1/kernel")."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ShapeError(ValueError, AssertionError):
    """A mask or score whose shape is not its parameter's (torch raises AssertionError here)."""


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """``(DictKey('conv1'), DictKey('kernel'))`` -> ``"conv1/kernel"``; NNX's trailing ``.value`` dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def is_kernel(path: str, leaf) -> bool:
    """The default selection: a floating array of ``ndim >= 2`` named ``kernel``."""
    return (
        path.rsplit("/", 1)[-1] == "kernel"
        and is_array(leaf)
        and jnp.ndim(leaf) >= 2
        and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    )


def is_variable(x) -> bool:
    """An ``nnx.Variable`` (``Param``, an optimizer's ``OptArray``...): a box around one leaf.

    Looked up lazily: without ``flax.nnx`` imported there can be none, and the core never imports it.
    """
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _is_leaf(x) -> bool:
    return x is None or is_variable(x)


def unbox(x):
    """A leaf without its ``nnx.Variable`` box (the value itself otherwise)."""
    return x.get_value() if is_variable(x) else x


def unbox_tree(tree):
    """``tree`` with every ``nnx.Variable`` replaced by its value (``nnx.as_pure``); ``tree``
    itself when it holds none."""
    if not any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable)):
        return tree
    return jax.tree.map(unbox, tree, is_leaf=is_variable)


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _few(paths: Sequence[str], n: int = 4) -> str:
    """Up to ``n`` paths, quoted, and how many more."""
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


Select = str | Sequence[str] | Callable[[str, Any], bool] | None


def is_array(x) -> bool:
    """Whether a leaf is an array (or a number) that pruning can address: not a string, a
    function or another object that merely sits in the tree."""
    return isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex)


def as_array(path: str, v):
    """A leaf as a JAX array (non-array leaves as they are), refusing a silent narrowing: without
    ``jax_enable_x64`` JAX would turn a float64/int64 numpy leaf into float32/int32."""
    if isinstance(v, jax.Array) or not is_array(v):
        return v
    if isinstance(v, np.ndarray | np.generic) and jax.dtypes.canonicalize_dtype(v.dtype) != v.dtype:
        raise TypeError(
            f"{path or 'the array'} is {v.dtype}, which JAX would round to "
            f"{jax.dtypes.canonicalize_dtype(v.dtype)} (jax_enable_x64 is off): enable it "
            "(jax.config.update('jax_enable_x64', True)) or cast the leaf yourself"
        )
    return jnp.asarray(v)


class Tree:
    """A params pytree flattened to leaves, with the masks and scores aligned to it.

    ``masks`` and ``importance_scores`` mirror ``params``; ``None`` marks a leaf without one. An
    ``nnx.Variable`` (``Param``, ``OptArray``) counts as the leaf it holds, in all three: masks from an
    optimizer state line up with ``nnx.state(model, nnx.Param)``, and masks come out as plain arrays
    (an ``nnx.State`` of arrays for an ``nnx.State`` of params), never wrapped as a ``Param``. Leaves
    that are not arrays (strings, functions) are carried along untouched and never selected. Only
    the leaves a call uses (masked or selected) become JAX arrays; the others are left as given.

    Raises:
      ValueError: two leaves have the same path string (``{"a/b": x, "a": {"b": y}}``): a path
        could not name one of them.
    """

    def __init__(self, params, masks=None, scores=None, *, scores_name="importance_scores"):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
        self.boxes = [v if is_variable(v) else None for _, v in flat]
        flat = [(p, unbox(v)) for p, v in flat]
        self.paths = [path_str(p) for p, _ in flat]
        if len(set(self.paths)) != len(self.paths):
            twice = sorted({p for p in self.paths if self.paths.count(p) > 1})
            raise ValueError(
                f"params has several leaves at the path(s) {twice} (a key containing '/' collides "
                "with a nested key): rename the keys so that every leaf has its own path"
            )
        self.masks = self.align(masks, "masks")
        self.values = [
            v if m is None else as_array(p, v) for p, (_, v), m in zip(self.paths, flat, self.masks)
        ]
        self.scores = [
            None if s is None else as_array(f"{scores_name} at {path!r}", s)
            for path, s in zip(self.paths, self.align(scores, scores_name))
        ]
        for path, v, m in zip(self.paths, self.values, self.masks):
            if m is None:
                continue
            if not is_array(v):
                raise TypeError(f"mask at {path!r}: the leaf is a {type(v).__name__}, not an array")
            if jnp.shape(m) != jnp.shape(v):
                raise ShapeError(f"mask at {path!r} has shape {jnp.shape(m)}, expected {jnp.shape(v)}")
            if jnp.result_type(m) != jnp.bool_:
                raise TypeError(f"mask at {path!r} has dtype {jnp.result_type(m)}, expected bool")
        for path, v, s in zip(self.paths, self.values, self.scores):
            if s is not None and jnp.shape(s) != jnp.shape(v):
                raise ShapeError(
                    f"{scores_name} at {path!r} should have the same shape as the parameter, "
                    f"got {tuple(jnp.shape(s))} vs {jnp.shape(v)}"
                )

    def align(self, tree, name):
        """The leaves of ``tree`` (a pytree like params, None allowed) in params order."""
        if tree is None:
            return [None] * len(self.paths)
        try:
            leaves = self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError):
            # Another container with the very same leaf paths (a dict for an nnx.State) lines up too.
            flat = {
                path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
            }
            known = set(self.paths)
            extra = [p for p, x in flat.items() if p not in known and x is not None]
            missing = [p for p in self.paths if p not in flat]
            if extra or missing:
                what = name[:-1] if name.endswith("s") else name
                why = [f"no {what} at {_few(missing)}"] if missing else []
                why += [f"entries at {_few(extra)}, where params have none"] if extra else []
                raise ValueError(
                    f"{name} must mirror the structure of params: {'; '.join(why)} (a leaf that is "
                    "not pruned takes None)"
                ) from None
            leaves = [flat[p] for p in self.paths]
        return [unbox(x) for x in leaves]

    def select(self, select: Select) -> list[int]:
        """Indices of the selected leaves (see the ``select`` argument of the pruning functions).

        The default is every leaf named ``kernel`` (Dense, Conv, Einsum and attention layers) with a
        floating dtype and ``ndim >= 2``; never biases, norm scales, embeddings or free-standing
        params. A bare array is always selected.
        """
        if not self.values:
            raise ValueError("params has no leaves: there is nothing to prune")
        if select is None:
            if self.treedef.num_nodes == 1:  # a bare array: prune it
                idx = [0]
            else:
                idx = [i for i, (p, v) in enumerate(zip(self.paths, self.values)) if is_kernel(p, v)]
            what = "the default selection (floating leaves named 'kernel' with ndim >= 2)"
        elif callable(select):
            idx = [i for i, (p, v) in enumerate(zip(self.paths, self.values)) if is_array(v) and select(p, v)]
            what = f"select={select!r}"
        else:
            patterns = [select] if isinstance(select, str) else list(select)
            if not all(isinstance(s, str) for s in patterns):
                raise TypeError(
                    f"select must be a path, a glob, a list of them or a predicate, got {select!r}"
                )
            idx = [i for i, p in enumerate(self.paths) if any(fnmatch.fnmatchcase(p, s) for s in patterns)]
            what = f"select={select!r}"
        if not idx:
            raise ValueError(f"{what} matches no leaf; the paths are {self.paths}")
        for i in idx:
            if not is_array(self.values[i]):
                raise TypeError(
                    f"{what} selects {self.paths[i]!r}, a {type(self.values[i]).__name__}, not an array"
                )
            self.values[i] = as_array(self.paths[i], self.values[i])
        return idx

    def where(self, i: int) -> str:
        """``"path: "`` to start an error message about leaf ``i`` (empty for a bare array)."""
        return f"{self.paths[i]}: " if self.paths[i] else ""

    def with_masks(self, new: dict[int, Any]):
        """The masks pytree: ``new[i]`` for the given leaves, the incoming mask (or None) elsewhere."""
        leaves = [new.get(i, m) for i, m in enumerate(self.masks)]
        return self.treedef.unflatten(leaves)

    def with_values(self, values):
        """A pytree like params holding ``values``, each back in its leaf's ``nnx.Variable`` box."""
        leaves = [
            v if box is None else jax.tree.structure(box).unflatten([v]) for v, box in zip(values, self.boxes)
        ]
        return self.treedef.unflatten(leaves)

    def any_traced(self, idx, *extra) -> bool:
        arrays = [self.masks[i] for i in idx] + [self.scores[i] for i in idx] + list(extra)
        return any(is_tracer(a) for a in arrays)


def effective(value, mask):
    """``value * mask``: torch's effective weight, and its default importance scores.

    Written as a select of ``value`` and ``value * 0`` because XLA rewrites ``value * mask`` into
    ``select(mask, value, 0)`` under jit, losing what the product gives (NaN stays NaN, -x -> -0.0).
    """
    if mask is None:
        return value
    # value * 0 keeps a float's sign and NaN (torch's product); other dtypes have no such zero, and
    # bool * 0 would promote to int
    zero = value * 0 if jnp.issubdtype(jnp.result_type(value), jnp.inexact) else jnp.zeros_like(value)
    return jnp.where(mask, value, zero)
