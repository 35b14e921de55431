"""Packed tensors: a mask at 1 bit per entry (deflated), or only the kept values plus that mask.

One record per tensor, a self-describing byte string (a msgpack `bin`, a `uint8` array in orbax
and safetensors):

    header (little-endian)   b"JPRB", version 1, kind, dtype code, ndim, mask encoding,
                             kept (u64), mask bytes (u64), shape (u64 x ndim)
    mask                     the row-major entries as bits (numpy.packbits, zero padding),
                             stored as is (encoding 0) or zlib-deflated (1), whichever is shorter
    values                   kinds "values"/"zeros" only: the kept entries, row-major, `kept` of
                             them in the dtype

    kind 0 "mask"    a mask alone; decodes to an array of the dtype (bool, or torch's float mask)
    kind 1 "values"  a pruned tensor: its kept values and its mask; decodes to the values with
                     zeros where pruned, and the bool mask
    kind 2 "zeros"   an unmasked tensor that is mostly zeros (e.g. after `remove`): the nonzero
                     values and where they are; decodes to the values alone

Reading checks everything the header declares against the bytes that follow before allocating
(sizes, the machine's memory, the bit count against the value count, zero padding, a complete
and exactly consumed zlib stream) and decodes in slices straight into the output arrays, so no
full-size temporary is made. Every refusal is a ValueError naming the tensor.
"""

import struct
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

from . import _convert

MAGIC = b"JPRB"
VERSION = 1
KINDS = ("mask", "values", "zeros")
_HEAD = struct.Struct("<4sBBBBBxxxQQ")  # magic, version, kind, dtype, ndim, encoding; kept, mask bytes
_DIM = struct.Struct("<Q")
_MAX_NDIM = 32
_ZLIB_LEVEL = 1  # measured on a 90 %-pruned 1e8 mask: level 6 saves 4 % of its bytes for 8x the time
_SLICE = 1 << 16  # packed mask bytes decoded at a time (512 Ki entries: stays in cache)

# Codes are part of the format: append, never reorder.
_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


_CODE = {_np_dtype(name): code for code, name in enumerate(_DTYPES)}


class Header(NamedTuple):
    """What a record declares: kind ("mask"/"values"/"zeros"), dtype, shape, kept count, and the
    byte counts of the record, its mask, and its values."""

    kind: str
    dtype: np.dtype
    shape: tuple[int, ...]
    kept: int
    nbytes: int
    mask_nbytes: int
    encoding: int
    start: int  # where the mask begins

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=object))

    @property
    def dense_nbytes(self) -> int:
        """The bytes of the tensor(s) it decodes to, dense (a mask as its dtype, values without it)."""
        return self.size * self.dtype.itemsize


def supported(dtype) -> bool:
    """Whether a record can hold arrays of `dtype`."""
    return np.dtype(dtype) in _CODE


# ------------------------------------------------------------------------------------- encoding


def _record(kind: str, dtype: np.dtype, shape, mask: np.ndarray, values: np.ndarray | None) -> bytes:
    bits = np.packbits(mask.reshape(-1))
    deflated = zlib.compress(bits, _ZLIB_LEVEL)
    encoding, payload = (1, deflated) if len(deflated) < bits.nbytes else (0, bits)
    kept = int(np.count_nonzero(mask)) if values is None else values.size
    head = _HEAD.pack(
        MAGIC, VERSION, KINDS.index(kind), _CODE[np.dtype(dtype)], len(shape), encoding, kept, len(payload)
    )
    parts = [head, *(_DIM.pack(d) for d in shape), payload]
    if values is not None:
        parts.append(np.ascontiguousarray(values).view(np.uint8).data)
    return b"".join(parts)


def pack_mask(mask: np.ndarray, dtype=np.bool_) -> bytes:
    """A kind-"mask" record of a bool mask; it decodes to `mask.astype(dtype)`.

    Examples:
      >>> import numpy as np
      >>> rec = pack_mask(np.arange(20) % 3 == 0)
      >>> len(rec) < 60, unpack(rec, "m")[1].nonzero()[0].tolist()
      (True, [0, 3, 6, 9, 12, 15, 18])
    """
    return _record("mask", np.dtype(dtype), mask.shape, mask, None)


def pack_values(values: np.ndarray, mask: np.ndarray, *, kind: str = "values") -> bytes:
    """A kind-"values" record (the entries of `values` where `mask`, and `mask`) or, with
    kind="zeros", a record of an unmasked tensor whose entries outside `mask` are zero."""
    kept = values.reshape(-1)[mask.reshape(-1)]
    return _record(kind, values.dtype, values.shape, mask, kept)


def packed_nbytes(values: np.ndarray, mask: np.ndarray) -> int:
    """An upper bound on the size of `pack_values(values, mask)` (the mask not deflated)."""
    kept = int(np.count_nonzero(mask))
    return _HEAD.size + _DIM.size * values.ndim + -(-values.size // 8) + kept * values.dtype.itemsize


# ------------------------------------------------------------------------------------- decoding


def _memory() -> int:
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def header(record, name: str) -> Header:
    """The checked header of a record (a bytes-like object); ValueError naming `name` if the
    header is malformed or declares sizes the record's length does not have."""
    buf = memoryview(record).cast("B")
    if len(buf) < _HEAD.size:
        raise ValueError(f"{name}: packed record of {len(buf)} bytes, shorter than its header")
    magic, version, kind, code, ndim, encoding, kept, mask_nbytes = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise ValueError(f"{name}: not a packed record (bad magic {bytes(magic)!r})")
    if version != VERSION:
        raise ValueError(f"{name}: packed record version {version}, this jprune reads {VERSION}")
    if kind >= len(KINDS) or code >= len(_DTYPES) or ndim > _MAX_NDIM or encoding > 1:
        raise ValueError(
            f"{name}: bad packed record header (kind {kind}, dtype code {code}, ndim {ndim}, "
            f"mask encoding {encoding})"
        )
    start = _HEAD.size + _DIM.size * ndim
    if len(buf) < start:
        raise ValueError(f"{name}: packed record truncated in its shape")
    shape = tuple(_DIM.unpack_from(buf, _HEAD.size + _DIM.size * i)[0] for i in range(ndim))
    h = Header(KINDS[kind], _np_dtype(_DTYPES[code]), shape, kept, len(buf), mask_nbytes, encoding, start)
    values_nbytes = 0 if h.kind == "mask" else kept * h.dtype.itemsize
    if h.dense_nbytes + h.size > _memory():
        raise ValueError(f"{name}: declares shape {shape} of {h.dtype}, more than this machine's memory")
    if kept > h.size:
        raise ValueError(f"{name}: declares {kept} kept entries of {h.size}")
    packed = -(-h.size // 8)
    if encoding == 0 and mask_nbytes != packed:
        raise ValueError(f"{name}: declares {mask_nbytes} mask bytes, {h.size} entries need {packed}")
    if start + mask_nbytes + values_nbytes != len(buf):
        raise ValueError(
            f"{name}: packed record of {len(buf)} bytes, its header declares "
            f"{start + mask_nbytes + values_nbytes} ({mask_nbytes} of mask, {values_nbytes} of "
            f"values) (truncated or damaged?)"
        )
    return h


def _bit_slices(buf: memoryview, h: Header, name: str):
    """The packed mask in slices of at most `_SLICE` bytes, inflated as it goes; checks that the
    stream is complete, exactly as long as the mask, and fully consumed."""
    data = buf[h.start : h.start + h.mask_nbytes]
    want = -(-h.size // 8)
    if h.encoding == 0:
        for i in range(0, want, _SLICE):
            yield np.frombuffer(data[i : i + _SLICE], np.uint8)
        return
    z, got, at = zlib.decompressobj(), 0, 0
    try:
        while got < want:
            if z.unconsumed_tail:
                chunk = z.decompress(z.unconsumed_tail, min(_SLICE, want - got))
            elif at < len(data):
                step = data[at : at + _SLICE]
                at += len(step)
                chunk = z.decompress(step, min(_SLICE, want - got))
            else:
                break
            got += len(chunk)
            if chunk:
                yield np.frombuffer(chunk, np.uint8)
        if got == want and not z.eof:  # the stream's end marker may still be ahead
            rest = z.unconsumed_tail + bytes(data[at:])
            at = len(data)
            if z.decompress(rest, 1):
                got += 1
    except zlib.error as e:
        raise ValueError(f"{name}: damaged mask stream ({e})") from None
    if got != want or not z.eof or z.unused_data or z.unconsumed_tail or at != len(data):
        raise ValueError(
            f"{name}: the mask stream holds {f'more than {want}' if got > want else got} bytes "
            f"{'' if z.eof else '(incomplete) '}for {h.size} entries ({want} bytes) (truncated or damaged?)"
        )


def unpack(record, name: str, *, mask_dtype=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Decodes a record: `(None, mask)` for kind "mask" (the mask in its recorded dtype),
    `(values, mask)` for "values" (zeros where pruned; the mask bool, or `mask_dtype`),
    `(values, None)` for "zeros". The outputs are the only full-size arrays it allocates.

    Raises:
      ValueError: naming `name`, for a malformed header, sizes that disagree with the record's
        length, a damaged or truncated mask stream, nonzero padding bits, or a mask whose count
        of kept entries differs from the count of values.
    """
    h = header(record, name)
    buf = memoryview(record).cast("B")
    n = h.size
    mask_dtype = np.dtype(h.dtype if h.kind == "mask" else mask_dtype or np.bool_)
    mask = None if h.kind == "zeros" else np.empty(n, mask_dtype)
    values = None if h.kind == "mask" else np.zeros(n, h.dtype)
    if values is not None:
        kept_values = np.frombuffer(buf[h.start + h.mask_nbytes :], np.uint8).view(h.dtype)
    pos = seen = 0
    for bits in _bit_slices(buf, h, name):
        count = min(bits.size * 8, n - pos)
        if count < bits.size * 8 and bits[-1] & (0xFF >> (count % 8)):
            raise ValueError(f"{name}: nonzero padding bits after the mask's {n} entries")
        chunk = np.unpackbits(bits, count=count).view(np.bool_)
        if mask is not None:
            mask[pos : pos + count] = chunk
        k = int(np.count_nonzero(chunk))
        if seen + k > h.kept:
            raise ValueError(f"{name}: the mask keeps more than the {h.kept} entries its record declares")
        if values is not None:
            np.place(values[pos : pos + count], chunk, kept_values[seen : seen + k])
        pos, seen = pos + count, seen + k
    if seen != h.kept:
        raise ValueError(f"{name}: the mask keeps {seen} entries, its record declares {h.kept}")
    return (
        None if values is None else values.reshape(h.shape),
        None if h.kind == "zeros" else mask.reshape(h.shape),
    )


# ------------------------------------------------------------------------- checkpoints and files


def mostly_zero(p: np.ndarray) -> np.ndarray | None:
    """The nonzero entries of an unmasked leaf at least half zeros (one a "zeros" record makes
    smaller), else None."""
    if p.dtype == np.bool_ or not supported(p.dtype) or p.size == 0:
        return None
    nonzero = p != 0
    if 2 * np.count_nonzero(nonzero) > p.size or packed_nbytes(p, nonzero) >= p.nbytes:
        return None
    return nonzero


def pack_ckpt(ckpt: Mapping, *, compact: bool, blob=bytes) -> dict:
    """The stored form of a checked checkpoint dict: every mask becomes a record under
    `"packed"` (at its params path); with `compact`, each masked leaf becomes a "values" record
    there instead (its params entry None) and each unmasked leaf at least half zeros a "zeros"
    record. `blob` wraps a record (bytes for msgpack, a uint8 array for orbax)."""
    params, packed = {}, {}
    masks = {path: m for path, m in _convert._leaf_paths(ckpt["masks"]) if m is not None}
    for path, p in _convert._leaf_paths(ckpt["params"]):
        m = masks.get(path)
        record = None
        if compact and m is not None and supported(p.dtype):
            record, p = pack_values(p, m), None
        elif compact and m is None and (nonzero := mostly_zero(p)) is not None:
            record, p = pack_values(p, nonzero, kind="zeros"), None
        elif m is not None:
            record = pack_mask(m)
        _convert._tree_set(params, path, p)
        if record is not None:
            _convert._tree_set(packed, path, blob(record))
    stored = {k: v for k, v in ckpt.items() if k not in ("params", "masks")}
    return {"params": params, "packed": packed, **stored}


def _records(tree, where: str):
    if not isinstance(tree, Mapping):
        raise ValueError(f"{where} is a {type(tree).__name__}, expected a dict")
    yield from _convert._leaf_paths(tree)


def unpack_ckpt(stored: Mapping, where: str) -> dict:
    """A checkpoint dict from its stored form (the inverse of `pack_ckpt`); ValueError naming
    `where` and the record's path when a record is malformed or does not fit its params."""
    ckpt = {k: v for k, v in stored.items() if k != "packed"}
    params = ckpt.get("params")
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: expected a checkpoint dict with a 'params' dict")
    params = ckpt["params"] = _copy_tree(params)
    masks = {}
    for path, record in _records(stored.get("packed", {}), f"{where}: packed"):
        name = f"{where}: packed/{'/'.join(path)}"
        if not isinstance(record, bytes | np.ndarray) or (
            isinstance(record, np.ndarray) and (record.dtype != np.uint8 or record.ndim != 1)
        ):
            got = f"a {record.dtype} array" if isinstance(record, np.ndarray) else type(record).__name__
            raise ValueError(f"{name} is {got}, expected a packed record (bytes)")
        h = header(record, name)
        p = _convert._tree_get(params, path)
        if any(
            not isinstance(_convert._tree_get(params, path[:i]), Mapping | type(_convert._MISSING))
            for i in range(1, len(path))
        ):
            raise ValueError(f"{name}: a record below a params array")
        if h.kind == "mask":
            if h.dtype != np.bool_:
                raise ValueError(f"{name}: a Flax mask record of dtype {h.dtype}, expected bool")
            if not isinstance(p, np.ndarray) or p.shape != h.shape:
                got = f"shape {p.shape}" if isinstance(p, np.ndarray) else "none"
                raise ValueError(f"{name}: a mask of shape {h.shape}, its params array has {got}")
            masks[path] = unpack(record, name)[1]
            continue
        if p is not None and p is not _convert._MISSING:
            raise ValueError(f"{name}: a {h.kind} record where params also holds an entry")
        values, mask = unpack(record, name)
        _convert._tree_set(params, path, values)
        if mask is not None:
            masks[path] = mask
    ckpt["masks"] = _convert._mirror(params, masks)
    return ckpt


def _copy_tree(tree):
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
