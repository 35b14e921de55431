"""`summarize`: which tensors of a checkpoint are pruned, and how much."""

import os
from collections.abc import Mapping

import numpy as np
import torch

from . import _arrays, _convert, _files, _layout

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _row(name: str, shape, dtype: str, numel: int, kept: int) -> dict:
    pruned = numel - kept
    return {
        "name": name,
        "shape": list(shape),
        "dtype": dtype,
        "numel": numel,
        "pruned": pruned,
        "sparsity": pruned / numel if numel else 0.0,
    }


def _torch_rows(sd: Mapping) -> tuple[list[dict], int]:
    rows = []
    for module, attrs in _layout.parse({k: tuple(v.shape) for k, v in sd.items()}).items():
        for a in attrs.values():
            if a.mask_key is not None:
                orig = sd[a.key]
                name = f"{module}.{a.name}" if module else a.name
                kept = int(torch.count_nonzero(sd[a.mask_key]))
                rows.append(_row(name, a.shape, str(orig.dtype)[6:], orig.numel(), kept))
    numel = sum(
        v.numel()
        for k, v in sd.items()
        if v.is_floating_point() and not k.endswith("_mask") and k.rpartition(".")[2] not in _BUFFERS
    )
    return rows, numel


def _flax_rows(ckpt: Mapping) -> tuple[list[dict], int]:
    rows, numel = [], 0
    masks = ckpt.get("masks") or {}
    for path, p in _convert._leaf_paths(ckpt["params"]):
        p = np.asarray(p)
        numel += p.size
        m = _convert._tree_get(masks, path)
        if _convert._present(m):
            kept = int(np.count_nonzero(np.asarray(m)))
            rows.append(_row("/".join(path), p.shape, str(p.dtype), p.size, kept))
    # Tensors kept verbatim (an unpruned LSTM weight_ih_l0...) count as the torch summary counts them.
    for key, value in ((ckpt.get("torch") or {}).get("extra") or {}).items():
        value = np.asarray(value)
        if _arrays.to_torch_dtype(value).is_floating_point and key.rpartition(".")[2] not in _BUFFERS:
            numel += value.size
    return rows, numel


def _dense_nbytes(obj: Mapping, fmt: str) -> int:
    """The bytes of every tensor but the masks, dense: what the unpruned model takes."""
    if fmt == "torch":
        return sum(t.numel() * t.element_size() for k, t in obj.items() if not _is_mask(obj, k))
    trees = [obj["params"], obj.get("batch_stats") or {}, (obj.get("torch") or {}).get("extra") or {}]
    return sum(np.asarray(a).nbytes for tree in trees for _, a in _convert._leaf_paths(tree))


def _is_mask(sd: Mapping, key: str) -> bool:
    return key.endswith("_mask") and f"{key[:-5]}_orig" in sd


def _file_nbytes(path) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def summarize(obj) -> dict:
    """Pruning summary of a torch state_dict, a Flax checkpoint dict, or a checkpoint file.

    Args:
      obj: a state_dict, a checkpoint dict with `params`/`masks`, or a path (any format `load`
        reads).

    Returns:
      `{"format", "tensors", "pruned", "numel_pruned_tensors", "numel_params", "sparsity",
      "dense_bytes"}`: one row per pruned tensor (`name`, `shape`, `dtype`, `numel`, `pruned`,
      `sparsity`), the pruned count, the global sparsity over the pruned tensors, and the bytes
      of all tensors but the masks, dense. For a path also `"file_bytes"` (the file's size, or
      the directory's) and `"ratio"` (file_bytes / dense_bytes).

    Raises:
      ValueError: `obj` is neither kind, or the file is unreadable (see `load`).

    Examples:
      >>> import torch
      >>> from torch.nn.utils import prune
      >>> from jprune.interop import summarize
      >>> lin = prune.l1_unstructured(torch.nn.Linear(4, 2), "weight", amount=0.25)
      >>> s = summarize(lin.state_dict())
      >>> [(r["name"], r["pruned"]) for r in s["tensors"]], s["sparsity"]
      ([('weight', 2)], 0.25)
    """
    path = None
    if isinstance(obj, str | os.PathLike):
        path = obj
        obj = _files.load_torch(obj, mmap=True) if _files.kind(obj) == "torch" else _files.load(obj)
    if isinstance(obj, Mapping) and isinstance(obj.get("params"), Mapping):
        fmt, (rows, numel) = "flax", _flax_rows(obj)
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        fmt, (rows, numel) = "torch", _torch_rows(obj)
    else:
        raise ValueError("Expected a torch state_dict or a Flax checkpoint dict with 'params'")
    pruned = sum(r["pruned"] for r in rows)
    total = sum(r["numel"] for r in rows)
    summary = {
        "format": fmt,
        "tensors": rows,
        "pruned": pruned,
        "numel_pruned_tensors": total,
        "numel_params": numel,
        "sparsity": pruned / total if total else 0.0,
        "dense_bytes": _dense_nbytes(obj, fmt),
    }
    if path is not None:
        summary["file_bytes"] = _file_nbytes(path)
        summary["ratio"] = summary["file_bytes"] / summary["dense_bytes"] if summary["dense_bytes"] else 0.0
    return summary
