"""How a model's sparsity is split across its layers: uniform, Erdős–Rényi-kernel, or per layer.

Each function gives one pruned-entry count per selected leaf (int32 device scalars, traced when
the sparsity is), for :func:`jprune.prune_to_sparsity`'s ``scope``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp

from . import _amount
from ._schedules import check_fraction


def target_count(sparsity, n: int):
    """``round(sparsity * n)`` as an int32 device scalar (Python's rounding, no host sync).

    A concrete sparsity is checked (a fraction in [0, 1]); a traced one is clipped to [0, 1].
    """
    if _amount.is_traced(sparsity):
        return _amount.count_traced(sparsity, n)
    if hasattr(sparsity, "shape") and jnp.ndim(sparsity) == 0:  # a concrete array: a number
        sparsity = float(sparsity)
    check_fraction("sparsity", sparsity)
    return _amount.count_traced(_amount.as_device_amount(float(sparsity)), n)


def uniform(sparsity, sizes: Sequence[int]) -> list:
    """Every leaf at ``sparsity`` (``scope="layer"``)."""
    return [target_count(sparsity, n) for n in sizes]


def per_layer(sparsity, paths: Sequence[str], sizes: Sequence[int], table: Mapping[str, float]) -> list:
    """Leaf ``i`` at ``table[pattern] * sparsity``, its pattern a path or glob matching it.

    Raises:
      ValueError: a selected leaf that no key matches, or that two keys match; a key matching no
        selected leaf; a value that is not a fraction.
    """
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"scope keys must be paths or globs, got {key!r}")
        check_fraction(f"scope[{key!r}]", value)
        if not any(fnmatch.fnmatchcase(p, key) for p in paths):
            raise ValueError(
                f"scope key {key!r} matches no selected leaf; the selected paths are {list(paths)}"
            )
    if not _amount.is_traced(sparsity):
        sparsity = check_fraction("sparsity", float(sparsity))
    out = []
    for path, n in zip(paths, sizes):
        keys = [k for k in table if fnmatch.fnmatchcase(path, k)]
        if len(keys) != 1:
            what = "no key of scope" if not keys else f"several keys of scope ({keys})"
            raise ValueError(f"{path}: {what} matches it; give every selected leaf exactly one sparsity")
        out.append(target_count(sparsity * float(table[keys[0]]), n))
    return out


def erk_densities(sparsity, shapes: Sequence[tuple[int, ...]]):
    """Erdős–Rényi-kernel densities (RigL, Evci et al. 2020; jaxpruner's ``erk``) for a total ``sparsity``.

    A leaf's density is ``eps * sum(shape) / prod(shape)``, ``eps`` scaled so that the kept
    entries total ``(1 - sparsity) * N``. Leaves whose density would exceed 1 are kept dense and
    ``eps`` is found again for the rest (marking all of them at once gives RigL's answer: ``eps``
    only grows when a leaf is made dense).

    Returns:
      A float32 array of densities, one per leaf (traced when ``sparsity`` is).
    """
    sizes = jnp.asarray([math.prod(s) for s in shapes], jnp.float32)
    raw = jnp.asarray([sum(s) / math.prod(s) for s in shapes], jnp.float32)
    keep = (1.0 - jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)) * jnp.sum(sizes)
    dense = jnp.zeros(len(shapes), bool)
    for _ in range(len(shapes)):  # at most one round per leaf
        rhs = keep - jnp.sum(jnp.where(dense, sizes, 0.0))
        divisor = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
        eps = jnp.where(divisor > 0, rhs / jnp.where(divisor > 0, divisor, 1.0), 0.0)
        dense = dense | (eps * raw > 1.0)
    return jnp.where(dense, 1.0, jnp.clip(eps * raw, 0.0, 1.0))


def erk(sparsity, shapes: Sequence[tuple[int, ...]]) -> list:
    """Pruned counts per leaf for ERK densities, summing to ``round(sparsity * N)`` exactly: each
    leaf gets the floor of its share, the rest go one each to the largest remainders."""
    total = target_count(sparsity, sum(math.prod(s) for s in shapes))
    counts = _erk_counts(jnp.asarray(sparsity, jnp.float32), total, tuple(tuple(s) for s in shapes))
    return [counts[i] for i in range(len(shapes))]


@partial(jax.jit, static_argnames="shapes")
def _erk_counts(sparsity, total, shapes):
    sizes = jnp.asarray([math.prod(s) for s in shapes], jnp.int32)
    dens = erk_densities(sparsity, shapes)
    share = (1.0 - dens) * sizes.astype(jnp.float32)
    base = jnp.minimum(jnp.floor(share).astype(jnp.int32), sizes)
    room = (dens < 1.0) & (base < sizes)
    rest = jnp.clip(total - jnp.sum(base), 0, len(shapes))
    order = jnp.argsort(jnp.where(room, -(share - jnp.floor(share)), jnp.inf), stable=True)
    rank = jnp.zeros(len(shapes), jnp.int32).at[order].set(jnp.arange(len(shapes), dtype=jnp.int32))
    counts = base + ((rank < rest) & room).astype(jnp.int32)
    # float32 shares of layers of ~1e7 entries are off by a few: settle the exact total on the
    # non-dense leaves, largest remainders first when adding, smallest first when taking away
    diff = total - jnp.sum(counts)
    up = jnp.where(dens < 1.0, sizes - counts, 0)
    down = jnp.where(dens < 1.0, counts, 0)
    frac = jnp.where(dens < 1.0, share - jnp.floor(share), 0.0)
    order = jnp.where(diff >= 0, jnp.argsort(-frac, stable=True), jnp.argsort(frac, stable=True))
    cap = jnp.where(diff >= 0, up, down)[order]
    moved = jnp.clip(jnp.abs(diff) - (jnp.cumsum(cap) - cap), 0, cap)
    return counts + jnp.sign(diff) * jnp.zeros_like(counts).at[order].set(moved)
