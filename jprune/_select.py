"""Exact k-smallest selection over unsigned integer keys, without sorting everything.

Scores become *keys*: unsigned integers whose order is the score order (``magnitude_keys``: for
``|x|`` of a float, the bit pattern itself, ``+0 < subnormals < ... < inf < NaN``; for an integer,
its magnitude). Keys are uint32 for dtypes up to 32 bits and uint64 for 64-bit ones (float64, int64:
these exist only with ``jax_enable_x64``), so every dtype is ranked exactly. Which entries may be
chosen is a separate bool array (the *candidates*), so every key value is usable.

The k-th smallest key is found by radix selection: a histogram of the top 16 bits finds the bucket
holding it, a histogram of the next 16 bits inside that bucket narrows it, and so on to the last
16 bits; one last pass writes the mask. Every count is a reduction, so the same code runs on sharded
arrays without gathering them. On GPUs, where scatter-add histograms contend on atomics, a sort
finds the key instead (issue #2 measured sort ahead there, histograms far ahead on CPU); small
inputs sort too. On one CPU device, float scores and random keys are usually selected by the native
kernel of ``_cpu`` instead (same rule, same answers).

Ties at the k-th key are broken by flat index, lowest first (the order of ``jax.lax.top_k``), by a
second selection over the tied entries' indices, run only when it is needed. torch breaks ties in an
implementation-defined order that cannot be matched; every tie-free input gives torch's answer.

Keys are never materialised: each *source* is ``(keyfn, args)`` and every pass recomputes
``keyfn(*args) -> (keys, candidates or None)`` inside its own jitted kernel, fused with the pass.
Called eagerly, the passes are separate dispatches per leaf (on XLA:CPU this runs about 2x faster
than one program holding every leaf); under an outer ``jit`` they inline into it.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

MAX_GROUP = 2**31 - 1  # counts are int32: a selection group holds fewer entries than 2**31
_BINS = 1 << 16
_NO_TIE = 0xFFFFFFFF  # the "last tied index chosen" when every tied entry is chosen


def key_bits(dtype) -> int:
    """The width of the keys of scores of ``dtype``: 64 for 64-bit dtypes, 32 otherwise."""
    return 64 if jnp.dtype(dtype).itemsize > 4 else 32


def key_dtype(dtype):
    """The key type of scores of ``dtype``: uint64 or uint32 (see ``key_bits``)."""
    return jnp.uint64 if key_bits(dtype) == 64 else jnp.uint32


def magnitude_keys(x):
    """Unsigned keys ordering ``|x|`` exactly as torch ranks it (NaN above +inf), for every real dtype.

    Floats up to 32 bits: the bits of ``|x|`` as float32 (bf16 and f16 convert exactly, so their keys
    are comparable with float32 keys); float64: the bits of ``|x|`` as uint64; unsigned integers
    and bool: the value; signed integers: ``|x| + 1``, and 0 for the most negative value, whose
    ``abs`` wraps to itself in torch and so ranks below every other magnitude.
    """
    dtype = jnp.dtype(x.dtype)
    out = key_dtype(dtype)
    if dtype == jnp.bool_:
        return x.astype(out)
    if jnp.issubdtype(dtype, jnp.floating):
        if dtype.itemsize > 4:
            return lax.bitcast_convert_type(jnp.abs(x), out)
        return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), out)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        u = x.astype(jnp.dtype(f"uint{8 * dtype.itemsize}"))  # two's complement bits
        magnitude = jnp.where(x < 0, -u, u).astype(out)  # below 2**(bits - 1) but for INT_MIN
        return jnp.where(x == jnp.iinfo(dtype).min, jnp.zeros_like(magnitude), magnitude + 1)
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return x.astype(out)
    raise TypeError(f"cannot rank scores of dtype {dtype} by magnitude; expected a real dtype")


def given(keys, candidates=None):
    """The key function of keys that are already computed (with optional candidates)."""
    return keys, candidates


def use_histogram(total: int, method: str = "auto") -> bool:
    """The method choice: histograms on CPU for large inputs and in every multi-process program
    (``jax.distributed``), a sort elsewhere (or when small)."""
    if method not in ("auto", "hist", "sort"):
        raise ValueError(f"method must be 'auto', 'hist' or 'sort', got {method!r}")
    if method != "auto":
        return method == "hist"
    if jax.process_count() > 1:  # arrays span hosts: a sort would gather them, counts are reductions
        return True
    return jax.default_backend() == "cpu" and total > _BINS


def check_group_size(total: int, where: str = "") -> None:
    """Refuse a selection group of more than ``MAX_GROUP`` entries (its int32 counts would wrap)."""
    if total > MAX_GROUP:
        raise ValueError(
            f"{where}cannot select among {total} entries at once: at most {MAX_GROUP} (2**31 - 1) "
            "are supported, as counts are int32; prune fewer leaves together (select=...) or "
            "per leaf"
        )


def _index(x, off):
    """Row-major flat index (plus ``off``) of every entry, built from iotas: no reshape, so a
    sharded ``x`` keeps its sharding."""
    idx, stride = off, 1
    for d in reversed(range(x.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    return idx


def _keys(keyfn, args, tie):
    """``(keys, candidates)`` of one source; with ``tie=(t, off)``: the flat indices of the
    candidates keyed ``t``."""
    x, cand = keyfn(*args)
    if tie is not None:
        t, off = tie
        hit = x == t
        return _index(x, off), hit if cand is None else hit & cand
    return x, cand


@partial(jax.jit, static_argnames=("keyfn", "shift"))
def _hist(keyfn, args, tie, prefix, *, shift):
    """Counts of the 16-bit digit ``(key >> shift) & 0xFFFF`` of the candidates whose higher bits
    are ``prefix`` (all candidates if ``prefix`` is None)."""
    x, cand = _keys(keyfn, args, tie)
    digit = ((x >> shift) & 0xFFFF).astype(jnp.int32)
    ok = cand
    if prefix is not None:
        inside = (x >> (shift + 16)) == prefix
        ok = inside if ok is None else ok & inside
    if ok is not None:  # the others get an out-of-range index and are dropped
        digit = jnp.where(ok, digit, _BINS)
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
    """The keys, non-candidates raised to the largest key: the k-th smallest (k at most the
    candidates) is then the k-th smallest candidate."""
    x, cand = _keys(keyfn, args, tie)
    if cand is not None:
        x = jnp.where(cand, x, jnp.array(jnp.iinfo(x.dtype).max, x.dtype))
    return x.ravel()


def _and(a, cand):
    return a if cand is None else a & cand


@partial(jax.jit, static_argnames=("keyfn",))
def _count(keyfn, args, tie, t):
    x, cand = _keys(keyfn, args, tie)
    return jnp.sum(_and(x < t, cand), dtype=jnp.int32), jnp.sum(_and(x == t, cand), dtype=jnp.int32)


@partial(jax.jit, static_argnames=("keyfn",))
def _keep(keyfn, args, t, last, off, k):
    x, cand = keyfn(*args)
    chosen = ((x < t) | ((x == t) & (_index(x, off) <= last))) & (k > 0)
    return _and(~chosen, cand)


def _cond(pred, true_fn, false_fn):
    """``lax.cond`` under a trace; a plain ``if`` on a concrete predicate (no branch compilation)."""
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, true_fn, false_fn)
    return true_fn() if pred else false_fn()


def kth_smallest(sources, k, hist: bool, *, bits: int = 32, ties=None):
    """The k-th smallest key (1-based) over all sources' candidates, with the counts below it and
    at it. ``bits`` is the key width (32 or 64)."""
    ties = ties or [None] * len(sources)
    if hist:
        prefix, below, at = None, 0, 0
        dtype = jnp.uint64 if bits == 64 else jnp.uint32
        for shift in range(bits - 16, -1, -16):
            h = sum(_hist(f, a, tie, prefix, shift=shift) for (f, a), tie in zip(sources, ties))
            digit, below, at = _find(h, k, below)
            digit = digit.astype(dtype)
            prefix = digit if prefix is None else (prefix << 16) | digit
        return prefix, below, at
    flat = jnp.concatenate([_materialize(f, a, tie) for (f, a), tie in zip(sources, ties)])
    t = jnp.sort(flat)[k - 1]
    counts = [_count(f, a, tie, t) for (f, a), tie in zip(sources, ties)]
    return t, sum(c[0] for c in counts), sum(c[1] for c in counts)


def prune_smallest(sources, k, *, bits: int = 32, method: str = "auto"):
    """Keep masks: every candidate except exactly the ``k`` smallest keys, ties by flat index.

    Args:
      sources: ``(keyfn, args)`` pairs; ``keyfn(*args)`` gives ``(keys, candidates)``: an unsigned
        key array of the shape of ``args[0]`` and a bool array of the entries that may be chosen
        (None: all). Flat indices run through the sources in order. ``keyfn`` is a static,
        hashable function.
      k: the count (int or int32 scalar, traced or not), ``0 <= k <=`` the number of candidates.
      bits: the width of the keys, 32 (uint32) or 64 (uint64); all sources share it.
      method: ``"auto"``, ``"hist"`` or ``"sort"``.

    Returns:
      One bool array per source: True for candidates not among the k.
    """
    return prune_groups([sources], [k], bits=bits, method=method)[0]


def prune_groups(groups, ks, *, bits: int = 32, method: str = "auto"):
    """``prune_smallest`` for several independent groups of sources at once.

    Eagerly, every group's passes are dispatched before the one host sync that decides which groups
    have ties to break, so the device never waits on Python between groups.
    """
    plans = []
    for sources, k in zip(groups, ks):
        sizes = [math.prod(jnp.shape(a[0])) for _, a in sources]
        check_group_size(sum(sizes))
        if sum(sizes) == 0:  # nothing to select from (k is 0)
            plans.append(None)
            continue
        hist = use_histogram(sum(sizes), method)
        offsets = [jnp.uint32(sum(sizes[:i])) for i in range(len(sizes))]
        k = jnp.asarray(k, jnp.int32)
        k1 = jnp.maximum(k, 1)
        t, below, at = kth_smallest(sources, k1, hist, bits=bits)
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

        def last_tied(sources=sources, hist=hist, offsets=offsets, t=t, take=take):
            """The flat index of the last tied entry chosen: the take-th smallest index keyed t."""
            return kth_smallest(sources, take, hist, ties=[(t, off) for off in offsets])[0]

        last = _cond(tied, last_tied, lambda: jnp.uint32(_NO_TIE))
        out.append([_keep(f, a, t, last, off, k) for (f, a), off in zip(sources, offsets)])
    return out
