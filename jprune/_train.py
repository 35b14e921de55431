"""Training with masks: an optax wrapper that keeps pruned weights at zero, and sparsity schedules.

Pure JAX + optax. The wrapper holds the masks as arrays in its state, so a new pruning step swaps
them (:func:`set_masks`) without rebuilding the optimizer or recompiling the train step. Schedules
return the target sparsity as a traced scalar, so a changing sparsity does not recompile either.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _amount, _select
from ._masks import apply_masks
from ._tree import Tree, path_str
from ._unstructured import global_unstructured, l1_unstructured

__all__ = [
    "KeepPrunedState",
    "keep_pruned",
    "get_masks",
    "set_masks",
    "constant_sparsity",
    "one_shot_sparsity",
    "polynomial_sparsity",
    "prune_to_sparsity",
    "update_masks",
]

Schedule = Callable[[Any], jax.Array]


def _is_none(x: Any) -> bool:
    return x is None


def _check_masks(params: Any, masks: Any) -> None:
    """Raises unless ``masks`` mirrors ``params``: a bool array of the leaf's shape, or None.

    Matched by path, so NNX ``State`` params holding ``Variable``s (what ``nnx.Optimizer`` passes
    to ``init``) accept plain-array masks (what it passes to ``update``).
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_masks = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]
    shapes = {path_str(path): jnp.shape(p) for path, p in flat_params}
    if len(flat_masks) != len(flat_params):
        raise ValueError(
            "masks must mirror params: the same pytree structure, with a bool array of the "
            "leaf's shape where a leaf is pruned and None where it is not; got "
            f"{len(flat_masks)} mask entries for {len(flat_params)} param leaves"
        )
    for path, m in flat_masks:
        if m is None:
            continue
        where = path_str(path)
        if where not in shapes:
            raise ValueError(f"mask at {where} has no parameter; the paths are {list(shapes)}")
        if not hasattr(m, "shape") or jnp.result_type(m) != jnp.bool_:
            raise TypeError(
                f"mask at {where} must be a bool array or None, got {getattr(m, 'dtype', type(m).__name__)}"
            )
        if tuple(m.shape) != tuple(shapes[where]):
            raise ValueError(f"mask at {where} has shape {tuple(m.shape)}, expected {tuple(shapes[where])}")


class KeepPrunedState(NamedTuple):
    """State of :func:`keep_pruned`: the current masks and the inner optimizer's state."""

    masks: Any
    inner_state: optax.OptState


def keep_pruned(inner: optax.GradientTransformation, masks: Any) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that pruned weights stay exactly zero, whatever it does.

    Gradients are zeroed at pruned positions before ``inner`` sees them, and the final update is
    replaced by ``-param`` there, so ``optax.apply_updates`` gives exactly 0 at every pruned
    position. Masking the gradient alone is not enough: momentum, weight decay, Adam's bias
    correction or Lion's sign step would still move a pruned weight. Weights newly pruned by a
    mask swap (:func:`set_masks`) are zeroed by the next update.

    Put this transformation outermost (or last in an ``optax.chain``): a transformation applied
    after it could move pruned weights again. Since the params themselves hold 0 where pruned, a
    forward pass on ``jp.apply_masks(params, masks)`` and one on ``params`` agree after the first
    update; the masked forward is still the safe default (it is right from step 0 and right after
    a mask swap).

    The state holds the mask arrays themselves (no copy): if a train step donates the optimizer
    state, keep your own copy of the masks. With ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, pass
    masks mirroring ``nnx.as_pure(nnx.state(model, nnx.Param))`` (see ``examples/nnx_finetune.py``).

    Args:
      inner: the optimizer to wrap, e.g. ``optax.adamw(1e-3)``.
      masks: a pytree mirroring params: a bool array of the leaf's shape for a pruned leaf, ``None``
        where a leaf is not pruned (e.g. from ``jp.l1_unstructured``). To change the masks later
        inside a compiled step (:func:`set_masks`), give every leaf you may prune an array: all
        True (``jp.identity``) for "not pruned yet".

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`KeepPrunedState`.
      ``update`` requires ``params``; extra keyword arguments are passed on to ``inner``.

    Raises:
      ValueError: at ``init``, if ``masks`` does not mirror the params or a mask's shape differs
        from its leaf's (the message names the leaf); at ``update``, if ``params`` is None.
      TypeError: at ``init``, if a mask is not a bool array or None.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
      >>> masks = {"w": jnp.array([True, False, True]), "b": None}
      >>> tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(3), "b": jnp.ones(1)}
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.9, 0. , 2.9], dtype=float32)
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # optax.tree_utils.tree_map_params calls init with a leafless placeholder for the params,
        # to find where params-like trees sit in the state: nothing to check against then.
        if jax.tree.leaves(params):
            _check_masks(params, masks)
        return KeepPrunedState(masks=masks, inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "keep_pruned needs the current params to keep pruned weights at exactly 0: "
                "call tx.update(grads, opt_state, params), got params=None"
            )
        masks = state.masks

        def zero_pruned(g, m):
            return g if m is None else jnp.where(m, g, jnp.zeros_like(g))

        def pin_to_zero(u, p, m):
            # p + (-p) == 0 exactly in floating point, so the applied update lands on 0.
            return u if m is None else jnp.where(m, u, -p.astype(u.dtype))

        grads = jax.tree.map(zero_pruned, updates, masks)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        updates = jax.tree.map(pin_to_zero, updates, params, masks)
        return updates, KeepPrunedState(masks=masks, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_state(x: Any) -> bool:
    return isinstance(x, KeepPrunedState)


def get_masks(opt_state: Any) -> Any:
    """Returns the masks held by the :func:`keep_pruned` state inside ``opt_state``.

    Args:
      opt_state: an optimizer state containing one :class:`KeepPrunedState`, at any depth (e.g.
        inside an ``optax.chain`` state).

    Returns:
      The masks pytree.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`KeepPrunedState`, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3)}
      >>> masks = {"w": jnp.array([True, False, True])}
      >>> state = optax.chain(optax.clip(1.0), keep_pruned(optax.sgd(0.1), masks)).init(params)
      >>> get_masks(state)["w"]
      Array([ True, False,  True], dtype=bool)
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(s)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one KeepPrunedState (from jp.keep_pruned) in opt_state, found {len(found)}"
        )
    return found[0].masks


def set_masks(opt_state: Any, masks: Any) -> Any:
    """Returns ``opt_state`` with the :func:`keep_pruned` masks replaced; jit-safe, no recompiles.

    The new masks must have the same structure, shapes and dtypes as the old ones, so a jitted
    train step keeps its compiled program. Start from all-True masks (``jp.identity``) on every leaf
    a schedule will prune, rather than ``None``.

    Args:
      opt_state: an optimizer state containing one :class:`KeepPrunedState`.
      masks: the new masks, e.g. after another pruning step.

    Returns:
      A new optimizer state; the inner optimizer's state is unchanged.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`KeepPrunedState` (or several), or the new masks
        differ from the old ones in structure or shape.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = keep_pruned(optax.sgd(0.5), {"w": jnp.ones(3, bool)})
      >>> state = set_masks(tx.init(params), {"w": jnp.array([True, False, True])})
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.5, 0. , 0.5], dtype=float32)
    """
    old = get_masks(opt_state)
    old_def, new_def = jax.tree.structure(old), jax.tree.structure(masks)
    if old_def != new_def:
        raise ValueError(
            "new masks must have the same structure as the old ones (None at the same leaves), "
            f"got {new_def}, expected {old_def}; start from all-True masks (jp.identity) on "
            "every leaf you will prune"
        )
    for (path, o), n in zip(
        jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(masks), strict=True
    ):
        if jnp.shape(o) != jnp.shape(n) or jnp.result_type(o) != jnp.result_type(n):
            raise ValueError(
                f"mask at {path_str(path)} has shape {jnp.shape(n)} and dtype "
                f"{jnp.result_type(n)}, expected {jnp.shape(o)} and {jnp.result_type(o)}"
            )
    return jax.tree.map(
        lambda s: s._replace(masks=masks) if _is_state(s) else s, opt_state, is_leaf=_is_state
    )


# ------------------------------------------------------------------------------------------------
# Schedules: step -> target sparsity (a float32 scalar; traced when the step is).


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")


def _check_step(name: str, value, minimum: int = 0) -> int:
    """A step count or frequency: an integer (not a float such as 2.5 or inf), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def constant_sparsity(sparsity: float) -> Schedule:
    """Returns a schedule that always gives ``sparsity``.

    Args:
      sparsity: the target fraction of pruned weights, in [0, 1].

    Returns:
      A function ``step -> sparsity`` (a float32 scalar).

    Raises:
      ValueError: if ``sparsity`` is not in [0, 1].

    Examples:
      >>> constant_sparsity(0.5)(10)
      Array(0.5, dtype=float32)
    """
    _check_fraction("sparsity", sparsity)

    def schedule(step):
        del step
        return jnp.asarray(sparsity, jnp.float32)

    return schedule


def one_shot_sparsity(sparsity: float, step: int) -> Schedule:
    """Returns a schedule that gives 0 before ``step`` and ``sparsity`` from ``step`` on.

    Args:
      sparsity: the target fraction of pruned weights, in [0, 1].
      step: the step at which to prune.

    Returns:
      A function ``step -> sparsity`` (a float32 scalar).

    Raises:
      ValueError: if ``sparsity`` is not in [0, 1] (NaN included) or ``step`` is negative.
      TypeError: if ``sparsity`` is not a real number or ``step`` not an integer.

    Examples:
      >>> s = one_shot_sparsity(0.75, step=100)
      >>> float(s(99)), float(s(100))
      (0.0, 0.75)
    """
    _check_fraction("sparsity", sparsity)
    at = _check_step("step", step)

    def schedule(step):
        return jnp.where(jnp.asarray(step) >= at, jnp.float32(sparsity), jnp.float32(0.0))

    return schedule


def polynomial_sparsity(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
    power: float = 3.0,
) -> Schedule:
    """Returns Zhu & Gupta's gradual pruning schedule (arXiv:1710.01878).

    ``s(t) = s_f + (s_i - s_f) * (1 - (t_q - t_0) / (t_end - t_0)) ** power`` where ``t_q`` is ``t``
    rounded down to ``t_0 + k * frequency`` and clipped to ``[t_0, t_end]``: the sparsity is
    ``initial_sparsity`` before ``begin_step``, rises fast then slowly, changes only every
    ``frequency`` steps, and is exactly ``final_sparsity`` from ``end_step`` on (also when
    ``end_step - begin_step`` is not a multiple of ``frequency``).

    Args:
      final_sparsity: the sparsity reached at ``end_step``, in [0, 1].
      begin_step: the first pruning step.
      end_step: the step at which ``final_sparsity`` is reached; greater than ``begin_step``.
      initial_sparsity: the sparsity at ``begin_step``, in [0, final_sparsity].
      frequency: the sparsity is updated every ``frequency`` steps (Zhu & Gupta's Δt), >= 1.
      power: the exponent, 3 in the paper; > 0.

    Returns:
      A function ``step -> sparsity`` (a float32 scalar, traced when ``step`` is traced).

    Raises:
      ValueError: on a sparsity outside [0, 1], ``initial_sparsity > final_sparsity``,
        ``end_step <= begin_step``, a negative ``begin_step``, ``frequency < 1``, or a ``power``
        that is not a finite number > 0.
      TypeError: steps or ``frequency`` that are not integers (``2.5``, ``inf``), or a sparsity that
        is not a real number.

    Examples:
      >>> s = polynomial_sparsity(0.9, begin_step=0, end_step=100, frequency=10)
      >>> [round(float(s(t)), 4) for t in (0, 9, 10, 50, 100, 500)]
      [0.0, 0.0, 0.2439, 0.7875, 0.9, 0.9]
    """
    _check_fraction("final_sparsity", final_sparsity)
    _check_fraction("initial_sparsity", initial_sparsity)
    if initial_sparsity > final_sparsity:
        raise ValueError(
            f"initial_sparsity must be <= final_sparsity, got {initial_sparsity} > {final_sparsity}"
        )
    begin_step, end_step = _check_step("begin_step", begin_step), _check_step("end_step", end_step)
    if end_step <= begin_step:
        raise ValueError(
            f"expected 0 <= begin_step < end_step, got begin_step={begin_step}, end_step={end_step}"
        )
    frequency = _check_step("frequency", frequency, minimum=1)
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not 0 < power < math.inf:
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    span = end_step - begin_step

    def schedule(step):
        t = jnp.asarray(step, jnp.int32) - begin_step
        # Quantized to every `frequency` steps, but the last step is end_step itself: the schedule
        # ends exactly at final_sparsity even when the span is not a multiple of the frequency.
        t = jnp.where(t >= span, span, jnp.clip((t // frequency) * frequency, 0, span))
        progress = t.astype(jnp.float32) / jnp.float32(span)
        s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
        return jnp.asarray(s, jnp.float32)

    return schedule


# ------------------------------------------------------------------------------------------------
# Pruning to a target sparsity inside a train step.


def _target_count(sparsity: Any, n: int) -> jax.Array:
    """``round(sparsity * n)`` as an int32 device scalar (Python's rounding, no host sync)."""
    if _amount.is_traced(sparsity):
        return _amount.count_traced(sparsity, n)
    if isinstance(sparsity, jax.Array):  # concrete: checked like a number
        sparsity = float(sparsity) if jnp.ndim(sparsity) == 0 else sparsity
    _check_fraction("sparsity", sparsity)
    return _amount.count_traced(_amount.as_device_amount(float(sparsity)), n)


def _pruned_count(masks: list) -> jax.Array:
    return sum((jnp.sum(~m, dtype=jnp.int32) for m in masks if m is not None), jnp.int32(0))


def prune_to_sparsity(
    params: Any,
    sparsity: Any,
    *,
    masks: Any = None,
    scope: str = "global",
    select: Any = None,
) -> Any:
    """Prunes further by magnitude until ``sparsity`` of the selected weights are pruned.

    Exactly ``round(sparsity * n)`` of the ``n`` selected entries end up pruned (or more, if
    ``masks`` already prunes more: a pruned weight never comes back). The new ones are the
    smallest ``|param|`` among the remaining entries, torch's iterative (container) rule with an
    integer amount. ``sparsity`` may be a traced scalar: calls inside ``jax.jit`` do not recompile
    when it changes.

    Args:
      params: the parameter pytree.
      sparsity: the target fraction of pruned weights, a float in [0, 1] or a traced scalar
        (clipped to [0, 1]).
      masks: the current masks (None: nothing pruned yet).
      scope: ``"global"`` ranks all selected weights together (``jp.global_unstructured``);
        ``"layer"`` prunes each selected leaf to ``sparsity`` (``jp.l1_unstructured``).
      select: which leaves to prune (see ``jp.l1_unstructured``); default: floating leaves with
        ndim >= 2 (kernels, not biases).

    Returns:
      The new masks.

    Raises:
      ValueError: if ``scope`` is neither ``"global"`` nor ``"layer"``, or a concrete ``sparsity``
        is outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"a": jnp.array([[1.0, -5.0], [3.0, 0.5]]), "b": jnp.array([[2.0, 4.0]])}
      >>> masks = prune_to_sparsity(params, 0.5, select="*")
      >>> masks["a"].tolist(), masks["b"].tolist()
      ([[False, True], [True, False]], [[False, True]])
      >>> int((~prune_to_sparsity(params, 0.8, masks=masks, select="*")["b"]).sum())  # 5 of 6 now
      2
    """
    if scope not in ("global", "layer"):
        raise ValueError(f'scope must be "global" or "layer", got {scope!r}')
    tree = Tree(params, masks)
    idx = tree.select(select)
    for i in idx:
        _select.check_group_size(tree.values[i].size, tree.where(i))
    if scope == "global":
        n = sum(tree.values[i].size for i in idx)
        _select.check_group_size(n)
        k = _target_count(sparsity, n) - _pruned_count([tree.masks[i] for i in idx])
        return global_unstructured(params, jnp.maximum(k, 0), masks=masks, select=select)
    for i in idx:  # leaf by leaf: each gets its own count
        k = _target_count(sparsity, tree.values[i].size) - _pruned_count([tree.masks[i]])
        only = lambda p, _, path=tree.paths[i]: p == path  # noqa: E731
        masks = l1_unstructured(params, jnp.maximum(k, 0), masks=masks, select=only)
    return masks


def update_masks(
    params: Any,
    masks: Any,
    step: Any,
    schedule: Schedule,
    *,
    frequency: int = 1,
    scope: str = "global",
    select: Any = None,
) -> tuple[Any, Any]:
    """Re-prunes to ``schedule(step)`` every ``frequency`` steps; returns ``(params, masks)``.

    Meant to run inside a jitted train step, after the optimizer update: ``step`` may be traced,
    the pruning runs under ``jax.lax.cond`` so the steps in between cost nothing, and the result
    has the structure of the inputs so the step compiles once. ``masks`` must hold an array (e.g.
    all True, from ``jp.identity``) on every leaf ``select`` picks.

    The returned params are zero where pruned (newly pruned entries are zeroed on pruning steps).
    With :func:`keep_pruned` holding them there, the forward pass can use the params directly:
    no per-step ``apply_masks``. Pass the new masks on with :func:`set_masks`.

    Args:
      params: the parameter pytree.
      masks: the current masks.
      step: the current step (int or traced int scalar).
      schedule: a function ``step -> sparsity``, e.g. :func:`polynomial_sparsity`.
      frequency: re-prune when ``step % frequency == 0``.
      scope: ``"global"`` or ``"layer"``, as in :func:`prune_to_sparsity`.
      select: which leaves to prune, as in :func:`prune_to_sparsity`.

    Returns:
      ``(params, masks)`` to use from this step on.

    Raises:
      ValueError: if ``frequency < 1``, or a selected leaf has a ``None`` mask.
      TypeError: if ``frequency`` is not an integer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"kernel": jnp.arange(1.0, 11.0).reshape(2, 5)}
      >>> masks = {"kernel": jnp.ones((2, 5), bool)}
      >>> schedule = polynomial_sparsity(0.8, begin_step=0, end_step=10, frequency=5)
      >>> step_fn = jax.jit(lambda p, m, t: update_masks(p, m, t, schedule, frequency=5))
      >>> [int((~step_fn(params, masks, t)[1]["kernel"]).sum()) for t in (0, 3, 5, 10)]
      [0, 0, 7, 8]
      >>> step_fn(params, masks, 5)[0]["kernel"]
      Array([[ 0.,  0.,  0.,  0.,  0.],
             [ 0.,  0.,  8.,  9., 10.]], dtype=float32)
    """
    frequency = _check_step("frequency", frequency, minimum=1)
    old_def = jax.tree.structure(masks)

    def recompute(operands):
        params, masks = operands
        new = prune_to_sparsity(params, schedule(step), masks=masks, scope=scope, select=select)
        if jax.tree.structure(new) != old_def:
            raise ValueError(
                "update_masks needs a mask array (not None) on every leaf it prunes, so the "
                "train step keeps one compiled program; start from jp.identity(params, select=...)"
            )
        return apply_masks(params, new), new  # torch's orig * mask, the one way masks are applied

    return jax.lax.cond(jnp.asarray(step) % frequency == 0, recompute, lambda ops: ops, (params, masks))
