"""Checkpoint files: torch .pt/.pth/.safetensors and Flax .msgpack/orbax directories; atomic writes.

A file's kind follows its extension: `.pt`/`.pth`/`.safetensors` hold a torch state_dict,
`.msgpack` holds a Flax checkpoint dict (flax.serialization), and a directory (existing, or a
path without an extension, or ending in `.orbax`) is an orbax checkpoint of the same dict.
"""

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from . import _convert

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")
FLAX_SUFFIXES = (".msgpack", ".orbax")
_ORBAX_META = "jprune"
_ORBAX_STATE = "state"
_FORMAT = "jprune.interop/1"


def kind(path) -> str:
    """`"torch"` or `"flax"` for a checkpoint path, by its extension (a directory is orbax).

    Raises:
      ValueError: an extension that is neither.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in FLAX_SUFFIXES or os.path.isdir(path) or suffix == "":
        return "flax"
    raise ValueError(
        f"{path}: unsupported extension '{suffix}'; expected .pt, .pth or .safetensors (torch), "
        ".msgpack or an orbax directory (Flax)"
    )


def _suffix(path) -> str:
    return os.path.splitext(os.fspath(path).rstrip("/"))[1].lower()


def _is_orbax(path) -> bool:
    return _suffix(path) in ("", ".orbax") or os.path.isdir(path)


def _check_state_dict(obj, path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a state_dict (a mapping of str to torch.Tensor), got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = (
                " (a training checkpoint? save its model's state_dict alone)"
                if isinstance(value, Mapping)
                else ""
            )
            raise ValueError(
                f"{path}: expected a state_dict mapping str to torch.Tensor, got "
                f"{type(value).__name__} at key {key!r}{hint}"
            )
    return obj


def load_torch(path, *, mmap: bool = False) -> Mapping:
    """Reads a torch state_dict from .pt/.pth (`weights_only=True`) or .safetensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if _suffix(path) == ".safetensors":
        return _load_safetensors(path)
    with warnings.catch_warnings():
        # Plain pickles (protocol > 2) make torch warn before it refuses them; the refusal is the
        # message that matters.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines[1:] if "nsupported" in ln), lines[0] if lines else "")
            raise pickle.UnpicklingError(
                f"{path}: refused to unpickle (torch.load weights_only=True): {why}; nothing in "
                "it was executed"
            ) from None
        except (RuntimeError, EOFError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a readable torch checkpoint (truncated?): {first}") from e
    return _check_state_dict(obj, path)


def _load_safetensors(path: str) -> Mapping:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "jprune.key_order" in meta:
                order = json.loads(meta["jprune.key_order"])
                if sorted(order) == sorted(keys):
                    keys = order
            sd = OrderedDict((k, f.get_tensor(k)) for k in keys)
    except Exception as e:  # safetensors raises its own SafetensorError and OSError types
        if isinstance(e, FileNotFoundError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file (truncated?): {first}") from e
    if "jprune.torch_metadata" in meta:
        sd._metadata = OrderedDict(json.loads(meta["jprune.torch_metadata"]).items())
    return sd


def _load_msgpack(path: str) -> dict:
    from flax import serialization

    with open(path, "rb") as f:
        data = f.read()
    try:
        ckpt = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack's ExtraData/UnpackValueError/OutOfData, ValueError
        raise ValueError(f"{path}: not a readable msgpack checkpoint (truncated?): {e}") from e
    return _check_ckpt(ckpt, path)


def _check_ckpt(ckpt, path) -> dict:
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("params"), Mapping):
        raise ValueError(f"{path}: expected a checkpoint dict with a 'params' dict")
    return dict(ckpt)


def _load_orbax(path: str) -> dict:
    import jax
    import orbax.checkpoint as ocp

    meta_file = os.path.join(path, _ORBAX_META, "metadata")
    if not os.path.isdir(os.path.join(path, _ORBAX_STATE)) or not os.path.isfile(meta_file):
        raise ValueError(f"{path}: not an orbax checkpoint written by jprune (no '{_ORBAX_META}')")
    try:
        with ocp.PyTreeCheckpointer() as pc:
            tree = pc.metadata(os.path.join(path, _ORBAX_STATE)).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
            r = c.restore(
                path,
                ocp.args.Composite(
                    **{
                        _ORBAX_STATE: ocp.args.PyTreeRestore(restore_args=restore_args),
                        _ORBAX_META: ocp.args.JsonRestore(),
                    }
                ),
            )
    except Exception as e:
        raise ValueError(f"{path}: not a readable orbax checkpoint: {e}") from e
    state, meta = dict(r[_ORBAX_STATE]), r[_ORBAX_META]
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: expected format {_FORMAT!r}, got {meta.get('format')!r}")
    params = state.get("params", {})
    masks = {
        path: m for path, m in _convert._leaf_paths(state.get("masks", {}))
    }  # only present masks were saved
    ckpt = {"params": params, "masks": _convert._mirror(params, masks)}
    if "batch_stats" in state:
        ckpt["batch_stats"] = state["batch_stats"]
    if meta.get("recipe") is not None or "extra" in state:
        ckpt["torch"] = {}
        if meta.get("recipe") is not None:
            ckpt["torch"]["recipe"] = meta["recipe"]
        if "extra" in state:
            ckpt["torch"]["extra"] = state["extra"]
    return ckpt


def load(path):
    """Reads a checkpoint file: a torch state_dict or a Flax checkpoint dict, by extension.

    `.pt`/`.pth` are read with `torch.load(weights_only=True)`, so a pickle that would run code is
    refused and never executed.

    Args:
      path: a `.pt`, `.pth`, `.safetensors` or `.msgpack` file, or an orbax checkpoint directory.

    Returns:
      A state_dict (OrderedDict of tensors) for torch files; a dict with `params`, `masks`, ... for
      Flax files.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: an unknown extension, or a truncated or malformed file.
      pickle.UnpicklingError: a .pt/.pth pickle holding anything but tensors and containers.

    Examples:
      >>> import os, tempfile, torch
      >>> from jprune.interop import load, save
      >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
      >>> save({"fc.weight": torch.ones(2, 3)}, path)
      >>> {k: tuple(v.shape) for k, v in load(path).items()}
      {'fc.weight': (2, 3)}
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if kind(path) == "torch":
        return load_torch(path)
    if os.path.isdir(path):
        return _load_orbax(path)
    if _suffix(path) != ".msgpack":
        raise ValueError(f"{path}: an orbax checkpoint is a directory, this is a file")
    return _load_msgpack(path)


# ---------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_file(path: str):
    """Yields a temporary path next to `path`, renamed onto it only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _atomic_dir(path: str):
    """Yields a fresh directory path; on success it replaces `path` (an old directory is removed
    only after the new one is in place)."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory")
    parent = os.path.dirname(path)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        new = os.path.join(work, "new")
        yield new
        old = os.path.join(work, "old")
        if os.path.isdir(path):
            os.rename(path, old)
        os.rename(new, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_safetensors(sd: Mapping, path: str) -> None:
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, value in sd.items():
        value = value.detach().cpu().contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ptr in seen:  # safetensors refuses shared (tied) tensors
            value = value.clone()
        seen.add(ptr)
        tensors[key] = value
    meta = {"jprune.key_order": json.dumps(list(sd))}
    if getattr(sd, "_metadata", None) is not None:
        meta["jprune.torch_metadata"] = json.dumps({k: dict(v) for k, v in sd._metadata.items()})
    with _atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _empty_dict(x) -> bool:
    return isinstance(x, Mapping) and not x


def _prune_none(tree):
    if isinstance(tree, Mapping):
        out = {k: _prune_none(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not _empty_dict(v)}
    return tree


def _save_orbax(ckpt: Mapping, path: str) -> None:
    import orbax.checkpoint as ocp

    torch_meta = ckpt.get("torch") or {}
    state = {"params": ckpt["params"], "masks": ckpt.get("masks") or {}}
    if ckpt.get("batch_stats"):
        state["batch_stats"] = ckpt["batch_stats"]
    if torch_meta.get("extra"):
        state["extra"] = torch_meta["extra"]
    state = _prune_none({k: _numpy_tree(v) for k, v in state.items()})
    recipe = torch_meta.get("recipe")
    meta = {"format": _FORMAT, "recipe": None if recipe is None else str(recipe)}
    with _atomic_dir(path) as tmp, ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(
            tmp,
            ocp.args.Composite(
                **{_ORBAX_STATE: ocp.args.PyTreeSave(state), _ORBAX_META: ocp.args.JsonSave(meta)}
            ),
        )


def _numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    if tree is None or isinstance(tree, str | bytes | int | float):
        return tree
    return np.asarray(tree)


def save(obj, path) -> None:
    """Writes a torch state_dict or a Flax checkpoint dict, in the format the extension names.

    The write is atomic: the data goes to a temporary file (or directory) next to `path`, renamed
    onto `path` only once complete, so a failure never leaves a half-written output. A state_dict
    goes to `.pt`/`.pth`/`.safetensors` (key order kept); a checkpoint dict (as `from_torch`
    returns) goes to `.msgpack` or an orbax directory.

    Args:
      obj: a state_dict (str -> Tensor) or a checkpoint dict with `params`.
      path: the output path; its extension picks the format.

    Raises:
      ValueError: an unknown extension.
      TypeError: `obj` does not suit the format (e.g. a checkpoint dict for a `.pt` file).

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from jprune.interop import load, save
      >>> path = os.path.join(tempfile.mkdtemp(), "m.msgpack")
      >>> save({"params": {"w": np.ones(2, np.float32)}, "masks": {"w": None}}, path)
      >>> load(path)["masks"]
      {'w': None}
    """
    path = os.fspath(path)
    if kind(path) == "torch":
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise TypeError(
                f"{path}: a torch file holds a state_dict (str -> Tensor); convert a Flax "
                "checkpoint with to_torch first"
            )
        if _suffix(path) == ".safetensors":
            _save_safetensors(obj, path)
        else:
            with _atomic_file(path) as tmp:
                torch.save(obj, tmp)
        return
    if not isinstance(obj, Mapping) or not isinstance(obj.get("params"), Mapping):
        raise TypeError(
            f"{path}: a Flax file holds a checkpoint dict with 'params'; convert a state_dict "
            "with from_torch first"
        )
    if _is_orbax(path):
        _save_orbax(obj, path)
        return
    from flax import serialization

    data = serialization.msgpack_serialize(_numpy_tree(dict(obj)))
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def convert(src, dst, *, template=None, progress: bool | None = None) -> None:
    """Converts a checkpoint file between torch and Flax formats; direction by extension.

    Reads all of `src` and converts it in memory before anything is written, then writes `dst`
    atomically, so bad input leaves no output. torch -> torch and Flax -> Flax re-encode
    (e.g. .pt -> .safetensors, .msgpack -> orbax).

    Args:
      src: the input file or orbax directory.
      dst: the output path.
      template: optional template passed on to `from_torch` (Flax params) or `to_torch` (a torch
        state_dict or module).
      progress: show a progress bar; None shows one for large checkpoints on a terminal.

    Raises:
      FileNotFoundError: `src` does not exist.
      ValueError: unknown extensions, malformed input, or anything `from_torch`/`to_torch` refuse.
      pickle.UnpicklingError: a .pt/.pth pickle that is not plain tensors.

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
    src_kind, dst_kind = kind(src), kind(dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src_kind == "torch":
        mmap = _suffix(src) != ".safetensors"
        sd = load_torch(src, mmap=mmap)
        if dst_kind == "flax":
            obj = _convert._from_torch(sd, template, copy=mmap, progress=progress)
        else:
            obj = sd
    else:
        ckpt = load(src)
        if dst_kind == "torch":
            obj = _convert._to_torch(ckpt, template, progress=progress)
        else:
            obj = ckpt
    save(obj, dst)
