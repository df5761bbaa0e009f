"""Every instruction-set build of the CPU loops gives the same bits.

On x86-64 the loops are compiled three times -- baseline (SSE2), AVX2 + F16C
and, for float16 / bfloat16, AVX-512 -- and the widest the CPU runs is picked
at run time (csrc/cpu/isa.h). MLX_FUSED_RMSPROP_ISA=baseline|avx2 caps the
choice, so each build runs here in its own process over the same inputs:
every float16 / bfloat16 bit pattern (NaN, Inf, subnormals, -0) as
parameter and as gradient, random float32 / float64 bit patterns, run
lengths around every vector width, each walk (flat, transposed tiles,
strided), in place and into fresh buffers, and the variants' loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ISAS = ("baseline", "avx2", "avx512")

_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "avx2": ("avx2", "f16c"),
    "avx512": ("avx2", "f16c", "avx512f", "avx512bw", "avx512vl"),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_runs(isa: str) -> bool:
    return set(_CPU_FLAGS[isa]) <= _cpu_flags()


def _widest_isa() -> str:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    return [isa for isa in ISAS if _cpu_runs(isa)][-1]


def _run(script: str, isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLX_FUSED_RMSPROP_ISA", None)
    if isa is not None:
        env["MLX_FUSED_RMSPROP_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


_ISA_SCRIPT = r"""
import json
from mlx_fused_rmsprop import _ext
print(json.dumps({"isa": _ext._cpu_isa()}))
"""


def test_the_widest_build_the_cpu_runs_is_picked_and_can_be_capped():
    assert _run(_ISA_SCRIPT, None)["isa"] == _widest_isa()
    assert _run(_ISA_SCRIPT, "baseline")["isa"] == "baseline"
    if _cpu_runs("avx2"):
        assert _run(_ISA_SCRIPT, "avx2")["isa"] == "avx2"


_BITS_SCRIPT = r"""
import hashlib, json
import numpy as np
import mlx.core as mx
from mlx_fused_rmsprop import _ext, rmsprop_step, rmsprop_update

mx.set_default_device(mx.cpu)
rng = np.random.default_rng(7)
UINT = {mx.float16: np.uint16, mx.bfloat16: np.uint16, mx.float32: np.uint32,
        mx.float64: np.uint64}
UINT_MX = {mx.float16: mx.uint16, mx.bfloat16: mx.uint16, mx.float32: mx.uint32,
           mx.float64: mx.uint64}
out = {"isa": _ext._cpu_isa()}

def from_bits(bits, dtype):
    return mx.array(bits).view(dtype)

def random_bits(n, dtype):
    # Any bit pattern (NaN, Inf, subnormals); for the 16-bit formats every
    # pattern, shuffled, then random ones.
    u = UINT[dtype]
    if u == np.uint16:
        every = rng.permutation(np.arange(65536, dtype=np.uint32)).astype(u)
        return np.resize(every, n)
    return rng.integers(0, np.iinfo(u).max, n, dtype=u, endpoint=True)

def finite(n, dtype, scale=1.0):
    return (mx.array(rng.standard_normal(n).astype(np.float32)) * scale).astype(dtype)

def digest(*arrays, unspecified=None):
    # Where two or more inputs of an element are NaN, IEEE 754 leaves the
    # sign of the NaN result to the instruction's operand order (which the
    # compiler may pick differently per build): there only NaN-ness counts.
    h = hashlib.sha256()
    for a in arrays:
        bits = mx.contiguous(a).view(UINT_MX[a.dtype])
        if unspecified is not None:
            bits = mx.where(unspecified & mx.isnan(a), mx.array(1, bits.dtype), bits)
        mx.eval(bits)
        h.update(bytes(memoryview(bits)))
    return h.hexdigest()

def plain(g, w, v, in_place):
    # In place: a second step, whose w and v (the first step's outputs) are
    # referenced by nothing else and so are donated to its outputs.
    lr = mx.array(0.01)
    for _ in range(2 if in_place else 1):
        unspecified = (mx.isnan(g).astype(mx.int32) + mx.isnan(w) + mx.isnan(v)) >= 2
        mx.eval(unspecified)
        w, v = rmsprop_update(g, w, v, lr, alpha=0.9, eps=1e-6)
        mx.eval(w, v)
    return digest(w, v, unspecified=unspecified)

DTYPES = (mx.float16, mx.bfloat16, mx.float32, mx.float64)
LENGTHS = list(range(1, 40)) + [63, 64, 65, 1000, 4099]
for dtype in DTYPES:
    name = str(dtype).split(".")[-1]
    n = 65536 * 2
    # Every bit pattern as the parameter, then as the gradient; v any
    # non-negative value (NaN and Inf included: the bits with the sign cleared).
    raw_v = random_bits(n, dtype)
    sign = np.array(1, UINT[dtype]) << (8 * np.dtype(UINT[dtype]).itemsize - 1)
    v_bits = from_bits(raw_v & ~sign, dtype)
    for in_place in (False, True):
        w = from_bits(random_bits(n, dtype), dtype)
        out[f"{name}/w-bits/{in_place}"] = plain(finite(n, dtype), w, v_bits, in_place)
        g = from_bits(random_bits(n, dtype), dtype)
        out[f"{name}/g-bits/{in_place}"] = plain(g, finite(n, dtype), v_bits, in_place)
    # Run lengths around the vector widths (the tails of every loop).
    for n in LENGTHS:
        out[f"{name}/len{n}"] = plain(finite(n, dtype), finite(n, dtype),
                                      mx.abs(finite(n, dtype)), True)
    # The transposed walk (tiles of the gradient) and the strided one.
    for rows, cols in ((2, 17), (17, 3), (63, 65), (64, 64), (130, 47)):
        g = mx.transpose(finite(rows * cols, dtype).reshape(cols, rows))
        w = finite(rows * cols, dtype).reshape(rows, cols)
        v = mx.abs(finite(rows * cols, dtype)).reshape(rows, cols)
        assert _ext._cpu_walk(g, w, v) == "transposed"
        out[f"{name}/transposed{rows}x{cols}"] = plain(g, w, v, True)
        gs = finite(rows * cols * 2, dtype).reshape(rows, cols * 2)[:, ::2]
        assert _ext._cpu_walk(gs, w, v) != "flat"
        out[f"{name}/strided{rows}x{cols}"] = plain(gs, w, v, False)
    # The variants' loops: momentum, centered, float32 state beside halves.
    for opts in ({"momentum": 0.9, "nesterov": True}, {"centered": True, "momentum": 0.5},
                 {"weight_decay": 0.1, "bias_correction": True}):
        for n in (37, 4099):
            state_dtype = mx.float32 if dtype in (mx.float16, mx.bfloat16) else dtype
            state = {"v": mx.abs(finite(n, state_dtype))}
            if opts.get("centered"):
                state["mean"] = finite(n, state_dtype, 0.1)
            if opts.get("momentum"):
                state["momentum_buffer"] = finite(n, state_dtype)
            w2, s2 = rmsprop_step(finite(n, dtype), finite(n, dtype), state, 0.01, step=3,
                                  alpha=0.9, eps=1e-6, **opts)
            out[f"{name}/variant{sorted(opts)}/{n}"] = digest(w2, *s2.values())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def baseline_bits() -> dict:
    results = _run(_BITS_SCRIPT, "baseline")
    assert results.pop("isa") == "baseline"
    return results


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_every_build_of_the_loops_gives_the_same_bits(isa, baseline_bits):
    """The SIMD builds against the baseline one; the rest of the suite runs
    the default (widest) build in process against mlx itself."""
    if not _cpu_runs(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    results = _run(_BITS_SCRIPT, None if isa == _widest_isa() else isa)
    assert results.pop("isa") == isa
    assert results.keys() == baseline_bits.keys()
    differing = sorted(k for k in baseline_bits if baseline_bits[k] != results[k])
    assert not differing, f"{isa} differs from baseline in {differing}"
