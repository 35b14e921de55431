"""Structured pruning over coupled channel groups: a channel is pruned in every slice that indexes it."""

from __future__ import annotations

import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _amount, _select
from ._groups import Group, Groups
from ._tree import Tree, as_array, effective

_STATS = ("mean", "var")  # Flax BatchNorm's running statistics: coupled, but not an importance


def _slices(x, member, xp=jnp):
    """``x`` with the member's axis first, channels as rows: ``(width, ...)``."""
    x = xp.moveaxis(x, member.axis, 0)
    # as an array: JAX reuses a jitted function's numpy int64 index constants across a switch of
    # jax_enable_x64, and fails ("lax.add requires arguments to have the same dtypes")
    return x if member.index is None else x[xp.asarray(member.index)]


def _check_n(n):
    if n == "fro":
        return 2.0
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n) or n < 0:
        raise ValueError(f"n must be a non-negative real number, inf or 'fro', got {n!r}")
    return float(n)


def importance(x, member, p):
    """Per channel: the sum of ``|x|**p`` over the member's slice (max for inf, count for 0)."""
    s = jnp.abs(_slices(x, member).astype(jnp.promote_types(x.dtype, jnp.float32)))
    s = s.reshape(s.shape[0], -1)
    if p == math.inf:
        return jnp.max(s, axis=1)
    if p == 0:
        return jnp.sum(s != 0, axis=1).astype(s.dtype)
    return jnp.sum(s if p == 1 else s**p, axis=1)


def channel_keep(mask, member, xp=jnp):
    """Per channel: whether any entry of the member's slice is unpruned (None for no mask)."""
    if mask is None:
        return None
    s = _slices(mask, member, xp)
    return xp.any(s.reshape(s.shape[0], -1), axis=1)


def removed(group: Group, masks, index, xp=jnp):
    """Channels already pruned: every consumer slice (a kernel's input rows) fully masked."""
    dead = xp.ones(group.width, bool)
    for m in group.members:
        if m.role == "in":
            keep = channel_keep(masks[index[m.path]], m, xp)
            dead = dead & (xp.zeros(group.width, bool) if keep is None else ~keep)
    return dead


def check_tree(tree: Tree, groups: Groups, what: str):
    if tuple(tree.paths) != groups.paths:
        raise ValueError(
            f"{what}: the tree's leaves {tree.paths[:4]}... are not those the groups were read from "
            f"{list(groups.paths[:4])}...: pass the same variables as to channel_groups"
        )
    for p, v, s in zip(tree.paths, tree.values, groups.shapes):
        if tuple(np.shape(v)) != tuple(s):
            raise ValueError(
                f"{what}: {p} has shape {tuple(np.shape(v))}, the groups were read at {tuple(s)}"
            )


def group_structured(
    tree,
    amount,
    groups: Groups,
    n=2,
    masks=None,
    scope="global",
    importance_scores=None,
    select=None,
    round_to=None,
):
    """Prune whole channels of coupled groups: every slice of a pruned channel, in every member.

    A channel's importance is the Ln norm of all its coupled slices together (the kernel's output
    column and the next kernel's input rows, the bias, the norm's scale and shift; not the running
    statistics ``mean``/``var``), over ``params * masks`` or over ``importance_scores``. Channels
    already pruned (every consumer slice masked) count as pruned: ``amount`` is of the remaining
    channels (torch's count rule, ``_amount.counts``), and at least one channel of each group
    remains. Unprunable groups are never touched.

    ``scope="layer"`` prunes ``amount`` of each group's remaining channels. ``scope="global"`` prunes
    ``amount`` of all remaining channels at once, ranked by importance *divided by its group's mean
    importance* over the group's remaining channels (so wide groups and strided flatten rows compete
    fairly; a group whose mean is 0 is ranked by its raw zeros), sparing each group's most important
    channel (the first in index order among equals); ties are broken by group order, then channel
    index, lowest pruned first.

    Args:
      tree: the variables ``channel_groups`` read (same structure and shapes).
      amount: int count or float fraction of the remaining channels.
      groups: from ``channel_groups``.
      n: the norm: 1, 2, any ``p > 0``, ``inf``, 0 (count of nonzeros) or ``"fro"`` (= 2).
      masks: current masks (mirroring ``tree``) or None.
      scope: ``"global"`` or ``"layer"``.
      importance_scores: a pytree like ``tree`` (None leaves: not counted).
      select: which prunable groups to prune: None (all), a list of group ids, or a predicate on a
        ``Group`` (e.g. ``lambda g: "attention" in g.name``). A Linen ``MultiHeadDotProductAttention``
        has one head size for q, k and v, so prune its heads group, not its value-dims group.
      round_to: None, or an int ``r``: each pruned group keeps a multiple of ``r`` of its channels
        (heads, for a heads group), the count rounded up (so fewer are pruned than ``amount`` asks),
        or all of its remaining channels when fewer than that multiple remain. The kept channels are
        the most important ones, as without rounding. Widths that are multiples of 8 or 16 suit
        vector units and matrix engines. (Torch-Pruning's ``round_to`` rounds down: it prunes more.)

    Returns:
      Masks mirroring ``tree``: bool arrays on every member of a pruned group, None (or the incoming
      mask) elsewhere.

    Raises:
      ValueError: a bad amount, ``n``, ``scope`` or ``round_to``; a count that would remove every
        channel of a group; a tree that is not the one the groups were read from.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jprune as jp
      >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> params = mlp.init(jax.random.key(0), x)
      >>> groups = jp.channel_groups(mlp.apply, params, x)
      >>> masks = jp.group_structured(params, 0.5, groups)
      >>> masks["params"]["layers_2"]["kernel"].all(axis=1).sum().item()  # input rows kept
      2
      >>> masks = jp.group_structured(params, 0.25, groups, round_to=2)  # 3 kept, rounded up to 4
      >>> masks["params"]["layers_2"]["kernel"].all(axis=1).sum().item()
      4
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    p = _check_n(n)
    r = _check_round_to(round_to)
    t = Tree(tree, masks, importance_scores)
    check_tree(t, groups, "group_structured")
    todo = _chosen(groups, select)
    if not todo:
        return t.with_masks({})
    values = [as_array(path, v) for path, v in zip(t.paths, t.values)]
    keys, cands, live, room = _rank(
        values,
        t.masks,
        t.scores,
        groups=groups,
        todo=todo,
        p=p,
        scope=scope,
        use_scores=importance_scores is not None,
    )
    traced = isinstance(live[0], jax.core.Tracer) or _amount.is_traced(amount)
    bits = 8 * keys[0].dtype.itemsize
    if scope == "layer":
        where = [f"group {g.id} ({g.name}): " for g in todo]
        ks = _amount.counts(amount, live, [g.width for g in todo], where=where, traced=traced)
        if not traced:
            for k, lv, w in zip(ks, jax.device_get(live), where):
                if k > 0 and k >= lv:
                    raise ValueError(
                        f"{w}pruning {k} of its {lv} remaining channels would remove them all; "
                        "at most all but one channel of a group can be pruned"
                    )
        ks = [jnp.minimum(jnp.asarray(k, jnp.int32), jnp.maximum(lv - 1, 0)) for k, lv in zip(ks, live)]
        ks = [_rounded(k, lv, r) for k, lv in zip(ks, live)]
        sources = [[(_select.given, (x, c))] for x, c in zip(keys, cands)]
        keeps = [k[0] for k in _select.prune_groups(sources, ks, bits=bits)]
    else:
        total_live = sum(live)
        (k,) = _amount.counts(amount, [total_live], [sum(g.width for g in todo)], where=[""], traced=traced)
        if not traced and k > int(room):
            raise ValueError(
                f"pruning {k} of the {int(total_live)} remaining channels would remove every channel of "
                f"a group: at most {int(room)} can be pruned (all but one per group)"
            )
        k = jnp.minimum(jnp.asarray(k, jnp.int32), room)
        # one source (fewer kernels to compile): flat order is group order, then channel index
        (flat,) = _select.prune_smallest(
            [(_select.given, (jnp.concatenate(keys), jnp.concatenate(cands)))], k, bits=bits
        )
        keeps = jnp.split(flat, np.cumsum([g.width for g in todo])[:-1].tolist())
        if r > 1:  # each group's count rounded: its smallest keys again, fewer of them
            ks = [_rounded(jnp.sum(c & ~k, dtype=jnp.int32), lv, r) for c, k, lv in zip(cands, keeps, live)]
            sources = [[(_select.given, (x, c))] for x, c in zip(keys, cands)]
            keeps = [k[0] for k in _select.prune_groups(sources, ks, bits=bits)]
    new = _build(keeps, cands, t.masks, groups=groups, todo=todo, scope=scope)
    return t.with_masks(new)


def _check_round_to(round_to) -> int:
    if round_to is None:
        return 1
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1:
        raise ValueError(f"round_to must be None or a positive int, got {round_to!r}")
    # any r of at least a group's width keeps all it has left: the same for every larger r, and
    # int32 counts then hold it
    return min(int(round_to), _select.MAX_GROUP)


def _rounded(k, live, r):
    """How many of ``live`` channels to prune instead of ``k``, so that a multiple of ``r`` remain
    (rounded up), or all of them."""
    if r == 1:
        return k
    short = -(live - k) % r  # how many more to keep for a multiple of r: no int32 overflow
    return jnp.maximum(k - short, 0)


def _chosen(groups: Groups, select) -> tuple[Group, ...]:
    if select is None:
        return groups.prunable
    if callable(select):
        return tuple(g for g in groups.prunable if select(g))
    ids = list(select)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(groups):
            raise ValueError(f"select: {i!r} is not a group id (0..{len(groups) - 1})")
        if not groups[i].prunable:
            raise ValueError(f"select: group {i} ({groups[i].name}) is not prunable: {groups[i].reason}")
    return tuple(g for g in groups.prunable if g.id in ids)


@partial(jax.jit, static_argnames=("groups", "todo", "p", "scope", "use_scores"))
def _rank(values, masks, scores, *, groups, todo, p, scope, use_scores):
    """Per prunable group: selection keys, candidates, remaining channels; and (global) how many
    channels may go in all."""
    index = {path: i for i, path in enumerate(groups.paths)}
    imps, dead = [], []
    for g in todo:
        total = None
        for m in g.members:
            i = index[m.path]
            if use_scores:
                src = scores[i]
                if src is None:
                    continue
            elif m.path.rsplit("/", 1)[-1] in _STATS:
                continue
            else:
                src = effective(values[i], masks[i])
            part = importance(src, m, p)
            total = part if total is None else (jnp.maximum(total, part) if p == math.inf else total + part)
        if total is None:
            total = jnp.zeros(g.width, jnp.float32)
        if p not in (0, 1, math.inf):
            total = total ** (1.0 / p)
        imps.append(total)
        dead.append(removed(g, masks, index))
    dtype = jnp.result_type(*imps)
    live = [jnp.sum(~d, dtype=jnp.int32) for d in dead]
    if scope == "layer":
        return [_select.magnitude_keys(x.astype(dtype)) for x in imps], [~d for d in dead], live, None
    keys, cands = [], []
    for x, d in zip(imps, dead):
        x = x.astype(dtype)
        mean = jnp.sum(jnp.where(d, 0, x)) / jnp.maximum(jnp.sum(~d), 1)
        y = jnp.where(mean > 0, x / jnp.where(mean > 0, mean, 1), x)
        best = jnp.argmax(jnp.where(d, -jnp.inf, y))  # spared: at least one channel stays
        keys.append(_select.magnitude_keys(y))
        cands.append(~d & (jnp.arange(x.shape[0]) != best))
    room = sum(jnp.sum(c, dtype=jnp.int32) for c in cands)
    return keys, cands, live, room


@partial(jax.jit, static_argnames=("groups", "todo", "scope"))
def _build(keeps, cands, masks, *, groups, todo, scope):
    """The masks of every member: its pruned channels' slices False, AND the incoming mask."""
    index = {path: i for i, path in enumerate(groups.paths)}
    new = {}
    for g, keep, cand in zip(todo, keeps, cands):
        if scope == "global":  # the spared channel is not a candidate: keep it (and no dead one)
            keep = keep | (~cand & ~removed(g, masks, index))
        for m in g.members:
            i = index[m.path]
            shape = groups.shapes[i]
            size = shape[m.axis]
            if m.index is None:
                along = keep
            else:
                along = (
                    jnp.ones(size, bool)
                    .at[jnp.asarray(m.index)]
                    .set(jnp.broadcast_to(keep[:, None], m.index.shape))
                )
            view = [1] * len(shape)
            view[m.axis] = size
            full = jnp.broadcast_to(along.reshape(view), shape)
            cur = new.get(i, masks[i])
            new[i] = full if cur is None else cur & full
    return new
