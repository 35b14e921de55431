"""The public conversions: a path is read by `_files`, converted by `_convert`, written by `_files`.

Load -> pure convert -> save, each one pass down: `_convert` never reads or writes a file, and
`_files` never converts, so neither imports the other.
"""

import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch.nn.utils import prune

from . import _convert, _files, _layout, _torch


def _read_torch(source):
    """``(source, copy)``: a .pt/.pth/.safetensors path read into a state_dict (a memory-mapped .pt
    must be copied out of its file), anything else as it is."""
    if not isinstance(source, str | os.PathLike):
        return source, False
    if _files.kind(source) != "torch":
        raise ValueError(
            f"{os.fspath(source)}: from_torch reads .pt, .pth or .safetensors files; "
            "load Flax files with jprune.interop.load"
        )
    mmap = os.fspath(source).lower().endswith((".pt", ".pth"))
    return _files.load_torch(source, mmap=mmap), mmap


def from_torch(state_dict, template=None) -> dict:
    """Converts a (pruned) torch state_dict to a Flax checkpoint dict.

    Names and layouts: module path `a.b.c` -> nested keys `a`/`b`/`c`; a Linear weight (out, in)
    -> `kernel` (in, out); a ConvNd weight (O, I, *spatial) -> `kernel` (*spatial, I, O); a norm
    weight -> `scale`; BatchNorm `running_mean`/`running_var` -> `batch_stats` `mean`/`var` (the
    table in `jprune.interop`'s docstring has them all). What decides a layout, first that applies:
    the torch module's classes (when given an nn.Module, as `state_dict` or as `template`), a Flax
    template (which may cover only part of the model; the rest follows the default rules), the
    default shape rules. A layout none of them decides is refused with a message naming the
    tensor (e.g. a 2-D weight with no bias: Linear or Embedding?). A pruned tensor that no rule
    places (LSTM `weight_ih_l0`, `in_proj_weight` without the module, a custom parameter) keeps
    its torch name and layout in `params`, its mask beside it: no mask is ever dropped.

    The result is `{"params", "masks", "batch_stats" (only if present), "torch"}`:
    `params` holds the `X_orig` values (or `X` where unpruned), `masks` mirrors `params` with a
    bool array where torch has `X_mask` and None elsewhere, and `torch` holds what `to_torch`
    needs to rebuild the state_dict exactly: `"recipe"` (a JSON string listing every torch key in
    order with its Flax place, layout and torch dtype, mask dtypes included) and `"extra"`
    (tensors with no Flax place, e.g. `num_batches_tracked`, kept verbatim; only if any).

    Leaves are numpy arrays (bf16 and float8 via ml_dtypes, float64 kept as float64), C-contiguous;
    leaves that need no transposition share memory with the input tensors.

    Args:
      state_dict: a state_dict (str -> Tensor), an nn.Module, or a path to a .pt/.pth/.safetensors
        file (read with `weights_only=True`, memory-mapped).
      template: optional Flax params (or a variables dict with `params`/`batch_stats`), e.g. from
        `model.init`, arrays or `jax.ShapeDtypeStruct`s; or the torch nn.Module whose state_dict
        this is (its classes decide the layouts).

    Returns:
      The checkpoint dict described above.

    Raises:
      ValueError: a mask that is not 0/1, a mask whose shape differs from its `_orig`, `_mask`
        without `_orig`, a layout nothing decides, a template that does not match, or two torch
        tensors that would land on one Flax leaf.
      TypeError: `state_dict` is not a mapping of str to Tensor.

    Examples:
      >>> import torch
      >>> from torch.nn.utils import prune
      >>> from jprune.interop import from_torch
      >>> lin = torch.nn.Linear(3, 2)
      >>> _ = prune.l1_unstructured(lin, "weight", amount=2)
      >>> ckpt = from_torch(lin.state_dict())
      >>> ckpt["params"]["kernel"].shape, ckpt["masks"]["kernel"].dtype.name, ckpt["masks"]["bias"]
      ((3, 2), 'bool', None)
      >>> int((~ckpt["masks"]["kernel"]).sum())
      2
    """
    source, copy = _read_torch(state_dict)
    state_dict, copied, kinds = _convert._state_dict_of(source)
    return _convert._from_torch(state_dict, template, copy=copy or copied, progress=False, kinds=kinds)


def to_torch(ckpt: Mapping, template=None) -> "OrderedDict[str, torch.Tensor]":
    """Converts a Flax checkpoint dict back to a torch state_dict.

    For a checkpoint made by `from_torch`, `to_torch(from_torch(sd))` reproduces `sd` exactly:
    every key in order, shape, dtype (mask dtypes included) and bit pattern, `num_batches_tracked`
    and unknown keys included. Masks added or removed since (e.g. by `jprune.l1_unstructured` or
    `jprune.remove`) turn `X` into `X_orig` + `X_mask` or back. Without a recorded recipe, torch
    names follow the Flax names (`kernel`/`scale`/`embedding` -> `weight`; `mean`/`var` ->
    `running_mean`/`running_var`, plus `num_batches_tracked` = 0; Flax attention `query`/`key`/
    `value`/`out` -> `in_proj_weight`/`in_proj_bias`/`out_proj.*`), masks get the parameter's
    dtype, and `template` (a torch state_dict or module) can supply the torch names instead.

    Args:
      ckpt: `{"params", "masks" (optional), "batch_stats" (optional), "torch" (optional)}`.
      template: optional torch state_dict, nn.Module or .pt/.pth/.safetensors path naming the
        torch side.

    Returns:
      An OrderedDict of fresh CPU tensors, ready for `load_state_dict`.

    Raises:
      ValueError: a mask that is not binary or has the wrong shape, a leaf without a torch name
        or with no known torch layout (a DenseGeneral kernel), two leaves that would become one
        torch key or module (`m/kernel` and `m/scale`; `a.b/*` and `a/b/*`), or a template that
        does not match.

    Examples:
      >>> import numpy as np
      >>> from jprune.interop import to_torch
      >>> ckpt = {"params": {"fc": {"kernel": np.ones((3, 2), np.float32)}},
      ...         "masks": {"fc": {"kernel": np.array([[1, 0], [1, 1], [0, 1]], bool)}}}
      >>> sd = to_torch(ckpt)
      >>> list(sd), tuple(sd["fc.weight_orig"].shape), sd["fc.weight_mask"].tolist()
      (['fc.weight_orig', 'fc.weight_mask'], (2, 3), [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    """
    return _convert._to_torch(ckpt, _read_torch(template)[0], progress=False)


def convert(src, dst, *, template=None, progress: bool | None = None, compact: bool = False) -> None:
    """Converts a checkpoint file between torch and Flax formats; direction by extension.

    Reads all of `src` and converts it in memory before anything is written, then writes `dst`
    atomically (see `save`), so bad input leaves no output and an existing `dst` that is not a
    checkpoint of its format is refused untouched. torch -> torch and Flax -> Flax re-encode
    (e.g. .pt -> .safetensors, .msgpack -> orbax).

    Args:
      src: the input file or orbax directory.
      dst: the output path.
      template: optional template passed on to `from_torch` (Flax params) or `to_torch` (a torch
        state_dict or module).
      progress: show a progress bar; None shows one for large checkpoints on a terminal.
      compact: write a compact checkpoint (see `save`).

    Raises:
      FileNotFoundError: `src` does not exist.
      ValueError: unknown extensions, malformed input, a `dst` that is not a checkpoint of its
        format, or anything `from_torch`/`to_torch` refuse (prefixed with `src`).
      pickle.UnpicklingError: a .pt/.pth pickle that is not plain tensors.
      OSError: writing `dst` failed; nothing was changed.

    Examples:
      >>> import os, tempfile, torch
      >>> from jprune.interop import convert, load, save
      >>> d = tempfile.mkdtemp()
      >>> save({"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}, f"{d}/m.pt")
      >>> convert(f"{d}/m.pt", f"{d}/m.msgpack")
      >>> load(f"{d}/m.msgpack")["params"]["fc"]["kernel"].shape
      (3, 2)
    """
    src, dst = os.fspath(src), os.fspath(dst)
    src_kind = _files.kind(src)
    dst_fmt = _files.check_destination(dst, compact=compact)  # refuse before the (long) read
    if src_kind == "torch":
        obj, mmap = _read_torch(src)
    else:
        obj = _files.load(src)
    try:
        if src_kind == "torch" and dst_fmt in ("msgpack", "orbax"):
            obj = _convert._from_torch(obj, template, copy=mmap, progress=progress)
        elif src_kind == "flax" and dst_fmt in ("pt", "safetensors"):
            obj = _convert._to_torch(obj, template, progress=progress)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e
    _files.save(obj, dst, compact=compact)


def apply_to_torch(module: torch.nn.Module, masks) -> None:
    """Installs jprune masks (Flax names and layouts) on a live torch module as torch pruning.

    Each mask becomes ``prune.custom_from_mask`` on its tensor, converted to torch's layout (a Flax
    ``kernel`` ``(in, out)`` is a Linear ``weight`` ``(out, in)``; the query/key/value masks of an
    attention layer are packed into ``in_proj_weight``), so a model pruned in JAX goes on in torch.
    Names and layouts come from the module itself, as ``from_torch(module)`` gives them. A tensor
    torch has already pruned keeps its mask too: the new one is combined with it, as torch does.

    Args:
      module: the torch model, pruned or not.
      masks: a masks pytree in the layout of ``from_torch(module)["params"]`` (bool arrays, ``None``
        where a leaf is not pruned; an attention's missing query/key/value mask counts as all kept).

    Raises:
      ValueError: a mask at a path the module has no tensor for, of the wrong shape, or not bool;
        the message names it, and the module is left exactly as it was.

    Examples:
      >>> import numpy as np, torch
      >>> from jprune.interop import apply_to_torch
      >>> lin = torch.nn.Linear(3, 2)
      >>> keep = np.array([[True, False], [True, True], [False, True]])  # Flax kernel (in, out)
      >>> apply_to_torch(lin, {"kernel": keep, "bias": None})
      >>> lin.weight_mask.tolist()
      [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    """
    ckpt = from_torch(module)
    params = ckpt["params"]
    recipe = _convert._read_recipe(ckpt["torch"]["recipe"])
    keys = {key for key, *_ in recipe["keys"]}
    given = {path: m for path, m in _convert._leaf_paths(masks) if m is not None}
    placed, plan = set(), []
    for key, target, layout, _ in recipe["keys"]:
        if target[0] != "params":
            continue
        leaves = [leaf[1:] for leaf in _layout.leaves(tuple(target), layout)]
        if not any(leaf in given for leaf in leaves):
            continue
        parts = []
        for leaf in leaves:
            shape = np.shape(_convert._tree_get(params, leaf))
            m = np.asarray(given.get(leaf, np.ones(shape, bool)))
            if m.dtype != np.bool_ or m.shape != shape:
                raise ValueError(
                    f"mask at {'/'.join(leaf)} must be a bool array of shape {shape} (the Flax "
                    f"layout of '{key}'), got {m.dtype} {m.shape}"
                )
            parts.append(m)
            placed.add(leaf)
        prefix, _, attr = key.rpartition(".")
        if attr.endswith("_orig") and f"{key[:-5]}_mask" in keys:  # already pruned by torch
            attr = attr[:-5]
        plan.append((prefix, attr, _layout.to_torch(layout, parts)))
    unplaced = sorted("/".join(p) for p in given if p not in placed)
    if unplaced:
        raise ValueError(
            f"masks at {unplaced} have no tensor in this {type(module).__name__}; its Flax "
            "names are those of jprune.interop.from_torch(module)['params']"
        )
    saved = _torch._snapshot(module)
    try:
        for prefix, attr, mask in plan:
            prune.custom_from_mask(
                module.get_submodule(prefix), attr, torch.from_numpy(np.ascontiguousarray(mask))
            )
    except BaseException:
        _torch._restore(saved)
        raise
