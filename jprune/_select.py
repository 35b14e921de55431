"""Exact k-smallest selection over uint32 keys, without sorting everything.

Scores become uint32 *keys* whose integer order is the score order (for ``|x|`` of a float, the bit
pattern itself: ``+0 < subnormals < ... < inf < NaN``). The k-th smallest key is found by radix
selection: a histogram of the high 16 bits finds the bucket holding it, a histogram of the low 16 bits
inside that bucket finds the key, and one last pass writes the mask. Every count is a reduction, so
the same code runs on sharded arrays without gathering them. On GPUs, where scatter-add histograms
contend on atomics, a sort finds the key instead (issue #2 measured sort ahead there, histograms far
ahead on CPU); small inputs sort too. On one CPU device, float32 scores and random keys are
usually selected by the native kernel of ``_cpu`` instead (same rule, same answers).

Ties at the k-th key are broken by flat index, lowest first (the order of ``jax.lax.top_k``), by a
second selection over the tied entries' indices, run only when it is needed. torch breaks ties in an
implementation-defined order that cannot be matched; every tie-free input gives torch's answer.

Keys are never materialised: each *source* is ``(keyfn, args)`` and every pass recomputes
``keyfn(*args)`` inside its own jitted kernel, fused with the pass. Called eagerly, the passes are
separate dispatches per leaf (on XLA:CPU this runs about 2x faster than one program holding every
leaf); under an outer ``jit`` they inline into it.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

SENTINEL = 0xFFFFFFFF  # key of a non-candidate: above every real key (those keep the top bit clear)
_BINS = 1 << 16


def abs_keys(x):
    """uint32 keys ordering ``|x|`` as torch ranks floats: NaN above +inf (floats up to 32 bit)."""
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def given(keys):
    """The key function of keys that are already computed."""
    return keys


def use_histogram(total: int, method: str = "auto") -> bool:
    """The method choice: histograms on CPU for large inputs, a sort elsewhere (or when small)."""
    if method not in ("auto", "hist", "sort"):
        raise ValueError(f"method must be 'auto', 'hist' or 'sort', got {method!r}")
    if method != "auto":
        return method == "hist"
    return jax.default_backend() == "cpu" and total > _BINS


def _index(x, off):
    """Row-major flat index (plus ``off``) of every entry, built from iotas: no reshape, so a
    sharded ``x`` keeps its sharding."""
    idx, stride = off, 1
    for d in reversed(range(x.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    return idx


def _keys(keyfn, args, tie):
    """The keys of one source; with ``tie=(t, off)``: the flat indices of the entries keyed ``t``."""
    x = keyfn(*args)
    if tie is not None:
        t, off = tie
        x = jnp.where(x == t, _index(x, off), jnp.uint32(SENTINEL))
    return x


@partial(jax.jit, static_argnames=("keyfn", "shift"))
def _hist(keyfn, args, tie, bucket, *, shift):
    """Counts of the 16-bit digit ``(key >> shift) & 0xFFFF`` (only keys in ``bucket``, if given)."""
    x = _keys(keyfn, args, tie)
    digit = (x >> shift) & 0xFFFF
    if bucket is not None:  # keys outside the bucket get an out-of-range index and are dropped
        digit = jnp.where((x >> 16) == bucket, digit, _BINS)
    return jnp.zeros(_BINS, jnp.int32).at[digit].add(1, mode="drop")


@jax.jit
def _find(hist, k, before):
    """First digit whose running count (from ``before``) reaches ``k``; counts below it and at it.

    Two levels of 256 (row sums, then one row) instead of a 65536-long cumsum.
    """
    rows = hist.reshape(256, 256)
    run = before + jnp.cumsum(jnp.sum(rows, axis=1))
    r = jnp.minimum(jnp.searchsorted(run, k, side="left"), 255)
    row = rows[r]
    run = run[r] - jnp.sum(row) + jnp.cumsum(row)
    c = jnp.minimum(jnp.searchsorted(run, k, side="left"), 255)
    return (r * 256 + c).astype(jnp.uint32), run[c] - row[c], row[c]


@partial(jax.jit, static_argnames=("keyfn",))
def _materialize(keyfn, args, tie):
    return _keys(keyfn, args, tie).ravel()


@partial(jax.jit, static_argnames=("keyfn",))
def _count(keyfn, args, tie, t):
    x = _keys(keyfn, args, tie)
    return jnp.sum(x < t, dtype=jnp.int32), jnp.sum(x == t, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("keyfn",))
def _keep(keyfn, args, t, last, off, k):
    x = keyfn(*args)
    chosen = ((x < t) | ((x == t) & (_index(x, off) <= last))) & (k > 0)
    return (x != jnp.uint32(SENTINEL)) & ~chosen


def _cond(pred, true_fn, false_fn):
    """``lax.cond`` under a trace; a plain ``if`` on a concrete predicate (no branch compilation)."""
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, true_fn, false_fn)
    return true_fn() if pred else false_fn()


def kth_smallest(sources, k, hist: bool, ties=None):
    """The k-th smallest key (1-based) over all sources, with the counts below it and at it."""
    ties = ties or [None] * len(sources)
    if hist:
        h = sum(_hist(f, a, tie, None, shift=16) for (f, a), tie in zip(sources, ties))
        b, below, _ = _find(h, k, 0)
        h = sum(_hist(f, a, tie, b, shift=0) for (f, a), tie in zip(sources, ties))
        lo, below, at = _find(h, k, below)
        return (b << 16) | lo, below, at
    flat = jnp.concatenate([_materialize(f, a, tie) for (f, a), tie in zip(sources, ties)])
    t = jnp.sort(flat)[k - 1]
    counts = [_count(f, a, tie, t) for (f, a), tie in zip(sources, ties)]
    return t, sum(c[0] for c in counts), sum(c[1] for c in counts)


def prune_smallest(sources, k, *, method: str = "auto"):
    """Keep masks: every candidate except exactly the ``k`` smallest keys, ties by flat index.

    Args:
      sources: ``(keyfn, args)`` pairs; ``keyfn(*args)`` gives a uint32 key array of the shape of
        ``args[0]`` (non-candidates hold ``SENTINEL``); flat indices run through the sources in
        order. ``keyfn`` is a static, hashable function.
      k: the count (int or int32 scalar, traced or not), ``0 <= k <=`` the number of candidates.
      method: ``"auto"``, ``"hist"`` or ``"sort"``.

    Returns:
      One bool array per source: True for candidates (keys below ``SENTINEL``) not among the k.
    """
    return prune_groups([sources], [k], method=method)[0]


def prune_groups(groups, ks, *, method: str = "auto"):
    """``prune_smallest`` for several independent groups of sources at once.

    Eagerly, every group's passes are dispatched before the one host sync that decides which groups
    have ties to break, so the device never waits on Python between groups.
    """
    plans = []
    for sources, k in zip(groups, ks):
        sizes = [math.prod(jnp.shape(a[0])) for _, a in sources]
        if sum(sizes) == 0:  # nothing to select from (k is 0)
            plans.append(None)
            continue
        if sum(sizes) >= SENTINEL:
            raise ValueError(
                f"Cannot select among {sum(sizes)} entries: at most {SENTINEL - 1} are supported."
            )
        hist = use_histogram(sum(sizes), method)
        offsets = [jnp.uint32(sum(sizes[:i])) for i in range(len(sizes))]
        k = jnp.asarray(k, jnp.int32)
        k1 = jnp.maximum(k, 1)
        t, below, at = kth_smallest(sources, k1, hist)
        take = k1 - below  # how many of the `at` entries tied at t are selected (1..at)
        plans.append((sources, hist, offsets, k, t, take, take < at))
    ties = [False if p is None else p[-1] for p in plans]
    if not any(isinstance(x, jax.core.Tracer) for x in ties):
        ties = jax.device_get(ties)
    out = []
    for plan, tied, sources in zip(plans, ties, groups):
        if plan is None:
            out.append([jnp.zeros(jnp.shape(a[0]), bool) for _, a in sources])
            continue
        sources, hist, offsets, k, t, take, _ = plan
        last = _cond(
            tied,
            lambda s=sources, h=hist, o=offsets, t=t, n=take: kth_smallest(s, n, h, [(t, x) for x in o])[0],
            lambda: jnp.uint32(SENTINEL),
        )
        out.append([_keep(f, a, t, last, off, k) for (f, a), off in zip(sources, offsets)])
    return out
