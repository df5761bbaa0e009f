"""A NumPy model of the 8-bit block-wise state, written from the published
description, not from the kernels: the oracle of tests/test_state8.py.

- The maps: bitsandbytes' ``create_dynamic_map`` (Dettmers et al., "8-bit
  Optimizers via Block-wise Quantization"): 7 decimal exponent levels; level
  i holds the midpoints of n equal parts of [0.1, 1] times 10^(i-6), with
  n = 2^i for the signed map (plus the negatives of those values) and
  n = 2^(i+1) for the unsigned one; plus 0 and 1. Generated in float64, then
  rounded to float32 (what a kernel reads).
- Blocks of 256 consecutive elements in row-major order (the last may be
  partial); each holds a float32 scale, its absolute maximum, NaN when an
  element is not finite.
- Quantizing: q = x * float32(1 / scale), the code of the map magnitude
  nearest |q| by the float32 midpoints (bounds) between consecutive
  magnitudes, **ties (|q| exactly at a bound) toward the smaller magnitude**:
  rank = #{k : bound[k] < |q|}; the sign picks the mirrored negative code
  (signed map; the unsigned map has none, a negative q gets the zero code);
  every code is the zero code when the scale is 0 or NaN.
- The update: tests/variant_models.py's algorithm, but in np.float32 where
  the kernel computes in float32, in the contract's operation order
  (kernels/rmsprop_math.h's comment), scalars rounded from float64 once.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

import variant_models as models

BLOCK = 256
EXPONENT_LEVELS = 7
STATE_NAMES = ("v", "mean", "momentum_buffer")
F32 = np.float32


# ---- The maps.


def positive_values_f64(signed: bool) -> np.ndarray:
    """The map's values strictly between 0 and 1, in float64, ascending."""
    out = []
    for level in range(EXPONENT_LEVELS):
        parts = 2**level if signed else 2 ** (level + 1)
        edges = np.linspace(0.1, 1.0, parts + 1)
        out.append(10.0 ** (level - (EXPONENT_LEVELS - 1)) * (edges[:-1] + edges[1:]) / 2)
    return np.concatenate(out)


@dataclass
class QuantMap:
    values: np.ndarray  # 256 float32, ascending
    magnitudes: np.ndarray  # float32 from the zero code up: 0, ..., 1
    bounds: np.ndarray  # float32 midpoints of consecutive magnitudes
    zero_code: int
    negative_codes: int


def quant_map(signed: bool) -> QuantMap:
    positive = positive_values_f64(signed).astype(F32)
    magnitudes = np.concatenate([[F32(0)], positive, [F32(1)]]).astype(F32)
    negative = -positive[::-1] if signed else positive[:0]  # there is no -1
    negatives = len(negative)
    values = np.concatenate([negative, magnitudes]).astype(F32)
    m64 = magnitudes.astype(np.float64)
    bounds = ((m64[:-1] + m64[1:]) / 2).astype(F32)
    return QuantMap(values, magnitudes, bounds, negatives, negatives)


UNSIGNED, SIGNED = quant_map(False), quant_map(True)


def map_of(name: str) -> QuantMap:
    """v >= 0 uses the unsigned map, mean and momentum_buffer the signed one."""
    return UNSIGNED if name == "v" else SIGNED


# ---- Blocks.


def blocks(size: int) -> int:
    return -(-size // BLOCK)


def block_scales(x: np.ndarray) -> np.ndarray:
    """Each block's scale: max |x|, NaN when any element is NaN or +-Inf."""
    x = np.ascontiguousarray(x, F32).reshape(-1)
    out = np.zeros(blocks(x.size), F32)
    for b in range(out.size):
        part = x[b * BLOCK:(b + 1) * BLOCK]
        out[b] = np.max(np.abs(part)) if np.isfinite(part).all() else np.nan
    return out


def quantize(x: np.ndarray, m: QuantMap) -> tuple[np.ndarray, np.ndarray]:
    """(codes of x's shape, scales) of float32 values x, by the rule above."""
    flat = np.ascontiguousarray(x, F32).reshape(-1)
    scales = block_scales(flat)
    per_element = np.repeat(scales, BLOCK)[: flat.size]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = F32(1) / per_element  # rounded once per block
        q = flat * inverse
    rank = np.searchsorted(m.bounds, np.abs(q), side="left")  # #{bound < |q|}
    negative = np.signbit(q)
    codes = np.where(negative, m.zero_code - np.minimum(rank, m.negative_codes), m.zero_code + rank)
    codes = np.where(per_element > 0, codes, m.zero_code)  # 0 or NaN: every code zero
    return codes.astype(np.uint8).reshape(np.shape(x)), scales


def dequantize(codes: np.ndarray, scales: np.ndarray, m: QuantMap) -> np.ndarray:
    """map[code] * scale, float32, codes' shape."""
    flat = np.asarray(codes).reshape(-1)
    per_element = np.repeat(np.asarray(scales, F32), BLOCK)[: flat.size]
    with np.errstate(invalid="ignore"):
        return (m.values[flat] * per_element).reshape(np.shape(codes))


# ---- Parameter dtypes (float32 carries the values; bfloat16 by its bits).


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to nearest even in `dtype`, as float32 again."""
    x = np.asarray(x, F32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(F32)
    assert dtype == "bfloat16", dtype
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return np.where(np.isnan(x), x, rounded.view(F32))


# ---- The step.


@dataclass
class StepConstants:
    """The step's scalars as the host rounds them to float32 (from float64)."""

    lr: np.float32
    alpha: np.float32
    one_minus_alpha: np.float32
    eps: np.float32
    momentum: np.float32
    weight_decay: np.float32
    bias_correction: np.float32


def constants(o: models.Options, lr: float, t: int) -> StepConstants:
    bc = 1.0 - o.alpha**t if o.bias_correction else 1.0
    return StepConstants(
        F32(lr), F32(o.alpha), F32(1.0 - o.alpha), F32(o.eps), F32(o.momentum),
        F32(o.weight_decay), F32(bc),
    )


def update_f32(grad, param, state: dict, c: StepConstants, o: models.Options, settle=None):
    """One element-wise step in float32, the contract's order of operations:
    (param before rounding, new float32 state). grad, param, state float32.
    ``settle(name, value)``, when given, replaces each new state entry where
    the parameter's update reads it (a wrong kernel that reads back its
    requantized state; the returned state is the fresh one)."""
    settle = settle or (lambda name, value: value)
    grad, w = np.asarray(grad, F32), np.asarray(param, F32)
    one, zero = F32(1), F32(0)
    coupled = o.weight_decay > 0 and not o.decoupled_weight_decay
    decoupled = o.weight_decay > 0 and o.decoupled_weight_decay
    momentum = o.momentum > 0
    lr_inside = c.lr if (o.lr_inside_momentum and momentum) else one
    lr_outside = one if (o.lr_inside_momentum and momentum) else c.lr
    eps_inside, eps_outside = (c.eps, zero) if o.eps_in_sqrt else (zero, c.eps)
    new = {}
    with np.errstate(all="ignore"):
        g = grad * (-one if o.maximize else one)
        if coupled:
            g = g + (c.weight_decay * w)
        if decoupled:
            w = w - ((c.lr * c.weight_decay) * w)
        new["v"] = (c.alpha * state["v"]) + (c.one_minus_alpha * (g * g))
        variance = settle("v", new["v"]) / c.bias_correction
        if o.centered:
            new["mean"] = (c.alpha * state["mean"]) + (c.one_minus_alpha * g)
            m = settle("mean", new["mean"]) / c.bias_correction
            variance = variance - (m * m)
        d = np.sqrt(variance + eps_inside) + eps_outside
        if momentum:
            u = (g / d) * lr_inside
            new["momentum_buffer"] = (c.momentum * state["momentum_buffer"]) + u
            buffer = settle("momentum_buffer", new["momentum_buffer"])
            step = u + (c.momentum * buffer) if o.nesterov else buffer
            w = w - (step * lr_outside)
        else:
            w = w - ((c.lr * g) / d)
    return w.astype(F32), {k: v.astype(F32) for k, v in new.items()}


def requantized(name: str, value: np.ndarray) -> np.ndarray:
    """value after a round trip through its 8-bit form."""
    m = map_of(name)
    return dequantize(*quantize(value, m), m)


@dataclass
class Quantized:
    """One 8-bit state entry: codes (the parameter's shape) and scales."""

    codes: np.ndarray
    scales: np.ndarray


def quantized_step(
    grad: np.ndarray,
    param: np.ndarray,
    state: dict,
    lr: float,
    t: int,
    o: models.Options,
    dtype: str = "float32",
    stale_state_update: bool = False,
) -> tuple[np.ndarray, dict]:
    """One step of a quantized leaf: dequantize each entry, update in float32,
    the parameter from the fresh float32 state (rounded once to `dtype`),
    requantize. grad / param: float32 arrays holding `dtype` values in the
    leaf's shape (row-major order defines the blocks). `stale_state_update`:
    the parameter from the *requantized* state instead (a wrong kernel, for
    showing the tests can tell). Returns (param', {name: Quantized})."""
    c = constants(o, lr, t)
    full = {name: dequantize(e.codes, e.scales, map_of(name)) for name, e in state.items()}
    w, new = update_f32(grad, param, full, c, o, requantized if stale_state_update else None)
    out = {name: Quantized(*quantize(value, map_of(name))) for name, value in new.items()}
    return round_to(w, dtype), out


def initial_state(shape: tuple, o: models.Options) -> dict:
    """A fresh quantized state: v at initial_scale, the others at zero."""
    out = {}
    for name in o.state_names():
        start = o.initial_scale if name == "v" else 0.0
        out[name] = Quantized(*quantize(np.full(shape, start, F32), map_of(name)))
    return out


def run(param: np.ndarray, grads: list, lr: float, o: models.Options, dtype: str = "float32") -> tuple[list, dict]:
    """Parameters after each step from a fresh state, and the final state."""
    w, state, out = round_to(param, dtype), initial_state(np.shape(param), o), []
    for t, g in enumerate(grads, start=1):
        w, state = quantized_step(round_to(g, dtype), w, state, lr, t, o, dtype)
        out.append(w)
    return out, state
