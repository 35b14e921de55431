"""Structured pruning: whole channels along one axis, by Ln norm or at random.

``axis`` is in the array's own layout. Flax kernels keep output channels *last*: torch ``dim=0`` of a
Linear/Conv weight is ``axis=-1`` of the Flax kernel (and torch ``dim=1``, input channels, is
``axis=-2``). With ``masks``, a channel remains while any of its entries is unpruned (torch's
container rule): ``k`` counts remaining channels and only they can be chosen.
"""

from __future__ import annotations

import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp

from . import _amount, _select
from ._tree import Tree, effective


def normalize_axis(axis, shape, path):
    """torch's checks: ndim >= 2 (ValueError), axis in range (IndexError); returns axis >= 0."""
    ndim = len(shape)
    if ndim <= 1:
        raise ValueError(
            f"{path}: Structured pruning can only be applied to multidimensional tensors. "
            f"Found tensor of shape {tuple(shape)} with {ndim} dims"
        )
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if axis >= ndim:
        raise IndexError(f"{path}: Invalid index {axis} for tensor of size {tuple(shape)}")
    if axis < -ndim:
        raise IndexError(f"{path}: tuple index out of range (axis={axis} for ndim={ndim})")
    return int(axis) % ndim


def check_norm(n, ndim, path):
    """torch's rules for ``n``: a real p, inf, -inf, 'fro' (<= 2 reduced axes), 'nuc' (exactly 2)."""
    if n in ("fro", "nuc"):
        reduced = ndim - 1
        if (n == "fro" and reduced > 2) or (n == "nuc" and reduced != 2):
            raise RuntimeError(
                f"{path}: linalg.matrix_norm: dim must be a 2-tuple. Got {reduced} reduced axes "
                f"(n={n!r} needs {'at most 2' if n == 'fro' else 'exactly 2'})"
            )
    elif isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise ValueError(f"n must be a real number, inf, -inf, 'fro' or 'nuc', got {n!r}")


def channel_norms(t, n, axis):
    """The Ln norm of each slice of ``t`` along ``axis`` (``torch.norm(t, p=n, dim=others)``).

    Reduces over the other axes in place (no transpose: one pass over ``t``).
    """
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    if n == "nuc":  # 3-D only: nuclear norm of each 2-D slice
        return jnp.sum(jnp.linalg.svd(jnp.moveaxis(t, axis, 0), compute_uv=False), axis=-1)
    others = tuple(d for d in range(t.ndim) if d != axis)
    x = jnp.abs(t)
    p = 2.0 if n == "fro" else float(n)
    if p == math.inf:
        return jnp.max(x, axis=others)
    if p == -math.inf:
        return jnp.min(x, axis=others)
    if p == 0:
        return jnp.sum(x != 0, axis=others).astype(x.dtype)
    if p == 1:
        return jnp.sum(x, axis=others)
    if p == 2:
        return jnp.sqrt(jnp.sum(x * x, axis=others))
    return jnp.sum(x**p, axis=others) ** (1.0 / p)


def channel_mask(mask, axis):
    """True for channels along ``axis`` with any unpruned entry."""
    others = tuple(d for d in range(mask.ndim) if d != axis)
    return jnp.any(mask, axis=others)


def expand(channels, shape, axis):
    """Broadcast a per-channel vector to ``shape`` along ``axis``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(channels.reshape(view), shape)


@partial(jax.jit, static_argnames="axes")
def live_channels(masks, *, axes):
    """Number of remaining channels of each mask (None: not counted here)."""
    return [None if m is None else jnp.sum(channel_mask(m, a), dtype=jnp.int32) for m, a in zip(masks, axes)]


@partial(jax.jit, static_argnames=("axes", "n", "kind"))
def _prune(values, masks, scores, rngs, k, *, axes, n, kind):
    out = []
    for i, (v, m, s, r, axis) in enumerate(zip(values, masks, scores, rngs, axes)):
        c = v.shape[axis]
        if kind == "random":
            keys = jax.random.bits(r, (c,), jnp.uint32) >> 1
        else:  # norms keep their dtype's order: float64 norms get 64-bit keys
            keys = _select.magnitude_keys(channel_norms(effective(v, m) if s is None else s, n, axis))
        live = None if m is None else channel_mask(m, axis)
        bits = 8 * keys.dtype.itemsize
        keep = _select.prune_smallest([(_select.given, (keys, live))], k[i], bits=bits)[0]
        keep = expand(keep, v.shape, axis)
        out.append(keep if m is None else m & keep)
    return out


def run(tree: Tree, idx, amount, axis, *, kind, n=None, key=None):
    """Prune channels of the selected leaves; returns the masks pytree."""
    axes = tuple(normalize_axis(axis, tree.values[i].shape, tree.paths[i]) for i in idx)
    if kind == "ln":
        for i in idx:
            check_norm(n, tree.values[i].ndim, tree.paths[i])
            s = tree.scores[i] if tree.scores[i] is not None else tree.values[i]
            if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
                raise RuntimeError(
                    f"{tree.where(i)}linalg.vector_norm: Expected a floating point tensor as "
                    f"input. Got {jnp.result_type(s)}"
                )
    elif key is None:
        raise TypeError("random pruning needs an explicit PRNG key: pass key=jax.random.key(0)")
    masks = [tree.masks[i] for i in idx]
    channels = [tree.values[i].shape[a] for i, a in zip(idx, axes)]
    live = live_channels(masks, axes=axes)
    live = [c if n is None else n for c, n in zip(channels, live)]
    where = [tree.where(i) for i in idx]
    k = _amount.counts(amount, live, channels, where=where, traced=tree.any_traced(idx))
    rngs = list(jax.random.split(key, len(idx))) if kind == "random" else [None] * len(idx)
    new = _prune(
        [tree.values[i] for i in idx],
        masks,
        [tree.scores[i] for i in idx],
        rngs,
        jnp.asarray(k, jnp.int32),
        axes=axes,
        n=n,
        kind=kind,
    )
    return tree.with_masks(dict(zip(idx, new)))


def ln_structured(params, amount, n, axis, *, masks=None, importance_scores=None, select=None):
    """Prune the ``amount`` channels along ``axis`` with the smallest Ln norm, in each selected leaf.

    Like ``torch.nn.utils.prune.ln_structured`` (``dim`` -> ``axis``, in the array's own layout:
    torch ``dim=0`` of a Linear/Conv weight is ``axis=-1`` of a Flax kernel). A fraction is of the
    channels. Norms are computed in at least float32 over whole channels of the scores.

    Args:
      params: an array or a pytree of arrays.
      amount: int count or float fraction of the remaining channels.
      n: the norm: a real ``p`` (1, 2, 0.5, 0 = count of nonzeros, negative), ``inf``, ``-inf``,
        ``"fro"`` (= 2, at most 2 reduced axes) or ``"nuc"`` (3-D arrays only).
      axis: the channel axis.
      masks: the current masks, or None.
      importance_scores: a pytree like params; default ``params * masks``.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The combined masks pytree.

    Raises:
      ValueError: a 1-D leaf, a bad amount, or more than the remaining channels.
      IndexError: ``axis`` out of range.
      RuntimeError: ``"fro"``/``"nuc"`` on a shape they do not apply to, or integer scores.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> k = jnp.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.2]])  # (in, out): 3 output channels
      >>> jp.ln_structured(k, 1, n=2, axis=-1)
      Array([[ True,  True, False],
             [ True,  True, False]], dtype=bool)
    """
    tree = Tree(params, masks, importance_scores)
    return run(tree, tree.select(select), amount, axis, kind="ln", n=n)


def random_structured(params, amount, axis, *, key, masks=None, select=None):
    """Prune ``amount`` channels along ``axis`` chosen at random, in each selected leaf.

    Like ``torch.nn.utils.prune.random_structured`` (same counts and container rules).

    Args:
      params: an array or a pytree of arrays.
      amount: int count or float fraction of the remaining channels.
      axis: the channel axis, in the array's own layout.
      key: a ``jax.random`` key.
      masks: the current masks, or None.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The combined masks pytree.

    Examples:
      >>> import jax, jax.numpy as jnp, jprune as jp
      >>> m = jp.random_structured(jnp.ones((5, 4, 2)), 0.6, axis=2, key=jax.random.key(0))
      >>> m.sum(axis=(0, 1)).tolist() in ([0, 20], [20, 0])
      True
    """
    tree = Tree(params, masks)
    return run(tree, tree.select(select), amount, axis, kind="random", key=key)
