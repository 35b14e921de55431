"""Physical shrink: remove pruned channels from every coupled axis, so the model gets smaller."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._group_prune import channel_keep, check_tree, removed
from ._groups import Groups
from ._tree import Tree, is_tracer


def shrink(tree, masks, groups: Groups):
    """Remove pruned channels: slice every coupled axis of every member of a prunable group.

    The shrunk model computes the masked model's function (``apply_fn(small, x) ==
    apply_fn(apply_masks(tree, masks), x)`` up to float rounding). A channel is removed when

    - every *consumer* slice of it is masked (the input rows of each kernel that contracts it): its
      values reach nothing; or
    - every *producer* slice of it is masked (each kernel output column feeding it), and the input
      reaches the group only through producers (``Group.varies`` is None): the channel is then a
      constant, such as ``relu(bias)`` or a norm's shift, evaluated on the program with the example
      inputs and folded into each consumer's bias (exact for a Dense and a conv without padding).
      Where that is not exact (a padded conv, a consumer without a bias, values that vary over
      positions) it is refused, naming the group.

    Any other channel is kept with its masked entries zeroed (a partial mask removes only what is
    safe). ``group_structured`` masks every slice of a pruned channel, so all of them go.

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
        channel of a group; a constant channel that cannot be folded exactly.

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
    values = []
    for v, m in zip(t.values, masks_np):
        if m is not None:  # effective weights, torch's product bit for bit (as apply_masks)
            v = np.asarray(v)
            v = (
                np.where(m, v, v * 0)
                if np.issubdtype(v.dtype, np.inexact)
                else np.where(m, v, 0).astype(v.dtype)
            )
        values.append(v)
    drop: dict[tuple[int, int], list] = {}
    folds = []
    for g in groups.prunable:
        dead = removed(g, masks_np, index, np)
        const = _constant_channels(g, masks_np, index) & ~dead
        if const.any():
            folds.append((g, const))
        gone = dead | const
        if not gone.any():
            continue
        if gone.all():
            raise ValueError(
                f"shrink: group {g.id} ({g.name}) has every channel pruned; a layer of width 0 is "
                "refused: keep at least one channel"
            )
        for m in g.members:
            i = index[m.path]
            size = groups.shapes[i][m.axis]
            drop.setdefault((i, m.axis), []).append(m.positions(size)[gone].ravel())
    if folds:
        values = _fold(groups, folds, values, index)
    leaves = []
    for i, v in enumerate(values):
        if not any(k[0] == i for k in drop):
            leaves.append(v if v is t.values[i] else jnp.asarray(v))
            continue
        v = np.asarray(v)
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


def _constant_channels(g, masks, index):
    """Channels whose every producer slice (each kernel output column feeding them) is masked, in a
    group the input reaches only through producers: their values are constants."""
    producers = [m for m in g.members if m.role == "out"]
    if not producers or g.varies is not None:
        return np.zeros(g.width, bool)
    const = np.ones(g.width, bool)
    for m in producers:
        keep = channel_keep(masks[index[m.path]], m, np)
        const &= np.zeros(g.width, bool) if keep is None else ~keep
    return const


def _fold(groups: Groups, folds, values, index):
    """Add each constant channel's contribution to its consumers' biases (exact: the consumer sums
    a constant times fixed weights); refuse where it is not exact."""
    closed, args = groups.program
    want = {}
    for g, _ in folds:
        for m in g.members:
            if m.role != "in":
                continue
            for eqn, *_ in groups.consumers.get((index[m.path], m.axis), []):
                want[id(eqn)] = eqn
    seen = _evaluate(closed, [jnp.asarray(v) for v in values], args, want)
    values = list(values)
    for g, const in folds:
        for m in g.members:
            if m.role != "in":
                continue
            i = index[m.path]
            uses = groups.consumers.get((i, m.axis), [])
            where = f"shrink: group {g.id} ({g.name}), channels {np.flatnonzero(const).tolist()}: "
            hint = (
                "their producers are pruned but they still carry a constant (a bias or norm shift "
                "through the activation) into "
            )
            fix = (
                "; mask the bias/norm slices of those channels too (group_structured does), or their "
                "input rows"
            )
            if len(uses) != 1 or seen.get(id(uses[0][0]), (None, 0))[1] != 1:
                raise ValueError(f"{where}{hint}{m.path}, a layer applied more than once: cannot fold{fix}")
            eqn, side, wdim = uses[0]
            operands = seen[id(eqn)][0]
            bias = groups.bias.get(id(eqn))
            if bias is None:
                raise ValueError(f"{where}{hint}{m.path}, which has no bias to fold the constant into{fix}")
            pos = m.positions(groups.shapes[i][m.axis])[const].ravel()
            contrib = _contribution(eqn, side, wdim, operands, pos, where + hint + m.path, fix)
            (j, amap), bshape = bias
            values[j] = _add_to_bias(values[j], contrib, amap, bshape, where + hint + m.path, fix)
    return values


def _contribution(eqn, side, wdim, operands, pos, where, fix):
    """The consumer output's constant part from positions ``pos`` of the kernel operand's dim
    ``wdim``, laid out as the contraction's output (size 1 along dims it does not vary on)."""
    act = np.asarray(operands[side], np.float64)
    w = np.asarray(operands[1 - side], np.float64)
    wp = np.take(w, pos, axis=wdim)
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
        if lb:
            raise ValueError(f"{where}: a batched contraction: cannot fold{fix}")
        ac, wc = (list(lc), list(rc)) if side == 0 else (list(rc), list(lc))
        adim = ac[wc.index(wdim)]
        const = _constant_part(act, adim, pos, [d for d in range(act.ndim) if d not in ac], where, fix)
        const = np.transpose(const, [sorted(ac).index(d) for d in ac])  # dims in contraction order
        out = np.tensordot(const, wp, axes=(list(range(len(ac))), wc))  # the kernel's free dims
        wfree = [w.shape[d] for d in range(w.ndim) if d not in wc]
        ones = [1] * (act.ndim - len(ac))
        return out.reshape(ones + wfree if side == 0 else wfree + ones)
    # conv_general_dilated with one feature group: exact only without padding or input dilation
    p = eqn.params
    if any(tuple(x) != (0, 0) for x in p["padding"]) or any(d != 1 for d in p["lhs_dilation"]):
        raise ValueError(
            f"{where}, a conv that pads its input: the constant's contribution differs at the borders, "
            f"so folding it into the bias is not exact{fix}"
        )
    dn = p["dimension_numbers"]
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    const = _constant_part(act, lspec[1], pos, [d for d in range(act.ndim) if d != lspec[1]], where, fix)
    view = [1] * w.ndim
    view[wdim] = len(pos)
    out = (wp * const.reshape(view)).sum(axis=tuple(d for d in range(w.ndim) if d != rspec[0]))
    shape = [1] * len(ospec)
    shape[ospec[1]] = out.shape[0]
    return out.reshape(shape)


def _constant_part(act, dim, pos, keep_dims, where, fix):
    """The activation at positions ``pos`` of ``dim``, checked constant over ``keep_dims`` (the dims
    not contracted), with those dims dropped."""
    sl = np.take(act, pos, axis=dim)
    first = sl[tuple(slice(0, 1) if d in keep_dims else slice(None) for d in range(sl.ndim))]
    scale = max(float(np.max(np.abs(sl))) if sl.size else 0.0, 1e-30)
    if not np.allclose(sl, first, rtol=0, atol=1e-6 * scale):
        raise ValueError(
            f"{where}: the channel's values are not constant over the example inputs, so they cannot be "
            f"folded{fix}"
        )
    return np.squeeze(first, axis=tuple(keep_dims)) if keep_dims else first


def _add_to_bias(bias, contrib, amap, bshape, where, fix):
    """``bias + contrib``: ``contrib`` in the layout of the biased output, ``amap`` from the bias
    operand's dims to the bias leaf's axes."""
    bshape = tuple(bshape)
    if len(bshape) != contrib.ndim or any(b == 1 and c > 1 for b, c in zip(bshape, contrib.shape)):
        raise ValueError(f"{where}: its bias does not vary where the contribution does{fix}")
    bias = np.asarray(bias)
    c = np.broadcast_to(contrib, tuple(max(b, c) for b, c in zip(bshape, contrib.shape)))
    dims = [d for d in range(len(bshape)) if amap[d] is not None]
    c = np.squeeze(c, axis=tuple(d for d in range(len(bshape)) if amap[d] is None and c.shape[d] == 1))
    order = sorted(range(len(dims)), key=lambda k: amap[dims[k]])
    c = np.transpose(c, order).reshape(bias.shape)
    return (bias.astype(np.float64) + c).astype(bias.dtype)


def _evaluate(closed, leaves, args, want):
    """Run the program, recording the operands of the equations in ``want`` (and how many times
    each ran)."""
    import jax
    import jax.extend.core as jcore

    from ._groups import _CALLS

    seen = {}

    def run(jaxpr, consts, inputs):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, inputs):
            env[v] = x
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if id(eqn) in want:
                count = seen.get(id(eqn), (None, 0))[1]
                seen[id(eqn)] = (ins, count + 1)
            name = eqn.primitive.name
            if name in _CALLS:
                body = eqn.params[_CALLS[name]]
                inner = body.jaxpr if hasattr(body, "jaxpr") else body
                outs = run(inner, getattr(body, "consts", []), ins)
            else:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            for v, x in zip(eqn.outvars, outs):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def captured(leaves, args):  # one compiled program: the captured operands are its outputs
        seen.clear()
        run(closed.jaxpr, closed.consts, [*leaves, *args])
        return {k: ins for k, (ins, _) in seen.items()}

    values = jax.jit(captured)(leaves, list(args))
    return {k: (values[k], count) for k, (_, count) in seen.items()}
