"""8-bit block-wise state (``state_bits=8``), on the CPU.

The oracle is tests/state8_model.py: maps generated from the published
description and the 8-bit algorithm in NumPy float32. The kernel's codes,
scales and parameters must equal the model's bit for bit over several steps
(option combinations, partial blocks, dtypes, layouts, ties, zeros,
non-finite values); then accuracy against float32 state, which leaves
quantize, the conversions to and from full precision, checkpoints,
mx.compile and the sharded pieces in one process (the launched sharded tests
are in tests/test_distributed.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import state8_model as model
import variant_models as models
from fake_ranks import rank_state_dicts, sharded_at
from oracle import assert_trees_bit_equal_in_any_order
from test_cpu_isa import _cpu_runs, _widest_isa
from test_variants import op_kwargs, option_grid, random_state
from mlx_fused_rmsprop import RMSprop, _ext, rmsprop_step

F32 = np.float32
LR = float(F32(0.01))  # a float32 learning rate: the model and the kernel read the same
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
EIGHT_BIT = {"state_bits": 8, "min_8bit_size": 0}


# ---- Comparing the kernel with the model.


def as_f32(a: mx.array) -> np.ndarray:
    """An array's values as float32 NumPy (16-bit floats widen exactly)."""
    return np.array(a.astype(mx.float32))


def to_mx(x: np.ndarray, dtype: str) -> mx.array:
    """float32 values that are `dtype` values, as an mx array of `dtype`."""
    return mx.array(np.asarray(x, F32)).astype(MX_DTYPES[dtype])


def assert_same_floats(what: str, got: np.ndarray, want: np.ndarray, nan_ok: bool = False) -> None:
    """Bit for bit; with `nan_ok` any NaN equals any NaN (NaN payloads are
    not part of the contract), else a NaN in `want` fails: a comparison of
    NaNs would prove little."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert nan_ok or not np.isnan(want).any(), f"{what}: the model's result has NaN"
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        i = int(np.argmax(~same.reshape(-1)))
        pytest.fail(
            f"{what}: {int((~same).sum())} of {same.size} differ; first at {i}: "
            f"{got.reshape(-1)[i]!r} != {want.reshape(-1)[i]!r}"
        )


def assert_entry(what: str, state: dict, name: str, want: model.Quantized, nan_ok: bool = False) -> None:
    """A kernel's 8-bit entry (codes and `<name>_scale`) equals the model's."""
    codes, scales = state[name], state[name + "_scale"]
    assert codes.dtype == mx.uint8 and scales.dtype == mx.float32, what
    got = np.array(codes)
    assert got.shape == want.codes.shape, f"{what} {name}: {got.shape} != {want.codes.shape}"
    bad = got != want.codes
    if bad.any():
        i = int(np.argmax(bad.reshape(-1)))
        pytest.fail(
            f"{what} {name}: {int(bad.sum())} of {bad.size} codes differ; first at {i}: "
            f"{got.reshape(-1)[i]} != {want.codes.reshape(-1)[i]}"
        )
    assert_same_floats(f"{what} {name}_scale", np.array(scales), want.scales, nan_ok)


def assert_state(what: str, state: dict, want: dict, nan_ok: bool = False) -> None:
    assert set(state) == {n for name in want for n in (name, name + "_scale")}, what
    for name, entry in want.items():
        assert_entry(what, state, name, entry, nan_ok)


def kernel_state(state: dict) -> dict:
    """The model's 8-bit state as the optimizer's state entries."""
    out = {}
    for name, entry in state.items():
        out[name], out[name + "_scale"] = mx.array(entry.codes), mx.array(entry.scales)
    return out


def quantized_random_state(rng, shape, o: models.Options, t: int) -> dict:
    """A well-conditioned random state at step t, quantized by the model."""
    return {
        name: model.Quantized(*model.quantize(value.astype(F32), model.map_of(name)))
        for name, value in random_state(rng, shape, o, t).items()
    }


def run_op_and_model(o: models.Options, shape, dtype="float32", steps=3, seed=0, first=2,
                     grads=None, param=None, state=None, layout=None, nan_ok=False):
    """`steps` calls of rmsprop_step with 8-bit state beside the model, from a
    random (or the given) parameter, state and gradients; asserts parameter,
    codes and scales bit-equal after each step. `layout(name, array)` may
    hand the op another layout of the same values; `nan_ok`: NaN results are
    expected."""
    rng = np.random.default_rng(seed)
    layout = layout or (lambda name, a: a)
    w = model.round_to(rng.standard_normal(shape), dtype) if param is None else param
    state = quantized_random_state(rng, shape, o, first) if state is None else state
    kw, ks = to_mx(w, dtype), kernel_state(state)
    for k, t in enumerate(range(first, first + steps)):
        g = model.round_to(rng.standard_normal(shape) if grads is None else grads[k], dtype)
        w, state = model.quantized_step(g, w, state, LR, t, o, dtype)
        kw, ks = rmsprop_step(
            layout("grad", to_mx(g, dtype)), layout("param", kw),
            {n: layout(n, a) for n, a in ks.items()}, LR, step=t, **EIGHT_BIT, **op_kwargs(o),
        )
        what = f"{o} {dtype} {shape} step {t}"
        assert kw.dtype == MX_DTYPES[dtype] and kw.shape == tuple(shape), what
        assert_same_floats(f"{what} param", as_f32(kw), w, nan_ok)
        assert_state(what, ks, state, nan_ok)
    return kw, ks, w, state


def options_kw(o: models.Options) -> dict:
    """RMSprop's keyword arguments for these options."""
    return {k: getattr(o, k) for k in o.__dataclass_fields__}


def distinct_op_options():
    """The option grid of tests/test_variants.py without initial_scale (which
    only sets a fresh state): 240 combinations the kernel tells apart."""
    return [o for o in option_grid() if o.initial_scale == 0.0]


# A few combinations that between them turn every option on (for a random,
# well-conditioned state: from a fresh one, centered with bias correction
# cancels to NaN at step 1 -- see FRESH_OPTIONS).
SAMPLE_OPTIONS = [
    models.Options(alpha=0.9, eps=1e-6),
    models.Options(alpha=0.9, eps=1e-6, centered=True, momentum=0.9, nesterov=True,
                   weight_decay=0.05, bias_correction=True),
    models.Options(alpha=0.9, eps=1e-6, momentum=0.9, lr_inside_momentum=True, weight_decay=0.05,
                   decoupled_weight_decay=True, eps_in_sqrt=True, maximize=True),
]

# Combinations that stay finite from a fresh state.
FRESH_OPTIONS = [
    models.Options(alpha=0.9, eps=1e-6, centered=True, momentum=0.9, nesterov=True, weight_decay=0.05),
    models.Options(alpha=0.9, eps=1e-6, momentum=0.9, bias_correction=True, eps_in_sqrt=True,
                   lr_inside_momentum=True),
]

SIZES = {1: (1,), 255: (255,), 256: (16, 16), 257: (257,), 1000: (8, 125), 4096 + 17: (3, 1371)}


# ---- 1. The maps.


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_dynamic_map_is_the_published_construction(signed):
    """_ext.dynamic_map equals the float64 generator of the published
    description after float32 rounding: 256 distinct sorted values, exactly
    0 and 1, the unsigned map's smallest positive value 3.25e-7, the signed
    map's negatives mirroring its positives (no -1); the bounds are the
    float32 midpoints of consecutive magnitudes; the CPU's table search
    finds the same rank as the binary search at every bound."""
    got = _ext.dynamic_map(signed)
    want = model.quant_map(signed)
    values = np.array(got["values"], F32)
    assert values.shape == (256,)
    assert_same_floats("values", values, want.values)
    assert len(np.unique(values)) == 256 and (np.diff(values) > 0).all()
    zero = got["zero_code"]
    assert zero == got["negative_codes"] == want.zero_code == (127 if signed else 0)
    assert values[zero] == 0.0 and not np.signbit(values[zero]) and values[-1] == 1.0
    positive = values[zero + 1 : 255]
    # The published levels: 2^i (signed) or 2^(i+1) (unsigned) values in
    # [10^(i-7), 10^(i-6)) for i = 0..6.
    per_level = [2**i if signed else 2 ** (i + 1) for i in range(7)]
    level_of = np.floor(np.log10(positive.astype(np.float64))).astype(int) + 7
    assert np.bincount(level_of, minlength=7).tolist() == per_level
    if signed:
        assert (values[:zero] == -positive[::-1]).all() and values[0] > -1.0
        assert values[zero + 1] == F32(0.55e-6)
    else:
        assert values[1] == F32(3.25e-7) and 3e-7 < values[1] < 3.5e-7
    bounds = np.array(got["bounds"], F32)
    n = len(want.bounds)
    assert_same_floats("bounds", bounds[:n], want.bounds)
    assert np.isinf(bounds[n:]).all()
    magnitudes = values[zero:].astype(np.float64)
    assert ((magnitudes[:-1] < bounds[:n]) & (bounds[:n] < magnitudes[1:])).all()
    exact = (magnitudes[:-1] + magnitudes[1:]) / 2
    assert (np.abs(bounds[:n] - exact) <= np.spacing(bounds[:n]) / 2).all()  # float32 rounding
    assert _ext._rank_search_mismatches(signed, 200_000) == 0


def special_blocks(rng) -> dict[str, np.ndarray]:
    """Blocks of values that quantize at the edges, by name: every signed and
    unsigned bound exactly (ties) and one ulp either side, with a 1.0 in
    each block so that the scale is 1; random values; an all-zero block;
    blocks with NaN, +Inf, -Inf; tiny and huge scales; a partial last
    block."""
    edges = []
    for m in (model.UNSIGNED, model.SIGNED):
        b = m.bounds[m.bounds <= 1]
        edges += [b, np.nextafter(b, F32(2)), np.nextafter(b, F32(0))]
    edges = np.concatenate(edges).astype(F32)
    edges = edges * rng.choice([F32(-1), F32(1)], edges.size)
    out = {}
    for i, part in enumerate(np.array_split(edges, -(-edges.size // 255))):
        out[f"edges{i}"] = np.pad(np.concatenate([[F32(1)], part]), (0, 255 - part.size), constant_values=0.5)
    random = rng.standard_normal(256).astype(F32)
    out["random"] = random
    out["zero"] = np.zeros(256, F32)
    for name, bad in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        out[name] = rng.standard_normal(256).astype(F32)
        out[name][rng.integers(256)] = bad
    out["tiny"], out["huge"] = random * F32(1e-30), random * F32(1e30)
    out["partial"] = random[:77]
    return out


@pytest.mark.parametrize("is_v", [True, False], ids=["v", "signed"])
def test_quantize_state_and_dequantize_state_are_the_model(is_v):
    """_ext.quantize_state / dequantize_state against the model on edge
    values; codes are the nearest map value (float64 distance) except
    exactly at a bound, where the smaller magnitude wins (one ulp above it,
    the larger); an all-zero block has scale 0 and zero codes; a block with
    NaN or +-Inf has scale NaN and zero codes, and reads back NaN."""
    m = model.UNSIGNED if is_v else model.SIGNED
    named = special_blocks(np.random.default_rng(1))
    x = np.concatenate(list(named.values()))
    if is_v:
        x = np.abs(x)
    codes, scales = _ext.quantize_state(mx.array(x), is_v)
    want_codes, want_scales = model.quantize(x, m)
    assert_entry("quantize_state", {"v": codes, "v_scale": scales}, "v",
                 model.Quantized(want_codes, want_scales), nan_ok=True)
    back = np.array(_ext.dequantize_state(codes, scales, is_v))
    assert_same_floats("dequantize_state", back, model.dequantize(want_codes, want_scales, m), nan_ok=True)

    # The rule itself, independently of the bounds search: the nearest value.
    per_element = np.repeat(want_scales, 256)[: x.size]
    finite = np.isfinite(per_element) & (per_element > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (x * (F32(1) / per_element))[finite].astype(np.float64)
    values = m.values.astype(np.float64)
    err = np.abs(q - values[want_codes[finite]])
    best = np.min(np.abs(q[:, None] - values[None, :]), axis=1)
    at_bound = np.isin(np.abs(q).astype(F32), m.bounds)
    assert at_bound.sum() >= len(m.bounds[m.bounds <= 1]) - 1
    assert (err <= best)[~at_bound].all()
    assert (err - best <= np.spacing(F32(1)))[at_bound].all()  # within an ulp of a tie
    # Exactly at a bound: the smaller magnitude; an ulp above: the larger.
    for b in m.bounds[m.bounds <= 1][::7]:
        block = np.array([1.0, b, np.nextafter(b, F32(2))], F32)
        c, _ = _ext.quantize_state(mx.array(block), is_v)
        k = int(np.searchsorted(m.magnitudes, b))  # the magnitude above b
        assert np.array(c).tolist() == [255, m.zero_code + k - 1, m.zero_code + k]
    # Zero and non-finite blocks.
    got_codes, got_scales = np.array(codes), np.array(scales)
    index = {name: i for i, name in enumerate(named)}
    zero = index["zero"]
    assert got_scales[zero] == 0 and (got_codes[256 * zero : 256 * zero + 256] == m.zero_code).all()
    for name in ("nan", "inf", "-inf"):
        b = index[name]
        assert np.isnan(got_scales[b]), name
        assert (got_codes[256 * b : 256 * b + 256] == m.zero_code).all(), name
        assert np.isnan(back[256 * b : 256 * b + 256]).all(), name


# ---- 2. The kernel against the model.


def test_every_option_combination_against_the_model():
    """All 240 distinct option combinations of the variants table (the 480
    of tests/test_variants.py less initial_scale, which only sets a fresh
    state), three steps of rmsprop_step on 900 elements (three full blocks
    and a partial one): parameter, codes and scales bit-equal to the model."""
    for i, o in enumerate(distinct_op_options()):
        run_op_and_model(o, (3, 300), seed=i)


@pytest.mark.parametrize("dtype", list(MX_DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
def test_partial_blocks_and_parameter_dtypes_against_the_model(size, dtype):
    """Sizes around the block (1, 255, 256, 257, 1000, 4096 + 17) and
    float32 / float16 / bfloat16 parameters (rounded once from the float32
    result), for combinations that turn every option on."""
    for i, o in enumerate(SAMPLE_OPTIONS):
        run_op_and_model(o, SIZES[size], dtype, seed=size + i)


def transposed(a: mx.array) -> mx.array:
    """The same values, column-major (the gradient of an nn.Linear weight)."""
    return mx.contiguous(a.T).T


def every_other(a: mx.array) -> mx.array:
    """The same values as a strided view: every other column of an array
    twice as wide."""
    wide = mx.stack([a, mx.zeros_like(a)], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
    mx.eval(wide)
    return wide[..., ::2]


LAYOUTS = {
    "transposed gradient": lambda name, a: transposed(a) if name == "grad" else a,
    "strided parameter": lambda name, a: every_other(a) if name == "param" else a,
    "strided scales only": lambda name, a: every_other(a) if name.endswith("_scale") else a,
    "only the mean's codes transposed": lambda name, a: transposed(a) if name == "mean" else a,
    "transposed codes, strided scales": lambda name, a: (
        every_other(a) if name.endswith("_scale") else transposed(a) if name != "grad" and name != "param" else a
    ),
    "everything strided or transposed": lambda name, a: (
        every_other(a) if name.endswith("_scale") or name == "param" else transposed(a)
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_against_the_model(layout, dtype):
    """Blocks follow the leaf's row-major order whatever the memory layout:
    a transposed gradient, a strided parameter, non-contiguous codes and
    scales given by the user."""
    o = SAMPLE_OPTIONS[1]
    run_op_and_model(o, (5, 300), dtype, seed=3, layout=LAYOUTS[layout])


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "inputs-kept"])
def test_in_place_and_not(in_place):
    """The step's inputs donated (the usual loop: nothing else holds them)
    or kept: the same bits, and kept inputs are left untouched."""
    rng = np.random.default_rng(4)
    o, shape = SAMPLE_OPTIONS[2], (4, 300)
    w = rng.standard_normal(shape).astype(F32)
    state = quantized_random_state(rng, shape, o, 1)
    kw, ks = mx.array(w), kernel_state(state)
    mx.eval(kw, ks)
    for t in (1, 2, 3):
        g = rng.standard_normal(shape).astype(F32)
        w, state = model.quantized_step(g, w, state, LR, t, o)
        kept = None if in_place else (kw, dict(ks), [np.array(a) for a in (kw, *ks.values())])
        kw, ks = rmsprop_step(mx.array(g), kw, ks, LR, step=t, **EIGHT_BIT, **op_kwargs(o))
        mx.eval(kw, ks)
        assert_same_floats("param", np.array(kw), w)
        assert_state(f"step {t}", ks, state)
        if kept is not None:
            old_w, old_state, copies = kept
            for a, copy in zip((old_w, *old_state.values()), copies):
                assert np.array_equal(np.array(a), copy, equal_nan=a.dtype != mx.uint8)


def test_ties_at_the_bounds_in_the_kernel():
    """New state values exactly at a bound of the map, with the block's scale
    1 (so q = x): alpha = 0 makes mean' = g and v' = g * g exactly. Ties go
    to the smaller magnitude, an ulp above to the larger, as in the model."""
    o = models.Options(alpha=0.0, eps=1e-6, centered=True)
    # mean' = g hits every signed bound; v' = g * g every unsigned bound that
    # is a float32 square.
    signed = model.SIGNED.bounds[model.SIGNED.bounds <= 1]
    squares = []
    for b in model.UNSIGNED.bounds:
        root = F32(np.sqrt(np.float64(b)))
        for r in (root, np.nextafter(root, F32(0)), np.nextafter(root, F32(2))):
            if r * r == b:
                squares.append(r)
                break
    assert len(squares) > 60, len(squares)  # enough of the 255 to mean something
    values = np.concatenate([signed, -signed, np.nextafter(signed, F32(2)), squares]).astype(F32)
    g = np.concatenate([
        np.pad(np.concatenate([[F32(1)], part]), (0, 255 - part.size), constant_values=0.5)
        for part in np.array_split(values, -(-values.size // 255))
    ]).astype(F32)  # blocks of 256, each with a 1.0: scale 1
    state = {n: model.Quantized(np.full(g.shape, model.map_of(n).zero_code, np.uint8),
                                np.zeros(model.blocks(g.size), F32)) for n in o.state_names()}
    _, ks, _, _ = run_op_and_model(o, g.shape, grads=[g], steps=1, first=1, state=state,
                                      param=np.zeros(g.shape, F32))
    # And the rule, spelled out for the signed bounds: mean' = g.
    codes = np.array(ks["mean"])
    position = {float(v): i for i, v in enumerate(g)}
    for b in signed[::5]:
        k = int(np.searchsorted(model.SIGNED.magnitudes, b))
        assert codes[position[float(b)]] == 127 + k - 1  # tie: the smaller
        assert codes[position[float(-b)]] == 127 - (k - 1)
        assert codes[position[float(np.nextafter(b, F32(2)))]] == 127 + k
    assert (np.array(ks["mean_scale"]) == 1).all() and (np.array(ks["v_scale"]) == 1).all()


def test_zeros_and_non_finite_values_in_the_kernel():
    """An all-zero block keeps scale 0 and zero codes; an infinite gradient
    makes its blocks' scales NaN with zero codes, read back as NaN the next
    step (never repaired); a NaN scale given in the state stays NaN; the
    other blocks are unaffected; all as in the model."""
    o = models.Options(alpha=0.9, eps=1e-6, centered=True, momentum=0.9)
    shape = (4 * 256 + 10,)
    rng = np.random.default_rng(5)
    w = rng.standard_normal(shape).astype(F32)
    w[256:512] = 0
    state = quantized_random_state(rng, shape, o, 1)
    for name, entry in state.items():  # block 1 starts at zero
        entry.codes[256:512] = model.map_of(name).zero_code
        entry.scales[1] = 0
    state["v"].scales[3] = np.nan  # a non-finite state handed in
    grads = [rng.standard_normal(shape).astype(F32) for _ in range(3)]
    for g in grads:
        g[256:512] = 0
    grads[0][2 * 256 + 7] = np.inf
    kw, ks, _, _ = run_op_and_model(o, shape, grads=grads, param=w, state=state, first=1, nan_ok=True)
    for name in o.state_names():
        scales, codes = np.array(ks[name + "_scale"]), np.array(ks[name])
        zero = model.map_of(name).zero_code
        assert scales[1] == 0 and (codes[256:512] == zero).all(), name
        assert np.isnan(scales[2]) and (codes[512:768] == zero).all(), name
        assert np.isfinite(scales[[0, 4]]).all(), name
    assert np.isnan(np.array(ks["v_scale"])[3])
    assert (np.array(kw)[256:512] == 0).all() and np.isnan(np.array(kw)[512:768]).all()
    v = np.array(_ext.dequantize_state(ks["v"], ks["v_scale"], True))
    assert np.isnan(v[512:1024]).all() and np.isfinite(v[:512]).all() and np.isfinite(v[1024:]).all()


def kernel_against_the_model() -> None:
    """The comparisons above that walk the kernel's loops (every size,
    dtype, layout, the ties, zeros and non-finite values), for running in
    another build or thread count."""
    for size, dtype in itertools.product(SIZES, MX_DTYPES):
        test_partial_blocks_and_parameter_dtypes_against_the_model(size, dtype)
    for layout, dtype in itertools.product(LAYOUTS, ("float32", "bfloat16")):
        test_layouts_against_the_model(layout, dtype)
    test_ties_at_the_bounds_in_the_kernel()
    test_zeros_and_non_finite_values_in_the_kernel()


_BUILD_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import test_state8
from mlx_fused_rmsprop import _ext
test_state8.kernel_against_the_model()
print(json.dumps(_ext._cpu_isa()))
"""


@pytest.mark.parametrize("isa,threads", [("baseline", "1"), ("avx2", "1"), (None, "3")],
                         ids=["baseline", "avx2", "widest-3-threads"])
def test_every_build_and_thread_split_against_the_model(isa, threads):
    """In a process of its own per case: the baseline (SSE2) and AVX2 builds
    of the quantized loops (MLX_FUSED_RMSPROP_ISA; the widest build the CPU
    runs is the one the rest of this file tests), and leaves split over 3
    threads by blocks (MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD=300): the
    model's bits."""
    if isa is not None and not _cpu_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_FUSED_RMSPROP_")}
    env.update(MLX_FUSED_RMSPROP_NUM_THREADS=threads, MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD="300")
    if isa is not None:
        env["MLX_FUSED_RMSPROP_ISA"] = isa
    script = _BUILD_SCRIPT.format(tests=str(Path(__file__).resolve().parent))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == (isa or _widest_isa())


def test_the_parameter_is_updated_from_the_fresh_float32_state():
    """The kernel divides by the updated float32 state, not by its
    requantized value: the model with the requantized state read back gives
    other parameters (most elements), the kernel the fresh-state ones."""
    for o in (SAMPLE_OPTIONS[0], SAMPLE_OPTIONS[1]):
        rng = np.random.default_rng(6)
        shape = (2, 300)
        w = rng.standard_normal(shape).astype(F32)
        g = rng.standard_normal(shape).astype(F32)
        state = quantized_random_state(rng, shape, o, 3)
        fresh, _ = model.quantized_step(g, w, state, LR, 3, o)
        stale, _ = model.quantized_step(g, w, state, LR, 3, o, stale_state_update=True)
        assert (fresh != stale).mean() > 0.5
        kw, _ = rmsprop_step(mx.array(g), mx.array(w), kernel_state(state), LR, step=3,
                             **EIGHT_BIT, **op_kwargs(o))
        assert_same_floats(f"{o}", np.array(kw), fresh)


def train_leaf(opt: RMSprop, w0: np.ndarray, grads, dtype=mx.float32) -> mx.array:
    params = {"w": mx.array(w0).astype(dtype)}
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g).astype(dtype)}, params)
        mx.eval(params, opt.state)
    return params["w"]


def steps_beside_the_model(opt: RMSprop, params: dict, w, state: dict, grads, first: int,
                           o: models.Options, dtype: str = "float32"):
    """Steps first, first + 1, ... of `opt` on the leaf "w" and of the model
    from (w, state): parameter, codes and scales bit-equal after each.
    Returns (params, w, state)."""
    for t, g in enumerate(grads, start=first):
        params = opt.apply_gradients({"w": to_mx(g, dtype)}, params)
        mx.eval(params, opt.state)
        w, state = model.quantized_step(g, w, state, LR, t, o, dtype)
        assert_same_floats(f"step {t} param", as_f32(params["w"]), w)
        assert_state(f"step {t}", opt.state["w"], state)
    return params, w, state


@pytest.mark.parametrize("initial_scale", [0.0, 0.5])
@pytest.mark.parametrize("options", [0, 1])
def test_the_optimizer_from_a_fresh_state_against_the_model(options, initial_scale):
    """RMSprop(state_bits=8) from its own fresh state (v at initial_scale,
    quantized; the others zero), four steps (bias correction takes the step
    count from the optimizer): the model's bits after every step."""
    o = dataclasses.replace(FRESH_OPTIONS[options], initial_scale=initial_scale)
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((20, 300)).astype(F32)
    grads = [rng.standard_normal(w0.shape).astype(F32) for _ in range(4)]
    opt = RMSprop(LR, state_bits=8, **options_kw(o))
    steps_beside_the_model(opt, {"w": mx.array(w0)}, w0, model.initial_state(w0.shape, o), grads, 1, o)


def test_a_linear_layer_trained_by_the_optimizer_against_the_model():
    """nn.Linear's weight gradient comes transposed; three training steps of
    a two-layer model with value_and_grad: the quantized weight's codes,
    scales and values are the model's (fed the same gradients), the small
    bias keeps float32 state."""
    mx.random.seed(8)
    net = nn.Sequential(nn.Linear(48, 100), nn.Tanh(), nn.Linear(100, 3))
    x, y = mx.random.normal((16, 48)), mx.random.normal((16, 3))
    loss_and_grad = nn.value_and_grad(net, lambda x, y: ((net(x) - y) ** 2).mean())
    o = FRESH_OPTIONS[0]
    opt = RMSprop(LR, state_bits=8, **options_kw(o))
    w = np.array(net.layers[0].weight)
    state = model.initial_state(w.shape, o)
    for t in (1, 2, 3):
        _, grads = loss_and_grad(x, y)
        g = np.array(grads["layers"][0]["weight"])
        w, state = model.quantized_step(g, w, state, LR, t, o)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
        assert_same_floats(f"step {t}", np.array(net.layers[0].weight), w)
        assert_state(f"step {t}", opt.state["layers"][0]["weight"], state)
    assert opt.state["layers"][0]["bias"]["v"].dtype == mx.float32


# ---- 3. Accuracy against float32 state.


def test_accuracy_against_float32_state(capsys):
    """50 steps of N(0, 1) gradients (alpha 0.9, lr 0.01) on 65,536
    elements: the parameter's displacement is within 2% (relative L2) of the
    float32-state optimizer's, and the dequantized v's median relative error
    within 2%."""
    rng = np.random.default_rng(9)
    w0 = rng.standard_normal((256, 256)).astype(F32)
    grads = [rng.standard_normal(w0.shape).astype(F32) for _ in range(50)]
    eight, full = RMSprop(0.01, alpha=0.9, state_bits=8), RMSprop(0.01, alpha=0.9)
    w8, w32 = train_leaf(eight, w0, grads), train_leaf(full, w0, grads)
    assert eight.state["w"]["v"].dtype == mx.uint8 and full.state["w"]["v"].dtype == mx.float32
    d8, d32 = np.array(w8, np.float64) - w0, np.array(w32, np.float64) - w0
    displacement = np.linalg.norm(d8 - d32) / np.linalg.norm(d32)
    v8 = np.array(eight.full_precision_state()["w"]["v"], np.float64)
    v32 = np.array(full.state["w"]["v"], np.float64)
    median = np.median(np.abs(v8 - v32) / v32)
    with capsys.disabled():
        print(f"\n8-bit vs float32 state, 50 steps: displacement {displacement:.4%} (rel. L2), "
              f"v median relative error {median:.4%}")
    assert displacement <= 0.02 and median <= 0.02, (displacement, median)


# ---- 4. Which leaves quantize; state bytes.


def mixed_parameters(with_float64: bool = False) -> dict:
    """A weight at the default min_8bit_size (4096), a larger bfloat16 one,
    small float32 and bfloat16 biases; a float64 leaf above the size if
    asked (safetensors cannot hold float64)."""
    rng = np.random.default_rng(10)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(F32))

    params = {
        "layers": [
            {"weight": normal(64, 64), "bias": normal(64)},
            {"weight": normal(40, 130).astype(mx.bfloat16), "bias": normal(40).astype(mx.bfloat16)},
        ],
    }
    if with_float64:
        params["wide"] = normal(5000).astype(mx.float64)
    return params


def gradients_of(params: dict, k: int) -> dict:
    """Random gradients for step k (the same for every run)."""
    flat = tree_flatten(params)
    return tree_unflatten([
        (path, mx.random.normal(p.shape, key=mx.random.key(100 * k + i)).astype(p.dtype))
        for i, (path, p) in enumerate(flat)
    ])


def train(opt, params: dict, steps) -> dict:
    """Steps `steps` of gradients_of; the parameters stay finite (comparing
    NaNs would prove little)."""
    for k in steps:
        params = opt.apply_gradients(gradients_of(params, k), params)
        mx.eval(params, opt.state)
    for path, p in tree_flatten(params):
        assert mx.isfinite(p).all().item(), path
    return params


def test_which_leaves_quantize():
    """With state_bits=8: leaves of at least min_8bit_size elements keep
    8-bit entries (codes of the parameter's shape, one float32 scale per 256
    elements); smaller ones float32 state, also beside bfloat16 parameters;
    float64 leaves keep float64 state (and the documentation says so);
    min_8bit_size=0 quantizes every leaf but float64, including a
    one-element and an empty leaf."""
    params = mixed_parameters(with_float64=True)
    opt = RMSprop(0.01, state_bits=8, centered=True, momentum=0.5)
    train(opt, params, range(2))
    s = opt.state
    names = ("v", "mean", "momentum_buffer")
    for leaf, shape in ((s["layers"][0]["weight"], (64, 64)), (s["layers"][1]["weight"], (40, 130))):
        assert set(leaf) == set(names) | {n + "_scale" for n in names}
        for n in names:
            assert leaf[n].dtype == mx.uint8 and leaf[n].shape == shape
            assert leaf[n + "_scale"].dtype == mx.float32
            assert leaf[n + "_scale"].shape == (-(-shape[0] * shape[1] // 256),)
    for leaf in (s["layers"][0]["bias"], s["layers"][1]["bias"]):
        assert set(leaf) == set(names) and all(leaf[n].dtype == mx.float32 for n in names)
    assert {a.dtype for a in s["wide"].values()} == {mx.float64}
    assert "float64 excepted" in " ".join(RMSprop.__doc__.split())

    everything = RMSprop(0.01, state_bits=8, min_8bit_size=0)
    params = {**mixed_parameters(with_float64=True), "one": mx.array([0.5]), "empty": mx.zeros((0, 3))}
    train(everything, params, range(1))
    for path, value in tree_flatten(everything.state):
        if path.endswith(".v"):
            assert value.dtype == (mx.float64 if path == "wide.v" else mx.uint8), path
    assert everything.state["one"]["v_scale"].shape == (1,)
    assert everything.state["empty"]["v"].shape == (0, 3)
    assert everything.state["empty"]["v_scale"].shape == (0,)


def test_state_dtype_with_state_bits_gives_the_same_state():
    """state_dtype=mx.float32 with state_bits=8 is accepted and changes
    nothing (the small leaves' state is float32 either way)."""
    a = RMSprop(0.01, state_bits=8, momentum=0.9)
    b = RMSprop(0.01, state_bits=8, momentum=0.9, state_dtype=mx.float32)
    pa, pb = train(a, mixed_parameters(), range(3)), train(b, mixed_parameters(), range(3))
    assert_trees_bit_equal_in_any_order(pa, pb)
    assert_trees_bit_equal_in_any_order(a.state, b.state)


@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.9)])
def test_state_nbytes_of_quantized_leaves(centered, momentum):
    """state_nbytes() counts k * (n + 4 * ceil(n / 256)) bytes for a
    quantized leaf of n elements with k state entries: at most 0.26x the
    float32 state's 4 * k * n, for the default minimum size and up."""
    k = 1 + centered + (momentum > 0)
    for n in (4096, 4097, 5000, 65536 + 1):
        params = {"w": mx.zeros((n,))}
        eight = RMSprop(0.01, state_bits=8, centered=centered, momentum=momentum)
        full = RMSprop(0.01, centered=centered, momentum=momentum)
        eight.init(params)
        full.init(params)
        assert eight.state_nbytes() == k * (n + 4 * -(-n // 256))
        assert full.state_nbytes() == 4 * k * n
        assert eight.state_nbytes() <= 0.26 * full.state_nbytes()


# ---- 5. full_precision_state and conversions.


def one_leaf_run(o: models.Options, dtype="float32", steps=2, seed=11, shape=(20, 300)):
    """An 8-bit optimizer after `steps` on one leaf, with the model's state."""
    rng = np.random.default_rng(seed)
    w0 = model.round_to(rng.standard_normal(shape), dtype)
    grads = [model.round_to(rng.standard_normal(shape), dtype) for _ in range(steps + 4)]
    opt = RMSprop(LR, state_bits=8, **options_kw(o))
    w = train_leaf(opt, w0, grads[:steps], MX_DTYPES[dtype])
    want_w, want_state = model.run(w0, grads[:steps], LR, o, dtype)
    assert_same_floats("param", as_f32(w), want_w[-1])
    return opt, w, want_w[-1], want_state, grads[steps:]


@pytest.mark.parametrize("options", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_precision_state_is_the_dequantized_state(dtype, options):
    """full_precision_state(): every entry map[code] * scale bit for bit, in
    the plain layout (the parameter's shape, float32, no scales), plus the
    scalar entries; the optimizer's own state is not changed. RMSprop with
    float32 state and the same options loads it and continues exactly as the
    float32 model from that state."""
    o = FRESH_OPTIONS[options]
    opt, w, w_np, state, grads = one_leaf_run(o, dtype)
    before = dict(tree_flatten(opt.state))
    fp = opt.full_precision_state()
    assert set(fp) == {"step", "learning_rate", "w"} and fp["step"].item() == 2
    assert set(fp["w"]) == set(o.state_names())
    full = {}
    for name, entry in state.items():
        full[name] = model.dequantize(entry.codes, entry.scales, model.map_of(name))
        assert fp["w"][name].dtype == mx.float32 and fp["w"][name].shape == w.shape
        assert_same_floats(name, np.array(fp["w"][name]), full[name])
    assert_trees_bit_equal_in_any_order(dict(tree_flatten(opt.state)), before)

    wide = RMSprop(LR, state_dtype=mx.float32, **options_kw(o))
    wide.state = fp
    params = {"w": w}
    for t, g in enumerate(grads[:2], start=3):
        params = wide.apply_gradients({"w": to_mx(g, dtype)}, params)
        mx.eval(params, wide.state)
        w_np, full = model.update_f32(g, w_np, full, model.constants(o, LR, t), o)
        w_np = model.round_to(w_np, dtype)
        assert_same_floats(f"float32 state, step {t}", as_f32(params["w"]), w_np)
        for name in o.state_names():
            assert_same_floats(f"{name} step {t}", np.array(wide.state["w"][name]), full[name])


def test_mlx_rmsprop_loads_the_full_precision_state_and_continues():
    """mlx.optimizers.RMSprop takes full_precision_state() as its own and
    continues exactly as this class with float32 state would."""
    o = models.Options(alpha=0.9)
    opt, w, _, _, grads = one_leaf_run(o)
    theirs, ours = optim.RMSprop(LR, alpha=0.9), RMSprop(LR, alpha=0.9)
    theirs.state, ours.state = opt.full_precision_state(), opt.full_precision_state()
    pt = po = {"w": w}
    for g in grads[:3]:
        pt = theirs.apply_gradients({"w": mx.array(g)}, pt)
        po = ours.apply_gradients({"w": mx.array(g)}, po)
        mx.eval(pt, po, theirs.state, ours.state)
    assert theirs.step.item() == 5
    assert_trees_bit_equal_in_any_order(pt, po)
    assert_trees_bit_equal_in_any_order(theirs.state, ours.state)


def test_a_full_precision_checkpoint_is_quantized_at_the_next_step():
    """An mlx.optimizers.RMSprop state assigned to an 8-bit optimizer: left as
    given until the next step, which quantizes it exactly as
    _ext.quantize_state does (= the model) and steps from there."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((20, 300)).astype(F32)
    grads = [rng.standard_normal(w.shape).astype(F32) for _ in range(4)]
    theirs = optim.RMSprop(LR, alpha=0.9)
    params = {"w": mx.array(w)}
    for g in grads[:2]:
        params = theirs.apply_gradients({"w": mx.array(g)}, params)
    mx.eval(params, theirs.state)
    v = theirs.state["w"]["v"]
    codes, scales = _ext.quantize_state(v, True)
    want = model.Quantized(*model.quantize(np.array(v), model.UNSIGNED))
    assert_entry("quantize_state", {"v": codes, "v_scale": scales}, "v", want)

    opt = RMSprop(LR, alpha=0.9, state_bits=8)
    opt.state = theirs.state
    assert opt.state["w"]["v"].dtype == mx.float32  # not yet
    steps_beside_the_model(opt, params, np.array(params["w"]), {"v": want}, grads[2:], 3,
                           models.Options(alpha=0.9))


def test_rmsprop_step_quantizes_a_full_precision_state():
    """rmsprop_step with state_bits=8 given float32 state returns it 8-bit:
    quantized as quantize_state, then stepped (the model); with
    state_bits=None given 8-bit state, dequantized and stepped in float32."""
    o = SAMPLE_OPTIONS[2]
    rng = np.random.default_rng(14)
    shape = (3, 300)
    w, g = rng.standard_normal(shape).astype(F32), rng.standard_normal(shape).astype(F32)
    full = {n: v.astype(F32) for n, v in random_state(rng, shape, o, 2).items()}
    kw, ks = rmsprop_step(mx.array(g), mx.array(w), {n: mx.array(v) for n, v in full.items()}, LR,
                          step=2, **EIGHT_BIT, **op_kwargs(o))
    state = {n: model.Quantized(*model.quantize(v, model.map_of(n))) for n, v in full.items()}
    want_w, want_state = model.quantized_step(g, w, state, LR, 2, o)
    assert_same_floats("param", np.array(kw), want_w)
    assert_state("8-bit", ks, want_state)
    kw, back = rmsprop_step(mx.array(g), kw, ks, LR, step=3, **op_kwargs(o))
    dequantized = {n: model.dequantize(e.codes, e.scales, model.map_of(n)) for n, e in want_state.items()}
    want_w, want_full = model.update_f32(g, want_w, dequantized, model.constants(o, LR, 3), o)
    assert_same_floats("param", np.array(kw), want_w)
    assert set(back) == set(o.state_names())
    for name in o.state_names():
        assert_same_floats(name, np.array(back[name]), want_full[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_switching_a_running_job_8bit_float32_8bit(dtype):
    """8-bit for two steps, full_precision_state() into a float32-state
    optimizer for two, its state into an 8-bit optimizer for two more: every
    stage is the model's (quantized steps, float32 steps from the dequantized
    state, quantized steps from the quantized float32 state)."""
    o = SAMPLE_OPTIONS[2]
    opt, w, w_np, state, grads = one_leaf_run(o, dtype)
    wide = RMSprop(LR, state_dtype=mx.float32, **options_kw(o))
    wide.state = opt.full_precision_state()
    full = {n: model.dequantize(e.codes, e.scales, model.map_of(n)) for n, e in state.items()}
    params = {"w": w}
    for t, g in enumerate(grads[:2], start=3):
        params = wide.apply_gradients({"w": to_mx(g, dtype)}, params)
        w_np, full = model.update_f32(g, w_np, full, model.constants(o, LR, t), o)
        w_np = model.round_to(w_np, dtype)
    mx.eval(params, wide.state)
    assert_same_floats("float32 stage", as_f32(params["w"]), w_np)
    back = RMSprop(LR, state_bits=8, **options_kw(o))
    back.state = wide.state
    state = {n: model.Quantized(*model.quantize(v, model.map_of(n))) for n, v in full.items()}
    steps_beside_the_model(back, params, w_np, state, grads[2:4], 5, o, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_leaving_8bit_beside_16bit_parameters_keeps_their_dtype(dtype):
    """opt.state_bits = None on a running 8-bit optimizer of 16-bit
    parameters (state_dtype left at None): the next step dequantizes the
    state into the parameters' dtype, as every full-precision optimizer of
    them keeps it, and steps exactly as one loaded with that state."""
    rng = np.random.default_rng(17)
    dt = MX_DTYPES[dtype]
    params = {"w": to_mx(rng.standard_normal((20, 300)), dtype)}
    grads = [to_mx(rng.standard_normal((20, 300)), dtype) for _ in range(3)]
    opt = RMSprop(LR, alpha=0.9, momentum=0.9, state_bits=8)
    for g in grads[:2]:
        params = opt.apply_gradients({"w": g}, params)
    mx.eval(params, opt.state)
    plain = RMSprop(LR, alpha=0.9, momentum=0.9)
    plain.state = {**opt.state, "w": {n: a.astype(dt) for n, a in opt.full_precision_state()["w"].items()}}
    opt.state_bits = None
    got, want = opt.apply_gradients({"w": grads[2]}, params), plain.apply_gradients({"w": grads[2]}, params)
    mx.eval(got, want, opt.state, plain.state)
    assert {n: a.dtype for n, a in opt.state["w"].items()} == {"v": dt, "momentum_buffer": dt}
    assert_trees_bit_equal_in_any_order((got, opt.state["w"]), (want, plain.state["w"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_setting_state_bits_between_steps_converts(dtype):
    """opt.state_bits = 8 on a running optimizer quantizes its state at the
    next step (as quantize_state: the model), and opt.state_bits = None
    dequantizes it again (as full_precision_state; beside bfloat16
    parameters with state_dtype=mx.float32, the dtype 8-bit state is
    computed in)."""
    o = models.Options(alpha=0.9, momentum=0.9)
    rng = np.random.default_rng(13)
    w = model.round_to(rng.standard_normal((20, 300)), dtype)
    grads = [model.round_to(rng.standard_normal(w.shape), dtype) for _ in range(4)]
    opt = RMSprop(LR, alpha=0.9, momentum=0.9)
    params = {"w": to_mx(w, dtype)}
    for g in grads[:2]:
        params = opt.apply_gradients({"w": to_mx(g, dtype)}, params)
    mx.eval(params, opt.state)
    assert opt.state["w"]["v"].dtype == MX_DTYPES[dtype]
    state = {n: model.Quantized(*model.quantize(as_f32(v), model.map_of(n)))
             for n, v in opt.state["w"].items()}
    opt.state_bits = 8
    params, w_np, _ = steps_beside_the_model(opt, params, as_f32(params["w"]), state, grads[2:3], 3, o, dtype)
    expected_full = opt.full_precision_state()["w"]
    opt.state_bits = None
    if dtype != "float32":
        opt.state_dtype = mx.float32
    params = opt.apply_gradients({"w": to_mx(grads[3], dtype)}, params)
    mx.eval(params, opt.state)
    full = {n: np.array(a) for n, a in expected_full.items()}
    w_np, full = model.update_f32(grads[3], w_np, full, model.constants(o, LR, 4), o)
    assert_same_floats("param", as_f32(params["w"]), model.round_to(w_np, dtype))
    assert set(opt.state["w"]) == set(o.state_names())
    for name in o.state_names():
        assert opt.state["w"][name].dtype == mx.float32
        assert_same_floats(name, np.array(opt.state["w"][name]), full[name])


# ---- 6. Checkpoints.


def save_and_load(state: dict, path) -> dict:
    mx.save_safetensors(str(path), dict(tree_flatten(state)))
    return tree_unflatten(list(mx.load(str(path)).items()))


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    """Through mx.save_safetensors(dict(tree_flatten(opt.state))) and
    tree_unflatten(mx.load(...)): the loaded state is the saved one bit for
    bit, and continuing from it equals the uninterrupted run (parameters and
    state)."""
    options = dict(state_bits=8, centered=True, momentum=0.9, nesterov=True)
    opt = RMSprop(0.01, **options)
    params = train(opt, mixed_parameters(), range(2))
    loaded = save_and_load(opt.state, tmp_path / "state.safetensors")
    assert_trees_bit_equal_in_any_order(loaded, opt.state)
    fresh = RMSprop(0.01, **options)
    fresh.state = loaded
    resumed = train(fresh, params, range(2, 5))
    params = train(opt, params, range(2, 5))
    assert_trees_bit_equal_in_any_order(resumed, params)
    assert_trees_bit_equal_in_any_order(fresh.state, opt.state)


BROKEN_CHECKPOINTS = {
    "missing scale": (lambda s: s.pop("layers.0.weight.v_scale"),
                      r"has no entry 'layers\.0\.weight\.v_scale'$"),
    "missing codes": (lambda s: s.pop("layers.0.weight.mean"),
                      r"has no entry 'layers\.0\.weight\.mean'$"),
    "mis-shaped scale": (lambda s: s.update({"layers.0.weight.v_scale": mx.zeros((15,))}),
                         r"entry 'layers\.0\.weight\.v_scale' is \(15,\) mlx\.core\.float32, .*"
                         r"\(this entry: \(16,\) mlx\.core\.float32\)$"),
    "mis-shaped codes": (lambda s: s.update({"layers.1.weight.v": mx.zeros((130, 40), mx.uint8)}),
                         r"entry 'layers\.1\.weight\.v' is \(130, 40\) mlx\.core\.uint8, "
                         r"but the parameter is \(40, 130\) mlx\.core\.bfloat16 \(its state: mlx\.core\.uint8\)$"),
    "scale of another dtype": (lambda s: s.update({"layers.0.weight.mean_scale": mx.zeros((16,), mx.float16)}),
                               r"entry 'layers\.0\.weight\.mean_scale' is \(16,\) mlx\.core\.float16"),
}


@pytest.mark.parametrize("broken", list(BROKEN_CHECKPOINTS))
def test_a_broken_8bit_checkpoint_names_the_entry(tmp_path, broken):
    """A missing or mis-shaped codes or scale entry is a ValueError naming the
    entry; nothing changes (the step count, the state as assigned)."""
    edit, message = BROKEN_CHECKPOINTS[broken]
    opt = RMSprop(0.01, state_bits=8, centered=True)
    params = train(opt, mixed_parameters(), range(1))
    flat = dict(tree_flatten(opt.state))
    edit(flat)
    fresh = RMSprop(0.01, state_bits=8, centered=True)
    fresh.state = tree_unflatten(list(flat.items()))
    before = dict(tree_flatten(fresh.state))
    with pytest.raises(ValueError, match=message):
        fresh.apply_gradients(gradients_of(params, 1), params)
    assert fresh.step.item() == 1
    assert_trees_bit_equal_in_any_order(dict(tree_flatten(fresh.state)), before)


# ---- 7. mx.compile.


@pytest.mark.parametrize("options", [
    {},
    {"centered": True, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"bias_correction": True, "momentum": 0.9},
    {"momentum": 0.5, "lr_inside_momentum": True, "eps_in_sqrt": True, "maximize": True,
     "weight_decay": 0.01, "decoupled_weight_decay": True},
], ids=["plain", "centered-nesterov", "bias-correction", "optax-keras-like"])
def test_compiled_steps_give_the_eager_bits(options):
    """A compiled step with the model's parameters and the optimizer's state
    as inputs and outputs: parameters and 8-bit state bit-equal to eager
    steps, traced once."""
    params = mixed_parameters()
    eager, compiled = RMSprop(0.01, state_bits=8, **options), RMSprop(0.01, state_bits=8, **options)
    compiled.init(params)
    holder = {"params": params}
    traces = []

    @partial(mx.compile, inputs=[holder, compiled.state], outputs=[holder, compiled.state])
    def step(grads):
        traces.append(1)
        holder["params"] = compiled.apply_gradients(grads, holder["params"])

    pe = mixed_parameters()  # the same values, other arrays (compile swaps the holder's)
    for k in range(4):
        step(gradients_of(holder["params"], k))
        mx.eval(holder, compiled.state)
        pe = eager.apply_gradients(gradients_of(pe, k), pe)
        mx.eval(pe, eager.state)
    assert len(traces) == 1
    assert compiled.state["layers"][0]["weight"]["v"].dtype == mx.uint8
    assert all(mx.isfinite(p).all().item() for _, p in tree_flatten(pe))
    assert_trees_bit_equal_in_any_order(holder["params"], pe)
    assert_trees_bit_equal_in_any_order(compiled.state, eager.state)


# ---- 8. Sharded pieces, in one process (fake ranks; the singleton group steps).


SHARD_OPTIONS = {"state_bits": 8, "min_8bit_size": 256, "centered": True, "momentum": 0.9}


def test_sharded_pieces_start_at_blocks_and_assemble_to_the_state():
    """Over 2 and 3 (fake) ranks, every piece of an 8-bit leaf starts and
    stops at a multiple of 256 of the leaf (or its end), its scales are its
    blocks, and the ranks' state_nbytes() add up to the unsharded one's;
    assemble_state gives the unsharded state back, and with
    full_precision=True its full_precision_state()."""
    params = mixed_parameters()
    opt = RMSprop(0.1, **SHARD_OPTIONS)
    params = train(opt, params, range(2))
    sizes = {path: p.size for path, p in tree_flatten(params)}
    for ranks in (2, 3):
        dicts = rank_state_dicts(opt.state, params, ranks, **SHARD_OPTIONS)
        split = 0
        for flat in dicts:
            for key, record in flat.items():
                if not key.endswith(".__shard__"):
                    continue
                path = key[: -len(".__shard__")]
                _, start, stop, *_ = record.tolist()
                if flat[f"{path}.v"].dtype == mx.uint8:
                    assert start % 256 == 0 and (stop % 256 == 0 or stop == sizes[path]), (key, start, stop)
                    assert flat[f"{path}.v"].shape == (stop - start,)
                    assert flat[f"{path}.v_scale"].shape == (-(-stop // 256) - start // 256,)
                    split += 0 < start
        assert split >= 1  # an 8-bit leaf is really cut between ranks
        nbytes = [sharded_at(r, ranks, params, opt.state, **SHARD_OPTIONS).state_nbytes() for r in range(ranks)]
        assert sum(nbytes) == opt.state_nbytes()  # no block (and scale) on two ranks
        assert_trees_bit_equal_in_any_order(RMSprop.assemble_state(dicts[::-1]), opt.state)
        assert_trees_bit_equal_in_any_order(
            RMSprop.assemble_state(dicts, full_precision=True), opt.full_precision_state()
        )


@pytest.mark.parametrize("full_precision", [False, True], ids=["8-bit", "full-precision"])
def test_assembled_state_loads_into_another_rank_count_and_continues(full_precision):
    """3 fake ranks' sharded_state_dict -> assemble_state (8-bit, or
    full_precision=True) -> load_full_state into the singleton group, which
    steps: bit-identical to the unsharded optimizer given the same state
    (8-bit: the uninterrupted run itself; full precision is requantized,
    which is not always the same codes: the signed map has no -1, so a block
    whose absolute maximum is negative comes back with a smaller scale)."""
    params = mixed_parameters()
    opt = RMSprop(0.1, **SHARD_OPTIONS)
    params = train(opt, params, range(2))
    dicts = rank_state_dicts(opt.state, params, 3, **SHARD_OPTIONS)
    full = RMSprop.assemble_state(dicts, full_precision=full_precision)
    sharded = RMSprop(0.1, shard_group=mx.distributed.init(), **SHARD_OPTIONS)
    sharded.load_full_state(full)
    if full_precision:
        opt = RMSprop(0.1, **SHARD_OPTIONS)
        opt.state = RMSprop.assemble_state(dicts, full_precision=True)
    resumed = train(sharded, params, range(2, 5))
    params = train(opt, params, range(2, 5))
    assert_trees_bit_equal_in_any_order(resumed, params)
    assert_trees_bit_equal_in_any_order(RMSprop.assemble_state([sharded.sharded_state_dict()]), opt.state)
