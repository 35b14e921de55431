"""Pruned state_dicts <-> Flax checkpoint dicts, bit for bit: the pure conversion behind `from_torch`
and `to_torch` (`_api`), which never reads or writes a file."""

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import _arrays, _layout
from ._torch import module_kinds

# 2 added the layouts conv_transpose, qkv:H, qkv_bias:H and heads_out:H; a version-1 recipe reads
# the same, and a reader that knows only 1 refuses a 2 rather than misread a layout.
RECIPE_VERSION = 2
_RECIPE_VERSIONS = (1, 2)


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
    for c in path[:-1]:
        tree = tree.setdefault(c, {})
    tree[path[-1]] = value


def _tree_get(tree, path: tuple[str, ...]):
    for c in path:
        if not isinstance(tree, Mapping) or c not in tree:
            return _MISSING
        tree = tree[c]
    return tree


_MISSING = object()


def _present(x) -> bool:
    return x is not None and x is not _MISSING


def _mirror(params: Mapping, masks: dict, path: tuple[str, ...] = ()) -> dict:
    """A dict shaped like `params` with the mask at each path, None where there is none."""
    return {
        k: _mirror(v, masks, (*path, k)) if isinstance(v, Mapping) else masks.get((*path, k))
        for k, v in params.items()
    }


def _leaf_paths(tree, path=()):
    if not isinstance(tree, Mapping):
        yield path, tree
        return
    for k, v in tree.items():
        yield from _leaf_paths(v, (*path, k))


def _state_dict_of(state_dict) -> tuple[Mapping, bool, dict | None]:
    """(state_dict, whether its tensors must be copied, module kinds or None) from a mapping or
    module (file paths are read by the caller, `_api`: this module never touches files)."""
    if isinstance(state_dict, torch.nn.Module):
        return state_dict.state_dict(), False, module_kinds(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "Expected a state_dict (a mapping of str to torch.Tensor), an nn.Module or a file "
            f"path, got {type(state_dict).__name__}"
        )
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Expected a state_dict mapping str to torch.Tensor, got {type(value).__name__} "
                f"at key {key!r}"
            )
    return state_dict, False, None


def _plain_metadata(metadata: Mapping) -> dict:
    """torch's per-module metadata (``{"version": 2}``, which load_state_dict reads) as JSON;
    refused, never dropped or changed, if JSON cannot hold it exactly (a tuple, an object)."""
    plain = {k: dict(v) for k, v in metadata.items()}
    try:
        kept = json.loads(json.dumps(plain))
    except (TypeError, ValueError):
        kept = None
    if kept != plain:
        bad = next((k for k in plain if kept is None or kept.get(k) != plain[k]), "?")
        raise ValueError(
            f"state_dict._metadata of module {bad!r} ({plain.get(bad)!r}) cannot be kept exactly in "
            "the checkpoint (JSON); set state_dict._metadata = None to convert without torch's module "
            "versions"
        )
    return kept


def _progress(items, total_bytes: int, progress: bool | None, desc: str):
    if progress is False or (progress is None and total_bytes < 256 * 2**20):
        return items
    from tqdm.auto import tqdm

    # disable=None: only on a terminal, so logs and tests stay clean.
    return tqdm(items, desc=desc, unit="tensor", disable=None if progress is None else False)


def _from_torch(state_dict: Mapping, template, *, copy: bool, progress: bool | None, kinds=None) -> dict:
    if isinstance(template, torch.nn.Module):  # the torch model itself: its classes decide
        kinds, template = module_kinds(template), None
    recipe = _layout.plan({k: tuple(v.shape) for k, v in state_dict.items()}, template, kinds)
    params: dict = {}
    stats: dict = {}
    masks: dict = {}
    extra: dict = {}
    keys = []
    total = sum(v.numel() * v.element_size() for v in state_dict.values())

    def convert_one(entry) -> list[np.ndarray]:
        key, target, layout = entry
        t = state_dict[key]
        perm = _layout.to_flax_perm(layout, t.ndim)
        if perm is None and layout != "same":  # reshaped or split: to_flax makes fresh arrays
            value = _arrays.bool_mask(key, t, None) if target[0] == "masks" else _arrays.to_numpy(t)
            return _layout.to_flax(layout, value)
        if target[0] == "masks":
            return [_arrays.bool_mask(key, t, perm)]
        return [_arrays.permuted(t, perm, copy=copy)]

    # Tensors convert independently and numpy releases the GIL while copying, so a few threads
    # overlap the copies (torch.load itself reads on one thread); results keep the recipe order.
    workers = min(4, os.cpu_count() or 1) if total >= 64 * 2**20 else 1
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(convert_one, entry) for entry in recipe]
        for (key, target, layout), future in zip(
            recipe, _progress(futures, total, progress, "torch -> flax"), strict=True
        ):
            try:
                value = future.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            keys.append([key, list(target), layout, _arrays.dtype_name(state_dict[key].dtype)])
            if target[0] == "extra":
                (extra[key],) = value
                continue
            for leaf, part in zip(_layout.leaves(target, layout), value, strict=True):
                if leaf[0] == "masks":
                    masks[leaf[1:]] = part
                else:
                    _tree_set(params if leaf[0] == "params" else stats, leaf[1:], part)
    meta = {"version": RECIPE_VERSION, "keys": keys}
    if getattr(state_dict, "_metadata", None) is not None:
        meta["metadata"] = _plain_metadata(state_dict._metadata)
    for path in masks:  # plan places every mask on its tensor's params leaf
        assert _tree_get(params, path) is not _MISSING, path
    ckpt = {"params": params, "masks": _mirror(params, masks)}
    if stats:
        ckpt["batch_stats"] = stats
    ckpt["torch"] = {"recipe": json.dumps(meta)}
    if extra:
        ckpt["torch"]["extra"] = extra
    return ckpt


# ---------------------------------------------------------------------------- Flax -> torch


def _entries(ckpt: Mapping, template) -> tuple[list, dict, dict | None]:
    """(entries (key, target, layout, mask dtype or None), extra values, torch metadata)."""
    torch_meta = ckpt.get("torch") or {}
    extra = dict(torch_meta.get("extra") or {})
    if template is not None:
        template, _, kinds = _state_dict_of(template)
        flax = {"params": ckpt["params"]}
        if ckpt.get("batch_stats"):
            flax["batch_stats"] = ckpt["batch_stats"]
        recipe = _layout.plan({k: tuple(v.shape) for k, v in template.items()}, flax, kinds)
        for key, target, _ in recipe:
            if target[0] == "extra" and key not in extra:
                extra[key] = _arrays.to_numpy(template[key])
        entries = [
            (k, t, lay, _arrays.dtype_name(template[k].dtype) if t[0] == "masks" else None)
            for k, t, lay in recipe
        ]
        return entries, extra, getattr(template, "_metadata", None)
    if "recipe" in torch_meta:
        meta = _read_recipe(torch_meta["recipe"])
        entries = [(k, tuple(t), lay, dt if t[0] == "masks" else None) for k, t, lay, dt in meta["keys"]]
        return entries, extra, meta.get("metadata")
    entries = []
    for key, target, layout, synthesized in _layout.default_recipe(ckpt["params"], ckpt.get("batch_stats")):
        if synthesized and key not in extra:
            extra[key] = np.zeros((), np.int64)
        entries.append((key, target, layout, None))
    return entries, extra, None


def _read_recipe(recipe) -> dict:
    """The recorded recipe, checked entry by entry: a layout this version does not know is
    refused, never read as no layout."""
    try:
        meta = json.loads(str(recipe))
    except ValueError as e:
        raise ValueError(f"ckpt['torch']['recipe'] is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"ckpt['torch']['recipe'] is {type(meta).__name__} JSON, expected an object")
    if meta.get("version") not in _RECIPE_VERSIONS:
        raise ValueError(
            f"ckpt['torch']['recipe'] has version {meta.get('version')!r}, expected one of {_RECIPE_VERSIONS}"
        )
    metadata = meta.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise ValueError("ckpt['torch']['recipe'] has metadata that is not {module: {name: value}}")
    keys = meta.get("keys")
    for entry in keys if isinstance(keys, list) else [keys]:
        ok = isinstance(entry, list) and len(entry) == 4
        if ok:
            key, target, layout, dtype = entry
            ok = (
                isinstance(key, str)
                and isinstance(target, list)
                and all(isinstance(c, str) for c in target)
                and target[:1] in (["params"], ["masks"], ["batch_stats"], ["extra"])
                and (len(target) > 1) != (target == ["extra"])
                and isinstance(layout, str)
                and _layout.is_layout(layout)
                and isinstance(dtype, str)
            )
        if not ok:
            raise ValueError(
                f"ckpt['torch']['recipe'] has a malformed entry {str(entry)[:100]}: expected "
                "[torch key, [collection, *path], layout, torch dtype]"
            )
    return meta


def _adapt(entries: list, masks: Mapping) -> list:
    """Entries for the masks the checkpoint has now.

    A mask added since the recipe was recorded turns `X` into `X_orig` + `X_mask`, placed as torch
    places them (`X_orig` after the module's parameters, `X_mask` after its buffers); a mask
    removed turns `X_orig` back into `X`.
    """
    pruned = {t[1:] for _, t, _, _ in entries if t[0] == "masks"}
    last, last_param = {}, {}
    for i, (key, target, _, _) in enumerate(entries):
        module = key.rpartition(".")[0]
        last[module] = i
        if target[0] == "params":
            last_param[module] = i
    out, origs, new_masks = [], {}, {}
    for i, (key, target, layout, dtype) in enumerate(entries):
        module, _, attr = key.rpartition(".")
        prefix = f"{module}." if module else ""
        entry = (key, target, layout, dtype)
        if target[0] == "params":
            path = target[1:]
            has_mask = _has_mask(masks, path, layout)
            if path in pruned and not has_mask:
                entry = (prefix + attr.removesuffix("_orig"), target, layout, dtype)
            elif path not in pruned and has_mask:
                origs.setdefault(module, []).append((prefix + attr + "_orig", *entry[1:]))
                new_masks.setdefault(module, []).append(
                    (prefix + attr + "_mask", ("masks", *path), layout, None)
                )
                entry = None
        elif target[0] == "masks" and not _has_mask(masks, target[1:], layout):
            entry = None
        if entry is not None:
            out.append(entry)
        if last_param.get(module) == i:
            out.extend(origs.pop(module, []))
        if last[module] == i:
            out.extend(new_masks.pop(module, []))
    return out


def _has_mask(masks: Mapping, path: tuple, layout: str) -> bool:
    return any(_present(_tree_get(masks, leaf)) for leaf in _layout.leaves(path, layout))


def _check_covered(entries: list, ckpt: Mapping) -> None:
    """Refuses a params leaf no torch key takes, and two leaves on one torch key."""
    targets = {leaf for _, t, lay, _ in entries for leaf in _layout.leaves(t, lay)}
    keys: dict[str, tuple] = {}
    for key, target, _, _ in entries:
        if key in keys:
            raise ValueError(
                f"Flax leaves '{'/'.join(keys[key])}' and '{'/'.join(target)}' would both "
                f"become torch key '{key}'; rename one of them"
            )
        keys[key] = target
    for coll in ("params", "batch_stats"):
        for path, _ in _leaf_paths(ckpt.get(coll) or {}):
            if (coll, *path) not in targets:
                raise ValueError(
                    f"{coll} leaf '{'/'.join(path)}' has no torch name: it is not in "
                    "ckpt['torch']['recipe'] (recorded by from_torch); pass template= (the torch "
                    "state_dict or module) or drop ckpt['torch'] to use default names"
                )
    for path, m in _leaf_paths(ckpt.get("masks") or {}):
        if m is not None and _tree_get(ckpt["params"], path) is _MISSING:
            raise ValueError(f"mask at '{'/'.join(path)}' has no params leaf")


def _mask_values(path: tuple[str, ...], mask, param: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    where = "/".join(path)
    if mask.shape != param.shape:
        raise ValueError(f"mask at {where} has shape {mask.shape}, expected {param.shape}")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"mask at {where} is not binary (dtype {mask.dtype}); expected bool")
        mask = mask != 0
    return mask


def _to_torch(ckpt: Mapping, template, *, progress: bool | None) -> "OrderedDict":
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("params"), Mapping):
        raise TypeError("Expected a checkpoint dict with a 'params' dict (as from_torch returns)")
    masks = ckpt.get("masks") or {}
    entries, extra, metadata = _entries(ckpt, template)
    entries = _adapt(entries, masks)
    _check_covered(entries, ckpt)
    out = OrderedDict()
    total = sum(getattr(v, "nbytes", 0) for _, v in _leaf_paths(ckpt["params"]))  # no device copy
    for key, target, layout, dtype in _progress(entries, total, progress, "flax -> torch"):
        coll = target[0]
        if coll == "extra":
            if key not in extra:
                raise ValueError(f"'{key}' is listed in the recipe but missing from ckpt['torch']['extra']")
            out[key] = _arrays.to_torch(extra[key])
            continue
        tree = ckpt["params"] if coll in ("params", "masks") else ckpt.get("batch_stats") or {}
        parts = []
        for leaf in _layout.leaves(target, layout):
            value = _tree_get(tree, leaf[1:])
            if value is _MISSING:
                raise ValueError(f"'{key}' expects {'/'.join(leaf)} in the checkpoint; it is missing")
            value = np.asarray(value)
            if coll == "masks":  # a split tensor may have masks on some of its leaves only
                mask = _tree_get(masks, leaf[1:])
                value = _mask_values(leaf[1:], mask, value) if _present(mask) else np.ones(value.shape, bool)
            parts.append(value)
        tensor = _arrays.to_torch(_layout.to_torch(layout, parts))
        if coll == "masks":
            param = np.asarray(_tree_get(ckpt["params"], _layout.leaves(target, layout)[0][1:]))
            tensor = tensor.to(_arrays.torch_dtype(dtype) if dtype else _arrays.to_torch_dtype(param))
        out[key] = tensor
    if metadata is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return out
