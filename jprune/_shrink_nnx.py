"""Shrink an NNX model: a new, smaller module object with its layers' feature counts updated.

Public as ``jp.nnx.channel_groups`` and ``jp.nnx.shrink``.
"""

from __future__ import annotations

import numpy as np

from ._groups import Groups, channel_groups
from ._shrink import shrink


def nnx_groups(model, *args, **kwargs) -> Groups:
    """``channel_groups`` of an NNX module: its whole state (``nnx.split(model)``) as the tree.

    Masks and ``shrink_model`` then take that state: ``graphdef, state = nnx.split(model)``;
    ``masks = jp.group_structured(state, amount, groups)``.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 2, rngs=rngs))
      >>> [str(m) for m in jp.nnx.channel_groups(model, jnp.ones((1, 3))).prunable[0].members]
      ['layers/0/bias[0]', 'layers/0/kernel[1]', 'layers/2/kernel[0]']
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    def apply(s, *a, **k):  # layer attributes follow the shapes: the width check retraces smaller
        new = nnx.merge(graphdef, s)
        for module, attrs in _resized(new):
            for name, value in attrs.items():
                if hasattr(module, name):
                    setattr(module, name, value)
        return new(*a, **k)

    return channel_groups(apply, state, *args, **kwargs)


def _resized(new):
    """``(module, attributes)`` of every known layer of ``new``, from its variables' shapes."""
    from flax import nnx

    out = []
    for _, module in nnx.iter_modules(new):
        full = {
            k: tuple(np.shape(v.get_value() if hasattr(v, "get_value") else v.value))
            for k, v in _vars(module)
        }
        attrs = _features(module, full) if full else None
        if attrs:
            out.append((module, attrs))
    return out


def _features(module, shapes):
    """The feature attributes of a Flax NNX layer from its new variable shapes; None for a type
    jprune does not know."""
    from flax import nnx

    kernel = shapes.get("kernel")
    if isinstance(module, nnx.Linear):
        return {"in_features": kernel[0], "out_features": kernel[1]}
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            return None
        n = len(module.in_features)
        return {"in_features": tuple(kernel[:n]), "out_features": tuple(kernel[n:])}
    if isinstance(module, nnx.Conv | nnx.ConvTranspose) and getattr(module, "mask", None) is None:
        out = kernel[-1]
        groups = getattr(module, "feature_group_count", 1)
        if isinstance(module, nnx.Conv) and groups > 1:
            per = kernel[-2]
            if per != 1:  # a grouped conv's channels are never pruned (its group is unprunable)
                return None
            groups = out // (module.out_features // module.feature_group_count)  # depthwise: per input
            attrs = {"in_features": groups, "out_features": out, "feature_group_count": groups}
        else:
            attrs = {"in_features": kernel[-2], "out_features": out}
        if hasattr(module, "kernel_shape"):
            attrs["kernel_shape"] = tuple(kernel)
        return attrs
    if isinstance(module, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
        shape = next(iter(shapes.values()))
        return {"num_features": shape[-1]}
    if isinstance(module, nnx.Embed):
        return {"num_embeddings": shapes["embedding"][0], "features": shapes["embedding"][1]}
    return None


def shrink_model(model, masks, groups: Groups):
    """A smaller copy of an NNX model: pruned channels removed (``jp.shrink`` on its state) and every
    changed layer's feature attributes updated (``in_features``/``out_features``, a depthwise conv's
    ``feature_group_count``, a norm's ``num_features``, an attention's heads). ``model`` is unchanged.

    Known layers: ``Linear``, ``LinearGeneral``, ``Conv``/``ConvTranspose``, ``BatchNorm``,
    ``LayerNorm``, ``RMSNorm``, ``Embed``, ``MultiHeadAttention`` (whole heads; its q, k and v must
    keep one head size, so prune its heads group, not its value-dims group).

    Args:
      model: an ``nnx.Module``.
      masks: masks mirroring ``nnx.split(model)[1]`` (from ``group_structured`` on that state).
      groups: from ``nnx_groups(model, ...)`` (or ``channel_groups`` on the same state).

    Returns:
      The new module (the masked model's function, smaller).

    Raises:
      ValueError: a layer whose variables changed shape is of a type whose attributes jprune does
        not know (shrink its state with ``jp.shrink`` and rebuild it yourself); an attention whose
        q/k/v head sizes would differ; anything ``shrink`` raises.

    Examples:
      >>> import jax.numpy as jnp, jprune as jp
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 2, rngs=rngs))
      >>> x = jnp.ones((1, 3))
      >>> groups = jp.nnx.channel_groups(model, x)
      >>> masks = jp.group_structured(nnx.split(model)[1], 0.5, groups)
      >>> small = jp.nnx.shrink(model, masks, groups)
      >>> small.layers[0].out_features, small.layers[2].kernel.shape
      (2, (2, 2))
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    small_state, _ = shrink(state, masks, groups)
    new = nnx.merge(graphdef, small_state)
    old_shapes = dict(zip(groups.paths, groups.shapes))
    changed: dict[tuple, dict] = {}
    for path, var in nnx.to_flat_state(nnx.state(new)):
        key = "/".join(str(p) for p in path)
        shape = tuple(np.shape(var.get_value() if hasattr(var, "get_value") else var.value))
        if key in old_shapes and tuple(old_shapes[key]) != shape:
            changed.setdefault(tuple(path[:-1]), {})[str(path[-1])] = shape
    modules = dict(nnx.iter_modules(new))
    updates = []
    for mpath, shapes in changed.items():
        module = modules.get(mpath)
        where = "/".join(str(p) for p in mpath) or "the model"
        full = {
            k: tuple(np.shape(v.get_value() if hasattr(v, "get_value") else v.value))
            for k, v in _vars(module)
        }
        attrs = None if module is None else _features(module, full)
        if attrs is None:
            raise ValueError(
                f"shrink_model: {where} ({type(module).__name__}) changed shape {shapes}, and jprune does "
                "not know its attributes: shrink the state with jp.shrink and rebuild that layer yourself"
            )
        updates.append((module, attrs))
    for mpath, module in modules.items():
        if isinstance(module, nnx.MultiHeadAttention):
            q, k, v, o = (module.query.kernel, module.key.kernel, module.value.kernel, module.out.kernel)
            heads, head_dim = q.shape[1], q.shape[2]
            if k.shape[2] != head_dim or v.shape[2] != head_dim or o.shape[1] != head_dim:
                where = "/".join(str(p) for p in mpath)
                raise ValueError(
                    f"shrink_model: the attention {where} would get different head sizes for q/k/v/out "
                    f"({q.shape[2]}, {k.shape[2]}, {v.shape[2]}, {o.shape[1]}): prune its heads group only "
                    "(group_structured(..., select=...))"
                )
            updates.append(
                (
                    module,
                    {
                        "num_heads": heads,
                        "num_kv_heads": k.shape[1],
                        "head_dim": head_dim,
                        "qkv_features": heads * head_dim,
                        "in_features": q.shape[0],
                        "out_features": o.shape[-1],
                    },
                )
            )
    for module, attrs in updates:
        for name, value in attrs.items():
            if hasattr(module, name):
                setattr(module, name, value)
    return new


def _vars(module):
    from flax import nnx

    return [(k, v) for k, v in vars(module).items() if isinstance(v, nnx.Variable)]
