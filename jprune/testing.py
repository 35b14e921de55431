"""Comparing masks across frameworks: real differences versus tie order.

torch breaks ties at the pruning boundary in an implementation-defined order; jprune prunes tied
entries lowest flat index first. Two masks computed from the same scores can therefore differ
only in *which* of several equal scores were pruned. ``compare_masks`` tells such differences from
real ones, and ``assert_masks_equivalent`` fails only on a real one (both pure NumPy/JAX).
``torch_reference`` (torch's answer for the same weights) and ``assert_same_effective_weights``
import torch when they are called; importing this module never does.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import jax
import numpy as np

from ._select import magnitude_keys
from ._structured import channel_mask, channel_norms, normalize_axis
from ._tree import path_str

__all__ = [
    "LeafComparison",
    "MaskComparison",
    "assert_masks_equivalent",
    "assert_same_effective_weights",
    "compare_masks",
    "torch_reference",
]


class LeafComparison(NamedTuple):
    """One leaf of a ``MaskComparison``.

    ``differ``: entries whose masks differ; ``pruned_a``/``pruned_b``: pruned entries on each side;
    ``ties_only``: every difference swaps equal scores (None without scores, or without a
    difference); ``first``: the first differing index (row-major), or None.
    """

    path: str
    differ: int
    pruned_a: int
    pruned_b: int
    ties_only: bool | None
    first: tuple[int, ...] | None


class MaskComparison(NamedTuple):
    """Per-leaf comparison of two masks pytrees; ``print`` shows it as a table."""

    leaves: tuple[LeafComparison, ...]

    @property
    def equal(self) -> bool:
        """No entry differs."""
        return all(r.differ == 0 for r in self.leaves)

    @property
    def equivalent(self) -> bool:
        """Every difference is a tie at the selection boundary (the same scores were pruned)."""
        return all(r.differ == 0 or r.ties_only for r in self.leaves)

    def __str__(self) -> str:
        width = max([len("leaf")] + [len(r.path) for r in self.leaves])
        lines = [f"{'leaf':<{width}}  {'differ':>8}  {'pruned a':>9}  {'pruned b':>9}  verdict"]
        for r in self.leaves:
            if r.differ == 0:
                verdict = "equal"
            elif r.ties_only:
                verdict = "ties only"
            else:
                verdict = "differs" if r.ties_only is None else "differs beyond ties"
                verdict += f" (first at {r.first})"
            lines.append(f"{r.path:<{width}}  {r.differ:>8}  {r.pruned_a:>9}  {r.pruned_b:>9}  {verdict}")
        return "\n".join(lines)


def _is_none(x) -> bool:
    return x is None


def _leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [path_str(p) for p, _ in flat], [None if m is None else np.asarray(m) for _, m in flat], treedef


def _keys(score) -> np.ndarray:
    """Keys ordering ``|score|`` exactly (NaN included), as jprune ranks scores."""
    return np.asarray(magnitude_keys(jax.numpy.asarray(score))).ravel()


def _same_multiset(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and bool(np.array_equal(np.sort(a), np.sort(b)))


def _first_real(diff: np.ndarray, keys: np.ndarray, x: np.ndarray, y: np.ndarray) -> int:
    """The first differing flat index that no tie explains: its score is pruned more often on its
    side than on the other."""
    left = Counter(keys[~x & y].tolist())
    left.subtract(Counter(keys[~y & x].tolist()))
    for i in diff:
        side = 1 if not x[i] else -1  # pruned in a: counts up; pruned in b: counts down
        if left[int(keys[i])] * side > 0:
            return int(i)
    return int(diff[0])


def _channels(path, x, y, s, axis, n):
    """Structured masks as channel masks along ``axis`` (a channel is kept while any entry is),
    and the scores as the channels' Ln norms (as ``jp.ln_structured`` ranks them)."""
    ax = normalize_axis(axis, x.shape, path)
    x, y = (np.asarray(channel_mask(jax.numpy.asarray(m), ax)) for m in (x, y))
    return x, y, None if s is None else channel_norms(jax.numpy.asarray(s), n, ax)


def compare_masks(a, b, *, scores=None, axis=None, n=2) -> MaskComparison:
    """Compares two masks pytrees leaf by leaf, telling tie-order differences from real ones.

    With ``scores`` (a pytree like the masks: the importance scores both sides ranked, e.g. the
    params), a difference is a tie when the entries pruned only in ``a`` have exactly the scores
    (``|x|``) of the entries pruned only in ``b``: the same values were pruned, only equal ones were
    chosen differently. This is judged per leaf, and across all leaves together for a global
    ranking (a tie may cross leaves). Without scores every difference is reported as real.

    Structured masks (``axis`` given) compare by channel along ``axis``: a channel is pruned when
    all its entries are, and channels tie when their Ln norms (``n``, of the scores) are equal.

    Args:
      a: bool masks (``None`` for an unpruned leaf, read as all kept).
      b: bool masks of the same structure.
      scores: optional scores pytree of the same structure (``None`` leaves allowed where both
        masks are None).
      axis: compare whole channels along this axis (structured pruning), in every leaf.
      n: the norm that ranks channels, as in ``jp.ln_structured``.

    Returns:
      A ``MaskComparison``: ``.equal``, ``.equivalent`` and one ``LeafComparison`` per leaf with a
      mask on either side; ``print`` shows a table.

    Raises:
      ValueError: the trees differ in structure, or a leaf's masks or scores differ in shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jprune.testing import compare_masks
      >>> w = jnp.array([1.0, 2.0, 2.0, 3.0])  # a tie at 2.0: either may be pruned second
      >>> a, b = jnp.array([False, False, True, True]), jnp.array([False, True, False, True])
      >>> r = compare_masks(a, b, scores=w)
      >>> r.equal, r.equivalent
      (False, True)
      >>> print(r)
      leaf    differ   pruned a   pruned b  verdict
                   2          2          2  ties only
    """
    pa, ma, da = _leaves(a)
    _, mb, db = _leaves(b)
    if da != db:
        raise ValueError(f"the masks differ in structure: {da} vs {db}")
    ss = [None] * len(ma) if scores is None else jax.tree_util.tree_leaves(scores, is_leaf=_is_none)
    if len(ss) != len(ma):
        raise ValueError(f"scores must mirror the masks: {len(ss)} leaves for {len(ma)}")
    rows, only_a, only_b = [], [], []
    for path, x, y, s in zip(pa, ma, mb, ss):
        if x is None and y is None:
            continue
        shape = np.shape(x if x is not None else y)
        x = np.ones(shape, bool) if x is None else x.astype(bool)
        y = np.ones(shape, bool) if y is None else y.astype(bool)
        if x.shape != y.shape or (s is not None and np.shape(s) != x.shape):
            raise ValueError(f"{path}: shapes differ: a {x.shape}, b {y.shape}, scores {np.shape(s)}")
        if axis is not None:
            x, y, s = _channels(path, x, y, s, axis, n)
        fx, fy = x.ravel(), y.ravel()
        diff = np.flatnonzero(fx != fy)
        first, ties = (int(diff[0]) if diff.size else None), None
        if diff.size and s is not None:
            keys = _keys(s)
            only_a.append(keys[~fx & fy])
            only_b.append(keys[~fy & fx])
            ties = _same_multiset(only_a[-1], only_b[-1])
            if not ties:
                first = _first_real(diff, keys, fx, fy)
        at = None if first is None else tuple(int(i) for i in np.unravel_index(first, x.shape))
        rows.append(LeafComparison(path, int(diff.size), int((~x).sum()), int((~y).sum()), ties, at))
    if only_a and not all(r.ties_only in (None, True) for r in rows):
        # a global ranking: equal scores may have been pruned in another leaf
        across = _same_multiset(np.concatenate(only_a), np.concatenate(only_b))
        rows = [r._replace(ties_only=across) if r.ties_only is False else r for r in rows]
    return MaskComparison(tuple(rows))


def assert_masks_equivalent(a, b, *, scores=None, axis=None, n=2) -> None:
    """Raises unless ``a`` and ``b`` differ only by tie order (see ``compare_masks``).

    Args:
      a: bool masks pytree.
      b: bool masks pytree of the same structure.
      scores: the scores both were computed from; without them any difference fails.
      axis: compare whole channels along this axis (structured pruning); ``n``: their norm.

    Raises:
      AssertionError: naming the first leaf and index that differ for a real reason, with the
        comparison table.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jprune.testing import assert_masks_equivalent
      >>> w = jnp.array([1.0, 2.0, 2.0, 3.0])
      >>> assert_masks_equivalent(jnp.array([0, 1, 0, 1]) == 1, jnp.array([0, 0, 1, 1]) == 1, scores=w)
      >>> assert_masks_equivalent(jnp.array([0, 1, 1, 1]) == 1, jnp.array([1, 1, 0, 1]) == 1, scores=w)
      Traceback (most recent call last):
      AssertionError: masks differ beyond ties at leaf '' index (0,) (1 vs 1 pruned)
      leaf    differ   pruned a   pruned b  verdict
                   2          1          1  differs beyond ties (first at (0,))
    """
    report = compare_masks(a, b, scores=scores, axis=axis, n=n)
    for r in report.leaves:
        if r.differ and not r.ties_only:
            why = "differ" if r.ties_only is None else "differ beyond ties"
            where = f"leaf {r.path!r} index {r.first} ({r.pruned_a} vs {r.pruned_b} pruned)"
            raise AssertionError(f"masks {why} at {where}\n{report}")


# ------------------------------------------------------------------------------------------------
# torch as the oracle (needs torch; imported only when called)

_TORCH_METHODS = (
    "l1_unstructured",
    "random_unstructured",
    "ln_structured",
    "random_structured",
    "global_unstructured",
    "identity",
    "custom_from_mask",
)


def torch_reference(params, steps, *, masks=None, importance_scores=None, select=None):
    """Runs ``torch.nn.utils.prune`` on the same weights and returns torch's masks, jprune-shaped.

    Each selected leaf becomes a Parameter of a bare ``nn.Module`` (in the array's own layout:
    which entries an unstructured or per-channel method prunes does not depend on the layout, so
    ``axis`` is torch's ``dim`` as is), ``masks`` are installed first with ``custom_from_mask``,
    then the steps run through torch's own pruning container, as in torch's tutorial.

    Args:
      params: an array or a pytree of arrays (the weights torch prunes).
      steps: one call or a list of calls, each ``(method, amount)`` or ``(method, amount, kwargs)``:
        ``"l1_unstructured"``, ``"random_unstructured"`` (torch's RNG: compare counts, not
        indices), ``"ln_structured"`` (kwargs ``n`` and ``axis``), ``"random_structured"``
        (``axis``), ``"global_unstructured"`` (over all selected leaves, L1), ``"identity"``, or
        ``"custom_from_mask"`` (kwargs ``mask``: a pytree like params, 0/1 per selected leaf).
      masks: starting masks (a masks pytree), or None.
      importance_scores: a pytree like params, passed to every step (L1 and Ln methods).
      select: which leaves, as in ``jp.l1_unstructured`` (the same default).

    Returns:
      torch's masks as a jprune masks pytree (bool, ``None`` where a leaf was not selected).

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from jprune.testing import torch_reference
      >>> w = jnp.array([[0.5, -2.0, 3.0], [1.0, -4.0, 0.1]])
      >>> torch_reference(w, ("l1_unstructured", 2)).tolist()
      [[False, True, True], [True, True, False]]
      >>> steps = [("l1_unstructured", 2), ("ln_structured", 1, {"n": 2, "axis": 1})]
      >>> (torch_reference(w, steps) == jp.ln_structured(w, 1, 2, 1, masks=jp.l1_unstructured(w, 2))).all()
      Array(True, dtype=bool)
    """
    import torch
    from torch.nn.utils import prune

    from ._tree import Tree

    tree = Tree(params, masks, importance_scores)
    idx = tree.select(select)
    module = torch.nn.Module()
    names = [f"p{j}" for j in range(len(idx))]

    def tensor(a):
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":  # numpy has no bf16: through float32, exactly
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(a))

    for name, i in zip(names, idx):
        t = tensor(tree.values[i])
        module.register_parameter(name, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
        if tree.masks[i] is not None:
            prune.custom_from_mask(module, name, tensor(tree.masks[i]))
    scores = {name: tree.scores[i] for name, i in zip(names, idx) if tree.scores[i] is not None}
    for step in [steps] if isinstance(steps[0], str) else steps:
        method, amount, kw = (*step, {}) if len(step) == 2 else step
        if method not in _TORCH_METHODS:
            raise ValueError(f"method must be one of {_TORCH_METHODS}, got {method!r}")
        if method == "global_unstructured":
            imp = {(module, n): tensor(s) for n, s in scores.items()} or None
            targets = [(module, n) for n in names]
            prune.global_unstructured(
                targets, pruning_method=prune.L1Unstructured, importance_scores=imp, amount=amount
            )
            continue
        if method in ("identity", "custom_from_mask"):
            given = tree.align(kw["mask"], "mask") if method == "custom_from_mask" else None
            for name, i in zip(names, idx):
                if given is None:
                    prune.identity(module, name)
                elif given[i] is not None:
                    prune.custom_from_mask(module, name, tensor(given[i]))
            continue
        extra = {"dim": kw["axis"]} if "axis" in kw else {}
        if "n" in kw:
            extra["n"] = kw["n"]
        for name in names:
            if method in ("l1_unstructured", "ln_structured") and name in scores:
                extra["importance_scores"] = tensor(scores[name])
            else:
                extra.pop("importance_scores", None)
            getattr(prune, method)(module, name, amount, **extra)
    new = {
        i: np.asarray(getattr(module, f"{name}_mask").detach() != 0)
        for name, i in zip(names, idx)
        if hasattr(module, f"{name}_mask")
    }
    return tree.with_masks({i: jax.numpy.asarray(m) for i, m in new.items()})


def assert_same_effective_weights(params, masks, torch_model) -> None:
    """Raises unless the effective weights (``orig * mask``) agree bit for bit across frameworks.

    The torch side's weights and masks are read with ``jprune.interop.from_torch`` (Flax names and
    layouts; needs torch), and both sides' effective weights are torch's product ``orig * mask``
    (``jp.apply_masks``: a pruned NaN stays NaN, a pruned negative is ``-0.0``).

    Args:
      params: Flax params (the names and layouts of ``from_torch(torch_model)["params"]``).
      masks: their masks (``None`` where a leaf is not pruned).
      torch_model: a torch ``nn.Module`` (pruned or not), a state_dict, or a checkpoint path.

    Raises:
      AssertionError: naming the first leaf (and index) whose effective weights differ, or a leaf
        one side has and the other has not.

    Examples:
      >>> import numpy as np, torch
      >>> from torch.nn.utils import prune
      >>> from jprune.interop import from_torch
      >>> from jprune.testing import assert_same_effective_weights
      >>> lin = prune.l1_unstructured(torch.nn.Linear(4, 3), "weight", amount=5)
      >>> ckpt = from_torch(lin)
      >>> assert_same_effective_weights(ckpt["params"], ckpt["masks"], lin)
    """
    from jprune.interop import from_torch

    from ._masks import apply_masks

    ckpt = from_torch(torch_model)
    theirs = dict(_flat_paths(apply_masks(ckpt["params"], ckpt["masks"])))
    ours = dict(_flat_paths(apply_masks(params, masks)))
    if ours.keys() != theirs.keys():
        only = sorted(ours.keys() ^ theirs.keys())
        raise AssertionError(
            f"leaves {only} are on one side only (jprune: {sorted(ours)}, torch: {sorted(theirs)})"
        )
    for path, a in ours.items():
        a, b = np.asarray(a), np.asarray(theirs[path])
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{path}: jprune {a.dtype}{a.shape} vs torch {b.dtype}{b.shape}")
        bits = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.kind in "fc" else a.dtype
        diff = np.flatnonzero(a.view(bits).ravel() != b.view(bits).ravel())
        if diff.size:
            at = tuple(int(i) for i in np.unravel_index(diff[0], a.shape))
            raise AssertionError(
                f"{path}: effective weights differ at {at}: jprune {a[at]!r}, torch {b[at]!r} "
                f"({diff.size} entries differ)"
            )


def _flat_paths(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), v) for p, v in flat]
