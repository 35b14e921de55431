"""Exact selection on GPU by Pallas kernels (Triton backend): counting passes, no sort, no atomics.

The same answer as ``_select`` and the CPU kernel (the k smallest keys, ties by flat index) for
float32 and bfloat16 scores (the float32 bits of ``|x|``, NaN above inf) and uint32 keys, with
optional candidate masks. The k-th smallest key is found by radix selection over 4-bit digits,
most significant first: each pass is one Pallas kernel that reads the scores (keys are computed in
the kernel), and every program of its grid writes the 16-bin histogram of its block's digits
(entries whose higher digits match the prefix found so far), accumulated in registers, not by
atomics; XLA sums the per-block histograms and picks the digit. Eight passes give the 32-bit key;
if entries tied at it are only partly pruned, eight more passes over their flat indices find the
last one pruned (only when there are such ties). A last kernel writes the masks.

Unmeasured: no GPU was available to this work, so the kernels are tested in Pallas interpret mode
on CPU only (``tests/test_pallas.py``: the XLA path's masks on every selection test input with
32-bit keys; and lowered for CUDA, through Pallas' Triton lowering) and switched off by default.
``JPRUNE_PALLAS=1`` uses them on a GPU backend for float32/bfloat16 scores and random keys on one
device; everything else (other dtypes, sharded arrays, other backends) takes the XLA path.
``bench/gpu_check.py`` checks and times them on a GPU.
"""

from __future__ import annotations

import functools
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _select

_DIGIT = 4  # bits per pass: 16 one-hot compares per entry keep a pass memory-bound
_BINS = 1 << _DIGIT
_LEVELS = 32 // _DIGIT
_BLOCK = 8192  # entries per program of a counting pass (its histogram: 16 int32)
_CHUNK = 256  # entries per loop step inside a program: a (256, 16) int32 accumulator
_KEEP_BLOCK = 1024  # entries per program of the mask pass
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.uint32)
_PLATFORM = "gpu"  # where they run compiled (tests set "cpu" and run them in interpret mode)


@functools.cache
def _modules():
    """``(pallas, pallas.triton)``, imported on first use: ``import jprune`` does not pay for them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    return pl, plt


def enabled() -> bool:
    """Whether the kernels are switched on (``JPRUNE_PALLAS=1``) and the backend is a GPU."""
    return os.environ.get("JPRUNE_PALLAS", "0") == "1" and jax.default_backend() == _PLATFORM


def usable(values, masks) -> bool:
    """Whether the kernels take these arrays: switched on, float32/bfloat16/uint32 values, one GPU.

    A ``pallas_call`` is not partitioned by XLA: on sharded arrays it would gather them, so under a
    trace (sharding unknown) it is used only when there is one device.
    """
    if not enabled():
        return False
    for a in [*values, *(m for m in masks if m is not None)]:
        if a is not None and a.dtype not in (*_DTYPES, jnp.bool_):
            return False
        if isinstance(a, jax.core.Tracer):
            if jax.device_count() != 1:
                return False
        elif hasattr(a, "sharding"):
            devices = a.sharding.device_set
            if len(devices) != 1 or next(iter(devices)).platform != _PLATFORM:  # e.g. committed to CPU
                return False
    return all(v.dtype in _DTYPES for v in values)


def _key(x):
    """uint32 keys: the value itself, or the float32 bits of ``|x|`` (``_select.magnitude_keys``)."""
    if x.dtype == jnp.uint32:
        return x
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def _load(ref, inside, other):
    """The block ``ref`` where ``inside``, ``other`` past the end of the array (a masked load)."""
    return _modules()[1].load(ref, mask=inside, other=other)


def _hist_kernel(s_ref, x_ref, *refs, n, tie, masked, block, chunk):
    """One program: the 16-bin histogram of the digit ``(key >> shift) & 15`` of its block's
    candidates whose higher bits equal ``prefix``; with ``tie``, the keys are the flat indices of
    the candidates keyed ``t``. ``s_ref``: ``[shift, prefix, t, offset]`` (uint32)."""
    pl = _modules()[0]
    m_ref, out_ref = (refs[0], refs[1]) if masked else (None, refs[0])
    shift, prefix, t, off = s_ref[0], s_ref[1], s_ref[2], s_ref[3]
    base = pl.program_id(0) * block
    bins = lax.broadcasted_iota(jnp.uint32, (chunk, _BINS), 1)

    def step(j, acc):
        start = pl.multiple_of(j * chunk, chunk)
        pos = base + start + lax.iota(jnp.int32, chunk)
        inside = (pos < n) & (pos >= 0)  # past the end (int32 wraps within a block of 2**31)
        key = _key(_load(x_ref.at[pl.ds(start, chunk)], inside, 0))
        ok = inside
        if masked:
            ok = ok & _load(m_ref.at[pl.ds(start, chunk)], inside, False)
        if tie:
            ok = ok & (key == t)
            key = pos.astype(jnp.uint32) + off
        high = lax.shift_right_logical(key, shift)  # shift <= 28: two shifts, never one of 32
        ok = ok & (lax.shift_right_logical(high, jnp.uint32(_DIGIT)) == prefix)
        hit = ((high & jnp.uint32(_BINS - 1))[:, None] == bins) & ok[:, None]
        return acc + hit.astype(jnp.int32)

    acc = lax.fori_loop(0, block // chunk, step, jnp.zeros((chunk, _BINS), jnp.int32))
    out_ref[...] = jnp.sum(acc, axis=0)


def _keep_kernel(s_ref, x_ref, *refs, n, masked, block):
    """One program: keep = not chosen (and a candidate), chosen = ``key < t``, or ``key == t`` at a
    flat index up to ``last``; nothing when ``k == 0``. ``s_ref``: ``[t, last, offset, k > 0]``."""
    pl, plt = _modules()
    m_ref, out_ref = (refs[0], refs[1]) if masked else (None, refs[0])
    t, last, off, live = s_ref[0], s_ref[1], s_ref[2], s_ref[3]
    pos = pl.program_id(0) * block + lax.iota(jnp.int32, block)
    inside = (pos < n) & (pos >= 0)
    key = _key(_load(x_ref, inside, 0))
    flat = pos.astype(jnp.uint32) + off
    chosen = ((key < t) | ((key == t) & (flat <= last))) & (live != 0)
    keep = ~chosen
    if masked:
        keep = keep & _load(m_ref, inside, False)
    plt.store(out_ref, keep, mask=inside)


def _block(n, block, chunk):
    """A power of two, a multiple of ``chunk``, no larger than needed for ``n`` entries."""
    return min(block, max(chunk, 1 << max(n - 1, 0).bit_length()))


def _call(kernel, x, m, scalars, *, block, out_block, out_dtype, interpret, name):
    """Run ``kernel`` over ``x`` (and ``m``) in blocks of ``block``; each program writes
    ``out_block`` entries of the output: one per entry of ``x`` (``out_block=None``) or a few."""
    pl, plt = _modules()
    grid = pl.cdiv(x.size, block)
    operands = [scalars, x.ravel()] + ([] if m is None else [m.ravel()])
    blocks = [pl.BlockSpec((block,), lambda i: (i,))] * (len(operands) - 1)
    size, out_block = (x.size, block) if out_block is None else (grid * out_block, out_block)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((size,), out_dtype),
        grid=(grid,),
        in_specs=[pl.BlockSpec((4,), lambda i: (0,)), *blocks],
        out_specs=pl.BlockSpec((out_block,), lambda i: (i,)),
        interpret=interpret,
        name=name,
        compiler_params=plt.CompilerParams(),  # the Triton backend (jax's GPU default is Mosaic GPU)
    )(*operands)


def _hist(x, m, scalars, *, tie, interpret, block, chunk):
    block = _block(x.size, block, chunk)
    kernel = partial(_hist_kernel, n=x.size, tie=tie, masked=m is not None, block=block, chunk=chunk)
    kw = dict(block=block, out_block=_BINS, out_dtype=jnp.int32, interpret=interpret, name="jprune_hist")
    return jnp.sum(_call(kernel, x, m, scalars, **kw).reshape(-1, _BINS), axis=0)


def _keep(x, m, scalars, *, interpret):
    block = _block(x.size, _KEEP_BLOCK, 1)
    kernel = partial(_keep_kernel, n=x.size, masked=m is not None, block=block)
    kw = dict(block=block, out_block=None, out_dtype=jnp.bool_, interpret=interpret, name="jprune_keep")
    return _call(kernel, x, m, scalars, **kw).reshape(x.shape)


def _kth(values, masks, offsets, k, *, tie, interpret, block, chunk):
    """The k-th smallest key (1-based; with ``tie = t``: flat index of the candidates keyed ``t``)
    over all the values' candidates, with the counts below it and at it."""
    t = jnp.uint32(0) if tie is None else tie

    def level(i, carry):
        prefix, below, _ = carry
        shift = jnp.uint32(32 - _DIGIT) - i.astype(jnp.uint32) * jnp.uint32(_DIGIT)
        h = sum(
            _hist(
                x,
                m,
                jnp.stack([shift, prefix, t, jnp.uint32(off)]),
                tie=tie is not None,
                interpret=interpret,
                block=block,
                chunk=chunk,
            )
            for x, m, off in zip(values, masks, offsets)
        )
        run = below + jnp.cumsum(h)
        d = jnp.minimum(jnp.sum(run < k), _BINS - 1)  # the first digit whose running count reaches k
        return (prefix << _DIGIT) | d.astype(jnp.uint32), run[d] - h[d], h[d]

    return lax.fori_loop(0, _LEVELS, level, (jnp.uint32(0), jnp.int32(0), jnp.int32(0)))


def _group(values, masks, k, *, interpret, block, chunk):
    """Keep masks of one selection group (the k smallest keys of all its values pruned)."""
    sizes = [x.size for x in values]
    _select.check_group_size(sum(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if sum(sizes) == 0:
        return [jnp.zeros(x.shape, bool) for x in values]
    kw = dict(interpret=interpret, block=block, chunk=chunk)
    k1 = jnp.maximum(k, 1)
    t, below, at = _kth(values, masks, offsets, k1, tie=None, **kw)
    take = k1 - below  # how many of the `at` entries tied at t are pruned (1..at)
    last = lax.cond(
        take < at,
        lambda: _kth(values, masks, offsets, take, tie=t, **kw)[0],
        lambda: jnp.uint32(_select._NO_TIE),
    )
    live = (k > 0).astype(jnp.uint32)
    return [
        _keep(x, m, jnp.stack([t, last, jnp.uint32(off), live]), interpret=interpret)
        for x, m, off in zip(values, masks, offsets)
    ]


@partial(jax.jit, static_argnames=("joint", "interpret", "block", "chunk"))
def prune(
    values, masks, k, *, joint: bool, interpret: bool = False, block: int = _BLOCK, chunk: int = _CHUNK
):
    """Keep masks: the ``k`` smallest keys of each value (or of all of them, ``joint``) pruned.

    Args:
      values: float32 or bfloat16 arrays (keys: the float32 bits of ``|x|``) or uint32 keys.
      masks: one bool mask of candidates per value, or None (every entry is one).
      k: an int32 count (``joint``) or one per value; traced or not, at most the candidates.
      joint: one selection over all values (global pruning) or one per value.
      interpret: run the kernels in Pallas interpret mode (any backend; slow: for tests).
      block, chunk: entries per program of a counting pass and per step of its loop (powers of
        two, ``chunk`` dividing ``block``).

    Returns:
      One bool array per value: True for candidates not among the k smallest.
    """
    if chunk & (chunk - 1) or block & (block - 1) or block % chunk:
        raise ValueError(f"block and chunk must be powers of two, chunk dividing block; got {block}, {chunk}")
    kw = dict(interpret=interpret, block=block, chunk=chunk)
    k = jnp.asarray(k, jnp.int32).reshape(-1)
    if joint:
        return _group(list(values), list(masks), k[0], **kw)
    return [_group([x], [m], ki, **kw)[0] for x, m, ki in zip(values, masks, k)]
