"""Gradual pruning: prune further to a target sparsity, and re-prune on a schedule inside a train step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from . import _distribution, _select
from ._masks import apply_masks
from ._nm import _check as check_pattern
from ._nm import n_m_unstructured
from ._schedules import as_schedule, check_fraction, check_step
from ._tree import Tree, is_tracer
from ._unstructured import global_unstructured, l1_unstructured

__all__ = ["prune_to_sparsity", "update_masks"]

_ALL = lambda path, leaf: True  # noqa: E731  (the leaves are chosen before the calls below)


def _n_pruned(m) -> jax.Array:
    return jnp.int32(0) if m is None else jnp.sum(~m, dtype=jnp.int32)


def _n_live(m, size: int) -> jax.Array:
    return jnp.int32(size) if m is None else jnp.sum(m, dtype=jnp.int32)


def _check_scope(scope) -> None:
    if isinstance(scope, Mapping):
        return
    if scope not in ("global", "layer", "erk"):
        raise ValueError(
            f'scope must be "global", "layer", "erk" or a dict {{path or glob: sparsity}}, got {scope!r}'
        )


def _capped_global(values, cands, extra, caps):
    """``extra`` entries pruned among the candidates by one global ranking, at most ``caps[i]`` in
    leaf ``i``: the global ranking without the leaves it would push past their cap, those pinned at
    their cap (each its own smallest). A leaf over its cap in the global ranking is also at its cap
    in the answer (the threshold only rises when leaves are pinned), so pinning them until none is
    over gives it; each round pins one leaf at least."""
    cands = [jnp.ones(v.shape, bool) if c is None else c for v, c in zip(values, cands)]
    live = jnp.stack([jnp.sum(c, dtype=jnp.int32) for c in cands])
    caps = jnp.stack(caps)

    def ranked(pinned):
        free = [c & ~pinned[i] for i, c in enumerate(cands)]
        k = jnp.clip(extra - jnp.sum(jnp.where(pinned, caps, 0)), 0, jnp.sum(jnp.where(pinned, 0, live)))
        kept = global_unstructured(values, k, masks=free, select=_ALL)
        took = jnp.stack([jnp.sum(f & ~r, dtype=jnp.int32) for f, r in zip(free, kept)])
        return kept, took

    def body(carry):
        pinned, _, _ = carry
        kept, took = ranked(pinned)
        new = pinned | (took > caps)
        return new, kept, jnp.any(new != pinned)

    pinned = jnp.zeros(len(values), bool)
    pinned, kept, _ = jax.lax.while_loop(lambda c: c[2], body, (pinned, cands, jnp.bool_(True)))
    return [
        jnp.where(pinned[i], l1_unstructured(v, jnp.where(pinned[i], caps[i], 0), masks=c), kept[i])
        for i, (v, c) in enumerate(zip(values, cands))
    ]


def prune_to_sparsity(
    params: Any,
    sparsity: Any,
    *,
    masks: Any = None,
    scope: str | Mapping[str, float] = "global",
    select: Any = None,
    pattern: tuple[int, int] | None = None,
    max_sparsity: float | None = None,
) -> Any:
    """Prunes further by magnitude until ``sparsity`` of the selected weights are pruned.

    Exactly ``round(sparsity * n)`` of the ``n`` selected entries end up pruned (or more, if
    ``masks`` already prunes more: a pruned weight never comes back). The new ones are the
    smallest ``|param|`` among the remaining entries, torch's iterative (container) rule with an
    integer amount. ``sparsity`` may be a traced scalar: calls inside ``jax.jit`` do not recompile
    when it changes (a traced value is clipped to [0, 1]).

    Args:
      params: the parameter pytree (a Linen params dict, an ``nnx.State``).
      sparsity: the target fraction of pruned weights, a float in [0, 1] or a traced scalar.
      masks: the current masks (None: nothing pruned yet).
      scope: how the sparsity is split across the selected leaves. ``"global"``: one ranking of
        all of them (``jp.global_unstructured``); ``"layer"``: every leaf at ``sparsity``;
        ``"erk"``: Erdős–Rényi-kernel (RigL): a leaf's density is proportional to
        ``sum(shape) / prod(shape)``, scaled so the total is ``sparsity`` exactly, leaves that
        would be denser than 1 kept dense; a dict ``{path or glob: factor}``: the leaf it matches
        at ``factor * sparsity`` (with a schedule ending at 1.0 the factors are the final
        per-leaf sparsities); every selected leaf must match exactly one key.
      select: which leaves to prune (see ``jp.l1_unstructured``); default: floating leaves named
        ``kernel`` with ndim >= 2.
      pattern: ``(n, m)`` to ramp towards N:M sparsity (e.g. ``(2, 4)``): only entries that
        ``jp.n_m_unstructured(params, n, m, masks=masks)`` would prune are candidates (groups of
        ``m`` along a kernel's input axis, ``-2``), so at ``sparsity = n / m`` every group has
        ``n`` pruned. A concrete ``sparsity`` above ``n / m`` is refused, and so is a scope that
        asks one leaf for more than the pattern prunes (``"erk"`` often does); traced, both are capped.
      max_sparsity: with ``scope="global"``, the most any one leaf may be pruned (a fraction):
        the global ranking skips a leaf once it reaches it.

    Returns:
      The new masks (plain arrays, laid out like ``params``).

    Raises:
      ValueError: an unknown ``scope``, a concrete ``sparsity`` outside [0, 1] (or above ``n / m``
        with ``pattern``, or unreachable under ``max_sparsity``, or past the pattern in one leaf of
        a per-layer scope), a dict scope that misses a leaf.
      TypeError: ``pattern`` not two ints.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> params = {"a": jnp.array([[1.0, -5.0], [3.0, 0.5]]), "b": jnp.array([[2.0, 4.0]])}
      >>> masks = jp.prune_to_sparsity(params, 0.5, select="*")
      >>> masks["a"].tolist(), masks["b"].tolist()
      ([[False, True], [True, False]], [[False, True]])
      >>> int((~jp.prune_to_sparsity(params, 0.8, masks=masks, select="*")["b"]).sum())  # 5 of 6 now
      2
      >>> w = jnp.array([[4.0, 1.0], [3.0, 2.0], [0.5, 8.0], [7.0, 6.0]])
      >>> jp.prune_to_sparsity(w, 0.5, pattern=(2, 4)).astype(int).tolist()  # 2 of 4 per column
      [[1, 0], [0, 0], [0, 1], [1, 1]]
    """
    _check_scope(scope)
    if pattern is not None:
        if not isinstance(pattern, tuple | list) or len(pattern) != 2:
            raise TypeError(f"pattern must be (n, m), e.g. (2, 4), got {pattern!r}")
        check_pattern(*pattern)
    if max_sparsity is not None:
        if scope != "global":
            raise ValueError(f'max_sparsity applies to scope="global", got scope={scope!r}')
        max_sparsity = check_fraction("max_sparsity", max_sparsity)
    if not is_tracer(sparsity):
        if hasattr(sparsity, "shape") and jnp.ndim(sparsity) == 0:
            sparsity = float(sparsity)
        check_fraction("sparsity", sparsity)
    tree = Tree(params, masks)
    idx = tree.select(select)
    values = [tree.values[i] for i in idx]
    sizes = [v.size for v in values]
    for i, n in zip(idx, sizes):
        _select.check_group_size(n, tree.where(i))
    live = [tree.masks[i] for i in idx]

    if pattern is None:
        cands = live
    else:
        group_n, group_m = pattern
        if is_tracer(sparsity):
            sparsity = jnp.minimum(sparsity, group_n / group_m)
        elif sparsity > group_n / group_m:
            raise ValueError(
                f"sparsity {sparsity} is above {group_n}/{group_m}: the N:M pattern prunes no more"
            )
        chosen = {tree.paths[i] for i in idx}
        nm = n_m_unstructured(params, group_n, group_m, masks=masks, select=lambda p, _: p in chosen)
        nm = tree.align(nm, "masks")
        # candidates: what is still there and the pattern would prune
        cands = [
            (jnp.ones(v.shape, bool) if lv is None else lv) & ~nm[i] for i, lv, v in zip(idx, live, values)
        ]
    pruned = [_n_pruned(lv) for lv in live]
    room = [_n_live(c, n) for c, n in zip(cands, sizes)]

    if scope == "global":
        _select.check_group_size(sum(sizes))
        extra = jnp.clip(_distribution.target_count(sparsity, sum(sizes)) - sum(pruned), 0, sum(room))
        if max_sparsity is None:
            kept = global_unstructured(values, extra, masks=cands, select=_ALL)
        else:
            caps = [
                jnp.clip(_distribution.target_count(max_sparsity, n) - p, 0, r)
                for n, p, r in zip(sizes, pruned, room)
            ]
            if not any(is_tracer(x) for x in [extra, *caps]) and int(extra) > int(sum(caps)):
                raise ValueError(
                    f"sparsity {sparsity} cannot be reached with max_sparsity={max_sparsity}: "
                    f"{int(extra)} more entries to prune, room for {int(sum(caps))} under the cap"
                )
            kept = _capped_global(values, cands, extra, caps)
    else:
        if scope == "layer":
            targets = _distribution.uniform(sparsity, sizes)
        elif scope == "erk":
            targets = _distribution.erk(sparsity, [v.shape for v in values])
        else:
            targets = _distribution.per_layer(sparsity, [tree.paths[i] for i in idx], sizes, scope)
        if pattern is not None and not any(is_tracer(x) for x in [*targets, *pruned, *room]):
            for i, t, p, r, n in zip(idx, targets, pruned, room, sizes):
                if int(t) > int(p) + int(r):
                    raise ValueError(
                        f"{tree.where(i)}scope={scope!r} asks for {int(t)} of {n} entries pruned, "
                        f"but the {pattern[0]}:{pattern[1]} pattern prunes at most {int(p) + int(r)}; "
                        'use scope="global" or "layer" with pattern, or a lower sparsity'
                    )
        kept = [
            l1_unstructured(v, jnp.clip(t - p, 0, r), masks=c)
            for v, t, p, r, c in zip(values, targets, pruned, room, cands)
        ]
    if pattern is not None:  # back from candidates to masks: what was not a candidate stays
        kept = [k | ~c for k, c in zip(kept, cands)]
        kept = [k if lv is None else k & lv for k, lv in zip(kept, live)]
    return tree.with_masks(dict(zip(idx, kept)))


def update_masks(
    params: Any,
    masks: Any,
    step: Any,
    schedule: Any,
    *,
    frequency: int = 1,
    scope: str | Mapping[str, float] = "global",
    select: Any = None,
    pattern: tuple[int, int] | None = None,
    max_sparsity: float | None = None,
) -> tuple[Any, Any]:
    """Re-prunes to ``schedule(step)`` every ``frequency`` steps; returns ``(params, masks)``.

    Meant to run inside a jitted train step, after the optimizer update: ``step`` may be traced,
    the pruning runs under ``jax.lax.cond`` so the steps in between cost nothing, and the result
    has the structure of the inputs so the step compiles once. ``masks`` must hold an array (e.g.
    all True, from ``jp.identity``) on every leaf ``select`` picks.

    The schedule is only read on pruning steps (``step % frequency == 0``), so the masks reach a
    schedule's final sparsity on the first pruning step at or after its end. A concrete ``step``
    (a Python int) is decided here, and the schedule's value checked as by
    :func:`prune_to_sparsity` (refused outside [0, 1], above ``n / m``, or unreachable under
    ``max_sparsity``); inside ``jax.jit`` a traced value is clipped to [0, 1] and capped there.

    The returned params are zero where pruned (newly pruned entries are zeroed on pruning steps).
    With :func:`keep_pruned` holding them there, the forward pass can use the params directly:
    no per-step ``apply_masks``. Pass the new masks on with :func:`set_masks`.

    Args:
      params: the parameter pytree (a Linen params dict, an ``nnx.State``).
      masks: the current masks (e.g. ``jp.get_masks(opt_state)``).
      step: the current step (int or traced int scalar).
      schedule: any ``optax.Schedule`` ``step -> sparsity`` (``jp.polynomial_sparsity``,
        ``optax.linear_schedule``, ...), or a constant sparsity.
      frequency: re-prune when ``step % frequency == 0`` (Zhu & Gupta's Δt).
      scope, select, pattern, max_sparsity: as in :func:`prune_to_sparsity`.

    Returns:
      ``(params, masks)`` to use from this step on; the masks laid out like ``params`` (plain
      arrays, ``None`` on unpruned leaves).

    Raises:
      ValueError: if ``frequency < 1``, a selected leaf has a ``None`` mask, ``schedule(step)`` is
        not a scalar, or (concrete ``step``) a sparsity :func:`prune_to_sparsity` refuses.
      TypeError: if ``frequency`` or ``step`` is not an integer.

    Examples:
      >>> import jax, jax.numpy as jnp, jprune as jp
      >>> params = {"kernel": jnp.arange(1.0, 11.0).reshape(2, 5)}
      >>> masks = {"kernel": jnp.ones((2, 5), bool)}
      >>> schedule = jp.polynomial_sparsity(0.8, begin_step=0, end_step=10)
      >>> step_fn = jax.jit(lambda p, m, t: jp.update_masks(p, m, t, schedule, frequency=5))
      >>> [int((~step_fn(params, masks, t)[1]["kernel"]).sum()) for t in (0, 3, 5, 10)]
      [0, 0, 7, 8]
      >>> step_fn(params, masks, 5)[0]["kernel"]
      Array([[ 0.,  0.,  0.,  0.,  0.],
             [ 0.,  0.,  8.,  9., 10.]], dtype=float32)
    """
    frequency = check_step("frequency", frequency, minimum=1)
    schedule = as_schedule(schedule)
    if isinstance(step, bool) or not jnp.issubdtype(jnp.result_type(step), jnp.integer):
        raise TypeError(f"step must be an integer (a traced int scalar in a jitted step), got {step!r}")
    prune_now = None if is_tracer(step) else int(step) % frequency == 0  # before jnp.asarray: under
    step = jnp.asarray(step)  # jit that gives a tracer even for a Python int
    if jnp.issubdtype(step.dtype, jnp.unsignedinteger):  # nnx.Optimizer's step: uint32 would wrap
        step = step.astype(jnp.int32)  # in a schedule's (step - begin)
    _check_scope(scope)
    tree = Tree(params, masks)
    masks = tree.treedef.unflatten(tree.masks)  # laid out like params, unboxed
    old_def = jax.tree.structure(masks)

    def recompute(operands):
        params, masks = operands
        sparsity = schedule(step)
        if jnp.ndim(sparsity) != 0:
            raise ValueError(f"schedule(step) must be a scalar sparsity, got shape {jnp.shape(sparsity)}")
        new = prune_to_sparsity(
            params,
            sparsity,
            masks=masks,
            scope=scope,
            select=select,
            pattern=pattern,
            max_sparsity=max_sparsity,
        )
        if jax.tree.structure(new) != old_def:
            raise ValueError(
                "update_masks needs a mask array (not None) on every leaf it prunes, so the "
                "train step keeps one compiled program; start from jp.identity(params, select=...)"
            )
        return apply_masks(params, new), new  # torch's orig * mask, the one way masks are applied

    if prune_now is not None:  # a known step: decided here (a concrete sparsity is then checked)
        return recompute((params, masks)) if prune_now else (params, masks)
    return jax.lax.cond(step % frequency == 0, recompute, lambda ops: ops, (params, masks))
