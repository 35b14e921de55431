"""Bit-exact torch.Tensor <-> numpy conversion, including dtypes numpy lacks (bf16, float8)."""

import ml_dtypes
import numpy as np
import torch

# torch dtypes without a numpy counterpart travel as same-width integers and are re-labelled with
# the ml_dtypes type (the one JAX uses), so no value is ever converted, only reinterpreted.
_BIT_VIEWS = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.int8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.int8, np.dtype(ml_dtypes.float8_e5m2)),
    torch.float8_e4m3fnuz: (torch.int8, np.dtype(ml_dtypes.float8_e4m3fnuz)),
    torch.float8_e5m2fnuz: (torch.int8, np.dtype(ml_dtypes.float8_e5m2fnuz)),
}
_FROM_NUMPY = {np_dtype: (int_dtype, t) for t, (int_dtype, np_dtype) in _BIT_VIEWS.items()}
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `"float32"`."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """`"float32"` -> `torch.float32`; ValueError for a name torch does not know."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Expected a torch dtype name, got {name!r}")
    return dtype


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy), with the bits unchanged."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in _BIT_VIEWS:
        int_dtype, np_dtype = _BIT_VIEWS[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype)
    try:
        return t.numpy()
    except TypeError as e:  # e.g. quantized or complex32 tensors
        raise ValueError(f"Expected a tensor numpy can hold, got dtype {t.dtype}") from e


def to_torch(a) -> torch.Tensor:
    """A fresh, writable, contiguous CPU tensor with the bits of `a` (numpy or JAX array)."""
    a = np.array(a, copy=True, order="C")
    if a.dtype in _FROM_NUMPY:
        int_dtype, dtype = _FROM_NUMPY[a.dtype]
        return torch.from_numpy(a.view(np.dtype(str(int_dtype).removeprefix("torch.")))).view(dtype)
    return torch.from_numpy(a)


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of C-contiguous numpy array `a` (bf16 and float8 included)."""
    if a.dtype in _FROM_NUMPY:
        int_dtype, dtype = _FROM_NUMPY[a.dtype]
        return torch.from_numpy(a.view(np.dtype(str(int_dtype).removeprefix("torch.")))).view(dtype)
    return torch.from_numpy(a)


def to_torch_dtype(a: np.ndarray) -> torch.dtype:
    """The torch dtype that holds the values of numpy array `a` exactly."""
    if a.dtype in _FROM_NUMPY:
        return _FROM_NUMPY[a.dtype][1]
    return torch.from_numpy(np.empty(0, a.dtype)).dtype


def is_tensor(x) -> bool:
    """True for a torch.Tensor (Parameters included)."""
    return isinstance(x, torch.Tensor)


def _transpose2d(a: np.ndarray, tile: int = 128) -> np.ndarray:
    """`a.T` as a new C-contiguous array, copied tile by tile (cache-friendly, ~2x numpy's)."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[j : j + tile, i : i + tile] = a[i : i + tile, j : j + tile].T
    return out


def permuted(t: torch.Tensor, perm: tuple[int, ...] | None, *, copy: bool) -> np.ndarray:
    """A C-contiguous numpy array of `t.permute(perm)`; a view of `t` when no copy is needed.

    Never a strided view: consumers that ignore strides (DLPack importers) must see the layout
    the shape promises.
    """
    t = t.detach()
    if perm is None:
        out = t.contiguous()
        if copy and out.data_ptr() == t.data_ptr():
            out = out.clone()
        return to_numpy(out)
    if perm == (1, 0):
        return _transpose2d(to_numpy(t))
    out = torch.empty([t.shape[i] for i in perm], dtype=t.dtype)
    out.copy_(t.permute(perm))
    return to_numpy(out)


def bool_mask(key: str, mask: torch.Tensor, perm: tuple[int, ...] | None) -> np.ndarray:
    """`mask != 0` as a bool array in the layout `perm`; ValueError unless every entry is 0 or 1.

    A float mask is compared bitwise with 1.0, and the count of exact ones must equal the count
    of nonzero bit patterns, so -0.0, NaN, 0.5 or 2 are caught and the round trip back to the
    mask dtype is bit-exact.
    """
    mask = mask.detach().cpu()
    if mask.is_complex():
        raise ValueError(f"mask '{key}' has dtype {mask.dtype}, expected a real or bool dtype")
    if mask.dtype == torch.bool:
        bits, one = mask, True
    elif mask.is_floating_point():
        bits = mask.view(_INT_OF_WIDTH[mask.element_size()])
        one = torch.ones((), dtype=mask.dtype).view(bits.dtype).item()
    else:
        bits, one = mask, 1
    bits_np = bits.contiguous().numpy()
    ones = bits_np == one
    if mask.dtype != torch.bool and np.count_nonzero(ones) != np.count_nonzero(bits_np.astype(bool)):
        flat_bits, flat = bits_np.reshape(-1), mask.reshape(-1)
        bad = int(np.flatnonzero((flat_bits != 0) & (flat_bits != one))[0])
        raise ValueError(
            f"mask '{key}' is not binary: entry {bad} (row-major) is {flat[bad].item()!r}; "
            "expected only 0 and 1 (torch's custom_from_mask allows other values, jprune masks "
            "are bool)"
        )
    if perm is None:
        return ones
    return torch.from_numpy(ones).permute(perm).contiguous().numpy()
