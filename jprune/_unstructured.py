"""Unstructured pruning: L1 and random, per leaf or global, with torch's container rules.

A call prunes ``k`` of the *remaining* entries (``mask == True``) of each selected leaf (or, for
``global_unstructured``, of all selected leaves together): ``k`` is the amount itself for an integer,
``round(amount * remaining)`` for a fraction. Entries already pruned stay pruned.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _amount, _cpu, _select
from ._tree import Tree, effective


def score_keys(s):
    """uint32 keys ordered like ``|s|`` (NaN above inf); exact for floats up to 32 bits."""
    if jnp.issubdtype(s.dtype, jnp.floating) and s.dtype.itemsize <= 4:
        return _select.abs_keys(s)
    # float64 / integers: the rank of |s| (a stable sort, NaN last) is an order-preserving key.
    flat = jnp.abs(s).ravel()
    rank = (
        jnp.zeros(flat.shape, jnp.uint32)
        .at[jnp.argsort(flat, stable=True)]
        .set(jnp.arange(flat.size, dtype=jnp.uint32))
    )
    return rank.reshape(s.shape)


def l1_keys(value, mask, score):
    """Keys of ``|score|`` (default ``value * mask``); already-pruned entries get the sentinel."""
    return candidate_keys(score_keys(effective(value, mask) if score is None else score), mask)


def candidate_keys(keys, mask):
    """Already-pruned entries get the sentinel key, so they are never chosen again."""
    return keys if mask is None else jnp.where(mask, keys, jnp.uint32(_select.SENTINEL))


@partial(jax.jit, static_argnames="shapes")
def random_keys(key, shapes):
    """Uniform random 31-bit keys for arrays of the given shapes: pruning the k smallest keys prunes
    a uniform random k-subset. One draw for all of them (one threefry program to compile)."""
    bits = jax.random.bits(key, (sum(math.prod(s) for s in shapes),), jnp.uint32) >> 1
    offsets = np.cumsum([0, *(math.prod(s) for s in shapes)])
    return [bits[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]


@jax.jit
def remaining(masks):
    """Number of unpruned entries of each mask (None: not counted here)."""
    return [None if m is None else jnp.sum(m, dtype=jnp.int32) for m in masks]


count_traced = jax.jit(_amount.count_traced)


def counts(tree: Tree, idx, amount, *, joint: bool):
    """The count(s) k: torch's rule and errors on the host, or on the device for a traced amount."""
    _amount.validate(amount)
    masks = [tree.masks[i] for i in idx]
    left = remaining(masks) if any(m is not None for m in masks) else masks
    sizes = [tree.values[i].size if n is None else n for i, n in zip(idx, left)]
    if _amount.is_traced(amount) or tree.any_traced(idx):  # no host sync, no exceptions
        amount = amount if _amount.is_traced(amount) else _amount.as_device_amount(amount)
        if joint:
            return count_traced(amount, sum(sizes))
        return [count_traced(amount, n) for n in sizes]
    sizes = [int(n) for n in jax.device_get(sizes)]
    if joint:
        return _amount.count(amount, sum(sizes))
    ks = []
    for i, n in zip(idx, sizes):
        try:
            ks.append(_amount.count(amount, n))
        except ValueError as e:
            raise ValueError(f"{tree.paths[i]}: {e}") from None
    return ks


def run(tree: Tree, idx, amount, *, kind: str, joint: bool, key=None, method: str = "auto"):
    """Prune the selected leaves of ``tree`` (``kind`` "l1" or "random"); returns the masks pytree."""
    if kind == "random" and key is None:
        raise TypeError("random pruning needs an explicit PRNG key: pass key=jax.random.key(0)")
    k = counts(tree, idx, amount, joint=joint)
    if kind == "random":
        bits = random_keys(key, tuple(tree.values[i].shape for i in idx))
        sources = [(candidate_keys, (b, tree.masks[i])) for b, i in zip(bits, idx)]
    else:
        sources = [(l1_keys, (tree.values[i], tree.masks[i], tree.scores[i])) for i in idx]
    return tree.with_masks(dict(zip(idx, prune(sources, k, joint=joint, method=method))))


@partial(jax.jit, static_argnames=("keyfns", "joint", "method"))
def _prune_at_once(keyfns, args, k, *, joint, method):
    sources = list(zip(keyfns, args))
    if joint:
        return _select.prune_smallest(sources, k, method=method)
    return [_select.prune_smallest([s], ki, method=method)[0] for s, ki in zip(sources, k)]


def native_inputs(sources):
    """The CPU kernel's ``(values, masks)`` for these sources, or None if it cannot take them."""
    values, masks = [], []
    for fn, args in sources:
        if fn is l1_keys:
            value, mask, score = args
            values.append(value if score is None else score)
        elif fn is candidate_keys:
            value, mask = args
            values.append(value)
        else:
            return None
        masks.append(mask)
    if sum(math.prod(jnp.shape(v)) for v in values) >= 2**31:  # counts are int32 in the kernel
        return None
    return (values, masks) if _cpu.usable(values + [m for m in masks if m is not None]) else None


def prune(sources, k, *, joint, method="auto"):
    """Keep masks for the sources: ``k`` pruned per source, or across all of them (``joint``).

    On CPU the native kernel (``_cpu``) takes them when it can. Otherwise, sources that select by
    histograms run as separate passes (fast on XLA:CPU, see ``_select``); the others, small or
    sorted, run as one jitted program: one compilation instead of several.
    """
    native = native_inputs(sources) if method == "auto" else None
    if native is not None:
        return _cpu.prune(*native, k, joint=joint)
    sizes = [math.prod(jnp.shape(args[0])) for _, args in sources]
    if joint:
        if _select.use_histogram(sum(sizes), method):
            return _select.prune_smallest(sources, k, method=method)
        return _prune_at_once(
            tuple(f for f, _ in sources), [a for _, a in sources], k, joint=True, method=method
        )
    staged = [j for j, n in enumerate(sizes) if _select.use_histogram(n, method)]
    staged_masks = _select.prune_groups([[sources[j]] for j in staged], [k[j] for j in staged], method=method)
    out = {j: m for j, (m,) in zip(staged, staged_masks)}
    rest = [j for j in range(len(sources)) if j not in staged]
    if rest:
        fns, args = tuple(sources[j][0] for j in rest), [sources[j][1] for j in rest]
        ks = jnp.asarray([k[j] for j in rest], jnp.int32)
        out.update(zip(rest, _prune_at_once(fns, args, ks, joint=False, method=method)))
    return [out[j] for j in range(len(sources))]


def l1_unstructured(params, amount, *, masks=None, importance_scores=None, select=None):
    """Prune the ``amount`` entries of smallest ``|score|`` in each selected leaf.

    Like ``torch.nn.utils.prune.l1_unstructured``: exactly ``k`` entries (a count, not a threshold);
    with ``masks``, ``k`` counts only the remaining entries and the result is combined with them.

    Args:
      params: an array or a pytree of arrays (Linen params dict, ``nnx.State``).
      amount: an int count, or a float fraction in [0, 1] (``round(amount * remaining)``); a traced
        jax scalar works too, inside jit, without recompiling when it changes.
      masks: the current masks (bool leaves, ``None`` where unpruned), or None.
      importance_scores: a pytree like params (``None`` leaves allowed); default ``params * masks``.
      select: the leaves to prune: a path ``"conv1/kernel"``, a glob ``"*/kernel"``, a list of
        them, or a predicate ``(path, leaf) -> bool``. Default: floating leaves with ndim >= 2
        (kernels, not biases); a bare array is always selected.

    Returns:
      The masks pytree: bool arrays for pruned leaves (False = pruned), None elsewhere.

    Raises:
      TypeError: ``amount`` is not an int or float.
      ValueError: ``amount`` is out of range or larger than a leaf's remaining entries (the message
        names the leaf), or masks/scores do not match params.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> w = jnp.array([[1.0, -2.0, 3.0], [-4.0, 0.5, 6.0]])
      >>> jp.l1_unstructured(w, 2)
      Array([[False,  True,  True],
             [ True, False,  True]], dtype=bool)
    """
    tree = Tree(params, masks, importance_scores)
    return run(tree, tree.select(select), amount, kind="l1", joint=False)


def random_unstructured(params, amount, *, key, masks=None, select=None):
    """Prune ``amount`` entries chosen uniformly at random in each selected leaf.

    Like ``torch.nn.utils.prune.random_unstructured``: the same counts and container rules (the
    indices depend on the RNG). Each selected leaf draws from its own split of ``key``.

    Args:
      params: an array or a pytree of arrays.
      amount: int count or float fraction (see ``l1_unstructured``).
      key: a ``jax.random`` key.
      masks: the current masks, or None.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The combined masks pytree.

    Examples:
      >>> import jax, jax.numpy as jnp, jprune as jp
      >>> m = jp.random_unstructured(jnp.ones((4, 5)), 0.3, key=jax.random.key(0))
      >>> int((~m).sum())
      6
    """
    tree = Tree(params, masks)
    return run(tree, tree.select(select), amount, kind="random", joint=False, key=key)


def global_unstructured(
    params, amount, *, method="l1", key=None, masks=None, importance_scores=None, select=None
):
    """Prune ``amount`` entries across all selected leaves together (one global ranking).

    Like ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` (``method="l1"``) or
    ``RandomUnstructured`` (``method="random"``): a fraction counts the remaining entries of all
    selected leaves together. Selection is exact and never sorts everything (see ``_select``).

    Args:
      params: an array or a pytree of arrays.
      amount: int count or float fraction of all remaining entries.
      method: ``"l1"`` (smallest ``|score|``) or ``"random"``.
      key: a ``jax.random`` key, needed for ``method="random"``.
      masks: the current masks, or None.
      importance_scores: for ``"l1"``: a pytree like params; default ``params * masks``.
      select: which leaves (see ``l1_unstructured``).

    Returns:
      The combined masks pytree.

    Raises:
      ValueError: an unknown ``method``, a bad amount, or more than the remaining entries.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> p = {"a": jnp.array([[1.0, 2.0, 3.0, 4.0], [-4.0, -3.0, -2.0, -1.0]]),
      ...      "b": jnp.array([[0.0, 0.1, -2.0]])}
      >>> m = jp.global_unstructured(p, 4)
      >>> jp.apply_masks(p, m)["b"]
      Array([[ 0.,  0., -2.]], dtype=float32)
    """
    if method not in ("l1", "random"):
        raise ValueError(f"method must be 'l1' or 'random', got {method!r}")
    tree = Tree(params, masks, importance_scores)
    return run(tree, tree.select(select), amount, kind=method, joint=True, key=key)
