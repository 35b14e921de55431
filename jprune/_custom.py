"""Masks from the user: identity, a given mask, and custom rules (torch's BasePruningMethod)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ._structured import channel_mask, normalize_axis
from ._tree import ShapeError, Tree, as_array, effective, is_array, is_tracer

KINDS = ("unstructured", "structured", "global")


def identity(params, *, select=None):
    """All-True masks for the selected leaves, like ``torch.nn.utils.prune.identity``.

    Args:
      params: an array or a pytree of arrays.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The masks pytree: all-True for selected leaves, None elsewhere.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> jp.identity({"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)})
      {'bias': None, 'kernel': Array([[ True,  True],
             [ True,  True]], dtype=bool)}
    """
    tree = Tree(params)
    # ones_like keeps a sharded leaf's sharding, so a jitted step that takes the masks compiles once.
    return tree.with_masks({i: jnp.ones_like(tree.values[i], bool) for i in tree.select(select)})


def custom_from_mask(params, mask, *, masks=None):
    """Prune where ``mask`` is 0/False, like ``torch.nn.utils.prune.custom_from_mask``.

    Args:
      params: an array or a pytree of arrays.
      mask: a pytree like params: a 0/1 (bool, int or float) array per leaf to prune, ``None``
        elsewhere.
      masks: the current masks, or None; the result is their logical AND with ``mask``.

    Returns:
      The combined masks pytree.

    Raises:
      ValueError: a mask of another shape (also an AssertionError, as in torch), or a mask with
        values other than 0 and 1 (torch stores those and scales the weight; jprune masks are
        bool, so it refuses them).

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> jp.custom_from_mask(jnp.ones(4), jnp.array([1, 0, 1, 0]))
      Array([ True, False,  True, False], dtype=bool)
    """
    tree = Tree(params, masks)
    given = tree.align(mask, "mask")
    new = {}
    for i, (path, v, m) in enumerate(zip(tree.paths, tree.values, given)):
        if m is None:
            continue
        if not is_array(v):
            raise TypeError(f"mask at {path!r}: the leaf is a {type(v).__name__}, not an array")
        v = as_array(path, v)
        if jnp.shape(m) != v.shape:
            raise ShapeError(
                f"mask at {path!r}: default_mask shape {v.shape} must match mask shape {jnp.shape(m)}"
            )
        m = as_bool_mask(m, f"mask at {path!r}")
        new[i] = m if tree.masks[i] is None else tree.masks[i] & m
    return tree.with_masks(new)


def as_bool_mask(m, what: str):
    """A user's 0/1 mask as bool; anything else (0.5, 2, NaN, -1) is refused, never rounded.

    A traced mask (under jit) must already be bool: its values cannot be checked on the host.
    """
    dtype = jnp.result_type(m)
    if dtype == jnp.bool_:
        return jnp.asarray(m)
    if is_tracer(m):
        raise TypeError(
            f"{what} is a traced {dtype} array: under jit a mask must be bool (0/1 values cannot be "
            "checked on the device); pass `mask == 1` yourself, or call outside jit"
        )
    values = np.asarray(m)
    if not np.isin(values, (0, 1)).all():
        bad = values.ravel()[np.flatnonzero(~np.isin(values, (0, 1)))[0]]
        raise ValueError(
            f"{what} has values other than 0 and 1 (e.g. {bad!r}); torch would scale the weight by "
            "them, jprune masks are bool"
        )
    return jnp.asarray(values != 0)


def _call(rule, t, default, kwargs):
    out = rule(t, default, **kwargs)
    if jnp.shape(out) != t.shape:
        raise ShapeError(f"the rule returned a mask of shape {jnp.shape(out)}, expected {t.shape}")
    return as_bool_mask(out, f"the mask {getattr(rule, '__name__', 'the rule')} returned")


def _apply_rule(rule, kind, t, mask, axis, kwargs):
    """One leaf: torch's container rules around ``rule(t, default_mask)``; returns the new mask."""
    if kind == "structured":
        kwargs = {"axis": axis, **kwargs}
    if kind == "global" or mask is None:
        default = jnp.ones(t.shape, bool) if mask is None else mask
        return default & _call(rule, t, default, kwargs)
    # A re-prune: the rule sees the remaining entries (or channels) first, in order, then padding
    # that default_mask marks False; its answer on the padding is dropped (the mask is False there).
    live = mask.ravel() if kind == "unstructured" else channel_mask(mask, axis)
    order = jnp.argsort(~live, stable=True)
    real = jnp.arange(live.size) < jnp.sum(live)
    if kind == "unstructured":
        out = _call(rule, t.ravel()[order], real, kwargs)
        return mask & jnp.zeros(live.shape, bool).at[order].set(out).reshape(t.shape)
    real = real.reshape([-1 if d == axis else 1 for d in range(t.ndim)])
    default = jnp.take(mask, order, axis=axis) & real
    out = _call(rule, jnp.take(t, order, axis=axis), default, kwargs)
    return mask & jnp.take(out, jnp.argsort(order), axis=axis)


def custom_method(compute_mask=None, *, kind="unstructured"):
    """Turn a rule ``compute_mask(t, default_mask, **kw) -> mask`` into a pruning method.

    The counterpart of subclassing torch's ``BasePruningMethod``: write the rule once, get the
    built-ins' calling convention, ``select``, jit and iterative (container) semantics:

    - ``kind="unstructured"``: the first time, the rule sees the whole scores array and an
      all-True ``default_mask``. On an already pruned leaf it sees, as in torch, only the
      remaining entries as a 1-D vector in row-major order; to keep shapes static (jit) they are
      padded to the full size, the padding marked False in ``default_mask``, and whatever the rule
      returns there is ignored.
    - ``kind="structured"``: the rule also gets ``axis=``; on a pruned leaf it sees the remaining
      channels first (padding channels have ``default_mask`` False).
    - ``kind="global"``: the rule sees the whole array and the current mask, always.

    The rule returns a bool (or 0/1) mask of ``t``'s shape; the result is ANDed with the current
    mask. The method is called as ``method(params, *, masks=None, importance_scores=None,
    select=None, **kw)`` (structured: ``method(params, axis, *, ...)``); ``kw`` go to the rule.

    Args:
      compute_mask: the rule; omit it to use ``custom_method(kind=...)`` as a decorator.
      kind: ``"unstructured"``, ``"structured"`` or ``"global"``.

    Returns:
      The pruning method.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> @jp.custom_method(kind="unstructured")
      ... def every_other(t, default_mask):
      ...     return default_mask.ravel().at[::2].set(False).reshape(t.shape)
      >>> m = every_other(jnp.arange(1.0, 6.0))
      >>> m
      Array([False,  True, False,  True, False], dtype=bool)
      >>> every_other(jnp.arange(1.0, 6.0), masks=m)  # every other of the 2 remaining
      Array([False, False, False,  True, False], dtype=bool)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if compute_mask is None:
        return functools.partial(custom_method, kind=kind)

    def method(params, *args, masks=None, importance_scores=None, select=None, **kwargs):
        if kind == "structured":
            if len(args) != 1:
                raise TypeError(f"{compute_mask.__name__}(params, axis, ...) needs the axis")
            axis = args[0]
        elif args:
            raise TypeError(f"{compute_mask.__name__}(params, *, ...) takes no positional amount")
        tree = Tree(params, masks, importance_scores)
        new = {}
        for i in tree.select(select):
            path, v, m, s = tree.paths[i], tree.values[i], tree.masks[i], tree.scores[i]
            ax = normalize_axis(axis, v.shape, path) if kind == "structured" else None
            t = effective(v, m) if s is None else s
            try:
                new[i] = _apply_rule(compute_mask, kind, t, m, ax, kwargs)
            except (ValueError, TypeError) as e:  # ShapeError included: the same type, with the path
                raise type(e)(f"{path}: {e}") from None
        return tree.with_masks(new)

    functools.update_wrapper(method, compute_mask)
    method.kind = kind
    return method
