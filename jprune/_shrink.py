"""Physical shrink: remove pruned channels from every coupled axis, so the model gets smaller."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._group_prune import check_tree, removed
from ._groups import Groups
from ._tree import Tree, is_tracer


def shrink(tree, masks, groups: Groups):
    """Remove pruned channels: slice every coupled axis of every member of a prunable group.

    A channel is removed when every *consumer* slice of it (the input rows of each kernel that
    contracts it) is fully masked: its values then reach nothing, and the shrunk model computes the
    same function as the masked one (``apply_fn(small, x) == apply_fn(apply_masks(tree, masks), x)``
    up to float rounding). A channel with an unpruned consumer row is kept, with its masked entries
    zeroed; so a mask that prunes only some members of a group removes only what is safe.
    ``group_structured`` masks every slice of a pruned channel, so all of them go.

    Args:
      tree: the variables ``channel_groups`` read.
      masks: concrete masks mirroring ``tree`` (not traced: the shapes depend on them).
      groups: from ``channel_groups``.

    Returns:
      ``(small_tree, widths)``: the effective variables (``tree * masks``) with the removed channels
      sliced out, same structure; and ``widths``, a dict from each module path touched by a prunable
      group (``"params/Conv_0"``) to its new feature count: the sizes of its kernel's output axes (an
      int, or a tuple for a multi-axis DenseGeneral), the features of an ``embedding`` (its last
      axis), or the coupled axis of a module without a kernel (a norm, a depthwise conv). Rebuild a
      Linen module whose widths are constructor arguments from it.

    Raises:
      TypeError: traced masks.
      ValueError: a tree that is not the one the groups were read from; a mask that removes every
        channel of a group.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jprune as jp
      >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> params = mlp.init(jax.random.key(0), x)
      >>> groups = jp.channel_groups(mlp.apply, params, x)
      >>> masks = jp.group_structured(params, 0.5, groups)
      >>> small, widths = jp.shrink(params, masks, groups)
      >>> widths["params/layers_0"], small["params"]["layers_2"]["kernel"].shape
      (2, (2, 2))
      >>> small_mlp = nn.Sequential([nn.Dense(widths["params/layers_0"]), nn.relu, nn.Dense(2)])
      >>> y = mlp.apply(jp.apply_masks(params, masks), x)
      >>> bool(jnp.allclose(small_mlp.apply(small, x), y, rtol=1e-5, atol=1e-6))
      True
    """
    t = Tree(tree, masks)
    check_tree(t, groups, "shrink")
    if any(is_tracer(m) for m in t.masks):
        raise TypeError(
            "shrink: the masks are traced (under jit); the new shapes depend on them: call it outside jit"
        )
    index = {p: i for i, p in enumerate(t.paths)}
    masks_np = [None if m is None else np.asarray(m) for m in t.masks]
    drop: dict[tuple[int, int], list] = {}
    for g in groups.prunable:
        dead = removed(g, masks_np, index, np)
        if not dead.any():
            continue
        if dead.all():
            raise ValueError(
                f"shrink: group {g.id} ({g.name}) has every channel pruned; a layer of width 0 is "
                "refused: keep at least one channel"
            )
        for m in g.members:
            i = index[m.path]
            size = groups.shapes[i][m.axis]
            drop.setdefault((i, m.axis), []).append(m.positions(size)[dead].ravel())
    leaves = []
    for i, (v, m) in enumerate(zip(t.values, masks_np)):
        if m is None and not any(k[0] == i for k in drop):
            leaves.append(v)
            continue
        v = np.asarray(v)
        if m is not None:  # effective weights, torch's product bit for bit (as apply_masks)
            v = (
                np.where(m, v, v * 0)
                if np.issubdtype(v.dtype, np.inexact)
                else np.where(m, v, 0).astype(v.dtype)
            )
        for axis in range(v.ndim):
            if (i, axis) in drop:
                keep = np.setdiff1d(np.arange(v.shape[axis]), np.concatenate(drop[(i, axis)]))
                v = np.take(v, keep, axis=axis)
        leaves.append(jnp.asarray(v))
    return t.treedef.unflatten(leaves), _widths(groups, leaves)


def _widths(groups: Groups, leaves):
    module = {}
    outs: dict[str, list] = {}
    coupled: dict[str, list] = {}
    index = {p: i for i, p in enumerate(groups.paths)}
    for g in groups.prunable:
        for m in g.members:
            mod = m.path.rsplit("/", 1)[0] if "/" in m.path else ""
            module.setdefault(mod, None)
            coupled.setdefault(mod, []).append((index[m.path], m.axis))
    for g in groups:
        for m in g.members:
            mod = m.path.rsplit("/", 1)[0] if "/" in m.path else ""
            if mod in module and m.role == "out":
                outs.setdefault(mod, []).append((index[m.path], m.axis))
    widths = {}
    for mod in module:
        pairs = outs.get(mod) or coupled[mod]
        embeds = [i for i, _ in coupled[mod] if groups.paths[i].rsplit("/", 1)[-1] == "embedding"]
        if embeds:  # Flax Embed: (num_embeddings, features); attend makes the vocab an output axis
            widths[mod] = np.shape(leaves[embeds[0]])[-1]
            continue
        first = min(i for i, _ in pairs)
        sizes = tuple(np.shape(leaves[first])[a] for a in sorted({a for i, a in pairs if i == first}))
        widths[mod] = sizes[0] if len(sizes) == 1 else sizes
    return widths
