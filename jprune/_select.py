"""Exact k-smallest selection over uint32 keys, without sorting everything.

Scores become uint32 *keys* whose integer order is the score order (for ``|x|`` of a float, the bit
pattern itself: ``+0 < subnormals < ... < inf < NaN``). The k-th smallest key is found by radix
selection: a histogram of the high 16 bits finds the bucket holding it, a histogram of the low 16 bits
inside that bucket finds the key. Every count is a reduction, so the same code runs on sharded arrays
without gathering them. On GPUs, where scatter-add histograms contend on atomics, a sort finds the key
instead (measured in issue #2: sort is faster there; histograms are ~100x faster on CPU).

Ties at the k-th key are broken by flat index, lowest first (the order of ``jax.lax.top_k``), by a
second selection over the tied entries' indices, run only when it is needed. torch breaks ties in an
implementation-defined order that cannot be matched; every tie-free input gives torch's answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SENTINEL = 0xFFFFFFFF  # key of a non-candidate: above every real key (those keep the top bit clear)
_BINS = 1 << 16


def abs_keys(x):
    """uint32 keys ordering ``|x|`` like torch ranks floats: NaN above +inf (float dtypes <= 32 bit)."""
    x = jnp.abs(x.astype(jnp.float32))
    return lax.bitcast_convert_type(x, jnp.uint32)


def use_histogram(total: int, method: str = "auto") -> bool:
    """The method choice: histograms on CPU for large inputs, a sort elsewhere (or when small)."""
    if method != "auto":
        return method == "hist"
    return jax.default_backend() == "cpu" and total > _BINS


def _histogram(keys, shift, bucket=None):
    """Counts of the 16-bit digit ``(key >> shift) & 0xFFFF`` over all keys (or one bucket)."""
    hist = jnp.zeros(_BINS, jnp.int32)
    for x in keys:
        digit = (x >> shift) & 0xFFFF
        if bucket is not None:  # keys outside the bucket are dropped by an out-of-range index
            digit = jnp.where((x >> 16) == bucket, digit, _BINS)
        hist = hist.at[digit.ravel()].add(1, mode="drop")
    return hist


def _find(hist, k, before):
    """First digit whose running count (from ``before``) reaches ``k``; counts below it and at it."""
    run = before + jnp.cumsum(hist)
    d = jnp.searchsorted(run, k, side="left").astype(jnp.uint32)
    d = jnp.minimum(d, _BINS - 1)
    return d, run[d] - hist[d], hist[d]


def kth_smallest(keys, k, hist: bool):
    """The k-th smallest key (1-based) over a list of uint32 arrays, with the counts below and at it."""
    if hist:
        b, below, _ = _find(_histogram(keys, 16), k, 0)
        lo, below, at = _find(_histogram(keys, 0, bucket=b), k, below)
        return (b << 16) | lo, below, at
    flat = jnp.concatenate([x.ravel() for x in keys])
    t = jnp.sort(flat)[k - 1]
    below = sum(jnp.sum(x < t, dtype=jnp.int32) for x in keys)
    at = sum(jnp.sum(x == t, dtype=jnp.int32) for x in keys)
    return t, below, at


def smallest(keys, k, *, method: str = "auto"):
    """Boolean masks marking exactly the ``k`` smallest keys across the list, ties by flat index.

    Args:
      keys: uint32 arrays (non-candidates hold ``SENTINEL``); flat indices run through them in order.
      k: traced int32 count, ``0 <= k <=`` the number of candidates.
      method: ``"auto"``, ``"hist"`` or ``"sort"``.

    Returns:
      One bool array per key array, True where selected.
    """
    total = sum(x.size for x in keys)
    if total >= SENTINEL:
        raise ValueError(f"Cannot select among {total} entries: at most {SENTINEL - 1} are supported.")
    hist = use_histogram(total, method)
    k1 = jnp.maximum(k, 1)
    t, below, at = kth_smallest(keys, k1, hist)
    take = k1 - below  # how many of the `at` entries tied at t are selected (1..at)
    offsets, acc = [], 0
    for x in keys:
        offsets.append(acc)
        acc += x.size

    def index(x, off):
        return jnp.uint32(off) + jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)

    def cut():
        tied = [jnp.where(x == t, index(x, off), jnp.uint32(SENTINEL)) for x, off in zip(keys, offsets)]
        return kth_smallest(tied, take, hist)[0]

    last = lax.cond(take < at, cut, lambda: jnp.uint32(SENTINEL))
    return [
        ((x < t) | ((x == t) & (index(x, off) <= last))) & (k > 0)
        for x, off in zip(keys, offsets)
    ]
