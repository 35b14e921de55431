"""Unstructured pruning: L1 and random, per leaf or global, with torch's container rules.

A call prunes ``k`` of the *remaining* entries (``mask == True``) of each selected leaf (or, for
``global_unstructured``, of all selected leaves together): ``k`` is the amount itself for an integer,
``round(amount * remaining)`` for a fraction. Entries already pruned stay pruned.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _amount, _cpu, _pallas, _select
from ._tree import Tree


def l1_keys(value, mask, score):
    """Keys of ``|score|`` (default: the value itself); the candidates are the unpruned entries."""
    return _select.magnitude_keys(value if score is None else score), mask


def candidate_keys(keys, mask):
    """Random keys; the candidates are the unpruned entries."""
    return keys, mask


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


def counts(tree: Tree, idx, amount, *, joint: bool):
    """The count(s) k: one for the whole group (``joint``) or one per leaf (``_amount.counts``)."""
    sizes = [tree.values[i].size for i in idx]
    for i, n in zip(idx, sizes):
        _select.check_group_size(n, tree.where(i))
    masks = [tree.masks[i] for i in idx]
    live = remaining(masks) if any(m is not None for m in masks) else masks
    live = [n if m is None else m for n, m in zip(sizes, live)]
    traced = tree.any_traced(idx)
    if joint:
        _select.check_group_size(sum(sizes))
        return _amount.counts(amount, [sum(live)], [sum(sizes)], where=[""], traced=traced)[0]
    return _amount.counts(amount, live, sizes, where=[tree.where(i) for i in idx], traced=traced)


def _real_scores(tree: Tree, idx):
    """Refuse leaves whose scores cannot be ranked by magnitude (complex, non-numeric)."""
    for i in idx:
        s = tree.values[i] if tree.scores[i] is None else tree.scores[i]
        dtype = jnp.result_type(s)
        if not any(jnp.issubdtype(dtype, t) for t in (jnp.bool_, jnp.integer, jnp.floating)):
            raise TypeError(f"{tree.where(i)}cannot rank scores of dtype {dtype} by magnitude")


def l1_sources(tree: Tree, idx, *, joint: bool):
    """The L1 sources of the selected leaves, and the width of their keys.

    A global ranking compares every leaf on one scale, as torch's ``torch.cat`` of the scores does:
    all are ranked in the promoted dtype (float64 ranks in float64, ints beside float32 are rounded
    to float32, int8 beside int32 ranks as int32). Floats of up to 32 bits need no cast: their keys
    are already float32 keys.

    Raises:
      TypeError: integer scores whose promoted dtype JAX cannot hold (int32 with uint32 without
        ``jax_enable_x64``; uint64 with a signed dtype).
    """
    _real_scores(tree, idx)
    args = [(tree.values[i], tree.masks[i], tree.scores[i]) for i in idx]
    dtypes = [jnp.result_type(v if s is None else s) for v, _, s in args]
    if not joint:
        return [(l1_keys, a) for a in args], [_select.key_bits(d) for d in dtypes]
    floating = any(jnp.issubdtype(d, jnp.floating) for d in dtypes)
    # numpy's integer promotion is torch's (int32 with uint32 -> int64); JAX's narrows without x64
    common = functools.reduce(jnp.promote_types if floating else np.promote_types, dtypes)
    if not floating and not (
        (common == np.bool_ or jnp.issubdtype(common, jnp.integer))
        and jax.dtypes.canonicalize_dtype(common) == common
    ):
        raise TypeError(
            f"cannot rank integer scores of dtypes {sorted({str(d) for d in dtypes})} together: "
            f"their common dtype {common} is not available (jax_enable_x64 off?); cast them first"
        )
    bits = _select.key_bits(common)
    cast = [
        (v, m, s)
        if d == common or (floating and jnp.issubdtype(d, jnp.floating) and _select.key_bits(d) == bits)
        else (v, m, (v if s is None else s).astype(common))
        for (v, m, s), d in zip(args, dtypes)
    ]
    return [(l1_keys, a) for a in cast], [bits] * len(args)


def run(tree: Tree, idx, amount, *, kind: str, joint: bool, key=None, method: str = "auto"):
    """Prune the selected leaves of ``tree`` (``kind`` "l1" or "random"); returns the masks pytree."""
    if kind == "random" and key is None:
        raise TypeError("random pruning needs an explicit PRNG key: pass key=jax.random.key(0)")
    if kind == "random":
        k = counts(tree, idx, amount, joint=joint)
        bits = random_keys(key, tuple(tree.values[i].shape for i in idx))
        sources = [(candidate_keys, (b, tree.masks[i])) for b, i in zip(bits, idx)]
        widths = [32] * len(idx)
    else:
        sources, widths = l1_sources(tree, idx, joint=joint)
        k = counts(tree, idx, amount, joint=joint)
    new = prune(sources, k, joint=joint, bits=widths, method=method)
    return tree.with_masks(dict(zip(idx, new)))


@partial(jax.jit, static_argnames=("keyfns", "joint", "bits", "method"))
def _prune_at_once(keyfns, args, k, *, joint, bits, method):
    sources = list(zip(keyfns, args))
    if joint:
        return _select.prune_smallest(sources, k, bits=bits[0], method=method)
    return [_select.prune_smallest([s], ki, bits=b, method=method)[0] for s, ki, b in zip(sources, k, bits)]


_NATIVE_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def kernel_inputs(sources):
    """The kernels' ``(values, masks)`` for these sources, or None if they cannot take them.

    The kernels (``_cpu``, ``_pallas``) take float scores (keys of ``|x|``) and the 31-bit random
    keys; every other dtype (uint32 or bool values, integers, float64) takes the XLA path.
    """
    values, masks = [], []
    for fn, args in sources:
        if fn is l1_keys:
            value, mask, score = args
            value = value if score is None else score
            if jnp.result_type(value) not in _NATIVE_FLOATS:
                return None
        elif fn is candidate_keys:
            value, mask = args
        else:
            return None
        values.append(value)
        masks.append(mask)
    return values, masks


def native_inputs(sources):
    """``kernel_inputs`` if the CPU kernel can take them here (built, one CPU device), else None."""
    inputs = kernel_inputs(sources)
    if inputs is None or not _cpu.usable(inputs[0] + [m for m in inputs[1] if m is not None]):
        return None
    return inputs


def prune(sources, k, *, joint, bits=None, method="auto"):
    """Keep masks for the sources: ``k`` pruned per source, or across all of them (``joint``).

    ``bits`` is the key width of each source (32 by default). On CPU the native kernel (``_cpu``)
    takes them when it can; on GPU, with ``JPRUNE_PALLAS=1``, the Pallas kernels (``_pallas``).
    Otherwise, sources that select by histograms run as separate passes (fast on XLA:CPU, see
    ``_select``); the others, small or sorted, run as one jitted program: one compilation instead
    of several.
    """
    bits = tuple(bits or [32] * len(sources))
    if method == "auto" and _pallas.enabled():  # GPU with JPRUNE_PALLAS=1 (off by default: unmeasured)
        inputs = kernel_inputs(sources)
        if inputs is not None and _pallas.usable(*inputs):
            return _pallas.prune(*inputs, k, joint=joint)
    native = native_inputs(sources) if method == "auto" else None
    if native is not None:  # the XLA path is the fallback that jax.export and other platforms get
        xla = functools.partial(_prune_xla, sources, k, joint=joint, bits=bits, method=method)
        return _cpu.prune(*native, k, joint=joint, fallback=xla)
    return _prune_xla(sources, k, joint=joint, bits=bits, method=method)


def _prune_xla(sources, k, *, joint, bits, method):
    sizes = [math.prod(jnp.shape(args[0])) for _, args in sources]
    if joint:
        if _select.use_histogram(sum(sizes), method):
            return _select.prune_smallest(sources, k, bits=bits[0], method=method)
        return _prune_at_once(
            tuple(f for f, _ in sources), [a for _, a in sources], k, joint=True, bits=bits, method=method
        )
    staged = [j for j, n in enumerate(sizes) if _select.use_histogram(n, method)]
    out = {}
    for width in sorted({bits[j] for j in staged}):
        group = [j for j in staged if bits[j] == width]
        groups, ks = [[sources[j]] for j in group], [k[j] for j in group]
        masks = _select.prune_groups(groups, ks, bits=width, method=method)
        out.update({j: m for j, (m,) in zip(group, masks)})
    rest = [j for j in range(len(sources)) if j not in staged]
    if rest:
        fns, args = tuple(sources[j][0] for j in rest), [sources[j][1] for j in rest]
        ks = jnp.asarray([k[j] for j in rest], jnp.int32)
        widths = tuple(bits[j] for j in rest)
        out.update(zip(rest, _prune_at_once(fns, args, ks, joint=False, bits=widths, method=method)))
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
      >>> p = {"a": {"kernel": jnp.array([[1.0, 2.0, 3.0, 4.0], [-4.0, -3.0, -2.0, -1.0]])},
      ...      "b": {"kernel": jnp.array([[0.0, 0.1, -2.0]]), "bias": jnp.zeros(3)}}
      >>> m = jp.global_unstructured(p, 4)  # the kernels, ranked together
      >>> jp.apply_masks(p, m)["b"]["kernel"], m["b"]["bias"]
      (Array([[ 0.,  0., -2.]], dtype=float32), None)
    """
    if method not in ("l1", "random"):
        raise ValueError(f"method must be 'l1' or 'random', got {method!r}")
    tree = Tree(params, masks, importance_scores)
    return run(tree, tree.select(select), amount, kind=method, joint=True, key=key)
