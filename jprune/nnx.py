"""Pruning Flax NNX models: masks stored on the model, and the optimizer's masks read and swapped in place.

The core functions already take an ``nnx.State`` (``jp.l1_unstructured(nnx.state(model,
nnx.Param), 0.5)``) and give masks as an ``nnx.State`` of plain arrays. This module adds what is
NNX-specific: a mask variable type that is not a ``Param`` (so ``nnx.grad`` and
``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone), masks stored next to the params they mask
(``model.fc1.kernel_mask``), a forward pass on the effective weights, and ``get_masks`` /
``set_masks`` / ``update_masks`` that work on an ``nnx.Optimizer`` holding ``jp.keep_pruned`` in
place, as ``optimizer.update`` does.

A train step, compiled once (the masks change values, never structure)::

    from jprune import nnx as jpnnx

    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))  # all kept, to start
    optimizer = nnx.Optimizer(model, jp.keep_pruned(optax.adam(1e-3), jpnnx.masks_of(model)),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: loss(jpnnx.masked_view(m)(x), y))(model)
        optimizer.update(model, grads)
        jpnnx.update_masks(model, optimizer, jp.polynomial_sparsity(0.9, 0, 1000), frequency=100)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from . import _gradual, _optim
from ._masks import apply_masks
from ._shrink_nnx import nnx_groups as channel_groups
from ._shrink_nnx import shrink_model as shrink
from ._tree import Tree, is_variable

__all__ = [
    "PruneMask",
    "attach_masks",
    "channel_groups",
    "get_masks",
    "masked_view",
    "masks_of",
    "set_masks",
    "shrink",
    "update_masks",
]

_SUFFIX = "_mask"


class PruneMask(nnx.Variable):
    """A pruning mask on an NNX model (bool, False = pruned), stored as ``<param>_mask`` next to
    its param (``model.fc1.kernel_mask``). Not an ``nnx.Param``: ``nnx.grad`` and
    ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone, ``nnx.state(model, PruneMask)`` selects
    the masks (to save them with the model, e.g.).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> isinstance(jpnnx.PruneMask(jnp.ones(3, bool)), nnx.Param)
      False
    """


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _owner(model, keys: tuple, where: str):
    owner = model
    for k in keys[:-1]:
        owner = getattr(owner, k) if isinstance(k, str) else owner[k]
    if not isinstance(keys[-1], str):
        raise TypeError(f"{where}: a param stored at index {keys[-1]!r} has no attribute name for its mask")
    return owner, f"{keys[-1]}{_SUFFIX}"


def _params(model, wrt=nnx.Param):
    """The params state and the key tuple of each leaf (in the order of ``Tree``'s leaves)."""
    state = nnx.state(model, wrt)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]
    return state, [_keys(p) for p, _ in flat]


def attach_masks(model: nnx.Module, masks: Any) -> None:
    """Stores ``masks`` on ``model`` as :class:`PruneMask` variables, next to their params; in place.

    A param with a mask gets ``<name>_mask`` (``model.fc1.kernel_mask``), set in place if it is
    already there (so a jitted step that calls this keeps its program). ``None`` leaves get nothing.

    Args:
      model: an NNX module.
      masks: masks mirroring ``nnx.state(model, nnx.Param)`` (any layout: an ``nnx.State``, boxed
        or plain, or a nested dict with the same paths), e.g. from ``jp.l1_unstructured``.

    Raises:
      ValueError: masks that do not mirror the params, or a mask of another shape (naming it); a
        ``None`` mask where the model holds one (a mask is never dropped silently).
      TypeError: a mask that is not bool.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> jpnnx.attach_masks(model, jp.l1_unstructured(nnx.state(model, nnx.Param), 3))
      >>> int((~model.kernel_mask.get_value()).sum()), hasattr(model, "bias_mask")
      (3, False)
    """
    for put in _attaching(model, masks):
        put()


def _attaching(model, masks) -> list:
    """Checks ``masks`` against ``model`` and returns the in-place writes of :func:`attach_masks`
    (nothing changes until they run, so a refused call leaves the model as it was)."""
    state, keys = _params(model)
    tree = _optim.check_masks(state, masks)
    writes = []
    for path, key, m in zip(tree.paths, keys, tree.masks):
        owner, name = _owner(model, key, path)
        held = getattr(owner, name, None)
        if m is None:
            if isinstance(held, PruneMask):
                raise ValueError(
                    f"mask at {path!r} is None but the model holds one ({name}); pass the mask "
                    "(all True to keep everything), masks are never dropped silently"
                )
            continue
        if isinstance(held, PruneMask):
            writes.append(lambda held=held, m=m: held.set_value(m))
        else:
            writes.append(lambda owner=owner, name=name, m=m: setattr(owner, name, PruneMask(m)))
    return writes


def masks_of(model: nnx.Module, wrt: Any = nnx.Param) -> Any:
    """The masks stored on ``model``, mirroring ``nnx.state(model, wrt)``: an ``nnx.State`` of plain
    bool arrays, ``None`` where a param has no mask. The form ``jp.keep_pruned`` and the pruning
    functions take.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
      >>> masks = jpnnx.masks_of(model)
      >>> masks["bias"], masks["kernel"].shape
      (None, (4, 2))
    """
    state, keys = _params(model, wrt)
    tree = Tree(state)
    found = {}
    for i, (path, key) in enumerate(zip(tree.paths, keys)):
        owner, name = _owner(model, key, path)
        held = getattr(owner, name, None)
        if isinstance(held, PruneMask):
            found[i] = held.get_value()
    return tree.with_masks(found)


def masked_view(model: nnx.Module, masks: Any = None) -> nnx.Module:
    """``model`` with its effective weights ``param * mask`` (``jp.apply_masks``), for the forward
    pass; differentiable, and the model itself is unchanged.

    Args:
      model: an NNX module.
      masks: masks mirroring ``nnx.state(model, nnx.Param)``; default: :func:`masks_of` ``(model)``.

    Returns:
      A new module of the same structure (``nnx.merge``); call it as the model.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> jpnnx.attach_masks(model, {"kernel": jnp.array([[True], [False]])})
      >>> view = jpnnx.masked_view(model)
      >>> bool(view(jnp.array([[0.0, 1.0]]))[0, 0] == 0.0), bool(model.kernel[1, 0] != 0.0)
      (True, True)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks = masks_of(model) if masks is None else masks
    return nnx.merge(graphdef, apply_masks(params, masks), rest)


def _opt_state(optimizer: Any) -> Any:
    return optimizer.opt_state if isinstance(optimizer, nnx.Optimizer) else optimizer


def get_masks(optimizer: Any) -> Any:
    """The masks of the ``jp.keep_pruned`` inside an ``nnx.Optimizer`` (or its ``opt_state``), as
    plain arrays mirroring ``nnx.state(model, wrt)``.

    Examples:
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> masks = jp.l1_unstructured(nnx.state(model, nnx.Param), 3)
      >>> optimizer = nnx.Optimizer(model, jp.keep_pruned(optax.sgd(0.1), masks), wrt=nnx.Param)
      >>> int((~jpnnx.get_masks(optimizer)["kernel"]).sum())
      3
    """
    return _optim.get_masks(_opt_state(optimizer))


def set_masks(optimizer: Any, masks: Any) -> None:
    """Swaps the masks of the ``jp.keep_pruned`` inside an ``nnx.Optimizer`` (or its ``opt_state``),
    in place; inside ``nnx.jit`` too, without recompiling.

    Args:
      optimizer: an ``nnx.Optimizer`` whose ``tx`` contains ``jp.keep_pruned``, or its ``opt_state``.
      masks: the new masks: the structure of the old ones (``None`` at the same leaves), same shapes.

    Raises:
      ValueError: as ``jp.set_masks`` (another structure or shape, naming the leaf).
      TypeError: an optimizer state that does not keep its masks in ``nnx`` variables (a plain
        optax state: use ``jp.set_masks``, which returns the new state).

    Examples:
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> params = nnx.state(model, nnx.Param)
      >>> optimizer = nnx.Optimizer(model, jp.keep_pruned(optax.sgd(0.1), jp.identity(params)),
      ...                           wrt=nnx.Param)
      >>> jpnnx.set_masks(optimizer, jp.l1_unstructured(params, 5))
      >>> int((~jpnnx.get_masks(optimizer)["kernel"]).sum())
      5
    """
    for put in _setting(optimizer, masks):
        put()


def _setting(optimizer, masks) -> list:
    """Checks ``masks`` against the optimizer's and returns the in-place writes of :func:`set_masks`."""
    old = _optim._the_state(_opt_state(optimizer)).masks
    tree = _optim.check_masks(old, masks, hint="; new masks must have the structure of the old ones")
    if not all(box is not None for box in tree.boxes):
        raise TypeError(
            "set_masks works in place on an nnx.Optimizer (or its opt_state); this optimizer state "
            "holds plain arrays: use jp.set_masks(opt_state, masks), which returns the new state"
        )
    return [lambda box=box, m=m: box.set_value(m) for box, m in zip(tree.boxes, tree.masks)]


def _has_masks(model) -> bool:
    return bool(nnx.to_flat_state(nnx.state(model, PruneMask)))


def update_masks(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    schedule: Any,
    *,
    frequency: int = 1,
    step: Any = None,
    **kwargs: Any,
) -> None:
    """``jp.update_masks`` on an NNX model and its optimizer, in place: every ``frequency`` steps the
    params are re-pruned to ``schedule(step)`` (newly pruned ones zeroed), and the new masks go
    into the optimizer's ``jp.keep_pruned`` and, if the model holds masks (:func:`attach_masks`),
    onto the model. Call it in the jitted train step after ``optimizer.update``.

    Args:
      model: the NNX model the optimizer trains.
      optimizer: an ``nnx.Optimizer`` whose ``tx`` contains ``jp.keep_pruned``.
      schedule: any ``optax.Schedule`` ``step -> sparsity``, or a constant sparsity.
      frequency: re-prune when ``step % frequency == 0``.
      step: the step; default: ``optimizer.step`` (the number of updates so far).
      **kwargs: ``scope``, ``select``, ``pattern``, ``max_sparsity``, as in ``jp.prune_to_sparsity``.

    Examples:
      >>> import jax.numpy as jnp, optax, jprune as jp
      >>> from flax import nnx
      >>> from jprune import nnx as jpnnx
      >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
      >>> tx = jp.keep_pruned(optax.sgd(0.1), jpnnx.masks_of(model))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> jpnnx.update_masks(model, optimizer, 0.5)  # step 0: a pruning step
      >>> int((~model.kernel_mask.get_value()).sum()), int((model.kernel.get_value() == 0).sum())
      (16, 16)
    """
    step = optimizer.step.get_value() if step is None else step
    params = nnx.state(model, optimizer.wrt)
    new_params, masks = _gradual.update_masks(
        params, get_masks(optimizer), step, schedule, frequency=frequency, **kwargs
    )
    writes = _setting(optimizer, masks) + (_attaching(model, masks) if _has_masks(model) else [])
    nnx.update(model, new_params)  # everything checked: from here on nothing is refused
    for put in writes:
        put()
