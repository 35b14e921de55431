"""N:M semi-structured sparsity: in every group of ``m`` consecutive entries, ``n`` are pruned."""

from __future__ import annotations

import numbers
from functools import partial

import jax
import jax.numpy as jnp

from ._select import magnitude_keys
from ._structured import normalize_axis
from ._tree import Tree


def _check(n, m):
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"expected 0 <= n <= m and m >= 1, got n={n}, m={m}")


@partial(jax.jit, static_argnames=("n", "m", "axis"))
def _prune(value, mask, score, *, n, m, axis):
    keys = magnitude_keys(value if score is None else score)
    live = jnp.ones(value.shape, bool) if mask is None else mask
    # groups of m consecutive entries along `axis`: (..., groups, m)
    keys, live = (jnp.moveaxis(x, axis, -1) for x in (keys, live))
    shape = keys.shape
    keys, live = (x.reshape(*shape[:-1], shape[-1] // m, m) for x in (keys, live))
    # each candidate's rank among its group's candidates: smaller key first, ties by index
    i = jnp.arange(m)
    before = (keys[..., None, :] < keys[..., :, None]) | (
        (keys[..., None, :] == keys[..., :, None]) & (i[None, :] < i[:, None])
    )
    rank = jnp.sum(before & live[..., None, :], axis=-1)
    take = jnp.maximum(n - jnp.sum(~live, axis=-1, keepdims=True), 0)  # already pruned count
    keep = live & ~(rank < take)
    return jnp.moveaxis(keep.reshape(shape), -1, axis)


def n_m_unstructured(
    params, n: int = 2, m: int = 4, *, axis: int = -2, masks=None, importance_scores=None, select=None
):
    """Prune ``n`` of every ``m`` consecutive entries along ``axis``: N:M sparsity (2:4 by default).

    In each group of ``m`` entries the ``n`` with the smallest ``|score|`` are pruned, ties by
    index (lowest first). With ``masks``, entries already pruned count towards the ``n`` of their
    group: a group with ``n`` or more pruned stays as it is, so re-pruning keeps the pattern. The
    default axis is a Flax kernel's input axis (``-2``), the axis sparse tensor cores group.

    Args:
      params: an array or a pytree of arrays.
      n: entries pruned per group.
      m: the group size; the leaf's length along ``axis`` must be a multiple of it.
      axis: the axis along which groups run, in the array's own layout.
      masks: the current masks, or None.
      importance_scores: a pytree like params; default: the params.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The combined masks pytree.

    Raises:
      TypeError, ValueError: ``n``/``m`` not ints with ``0 <= n <= m``; a leaf whose length along
        ``axis`` is not a multiple of ``m`` (the message names it); ``axis`` out of range.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> w = jnp.array([[0.1, -3.0, 2.0, 0.5, 1.0, 0.2, -0.3, 4.0]])
      >>> jp.n_m_unstructured(w, 2, 4, axis=1).astype(int).tolist()
      [[0, 1, 1, 0, 1, 0, 0, 1]]
    """
    _check(n, m)
    tree = Tree(params, masks, importance_scores)
    new = {}
    for i in tree.select(select):
        v = tree.values[i]
        ax = normalize_axis(axis, v.shape, tree.paths[i])
        if v.shape[ax] % m:
            raise ValueError(
                f"{tree.where(i)}length {v.shape[ax]} along axis {axis} is not a multiple of m={m}: "
                "N:M groups would not tile it"
            )
        new[i] = _prune(v, tree.masks[i], tree.scores[i], n=n, m=m, axis=ax)
    return tree.with_masks(new)
