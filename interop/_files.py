"""Checkpoint files: torch .pt/.pth/.safetensors and Flax .msgpack/orbax directories; atomic writes.

A file's kind follows its extension: `.pt`/`.pth`/`.safetensors` hold a torch state_dict,
`.msgpack` holds a Flax checkpoint dict (flax.serialization), and a directory (existing, or a
path without an extension, or ending in `.orbax`) is an orbax checkpoint of the same dict.

Reading refuses rather than guesses: every file is opened by one helper (`_open_regular`) that
accepts only a regular, non-empty file (a FIFO, a device such as `/dev/zero` or a directory is
refused before anything is read), every read is bounded by the file's size, and what was read is
checked (`_check_state_dict`, `_check_ckpt`) before anything uses it. A malformed file raises
ValueError (or pickle.UnpicklingError, OSError) whose message starts with the path.

Masks are stored packed (`_packed`: 1 bit per entry, deflated when shorter), in msgpack and
orbax under `"packed"` (format `jprune.interop/2`; version 1 files, with bool masks, still load),
in safetensors as uint8 records listed in the metadata `jprune.packed`; compact files hold only
kept values (see `save`). Every record is checked before it is decoded, slice by slice.

Writing goes through one atomic writer (`_atomic`): the new checkpoint is written into a temporary
directory `.NAME.<pid>@<host>.<random>.tmp` next to the destination and moved onto it only once
complete (`os.replace` for files; an atomic exchange, Linux `renameat2(RENAME_EXCHANGE)`, for
orbax directories). An existing destination is replaced only if it is a checkpoint of the same
format (an empty directory also qualifies for orbax); anything else is refused untouched. Temporary
directories left by a killed writer are removed by the next save to the same destination, but only
those named with this host and a process id that no longer exists.
"""

import contextlib
import ctypes
import errno
import json
import logging
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from . import _arrays, _convert, _packed

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")
FLAX_SUFFIXES = (".msgpack", ".orbax")
_ORBAX_META = "jprune"
_ORBAX_STATE = "state"
_FORMAT = "jprune.interop/2"  # 2: masks and compact tensors as packed records (`_packed`)
_FORMATS = ("jprune.interop/1", _FORMAT)  # 1: bool masks, one byte per entry; still read
_CKPT_KEYS = ("params", "masks", "batch_stats", "torch")


# ----------------------------------------------------------------------------- paths and formats


def _suffix(path) -> str:
    return os.path.splitext(os.fspath(path).rstrip("/"))[1].lower()


def _format(path) -> str:
    """`"pt"`, `"safetensors"`, `"msgpack"` or `"orbax"`, by extension (an existing directory
    with another extension is orbax)."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix in (".pt", ".pth"):
        return "pt"
    if suffix in (".safetensors", ".msgpack"):
        return suffix[1:]
    if suffix in ("", ".orbax") or os.path.isdir(path):
        return "orbax"
    raise ValueError(
        f"{path}: unsupported extension '{suffix}'; expected .pt, .pth or .safetensors (torch), "
        ".msgpack or an orbax directory (Flax)"
    )


def kind(path) -> str:
    """`"torch"` or `"flax"` for a checkpoint path, by its extension (a directory is orbax).

    Raises:
      ValueError: an extension that is neither.
    """
    return "torch" if _format(path) in ("pt", "safetensors") else "flax"


# --------------------------------------------------------------------------------------- reading


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _require_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: is {_file_type(st.st_mode)}, expected a checkpoint file")
    if st.st_size == 0:
        raise ValueError(f"{path}: the file is empty, expected a checkpoint")


@contextlib.contextmanager
def _open_regular(path: str):
    """Yields `(binary file, size)` for a regular, non-empty file; refuses anything else unread.

    The type is checked before opening (opening a FIFO blocks) and again on the opened file (it
    may have been swapped in between); O_NONBLOCK keeps even that open from blocking.
    """
    try:
        _require_regular(path, os.stat(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


@contextlib.contextmanager
def _parsing(path: str, what: str):
    """Any error a parser raises on malformed bytes becomes a ValueError naming `path` and the
    error's type; refusals that already name `path` pass through."""
    try:
        yield
    except (pickle.UnpicklingError, FileNotFoundError):
        raise
    except Exception as e:  # parsers raise their own types (SafetensorError, msgpack's, tensorstore's)
        if isinstance(e, ValueError) and str(e).startswith(f"{path}"):
            raise
        raise ValueError(f"{path}: not a readable {what} (truncated or damaged?): {_first_line(e)}") from e


def _read_all(path: str) -> bytes:
    with _open_regular(path) as (f, size):
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: the file changed while it was read")
    return data


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_tensor(path: str, key: str, t: torch.Tensor) -> None:
    if t.layout != torch.strided or t.is_quantized:
        raise ValueError(
            f"{path}: tensor {key!r} is {'quantized' if t.is_quantized else str(t.layout)} "
            f"(dtype {t.dtype}); jprune converts dense tensors only (dequantize or to_dense it first)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "ComplexHalf support is experimental"
            _arrays.to_numpy(torch.empty(0, dtype=t.dtype))  # the dtype alone: no copy off a device
    except ValueError:
        raise ValueError(
            f"{path}: tensor {key!r} has dtype {t.dtype}, which has no numpy/JAX counterpart"
        ) from None


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
        _check_tensor(path, key, value)
    return obj


def _check_pt_archive(path: str, f, size: int) -> list[int]:
    """A .pt must be torch's zip archive with stored (uncompressed) entries inside the file, so
    nothing torch reads or allocates can exceed the file's size."""
    head = f.read(4)
    if head != b"PK\x03\x04":
        if head[:1] == b"\x80":  # a pickle: torch's pre-1.6 format, or a plain pickle
            raise pickle.UnpicklingError(
                f"{path}: refused to unpickle: a plain pickle, not the zip archive torch.save "
                "writes (a pre-1.6 torch file? re-save it with a current torch); nothing in it "
                "was executed"
            )
        raise ValueError(f"{path}: not a torch checkpoint (not the zip archive torch.save writes)")
    f.seek(0)
    with _parsing(path, "torch checkpoint"):
        infos = zipfile.ZipFile(f).infolist()
    for info in infos:
        if (
            info.compress_type != zipfile.ZIP_STORED
            or info.compress_size != info.file_size
            or info.header_offset + info.file_size > size
        ):
            raise ValueError(
                f"{path}: archive entry {info.filename!r} is compressed or extends past the end "
                "of the file; torch.save writes neither (damaged or repacked file?)"
            )
    return sorted(i.file_size for i in infos if re.search(r"/data/[^/]+$", i.filename) and i.file_size)


def _check_mmap_storages(path: str, sd: Mapping, records: list[int]) -> None:
    """With mmap, torch slices each storage out of the file by the size the pickle declares,
    unchecked (reading records, it checks); each storage must be exactly one data record."""
    storages = {}
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    if sorted(storages.values()) != records:
        raise ValueError(f"{path}: tensor storages do not match the archive's data records (damaged file?)")


def load_torch(path, *, mmap: bool = False) -> Mapping:
    """Reads a torch state_dict from .pt/.pth (`weights_only=True`) or .safetensors."""
    path = os.fspath(path)
    fmt = _format(path)
    if fmt == "safetensors":
        return _load_safetensors(path)
    if fmt != "pt":
        raise ValueError(f"{path}: not a torch file (.pt, .pth or .safetensors)")
    with _open_regular(path) as (f, size), _parsing(path, "torch checkpoint"):
        records = _check_pt_archive(path, f, size)
        f.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about what it then refuses
            try:
                # mmap needs a path: the file just checked (torch checks the archive again).
                obj = torch.load(path if mmap else f, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                why = next((ln for ln in lines[1:] if "nsupported" in ln), lines[0] if lines else "")
                raise pickle.UnpicklingError(
                    f"{path}: refused to unpickle (torch.load weights_only=True): {why}; nothing in "
                    "it was executed"
                ) from None
    _check_state_dict(obj, path)
    if mmap:
        _check_mmap_storages(path, obj, records)
    return obj


_MISSING = object()


def _is_str(x) -> bool:
    return isinstance(x, str)


def _json_meta(path: str, meta: Mapping, name: str, ok, expected: str):
    try:
        value = json.loads(meta[name])
    except ValueError:
        value = _MISSING
    if value is _MISSING or not ok(value):
        raise ValueError(f"{path}: metadata {name!r} is not {expected}")
    return value


def _load_safetensors(path: str) -> Mapping:
    from safetensors import safe_open

    # _open_regular checks the type; safetensors maps the file and checks its header against it.
    with _open_regular(path), _parsing(path, "safetensors file"), safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        packed = {}
        if "jprune.packed" in meta:
            packed = _json_meta(
                path,
                meta,
                "jprune.packed",
                lambda v: (
                    isinstance(v, dict)
                    and all(k in keys for k in v)
                    and all(
                        x is None
                        or isinstance(x, list)
                        and len(x) == 2
                        and all(isinstance(y, str) for y in x)
                        and x[0] not in keys
                        for x in v.values()
                    )
                ),
                "a JSON object naming the file's packed tensors",
            )
        folded = [x[0] for x in packed.values() if x is not None]
        if len(set(folded)) != len(folded):
            raise ValueError(f"{path}: metadata 'jprune.packed' folds one mask into two tensors")
        order = keys + folded
        if "jprune.key_order" in meta:
            order = _json_meta(
                path,
                meta,
                "jprune.key_order",
                lambda v: (
                    isinstance(v, list)
                    and all(isinstance(k, str) for k in v)
                    and sorted(v) == sorted(keys + folded)
                ),
                "a JSON list of the file's tensor names",
            )
        tensors = {}
        for k in keys:
            t = f.get_tensor(k)
            if k in packed:
                tensors.update(_unpack_tensor(path, k, t, packed[k]))
            else:
                tensors[k] = t
        sd = OrderedDict((k, tensors[k]) for k in order)
    if "jprune.torch_metadata" in meta:
        versions = _json_meta(
            path,
            meta,
            "jprune.torch_metadata",
            lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
            "a JSON object of objects (torch's state_dict._metadata)",
        )
        sd._metadata = OrderedDict(versions.items())
    return _check_state_dict(sd, path)


def _unpack_tensor(path: str, key: str, t: torch.Tensor, fold) -> dict:
    """The tensors a packed record of a .safetensors file stands for: `{key: tensor}`, plus the
    folded mask `{mask key: mask}` for a "values" record."""
    name = f"{path}: tensor {key!r}"
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name} is {t.dtype} of shape {tuple(t.shape)}, expected a packed record (uint8)")
    record = t.numpy()
    kind = _packed.header(record, name).kind
    if (kind == "values") != (fold is not None):
        raise ValueError(
            f"{name}: a {kind!r} record, but the metadata {'names' if fold else 'does not name'} "
            "a mask folded into it"
        )
    mask_dtype = None
    if fold is not None:
        try:
            mask_dtype = _arrays.to_numpy(torch.empty(0, dtype=_arrays.torch_dtype(fold[1]))).dtype
        except ValueError:
            mask_dtype = None
        if mask_dtype is None or not _packed.supported(mask_dtype):
            raise ValueError(
                f"{name}: the mask folded into it has dtype {fold[1]!r}, not a torch dtype it can hold"
            )
    values, mask = _packed.unpack(record, name, mask_dtype=mask_dtype)
    if kind == "mask":
        return {key: _arrays.from_numpy(mask)}
    out = {key: _arrays.from_numpy(values)}
    if fold is not None:
        out[fold[0]] = _arrays.from_numpy(mask)
    return out


def _check_recipe(path: str, recipe) -> None:
    if not isinstance(recipe, str):
        raise ValueError(f"{path}: torch/recipe is a {type(recipe).__name__}, expected a JSON string")
    try:
        _convert._read_recipe(recipe)  # the recipe's own checks, where from_torch writes it
    except ValueError as e:
        raise ValueError(f"{path}: {e}; drop ckpt['torch'] to use default torch names") from None


def _check_tree(path: str, tree, where: str) -> None:
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: {where} is a {type(tree).__name__}, expected a dict")
    for k, v in tree.items():
        at = f"{where}/{k}"
        if not isinstance(k, str):
            raise ValueError(f"{path}: {where} has a key {k!r}, expected str keys")
        if isinstance(v, Mapping):
            _check_tree(path, v, at)
        elif not isinstance(v, np.ndarray) or v.dtype.kind not in "biufcV":
            got = type(v).__name__ if not isinstance(v, np.ndarray) else f"an array of dtype {v.dtype}"
            raise ValueError(f"{path}: {at} is {got}, expected a numeric array")


def _check_ckpt(ckpt, path) -> dict:
    """A complete, well-typed checkpoint dict (masks mirror params, None where unpruned), from
    what a file held or what `save` is given; ValueError naming the path and the leaf otherwise."""
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("params"), Mapping):
        raise ValueError(f"{path}: expected a checkpoint dict with a 'params' dict")
    unknown = [k for k in ckpt if k not in _CKPT_KEYS]
    if unknown:
        raise ValueError(
            f"{path}: unexpected checkpoint entries {unknown}; a jprune checkpoint holds only "
            f"{', '.join(_CKPT_KEYS)} (save the model's variables alone)"
        )
    params = ckpt["params"]
    _check_tree(path, params, "params")
    out = {"params": params}
    masks = ckpt.get("masks")
    if masks is not None:
        if not isinstance(masks, Mapping):
            raise ValueError(f"{path}: masks is a {type(masks).__name__}, expected a dict")
        for leaf_path, m in _convert._leaf_paths(masks):
            where = "masks/" + "/".join(leaf_path)
            p = _convert._tree_get(params, leaf_path)
            if m is None:
                continue
            if p is _convert._MISSING or isinstance(p, Mapping):
                raise ValueError(f"{path}: {where} has no params array at the same path")
            if not isinstance(m, np.ndarray) or m.dtype != np.bool_:
                got = f"dtype {m.dtype}" if isinstance(m, np.ndarray) else f"a {type(m).__name__}"
                raise ValueError(f"{path}: {where} is {got}, expected a bool array (False = pruned)")
            if m.shape != p.shape:
                raise ValueError(f"{path}: {where} has shape {m.shape}, expected {p.shape} (its params')")
        masks = {at: m for at, m in _convert._leaf_paths(masks) if m is not None}
    out["masks"] = _convert._mirror(params, masks or {})
    if ckpt.get("batch_stats") is not None:
        _check_tree(path, ckpt["batch_stats"], "batch_stats")
        out["batch_stats"] = ckpt["batch_stats"]
    torch_meta = ckpt.get("torch")
    if torch_meta is not None:
        if not isinstance(torch_meta, Mapping) or any(k not in ("recipe", "extra") for k in torch_meta):
            raise ValueError(f"{path}: torch is not a dict with only 'recipe' and 'extra'")
        if torch_meta.get("recipe") is not None:
            _check_recipe(path, torch_meta["recipe"])
        if torch_meta.get("extra") is not None:
            _check_tree(path, torch_meta["extra"], "torch/extra")
        out["torch"] = {k: v for k, v in torch_meta.items() if v is not None}
    return out


def _load_msgpack(path: str) -> dict:
    from flax import serialization

    data = _read_all(path)
    with _parsing(path, "msgpack checkpoint"):
        ckpt = serialization.msgpack_restore(data)
    del data
    if isinstance(ckpt, Mapping) and "format" in ckpt:
        if ckpt["format"] != _FORMAT:
            raise ValueError(
                f"{path}: expected a jprune checkpoint of format {_FORMAT!r}, got {ckpt['format']!r}"
            )
        ckpt = _packed.unpack_ckpt({k: v for k, v in ckpt.items() if k != "format"}, path)
    return _check_ckpt(ckpt, path)


class _OrbaxLeftovers(logging.Filter):
    """Drops what a failed orbax call's abandoned tensorstore futures log when collected
    ("Future exception was never retrieved"): the error already raised, again."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and "tensorstore" in message)


def _unraisable(unraisable) -> None:
    """Drops the callbacks a failed orbax call's tensorstore threads post to its event loop after
    orbax closed it ("Event loop is closed"); anything else goes to the previous hook."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs (to stderr) what it then raises, and after a failure its abandoned futures
    report the same error again, possibly later (even at exit): the error raised is the one
    message, so those reports are dropped."""
    global _previous_unraisablehook
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        if sys.unraisablehook is not _unraisable:
            _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _unraisable
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _OrbaxLeftovers) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_OrbaxLeftovers())
        raise
    finally:
        logger.setLevel(level)


def _orbax_meta(path: str) -> dict:
    """The jprune metadata of an orbax checkpoint directory; ValueError if it is not one."""
    meta_file = os.path.join(path, _ORBAX_META, "metadata")
    if not os.path.isdir(os.path.join(path, _ORBAX_STATE)) or not os.path.isfile(meta_file):
        raise ValueError(f"{path}: not an orbax checkpoint written by jprune (no '{_ORBAX_META}')")
    with _parsing(meta_file, "JSON file"):
        meta = json.loads(_read_all(meta_file))
    if not isinstance(meta, dict) or meta.get("format") not in _FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else "not a JSON object"
        raise ValueError(f"{meta_file}: expected jprune metadata of format {_FORMAT!r}, got {got!r}")
    return meta


def _check_orbax_dir(path: str) -> None:
    """Every entry is a regular file or a directory (tensorstore would block on a FIFO)."""
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            if stat.S_ISDIR(st.st_mode) and os.path.islink(full):
                raise ValueError(f"{full}: a symbolic link to a directory inside an orbax checkpoint")
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise ValueError(f"{full}: is {_file_type(st.st_mode)}, expected a checkpoint file")


def _load_orbax(path: str) -> dict:
    import jax
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        raise ValueError(f"{path}: an orbax checkpoint is a directory, this is not one")
    meta = _orbax_meta(path)
    _check_orbax_dir(path)
    state_dir = os.path.join(os.path.abspath(path), _ORBAX_STATE)  # orbax needs absolute paths
    with _parsing(path, "orbax checkpoint"), _quiet_orbax(), ocp.PyTreeCheckpointer() as pc:
        found = pc.metadata(state_dir)  # None when orbax cannot read it
        if found is None or found.item_metadata is None:
            raise ValueError(f"{path}: not a readable orbax checkpoint: no array metadata in {state_dir}")
        tree = found.item_metadata.tree
        declared = sum(
            int(np.prod(m.shape, dtype=object)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(tree)
        )
        if declared > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
            raise ValueError(f"{path}: declares {declared} bytes of arrays, more than this machine's memory")
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = pc.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    entries = (
        ("params", "masks", "batch_stats", "extra")
        if meta["format"] != _FORMAT
        else ("params", "packed", "batch_stats", "extra")
    )
    if not isinstance(state, Mapping) or any(k not in entries for k in state):
        raise ValueError(f"{path}: not an orbax checkpoint written by jprune (unexpected state entries)")
    ckpt = {"params": state.get("params", {}), "masks": state.get("masks", {})}
    if "batch_stats" in state:
        ckpt["batch_stats"] = state["batch_stats"]
    if meta.get("recipe") is not None or "extra" in state:
        ckpt["torch"] = {"recipe": meta.get("recipe"), "extra": state.get("extra")}
    if meta["format"] == _FORMAT:
        ckpt = _packed.unpack_ckpt({**ckpt, "packed": state.get("packed", {})}, path)
    return _check_ckpt(ckpt, path)


def load(path):
    """Reads a checkpoint file: a torch state_dict or a Flax checkpoint dict, by extension.

    `.pt`/`.pth` are read with `torch.load(weights_only=True)`, so a pickle that would run code is
    refused and never executed. Only regular files are read (never a FIFO or a device), never more
    than their size, and what was read is checked before it is returned.

    Args:
      path: a `.pt`, `.pth`, `.safetensors` or `.msgpack` file, or an orbax checkpoint directory.

    Returns:
      A state_dict (OrderedDict of tensors) for torch files; a dict with `params`, `masks` (a
      bool array or None per params leaf), ... for Flax files.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: an unknown extension, a path that is not a regular file (or directory, for
        orbax), or a truncated or malformed file; the message starts with the path.
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
    fmt = _format(path)
    if fmt in ("pt", "safetensors"):
        return load_torch(path)
    if fmt == "orbax":
        return _load_orbax(path)
    return _load_msgpack(path)


# --------------------------------------------------------------------------------------- writing

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _rename_exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step (Linux renameat2); False where the system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), b)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


_ASIDE = ".previous"  # where the fallback swap keeps the old orbax checkpoint for a moment


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_orphans(path: str) -> None:
    """Removes temporary directories a killed writer left for `path`: those named with this host
    and a process id that no longer exists (another live writer's are left alone). An old orbax
    checkpoint set aside by an interrupted fallback swap goes back to `path` if `path` is gone."""
    parent, base = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(base)}\.(\d+)@(.+)\.[A-Za-z0-9_]+\.tmp")
    host = socket.gethostname()
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        if m is None or m[2] != host or _alive(int(m[1])):
            continue
        work = os.path.join(parent, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(os.path.join(work, _ASIDE)) and not os.path.lexists(path):
                os.rename(os.path.join(work, _ASIDE), path)
        shutil.rmtree(work, ignore_errors=True)


def _sniff(path: str) -> str | None:
    """The format an existing regular file starts like, or None."""
    try:
        with _open_regular(path) as (f, size):
            head = f.read(9)
    except (OSError, ValueError):
        return None
    if head.startswith(b"PK\x03\x04"):
        return "pt"
    if len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:] == b"{":
        return "safetensors"
    if head[0] in range(0x80, 0x90) or head[0] in (0xDE, 0xDF):  # a msgpack map
        return "msgpack"
    return None


def _check_destination(path: str, fmt: str) -> None:
    """Refuses a destination whose replacement could destroy anything but a checkpoint of `fmt`."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{path}: the directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif fmt == "orbax":
        if not stat.S_ISDIR(st.st_mode):
            why = "exists and is not a directory"
        elif os.listdir(path):
            try:
                _orbax_meta(path)
            except (OSError, ValueError):
                why = "is a directory that is not a jprune orbax checkpoint"
    elif not stat.S_ISREG(st.st_mode):
        why = f"exists and is {_file_type(st.st_mode)}"
    elif _sniff(path) != fmt:
        why = f"exists and is not a {fmt} checkpoint"
    if why:
        raise ValueError(
            f"{path}: {why}; refusing to replace it (only a checkpoint of the same format is "
            "replaced): remove it or choose another path"
        )


def _errno_of(e: BaseException) -> int | None:
    """The OS error behind a failed write (torch, safetensors and tensorstore each wrap it)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"os error (\d+)|os_error_code='(\d+)'", str(e))
    return int(m[1] or m[2]) if m else None


@contextlib.contextmanager
def _atomic(path: str, *, directory: bool):
    """Yields a temporary path next to `path`; if the block completes, moves it onto `path`.

    Files move with `os.replace`. A directory replacing an existing one is swapped with it in
    one step (renameat2 RENAME_EXCHANGE), so a crash leaves either checkpoint at `path`, never
    none; where the system cannot exchange, the old one is renamed aside and back on failure
    (should that fail too, or the process die in between, the next save to `path` puts it back).
    The temporary directory (and, after a swap, the old checkpoint) is removed at the end.
    """
    parent, base = os.path.split(path)
    work = tempfile.mkdtemp(prefix=f".{base}.{_owner()}.", suffix=".tmp", dir=parent)
    new, aside = os.path.join(work, base), os.path.join(work, _ASIDE)
    try:
        try:
            yield new
        except Exception as e:
            code = _errno_of(e)
            why = f"{os.strerror(code)} [Errno {code}]" if code else _first_line(e)
            error = OSError(f"{path}: could not write the checkpoint: {why}; nothing was changed")
            error.errno = code
            raise error from e
        if not directory or not os.path.lexists(path):
            os.replace(new, path)
        elif not _rename_exchange(new, path):
            os.rename(path, aside)
            try:
                os.rename(new, path)
            except BaseException:
                os.rename(aside, path)
                raise
    finally:
        if not (os.path.isdir(aside) and not os.path.lexists(path)):  # else _clean_orphans restores it
            shutil.rmtree(work, ignore_errors=True)


def _binary(key: str, t: torch.Tensor) -> np.ndarray | None:
    """`t != 0` as bool if every entry of `t` is exactly 0 or 1 (bit for bit) and a packed
    record can restore its dtype, else None."""
    if not _packed.supported(_arrays.to_numpy(torch.empty(0, dtype=t.dtype)).dtype):
        return None
    try:
        return _arrays.bool_mask(key, t, None)
    except ValueError:
        return None


def _packed_tensors(sd: Mapping, compact: bool) -> tuple[dict, dict]:
    """The tensors a jprune .safetensors file stores for `sd`, and its `jprune.packed` metadata:
    every binary `X_mask` becomes a "mask" record; with `compact`, a binary `X_mask` beside an
    `X_orig` of its shape folds into a "values" record of `X_orig` (metadata: the mask's key and
    dtype), and other tensors at least half zeros become "zeros" records."""

    def record(r: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(r), dtype=torch.uint8)

    folded, packed, tensors = {}, {}, {}
    if compact:
        for key, t in sd.items():
            mask_key = f"{key[:-5]}_mask"
            if key.endswith("_orig") and mask_key in sd and sd[mask_key].shape == t.shape:
                m = _binary(mask_key, sd[mask_key])
                if m is not None and _packed.supported(_arrays.to_numpy(torch.empty(0, dtype=t.dtype)).dtype):
                    folded[key], folded[mask_key] = (mask_key, m), None
    for key, value in sd.items():
        if key in folded:
            if folded[key] is not None:
                mask_key, m = folded[key]
                v = _arrays.to_numpy(value.detach().cpu().contiguous())
                tensors[key] = record(_packed.pack_values(v, m))
                packed[key] = [mask_key, _arrays.dtype_name(sd[mask_key].dtype)]
            continue
        m = _binary(key, value) if key.endswith("_mask") else None
        if m is not None:
            dtype = _arrays.to_numpy(torch.empty(0, dtype=value.dtype)).dtype
            tensors[key], packed[key] = record(_packed.pack_mask(m, dtype)), None
            continue
        if compact:
            v = _arrays.to_numpy(value.detach().cpu().contiguous())
            nonzero = _packed.mostly_zero(v)
            if nonzero is not None:
                tensors[key], packed[key] = record(_packed.pack_values(v, nonzero, kind="zeros")), None
                continue
        tensors[key] = value
    return tensors, packed


def _save_safetensors(sd: Mapping, path: str, *, compact: bool = False) -> None:
    from safetensors.torch import save_file

    stored, packed = _packed_tensors(sd, compact)
    tensors, seen = {}, set()
    for key, value in stored.items():
        value = value.detach().cpu().contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ptr in seen:  # safetensors refuses shared (tied) tensors
            value = value.clone()
        seen.add(ptr)
        tensors[key] = value
    meta = {"jprune.key_order": json.dumps(list(sd))}
    if packed:
        meta["jprune.packed"] = json.dumps(packed)
    if getattr(sd, "_metadata", None) is not None:
        meta["jprune.torch_metadata"] = json.dumps({k: dict(v) for k, v in sd._metadata.items()})
    save_file(tensors, path, metadata=meta)


def _save_pt(sd: Mapping, path: str) -> None:
    with open(path, "wb") as f:  # a file object: a failed write surfaces as OSError with errno
        torch.save(sd, f)


def _empty_dict(x) -> bool:
    return isinstance(x, Mapping) and not x


def _prune_none(tree):
    if isinstance(tree, Mapping):
        out = {k: _prune_none(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not _empty_dict(v)}
    return tree


def _save_orbax(ckpt: dict, path: str, *, compact: bool = False) -> None:
    import orbax.checkpoint as ocp

    torch_meta = ckpt.get("torch") or {}
    stored = _packed.pack_ckpt(ckpt, compact=compact, blob=lambda r: np.frombuffer(r, np.uint8))
    state = {"params": stored["params"], "packed": stored["packed"]}
    if ckpt.get("batch_stats"):
        state["batch_stats"] = ckpt["batch_stats"]
    if torch_meta.get("extra"):
        state["extra"] = torch_meta["extra"]
    state = _prune_none(state)
    meta = {"format": _FORMAT, "recipe": torch_meta.get("recipe")}
    with _quiet_orbax(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(
            path,
            ocp.args.Composite(
                **{_ORBAX_STATE: ocp.args.PyTreeSave(state), _ORBAX_META: ocp.args.JsonSave(meta)}
            ),
        )


def _save_msgpack(ckpt: dict, path: str, *, compact: bool = False) -> None:
    from flax import serialization

    data = serialization.msgpack_serialize({"format": _FORMAT, **_packed.pack_ckpt(ckpt, compact=compact)})
    with open(path, "wb") as f:
        f.write(data)


def _numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    if tree is None or isinstance(tree, str | bytes):
        return tree
    return np.asarray(tree)


def _destination(path) -> str:
    path = os.fspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base in ("", ".", ".."):
        raise ValueError(
            f"{path!r}: names no checkpoint (empty, '.' or '..'); give the checkpoint's own file "
            "or directory name"
        )
    return os.path.abspath(path.rstrip("/"))


def _check_compact(path: str, fmt: str) -> None:
    if fmt == "pt":
        raise ValueError(
            f"{path}: a compact checkpoint is written as .safetensors, .msgpack or an orbax "
            "directory (torch.load reads .pt files, and it knows no compact tensors)"
        )


def check_destination(path, *, compact: bool = False) -> str:
    """The format a save to ``path`` writes, after refusing a destination it may not replace
    (or, with `compact`, a format that cannot be compact)."""
    path = _destination(path)
    fmt = _format(path)
    if compact:
        _check_compact(path, fmt)
    _check_destination(path, fmt)
    return fmt


def save(obj, path, *, compact: bool = False) -> None:
    """Writes a torch state_dict or a Flax checkpoint dict, in the format the extension names.

    The write is atomic: the data goes to a temporary directory next to `path` and is moved onto
    `path` only once complete, so a failure (a full disk included) never leaves a half-written
    output and never changes an existing one. An existing `path` is replaced only if it is a
    checkpoint of the same format (for orbax: a jprune orbax directory, or an empty directory);
    anything else there is refused untouched. A state_dict goes to `.pt`/`.pth`/`.safetensors`
    (key order kept); a checkpoint dict (as `from_torch` returns) goes to `.msgpack` or an orbax
    directory.

    `.msgpack`, orbax and `.safetensors` store masks packed (see `_packed`): 1 bit per entry,
    deflated when that is shorter, plus a header of ~40 bytes; `load` gives back exactly what was
    saved (a float `X_mask` of a state_dict too, bit for bit; one that is not all 0/1 stays dense).

    With `compact=True` only what the effective weights need is stored: a masked leaf (a state_dict's
    `X_orig` with its `X_mask`) keeps only its kept values plus its packed mask, and an unmasked
    leaf at least half zeros (e.g. after `jprune.remove`) keeps only its nonzero values plus where
    they are. The values of pruned entries are dropped: they load as zeros, so `apply_masks` (and
    torch's `X_orig * X_mask`) gives the same effective weights and every output is the same, but
    `X_orig` itself is not the saved one; zeros come back as +0.0 (a -0.0 left by `remove` loses
    its sign). Loading gives an ordinary checkpoint dict or state_dict.

    Args:
      obj: a state_dict (str -> Tensor) or a checkpoint dict with `params`.
      path: the output path; its extension picks the format.
      compact: store only the kept values (not for `.pt`/`.pth`, which `torch.load` reads).

    Raises:
      ValueError: an unknown extension; a destination that is not a checkpoint of that format;
        a checkpoint dict that `load` would refuse (e.g. a non-bool mask).
      TypeError: `obj` does not suit the format (e.g. a checkpoint dict for a `.pt` file).
      OSError: the write failed (e.g. no space left); nothing was changed.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from jprune.interop import load, save
      >>> path = os.path.join(tempfile.mkdtemp(), "m.msgpack")
      >>> save({"params": {"w": np.ones(2, np.float32)}, "masks": {"w": None}}, path)
      >>> load(path)["masks"]
      {'w': None}
      >>> w = np.arange(1000, dtype=np.float32)
      >>> save({"params": {"w": w}, "masks": {"w": w % 10 == 0}}, path, compact=True)
      >>> os.path.getsize(path) < w.nbytes // 7, load(path)["params"]["w"][:11].tolist()
      (True, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    """
    path = _destination(path)
    fmt = _format(path)
    if fmt in ("pt", "safetensors"):
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise TypeError(
                f"{path}: a torch file holds a state_dict (str -> Tensor); convert a Flax "
                "checkpoint with to_torch first"
            )
        _check_state_dict(obj, path)
        write = _save_pt if fmt == "pt" else _save_safetensors
    else:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("params"), Mapping):
            raise TypeError(
                f"{path}: a Flax file holds a checkpoint dict with 'params'; convert a state_dict "
                "with from_torch first"
            )
        obj = _check_ckpt(_numpy_tree(dict(obj)), path)
        write = _save_orbax if fmt == "orbax" else _save_msgpack
    if compact:
        _check_compact(path, fmt)
    _check_destination(path, fmt)
    _clean_orphans(path)
    with _atomic(path, directory=fmt == "orbax") as tmp:
        write(obj, tmp, **({"compact": compact} if fmt != "pt" else {}))
