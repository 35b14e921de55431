"""The optax wrapper that keeps pruned weights at exactly zero, and the masks it holds.

The wrapper holds the masks as arrays in its state, so a new pruning step swaps them
(:func:`set_masks`) without rebuilding the optimizer or recompiling the train step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._tree import Tree, unbox_tree

__all__ = ["KeepPrunedState", "keep_pruned", "get_masks", "set_masks", "check_masks"]


def check_masks(reference: Any, masks: Any, *, hint: str = "") -> Tree:
    """The one check that ``masks`` mirror ``reference`` (params, or the masks they replace).

    Leaves line up by structure, or by path (a dict of masks for an ``nnx.State`` of params), and
    ``nnx.Variable`` boxes (``Param``, ``OptArray``) count as the leaf they hold. Where
    ``reference`` has an array, the mask is a bool array of its shape or ``None``; where it has
    ``None`` (masks being replaced), the mask is ``None`` too.

    Returns:
      The aligned :class:`~jprune._tree.Tree` (``reference`` as its values).

    Raises:
      ValueError: another structure (the message ends with ``hint``), or a mask of another shape
        (naming the leaf; also an ``AssertionError``, as in torch).
      TypeError: a mask that is not bool, or a mask on a leaf that is not an array.
    """
    try:
        return Tree(reference, masks)
    except ValueError as e:
        raise type(e)(f"{e}{hint}") from None


class KeepPrunedState(NamedTuple):
    """State of :func:`keep_pruned`.

    Attributes:
      masks: the masks in force (a pytree like the params: bool arrays, ``None`` where a leaf is not
        pruned); read them with :func:`get_masks`, swap them with :func:`set_masks`.
      inner_state: the wrapped optimizer's state.
    """

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
    masks mirroring ``nnx.state(model, nnx.Param)`` (e.g. ``jprune.nnx.masks_of(model)``).

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
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
      >>> masks = {"w": jnp.array([True, False, True]), "b": None}
      >>> tx = jp.keep_pruned(optax.sgd(0.1, momentum=0.9), masks)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(3), "b": jnp.ones(1)}
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.9, 0. , 2.9], dtype=float32)
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        held = masks
        # optax.tree_utils.tree_map_params calls init with a leafless placeholder for the params,
        # to find where params-like trees sit in the state: nothing to check against then.
        if jax.tree.leaves(params):
            tree = check_masks(params, masks)
            held = tree.treedef.unflatten(tree.masks)  # laid out like the params, unboxed
        return KeepPrunedState(masks=held, inner_state=inner.init(params))

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


def _the_state(opt_state: Any) -> KeepPrunedState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(s)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one KeepPrunedState (from jp.keep_pruned) in opt_state, found {len(found)}"
        )
    return found[0]


def get_masks(opt_state: Any) -> Any:
    """Returns the masks held by the :func:`keep_pruned` state inside ``opt_state``.

    Args:
      opt_state: an optimizer state containing one :class:`KeepPrunedState`, at any depth (e.g.
        inside an ``optax.chain`` state, or ``nnx.Optimizer``'s ``opt_state``).

    Returns:
      The masks pytree, as plain arrays (an ``nnx.Optimizer``'s ``OptArray`` boxes removed).

    Raises:
      ValueError: if ``opt_state`` holds no :class:`KeepPrunedState`, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> params = {"w": jnp.ones(3)}
      >>> masks = {"w": jnp.array([True, False, True])}
      >>> state = optax.chain(optax.clip(1.0), jp.keep_pruned(optax.sgd(0.1), masks)).init(params)
      >>> jp.get_masks(state)["w"]
      Array([ True, False,  True], dtype=bool)
    """
    return unbox_tree(_the_state(opt_state).masks)


def set_masks(opt_state: Any, masks: Any) -> Any:
    """Returns ``opt_state`` with the :func:`keep_pruned` masks replaced; jit-safe, no recompiles.

    The new masks must have the same structure, shapes and dtypes as the old ones, so a jitted
    train step keeps its compiled program. Start from all-True masks (``jp.identity``) on every leaf
    a schedule will prune, rather than ``None``. They are stored laid out like the old ones (in the
    same ``OptArray`` boxes for an ``nnx.Optimizer`` state, so ``nnx.update(optimizer.opt_state,
    new_state)`` takes them; ``jprune.nnx.set_masks`` does that for you).

    Args:
      opt_state: an optimizer state containing one :class:`KeepPrunedState`.
      masks: the new masks, e.g. after another pruning step.

    Returns:
      A new optimizer state; the inner optimizer's state is unchanged.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`KeepPrunedState` (or several), or the new masks
        differ from the old ones in structure or shape.
      TypeError: if a new mask is not bool.

    Examples:
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> params = {"w": jnp.ones(3)}
      >>> tx = jp.keep_pruned(optax.sgd(0.5), {"w": jnp.ones(3, bool)})
      >>> state = jp.set_masks(tx.init(params), {"w": jnp.array([True, False, True])})
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([0.5, 0. , 0.5], dtype=float32)
    """
    old = _the_state(opt_state).masks
    hint = (
        "; new masks must have the structure of the old ones (None at the same leaves): start from "
        "all-True masks (jp.identity) on every leaf you will prune"
    )
    tree = check_masks(old, masks, hint=hint)
    new = tree.with_values(tree.masks)
    return jax.tree.map(lambda s: s._replace(masks=new) if _is_state(s) else s, opt_state, is_leaf=_is_state)
