"""Pruning amounts: torch's validation and its count rule, on the host and inside jit.

An ``amount`` is an integer count or a fraction in ``[0, 1]``. Integer versus fraction is decided by
*type* (``1`` prunes one unit, ``1.0`` prunes everything), exactly as in ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

MAX_COUNT = 2**31 - 1  # counts are int32


def is_traced(amount) -> bool:
    """True for an amount only known on the device (a traced JAX scalar, under jit)."""
    return isinstance(amount, jax.core.Tracer)


def validate(amount):
    """Check ``amount`` as torch does when a pruning method is constructed; returns it.

    A concrete JAX scalar (outside jit) is checked and returned as the Python number of its value,
    so ``jnp.float32(1.5)``, ``jnp.array(-3)`` or NaN get the errors a Python number gets. A traced
    scalar is only checked for shape and dtype (its value is known on the device alone).

    Raises:
      TypeError: ``amount`` is not a real number (or is a ``bool``, which torch cannot use either),
        or is a JAX array that is not an int or float scalar.
      ValueError: a negative integer, or a fraction outside ``[0, 1]``.
    """
    if isinstance(amount, jax.Array):
        if jnp.ndim(amount) != 0:
            raise TypeError(f"A JAX array amount must be a scalar, got shape {jnp.shape(amount)}.")
        dtype = jnp.result_type(amount)
        integer, floating = jnp.issubdtype(dtype, jnp.integer), jnp.issubdtype(dtype, jnp.floating)
        if not (integer or floating):
            raise TypeError(f"Invalid dtype for amount: {dtype}. Must be an int or float scalar.")
        if is_traced(amount):
            return amount
        amount = int(amount) if integer else float(amount)
    # torch accepts bool here and then fails inside topk/kthvalue; refusing it early is clearer.
    if isinstance(amount, bool | np.bool_) or not isinstance(amount, numbers.Real):
        raise TypeError(f"Invalid type for amount: {amount}. Must be int or float.")
    if (isinstance(amount, numbers.Integral) and amount < 0) or (
        not isinstance(amount, numbers.Integral) and (float(amount) > 1.0 or float(amount) < 0.0)
    ):
        raise ValueError(
            f"amount={amount} should either be a float in the range [0, 1] or a non-negative integer"
        )
    return amount


def count(amount, n: int) -> int:
    """Number of units to prune out of ``n`` candidates, torch's rule (host Python).

    An integer is a count; a fraction gives ``round(amount * n)`` exactly as torch computes it:
    Python's banker's rounding of the product in the amount's own arithmetic (a double for a
    float, so 0.07 * 150 -> 11; float32 for ``np.float32``; exact for a ``Fraction``).

    Raises:
      ValueError: the count exceeds ``n``, or the amount is NaN.

    Examples:
      >>> count(0.5, 5), count(0.07, 150), count(3, 10)
      (2, 11, 3)
    """
    if isinstance(amount, numbers.Integral):
        k = int(amount)
    else:
        k = int(round(amount * n))  # ValueError("cannot convert float NaN to integer") for NaN
    if k > n:
        raise ValueError(f"amount={k} should be smaller than the number of parameters to prune={n}")
    return k


def _mul_u32(a, b):
    """Exact 32x32 -> 64-bit unsigned product as (hi, lo) uint32 words."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = (p00 & 0xFFFF) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


# Multi-word unsigned integers: little-endian lists of uint32 scalars; shifts are traced int32.
_U = jnp.uint32


def _shl32(x, b):
    return jnp.where(b >= 32, _U(0), x << jnp.minimum(b, 31).astype(_U))


def _shr32(x, b):
    return jnp.where(b >= 32, _U(0), x >> jnp.minimum(b, 31).astype(_U))


def _shr(words, sh):
    """``words >> sh`` (same number of words)."""
    padded = jnp.stack([*words, *[_U(0)] * (len(words) + 1)])
    w, b = sh // 32, sh % 32
    out = []
    for i in range(len(words)):
        lo = padded[jnp.minimum(i + w, 2 * len(words))]
        hi = padded[jnp.minimum(i + w + 1, 2 * len(words))]
        out.append(_shr32(lo, b) | jnp.where(b == 0, _U(0), _shl32(hi, 32 - b)))
    return out


def _any_below(words, nbits):
    """True if any bit below position ``nbits`` is set."""
    found = jnp.bool_(False)
    for j, x in enumerate(words):
        low = jnp.clip(nbits - 32 * j, 0, 32)
        found |= (x & jnp.where(low >= 32, _U(0xFFFFFFFF), _shl32(_U(1), low) - 1)) != 0
    return found


def _round_shift(words, sh):
    """``words / 2**sh`` rounded half to even (``sh >= 0``)."""
    s1 = jnp.maximum(sh, 1)
    q2 = _shr(words, s1 - 1)
    half = (q2[0] & 1) == 1
    q = _shr(q2, 1)
    up = half & (_any_below(words, s1 - 1) | ((q[0] & 1) == 1))
    out, carry = [], up.astype(_U)
    for x in q:
        y = x + carry
        carry = (y < x).astype(_U)
        out.append(y)
    return [jnp.where(sh == 0, x, y) for x, y in zip(words, out)]


def _bitlen(x):
    return 32 - jax.lax.clz(x).astype(jnp.int32)


def _fraction_words(a):
    """A traced fraction as words ``(m_hi, m_lo, s, p)``: ``a == (m_hi * 2**32 + m_lo) / 2**s``
    exactly (float64 kept as float64, narrower floats through float32), its product to be rounded
    to ``p = 53`` bits (a double, as Python's ``round(a * n)``)."""
    a = jnp.asarray(a)
    wide = a.dtype.itemsize > 4  # float64, with jax_enable_x64
    a = a if wide else a.astype(jnp.float32)
    a = jnp.clip(a, 0.0, 1.0)
    a = jnp.where(jnp.isnan(a), 0.0, a)  # a NaN fraction prunes nothing
    if wide:
        bits = jax.lax.bitcast_convert_type(a, jnp.uint64)
        exp = ((bits >> 52) & 0x7FF).astype(jnp.int32)
        m = bits & (2**52 - 1)
        m = jnp.where(exp == 0, m, m | 2**52)
        m_hi, m_lo = (m >> 32).astype(_U), (m & 0xFFFFFFFF).astype(_U)
        return m_hi, m_lo, 1075 - jnp.maximum(exp, 1), jnp.int32(53)
    bits = jax.lax.bitcast_convert_type(a, _U)
    exp = ((bits >> 23) & 0xFF).astype(jnp.int32)
    m = jnp.where(exp == 0, bits & 0x7FFFFF, (bits & 0x7FFFFF) | 0x800000)
    return _U(0), m, 150 - jnp.maximum(exp, 1), jnp.int32(53)


def _round_to_bits(n, prec):
    """``n`` (uint32) rounded half to even to ``prec`` significant bits, as numpy rounds an int
    into a float32 (24) or float16 (11) before multiplying."""
    r = jnp.maximum(_bitlen(n) - prec, 0)
    return _round_shift([n], r)[0] << r.astype(_U)


def count_traced(amount, n):
    """``count`` inside jit, for a traced candidate count ``n`` (int32).

    ``amount`` is an integer scalar (a count), a floating scalar (a fraction: its exact value,
    the product rounded as a double), or the exact words ``(m_hi, m_lo, s, p)`` of a host fraction
    from ``as_device_amount``. A fraction gives ``round(a * n)`` exactly as Python does it: the
    product rounded to ``p`` significant bits (53 for a double, 24 for ``np.float32``, 11 for
    ``np.float16``), then half to even, emulated in integer arithmetic. Counts are clipped to
    ``[0, n]``: errors cannot be raised under jit.
    """
    n = jnp.asarray(n, jnp.int32)
    if not isinstance(amount, tuple):
        amount = jnp.asarray(amount)
        if not jnp.issubdtype(amount.dtype, jnp.floating):  # clipped in its own dtype: no wrap
            hi = min(int(jnp.iinfo(amount.dtype).max), MAX_COUNT)
            amount = jnp.clip(amount, jnp.array(0, amount.dtype), jnp.array(hi, amount.dtype))
            return jnp.clip(amount.astype(jnp.int32), 0, n)
        amount = _fraction_words(amount)
    m_hi, m_lo, s, prec = (jnp.asarray(x) for x in amount)
    nf = _round_to_bits(n.astype(_U), prec)  # n as the amount's type holds it (exact for a double)
    a_hi, a_lo = _mul_u32(m_lo.astype(_U), nf)
    b_hi, b_lo = _mul_u32(m_hi.astype(_U), nf)
    p1 = a_hi + b_lo
    p = [a_lo, p1, b_hi + (p1 < a_hi).astype(_U)]  # m * n, below 2**85
    length = jnp.where(p[2] > 0, 64 + _bitlen(p[2]), jnp.where(p[1] > 0, 32 + _bitlen(p[1]), _bitlen(p[0])))
    r = jnp.maximum(length - prec, 0)
    q = _round_shift(p, r)  # the product in the amount's precision: p significant bits, times 2**(r - s)
    k = _round_shift(q, jnp.clip(s - r, 0, 95))[0]
    k = jnp.where(s - r > 95, _U(0), k)
    # A product of 2**p or more (float32: counts above 2**24) has no fraction bits left: q is an
    # integer times 2**(r - s).
    k = jnp.where(s < r, q[0] << jnp.clip(r - s, 0, 31).astype(_U), k)
    return jnp.clip(k.astype(jnp.int32), 0, n)


# Significant bits of a host fraction's arithmetic: torch computes round(amount * n) in the
# amount's own type (a Python float is a double; numpy scalars keep their width under NEP 50).
_PRECISION = {float: 53, np.float64: 53, np.float32: 24, np.float16: 11}


def as_device_amount(amount, max_n: int = MAX_COUNT):
    """A validated host amount as device scalars that ``count_traced`` reads exactly (no
    recompiles when it changes), for a count ``n <= max_n`` known only on the device.

    Raises (statically, what the host count would raise for some ``n <= max_n``):
      ValueError: an integer count above ``max_n``, or a NaN fraction.
      OverflowError: an ``np.float16`` fraction whose product with ``max_n`` overflows float16.
      TypeError: a fraction type whose arithmetic cannot be reproduced on the device
        (``Fraction``, ``np.longdouble``, ...): pass concrete masks or a float.
    """
    if isinstance(amount, numbers.Integral):
        if int(amount) > max_n:
            raise ValueError(
                f"amount={int(amount)} should be smaller than the number of parameters to prune={max_n}"
            )
        return jnp.asarray(int(amount), jnp.int32)
    prec = _PRECISION.get(type(amount))
    if prec is None:
        raise TypeError(
            f"amount={amount!r} ({type(amount).__name__}) cannot be counted exactly on the device "
            "(the masks are traced under jit): pass a float, an np.float32/np.float16, or concrete masks"
        )
    a = float(amount)
    if math.isnan(a):
        raise ValueError("cannot convert float NaN to integer")
    if type(amount) is np.float16 and max(a, 1.0) * max_n >= 65504:  # n or the product: inf
        raise OverflowError(
            f"amount=np.float16({a}) times up to {max_n} entries may overflow float16 (torch's "
            "round(amount * n) raises OverflowError there); pass a float"
        )
    if a == 0.0:
        return _U(0), _U(0), jnp.int32(0), jnp.int32(prec)
    f, e = math.frexp(a)
    m = int(f * 2**53)  # exact: a has at most 53 significant bits
    return _U(m >> 32), _U(m & 0xFFFFFFFF), jnp.int32(53 - e), jnp.int32(prec)


def counts(amount, live, sizes, *, where, traced: bool) -> list:
    """The count of every group, the one rule for all methods: torch's validation, then torch's
    count on the host, or on the device when the amount or the remaining counts are traced.

    Args:
      amount: the amount as given (validated here).
      live: per group, the remaining candidates: an int, or an int32 device scalar.
      sizes: per group, the static number of entries (``live <= sizes``).
      where: per group, the ``"path: "`` that starts its error messages.
      traced: whether ``live`` is only known on the device (traced masks).

    Returns:
      One count per group: Python ints, or int32 device scalars (clipped to ``[0, live]``: errors
      cannot be raised on the device; what can be known from ``sizes`` is raised here).

    Raises:
      TypeError, ValueError, OverflowError: as ``validate``, ``count`` and ``as_device_amount``,
        the message starting with the group's path.
    """
    amount = validate(amount)
    if is_traced(amount):
        return [_count_traced(amount, n) for n in live]
    if traced:
        out = []
        for n, size, w in zip(live, sizes, where):
            try:
                out.append(_count_traced(as_device_amount(amount, size), n))
            except (ValueError, OverflowError) as e:
                raise type(e)(f"{w}{e}") from None
        return out
    ks = []
    for n, w in zip(jax.device_get(list(live)), where):
        try:
            ks.append(count(amount, int(n)))
        except (ValueError, OverflowError) as e:
            raise type(e)(f"{w}{e}") from None
    return ks


_count_traced = jax.jit(count_traced)
