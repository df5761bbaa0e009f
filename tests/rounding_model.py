"""NumPy models of the rounding contract of kernels/rmsprop_math.h, written
from its comments in uint32 / float32 arithmetic: the counter-based hash
(rmsprop_rounding_key, rmsprop_random_bits), stochastic rounding to bfloat16
and float16 (rmsprop_stochastic_bfloat16 / _float16), and the Kahan store
(rmsprop_kahan + rmsprop_kahan_remainder). tests/test_rounding.py holds the
kernel to these bit for bit.

16-bit values travel as their raw uint16 bit patterns (numpy has no
bfloat16); ``half_bits`` / ``bits_to_f32`` convert.
"""

from __future__ import annotations

import numpy as np

U32 = np.uint32


def _u32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64).astype(U32)


def _mul(a: np.ndarray, c: int) -> np.ndarray:
    """a * c mod 2**32 (in uint64: no overflow warning, exact)."""
    return ((a.astype(np.uint64) * np.uint64(c)) & np.uint64(0xFFFFFFFF)).astype(U32)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint64) + b.astype(np.uint64)) & np.uint64(0xFFFFFFFF)).astype(U32)


def hash_round(h: np.ndarray, word: np.ndarray) -> np.ndarray:
    h = _add(h, _mul(_u32(word), 0xC2B2AE3D))
    h = (h << U32(17)) | (h >> U32(15))
    return _mul(h, 0x27D4EB2F)


def hash_finish(h: np.ndarray) -> np.ndarray:
    h = _u32(h)
    h = h ^ (h >> U32(16))
    h = _mul(h, 0x85EBCA6B)
    h = h ^ (h >> U32(13))
    h = _mul(h, 0xC2B2AE35)
    return h ^ (h >> U32(16))


def rounding_key(seed: int, step: int, leaf: int) -> np.ndarray:
    """The key of one leaf at one step (a 0-d uint32); step mod 2**32."""
    h = _add(_u32(seed), _u32(0x165667B1))
    h = hash_round(h, _u32(step % 2**32))
    h = hash_round(h, _u32(leaf))
    return hash_finish(h)


def random_bits(key: np.ndarray, index: np.ndarray) -> np.ndarray:
    """32 random bits per element at ``index`` (int64, row-major in the whole leaf)."""
    index = np.asarray(index, dtype=np.uint64)
    lo = (index & np.uint64(0xFFFFFFFF)).astype(U32)
    hi = (index >> np.uint64(32)).astype(U32)
    h = _add(_u32(key) ^ _mul(hi, 0x27D4EB2F), _mul(lo, 0x9E3779B1))
    return hash_finish(h)


def element_bits(seed: int, step: int, leaf: int, size: int, offset: int = 0) -> np.ndarray:
    """The random bits of elements offset .. offset+size-1 of a leaf."""
    return random_bits(rounding_key(seed, step, leaf), np.arange(offset, offset + size, dtype=np.int64))


# ---- Stochastic rounding of float32 results (returned as float32 holding a
# 16-bit value exactly, except float16's carry into 2**16, which the store's
# round to nearest turns into infinity).


def stochastic_bfloat16(x: np.ndarray, random: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(U32)
    rounded = _add(bits, random >> U32(16)) & U32(0xFFFF0000)
    nan = (bits & U32(0x7FFFFFFF)) > U32(0x7F800000)
    return np.where(nan, bits, rounded).view(np.float32)


def stochastic_float16(x: np.ndarray, random: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(U32)
    sign = bits & U32(0x80000000)
    magnitude = bits & U32(0x7FFFFFFF)
    exponent = (magnitude >> U32(23)).astype(np.int64) - 127
    dropped = np.minimum(np.where(exponent >= -14, 13, -1 - exponent), 23).astype(np.uint64)
    # (Where exponent < -24 dropped is 23 here; that branch is replaced below.)
    mask = ((np.uint64(1) << dropped) - np.uint64(1)).astype(U32)
    shifted = (random.astype(np.uint64) >> (np.uint64(32) - dropped)).astype(U32)
    rounded = _add(magnitude, shifted) & ~mask
    fraction = magnitude.view(np.float32) * np.float32(16777216.0)
    uniform = (random >> U32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    tiny = np.where(uniform < fraction, U32(0x33800000), U32(0))
    rounded = np.where(exponent < -24, tiny, rounded)
    rounded = np.where(exponent >= 16, U32(0x7F800000), rounded)
    nan = magnitude > U32(0x7F800000)
    return np.where(nan, bits, sign | rounded).view(np.float32)


# ---- 16-bit formats as uint16 bit patterns.


def f32_to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rounded to nearest even into ``dtype`` ('float16' or 'bfloat16')."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint16)
    bits = x.view(U32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = (x.view(U32) & U32(0x7FFFFFFF)) > U32(0x7F800000)
    return np.where(nan, (bits >> np.uint64(16)) | np.uint64(0x40), rounded).astype(np.uint16)


def bits_to_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    bits = np.asarray(bits, np.uint16)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(U32) << U32(16)).view(np.float32)


def stochastic(x: np.ndarray, random: np.ndarray, dtype: str) -> np.ndarray:
    """The stored 16-bit bits of x rounded stochastically with ``random``."""
    fn = stochastic_float16 if dtype == "float16" else stochastic_bfloat16
    return f32_to_bits(fn(x, random), dtype)


def kahan(w_bits: np.ndarray, c_bits: np.ndarray, updated: np.ndarray, dtype: str):
    """The Kahan store: (w' bits, c' bits) from the stored parameter and
    compensation (16-bit bits) and the float32 result ``updated``:
    c1 = c + (updated - w); w' = round(w + c1); c' = round(c1 - (w' - w))."""
    w, c = bits_to_f32(w_bits, dtype), bits_to_f32(c_bits, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        change = c + (np.asarray(updated, np.float32) - w)
        w_new = f32_to_bits(w + change, dtype)
        c_new = f32_to_bits(change - (bits_to_f32(w_new, dtype) - w), dtype)
    return w_new, c_new


def plain_update(w: np.ndarray, g: np.ndarray, v: np.ndarray, lr: float, alpha: float, eps: float):
    """The float32 result of one default RMSprop step (kernels/rmsprop_math.h
    grouping; numpy's float32 ops are IEEE and never fused): (w', v')."""
    f = np.float32
    w, g, v = (np.asarray(a, f) for a in (w, g, v))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        v_new = f(alpha) * v + f(1.0 - alpha) * (g * g)
        w_new = w - (f(lr) * g) / (np.sqrt(v_new) + f(eps))
    return w_new, v_new
