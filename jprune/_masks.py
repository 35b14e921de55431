"""Using masks: effective weights, making pruning permanent, and the sparsity report."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._nm import _check as check_pattern
from ._tree import Tree, effective, is_array, path_str


def apply_masks(params, masks):
    """The effective params: ``param * mask`` where a mask exists, the param itself elsewhere.

    A product, not a select, so it is bit-identical to torch's ``orig * mask`` (a pruned NaN stays
    NaN, a pruned negative becomes ``-0.0``).

    Args:
      params: an array or a pytree of arrays.
      masks: bool masks mirroring params (``None`` for unpruned leaves).

    Returns:
      A pytree like params.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> jp.apply_masks({"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])},
      ...                {"w": jnp.array([True, False]), "b": None})
      {'b': Array([3.], dtype=float32), 'w': Array([ 1., -0.], dtype=float32)}
    """
    tree = Tree(params, masks)
    return tree.with_values([effective(v, m) if is_array(v) else v for v, m in zip(tree.values, tree.masks)])


def remove(params, masks):
    """Make pruning permanent, like ``torch.nn.utils.prune.remove``: zeros baked into the params.

    The result is the effective params (``apply_masks``); drop the masks afterwards. Pruning again
    starts from scratch, and the baked zeros (``|x| = 0``) are the first L1 candidates.

    Args:
      params: an array or a pytree of arrays.
      masks: the masks to bake in.

    Returns:
      The params with pruned entries zeroed.

    Raises:
      ValueError: nothing is pruned (``masks`` has no mask), as torch raises for an unpruned tensor.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> w = jnp.array([5.0, -1.0, 3.0, 0.5])
      >>> jp.remove(w, jp.l1_unstructured(w, 2))
      Array([ 5., -0.,  3.,  0.], dtype=float32)
    """
    if not is_pruned(masks):
        raise ValueError("remove: nothing is pruned (every mask is None); prune before removing")
    return apply_masks(params, masks)


def is_pruned(masks) -> bool:
    """True if any leaf of ``masks`` holds a mask (like ``torch.nn.utils.prune.is_pruned``).

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> jp.is_pruned({"w": None}), jp.is_pruned({"w": jnp.ones(2, bool)})
      (False, True)
    """
    return any(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))


class Row(NamedTuple):
    """One leaf of a :class:`SparsityReport`: its path, pruned and total entry counts, and whether
    its mask has the report's N:M pattern (``None`` where the pattern cannot tile the leaf)."""

    path: str
    pruned: int
    total: int
    n_m: bool | None = None

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0


_BAR = 20


class SparsityReport(NamedTuple):
    """Pruned / total counts per leaf and overall; ``print`` shows a table with a bar per leaf.

    Attributes:
      rows: one :class:`Row` per leaf (``path``, ``pruned``, ``total``, ``fraction``, ``n_m``).
      pattern: the N:M pattern checked for ``Row.n_m`` (``(2, 4)``: at least 2 pruned in every 4
        consecutive entries along a kernel's input axis, ``-2``).
      pruned, total, fraction: over all rows.
    """

    rows: tuple[Row, ...]
    pattern: tuple[int, int] = (2, 4)

    @property
    def pruned(self) -> int:
        return sum(r.pruned for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def __str__(self) -> str:
        n, m = self.pattern
        nm = f"{n}:{m}"
        width = max([len("leaf"), len("global")] + [len(r.path) for r in self.rows])
        head = f"{'leaf':<{width}}  {'pruned':>10}  {'total':>10}  {'sparsity':>8}  {'':<{_BAR}}  {nm}"
        lines = [head.rstrip()]
        for r in (*self.rows, Row("global", self.pruned, self.total)):
            filled = round(r.fraction * _BAR)
            bar = "#" * filled + "." * (_BAR - filled)
            line = f"{r.path:<{width}}  {r.pruned:>10}  {r.total:>10}  {r.fraction:>8.2%}  {bar}  "
            lines.append((line + (nm if r.n_m else "")).rstrip())
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)


def _has_pattern(mask, n: int, m: int, axis: int = -2):
    """Whether every ``m`` consecutive entries along ``axis`` hold at least ``n`` pruned (a device
    bool), or None where the groups cannot tile the mask."""
    if jnp.ndim(mask) < 2 or jnp.shape(mask)[axis] % m:
        return None
    groups = jnp.moveaxis(jnp.asarray(mask), axis, -1)
    groups = groups.reshape(*groups.shape[:-1], groups.shape[-1] // m, m)
    return jnp.all(jnp.sum(~groups, axis=-1) >= n)


def sparsity(masks, params=None, *, pattern: tuple[int, int] = (2, 4)) -> SparsityReport:
    """Count pruned entries per masked leaf and overall, and check each for an N:M pattern.

    Args:
      masks: bool masks (``None`` for unpruned leaves).
      params: optional params mirroring ``masks``: unpruned leaves then count as 0 % rows.
      pattern: ``(n, m)``: a row's ``n_m`` says whether every ``m`` consecutive entries along the
        leaf's input axis (``-2``, as ``jp.n_m_unstructured``) hold at least ``n`` pruned: 2:4 is
        what sparse tensor cores (and ``torch.sparse.to_sparse_semi_structured``) take.

    Returns:
      A ``SparsityReport`` with ``rows`` (``path``, ``pruned``, ``total``, ``fraction``, ``n_m``)
      and overall ``pruned``, ``total``, ``fraction``; ``print(report)`` shows a table: a bar per
      leaf (``#`` pruned), and ``2:4`` where a leaf has the pattern.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> r = jp.sparsity({"a": jnp.array([True, False]), "b": jnp.array([False, False])})
      >>> r.pruned, r.total, r.fraction
      (3, 4, 0.75)
      >>> print(r)
      leaf        pruned       total  sparsity                        2:4
      a                1           2    50.00%  ##########..........
      b                2           2   100.00%  ####################
      -------------------------------------------------------------------
      global           3           4    75.00%  ###############.....
      >>> w = jnp.arange(1.0, 17.0).reshape(8, 2)
      >>> print(jp.sparsity(jp.n_m_unstructured(w, 2, 4)))
      leaf        pruned       total  sparsity                        2:4
                       8          16    50.00%  ##########..........  2:4
      -------------------------------------------------------------------
      global           8          16    50.00%  ##########..........
    """
    check_pattern(*pattern)
    if params is None:
        flat, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)
        items = [(path_str(p), m, np.size(m)) for p, m in flat if m is not None]
    else:
        tree = Tree(params, masks)
        items = [(p, m, np.size(v)) for p, v, m in zip(tree.paths, tree.values, tree.masks) if is_array(v)]
    counts = jax.device_get(
        [
            (np.size(m) - m.sum(), _has_pattern(m, *pattern)) if m is not None else (0, None)
            for _, m, _ in items
        ]
    )
    return SparsityReport(
        tuple(
            Row(p, int(np.asarray(c)), int(n), None if ok is None else bool(ok))
            for (p, _, n), (c, ok) in zip(items, counts)
        ),
        tuple(pattern),
    )
