"""The tuned CPU kernel (csrc/rmsprop_cpu.cpp): conversions, layouts, the
multi-threaded split and in-place buffer reuse. No timing assertions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import mlx_fused_rmsprop as fused
from mlx_fused_rmsprop import _ext, rmsprop_update

ROOT = Path(__file__).resolve().parent.parent
ALPHA, EPS = 0.99, 1e-8
HALF = {"float16": mx.float16, "bfloat16": mx.bfloat16}
BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}


@pytest.fixture(autouse=True)
def _cpu():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(BITS[a.dtype]))


def reference(g, w, v, lr, dtype):
    """One step as the CPU kernel defines it, with mlx ops: float32 leaves as
    mlx.optimizers.RMSprop computes them; half leaves converted to float32 by
    mlx, the same float32 math, one rounding back by mlx (astype)."""
    if dtype == mx.float32:
        v2 = ALPHA * v + (1 - ALPHA) * mx.square(g)
        return w - lr * g / (mx.sqrt(v2) + EPS), v2
    f = mx.float32
    g, w, v = (x.astype(f) for x in (g, w, v))
    v2 = mx.array(ALPHA, f) * v + mx.array(1 - ALPHA, f) * (g * g)
    w2 = w - (mx.array(lr, f) * g) / (mx.sqrt(v2) + mx.array(EPS, f))
    return w2.astype(dtype), v2.astype(dtype)


def fused_step(g, w, v, lr, in_place: bool):
    """rmsprop_update; with in_place the inputs are referenced by nothing but
    the graph, so the outputs may take their buffers."""
    lr_a = mx.array(lr, mx.float32)
    if in_place:
        # Bit-exact copies on fresh buffers that only the update will hold
        # once this function returns.
        w, v = _fresh_copy(w), _fresh_copy(v)
    return rmsprop_update(g, w, v, lr_a, alpha=ALPHA, eps=EPS)


def _fresh_copy(a: mx.array) -> mx.array:
    return mx.array(bits(a)).view(a.dtype).reshape(a.shape)


# ---- float16 / bfloat16 conversions: bit-exact against mlx's own.


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_half_conversions_match_mlx_bit_for_bit(tmp_path, isa):
    """Compiles tests/cpu_half_exact.cpp against the kernel's conversion headers
    (scalar, a vectorized loop of them, and the AVX2 / AVX-512 in-register
    ones this CPU has) and mlx's float16_t / bfloat16_t: all 65536 half
    patterns to float32, and
    to half from every half value's neighbourhood (ties, just above/below),
    every float32 exponent's edge mantissas (NaN, Inf, subnormals) and 4M
    random float32 patterns. (`cpu_half_exact all` checks all 2^32.)"""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    if isa == "avx2":
        if not _cpu_has("avx2"):
            pytest.skip("CPU has no AVX2")
        flags.append("-mavx2")
    exe = tmp_path / f"cpu_half_exact_{isa}"
    mlx_include = Path(mx.__file__).resolve().parent / "include"
    if not mlx_include.is_dir():
        mlx_include = Path(mx.__path__[0]) / "include"
    build = subprocess.run(
        [cxx, "-std=c++20", *flags, f"-I{mlx_include}", f"-I{ROOT / 'csrc'}",
         f"-I{ROOT / 'kernels'}",
         str(ROOT / "tests" / "cpu_half_exact.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "4000000", "12345"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("name", list(HALF))
def test_every_half_bit_pattern_round_trips_through_the_kernel(name):
    """With g = 0 and v = 0 the step is w' = w - 0: every one of the 65536
    half bit patterns (NaN, Inf, subnormals, -0) goes half -> float32 ->
    half through the kernel exactly as mlx converts it."""
    dtype = HALF[name]
    w = mx.arange(65536, dtype=mx.uint32).astype(mx.uint16).view(dtype)
    zeros = mx.zeros((65536,), dtype)
    for in_place in (False, True):
        w_new, v_new = fused_step(zeros, w, zeros, 0.01, in_place)
        expected = w.astype(mx.float32).astype(dtype)
        np.testing.assert_array_equal(bits(w_new), bits(expected))
        assert not np.any(bits(v_new))


@pytest.mark.parametrize("name", list(HALF))
@pytest.mark.parametrize("n", [1, 7, 4099, 300_001])
def test_half_leaves_bit_identical_to_float32_math_rounded_once(name, n):
    """Random bit patterns for g, w and v (so NaN, Inf and subnormals occur):
    the kernel's result is mlx's float32 math on mlx-converted inputs,
    rounded once by mlx, bit for bit.

    One exception, by IEEE 754: where two NaNs of different signs meet in one
    operation, which one propagates depends on the operands' order in the
    instruction the compiler picked (x86 keeps the first); that only happens
    where two or more of g, w, v are NaN, and there the result must be NaN."""
    dtype = HALF[name]
    rng = np.random.default_rng(n)
    raw = [rng.integers(0, 65536, n, dtype=np.uint16) for _ in range(3)]
    raw[2] &= 0x7FFF  # v >= 0 (or +NaN), as in a real run
    g, w, v = (mx.array(r).view(dtype) for r in raw)
    mx.eval(g, w, v)
    nans = sum(np.array(mx.isnan(x)).astype(int) for x in (g, w, v))
    exact = nans < 2
    ref_w, ref_v = reference(g, w, v, 0.01, dtype)
    for in_place in (False, True):
        out_w, out_v = fused_step(g, w, v, 0.01, in_place)
        for out, ref in ((out_w, ref_w), (out_v, ref_v)):
            np.testing.assert_array_equal(bits(out)[exact], bits(ref)[exact])
            np.testing.assert_array_equal(
                np.array(mx.isnan(out))[~exact], np.array(mx.isnan(ref))[~exact])


# ---- Layouts: every walk of the kernel, float32 bit-identical to mlx.


def _leaf(shape, dtype, seed):
    k = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(k, 3)
    g = mx.random.normal(shape, key=k1).astype(dtype)
    w = mx.random.normal(shape, key=k2).astype(dtype)
    v = (mx.random.uniform(shape=shape, key=k3) * 0.1).astype(dtype)
    return g, w, v


LAYOUTS = {
    "flat": lambda a: a,
    "grad_transposed": None,  # grad is the column-major twin (nn.Linear)
    "grad_strided": None,  # grad a strided slice of a bigger array
    "grad_padded_columns": None,  # unit row stride, padded columns: not the tiled walk
    "all_transposed": None,  # g, w, v all column-major: flat again
}


def _make_layout(kind, shape, dtype, seed):
    g, w, v = _leaf(shape, dtype, seed)
    if kind == "grad_transposed":
        g = mx.transpose(mx.random.normal(shape[::-1], key=mx.random.key(seed + 1))
                         .astype(dtype))
    elif kind == "grad_strided":
        big = mx.random.normal((shape[0], shape[1] * 2), key=mx.random.key(seed + 2))
        g = big.astype(dtype)[:, ::2]
    elif kind == "grad_padded_columns":
        rows, cols = shape
        big = mx.random.normal((cols, rows + 3), key=mx.random.key(seed + 3)).astype(dtype)
        g = big[:, :rows].T  # strides (1, rows + 3)
    elif kind == "all_transposed":
        g, w, v = (mx.transpose(x) for x in _leaf(shape[::-1], dtype, seed))
    mx.eval(g, w, v)
    return g, w, v


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (33, 129), (64, 128), (257, 513)])
def test_layouts_match_reference(kind, dtype, shape):
    g, w, v = _make_layout(kind, shape, dtype, seed=sum(shape))
    ref_w, ref_v = reference(g, w, v, 0.01, dtype)
    for in_place in (False, True):
        out_w, out_v = fused_step(g, w, v, 0.01, in_place)
        assert out_w.shape == shape and out_v.shape == shape
        np.testing.assert_array_equal(bits(out_w), bits(ref_w))
        np.testing.assert_array_equal(bits(out_v), bits(ref_v))


@pytest.mark.parametrize("shape", [(300, 700), (2048, 1024)])
def test_float32_transposed_grads_bit_identical_to_mlx_optimizer(shape):
    """The nn.Linear case (gradient column-major, split across threads for the
    larger shape) against mlx.optimizers.RMSprop itself."""
    g, w, _ = _make_layout("grad_transposed", shape, mx.float32, seed=3)
    ours, theirs = fused.RMSprop(learning_rate=0.01), optim.RMSprop(learning_rate=0.01)
    p_ours, p_theirs = {"w": w}, {"w": w}
    for _ in range(3):
        p_ours = ours.apply_gradients({"w": g}, p_ours)
        p_theirs = theirs.apply_gradients({"w": g}, p_theirs)
        mx.eval(p_ours, p_theirs, ours.state, theirs.state)
    np.testing.assert_array_equal(bits(p_ours["w"]), bits(p_theirs["w"]))
    np.testing.assert_array_equal(bits(ours.state["w"]["v"]), bits(theirs.state["w"]["v"]))


# ---- Which walk the kernel takes, and walks over 3-D / 4-D layouts.


def test_linear_weight_gradients_take_the_tiled_transposed_walk():
    """autodiff returns the weight gradient of every nn.Linear column-major:
    the kernel must take its tiled walk for it (the strided walk gives the
    same bits ~10x slower, so only the choice itself can show a regression),
    and the flat walk for biases."""
    model = nn.Linear(96, 40)
    x = mx.random.normal((8, 96))
    grads = nn.value_and_grad(model, lambda m: m(x).sum())(model)[1]
    mx.eval(grads)
    w, b = model.weight, model.bias
    assert grads["weight"].shape == w.shape
    assert _ext._cpu_walk(grads["weight"], w, mx.zeros_like(w)) == "transposed"
    assert _ext._cpu_walk(grads["bias"], b, mx.zeros_like(b)) == "flat"
    g, w, v = _make_layout("grad_transposed", (33, 129), mx.bfloat16, seed=1)
    assert _ext._cpu_walk(g, w, v) == "transposed"
    g, w, v = _make_layout("grad_strided", (33, 129), mx.float32, seed=1)
    assert _ext._cpu_walk(g, w, v) == "strided_like_param"
    assert _ext._cpu_walk(g, g, g) == "strided"


def _random_view(rng, shape, dtype, seed, positive=False, dense_rate=0.25):
    """An array of `shape` whose memory layout no two adjacent dims share:
    the transpose of a permuted base, with one axis taken every 2nd element
    and maybe one axis reversed (or, at dense_rate, a plain dense array)."""

    def x(base_shape, key):
        out = mx.random.normal(base_shape, key=key)
        return (mx.abs(out) * 0.1 if positive else out).astype(dtype)  # before any view

    if rng.random() < dense_rate:
        out = x(shape, key=mx.random.key(seed))
    else:
        ndim = len(shape)
        perm = rng.permutation(ndim)
        base_shape = [shape[p] for p in perm]
        step_axis = int(rng.integers(ndim))
        base_shape[step_axis] *= 2
        out = x(tuple(base_shape), key=mx.random.key(seed))
        index = [slice(None)] * ndim
        index[step_axis] = slice(None, None, 2)
        if rng.random() < 0.5:
            flip = int(rng.integers(ndim))
            index[flip] = slice(None, None, -2 if flip == step_axis else -1)
        out = mx.transpose(out[tuple(index)], list(np.argsort(perm)))
    mx.eval(out)
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_strided_walks_over_3d_and_4d_layouts(dtype):
    """Layouts that stay 3-D or 4-D after collapsing, so the strided walks'
    odometer wraps every outer dimension; both strided walks (param dense or
    not), fresh and in-place outputs, bit for bit with the reference."""
    rng = np.random.default_rng(2024)
    walks = {"strided": 0, "strided_like_param": 0}
    for case in range(80):
        shape = tuple(int(n) for n in rng.integers(2, 6, size=int(rng.integers(3, 5))))
        g = _random_view(rng, shape, dtype, 3 * case)
        w = _random_view(rng, shape, dtype, 3 * case + 1, dense_rate=0.5)
        v = _random_view(rng, shape, dtype, 3 * case + 2, positive=True)
        walk = _ext._cpu_walk(g, w, v)
        collapsed = _ext._gpu_dispatch([g, w, v])["shape"]
        if walk in walks and len(collapsed) >= 3:
            walks[walk] += 1
        ref_w, ref_v = reference(g, w, v, 0.01, dtype)
        for in_place in (False, True):
            out_w, out_v = fused_step(g, w, v, 0.01, in_place)
            np.testing.assert_array_equal(bits(out_w), bits(ref_w), err_msg=f"{case} {walk} {shape}")
            np.testing.assert_array_equal(bits(out_v), bits(ref_v), err_msg=f"{case} {walk} {shape}")
    assert min(walks.values()) >= 10, walks


def _column_major(shape, dtype, seed):
    """A dense, column-major array (the transpose of a row-major one) that
    nothing references but the returned handle."""
    base = (mx.abs(mx.random.normal(shape[::-1], key=mx.random.key(seed))) * 0.1).astype(dtype)
    out = base.T
    mx.eval(out)
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_a_state_laid_out_unlike_the_parameter_is_never_donated(dtype):
    """v dense but column-major, referenced by nothing else, param row-major:
    the outputs follow param's layout, so v's buffer must not be reused for
    v' (it would be written in one order while read in the other)."""
    shape = (67, 130)
    g, w, _ = _leaf(shape, dtype, seed=5)
    v = _column_major(shape, dtype, 9)
    assert _ext._cpu_walk(g, w, v) == "strided_like_param"
    ref_w, ref_v = reference(g, w, v, 0.01, dtype)
    mx.eval(ref_w, ref_v)
    out_w, out_v = rmsprop_update(
        g, _fresh_copy(w), _column_major(shape, dtype, 9), mx.array(0.01), alpha=ALPHA, eps=EPS
    )
    mx.eval(out_w, out_v)
    np.testing.assert_array_equal(bits(out_w), bits(ref_w))
    np.testing.assert_array_equal(bits(out_v), bits(ref_v))


# ---- The multi-threaded split never changes a result.

_SPLIT_SCRIPT = r"""
import hashlib, json, sys
import mlx.core as mx
from mlx_fused_rmsprop import _ext, rmsprop_update
mx.set_default_device(mx.cpu)
cases = json.loads(sys.argv[1])
out = {}
lr = mx.array(0.01)
for dtype_name, kind, shape in cases:
    dtype = getattr(mx, dtype_name)
    k1, k2, k3 = mx.random.split(mx.random.key(sum(shape)), 3)
    w = mx.random.normal(shape, key=k2).astype(dtype)
    v = mx.zeros(shape, dtype) + 0
    if kind == "transposed":
        g = mx.transpose(mx.random.normal(shape[::-1], key=k1).astype(dtype))
    else:
        g = mx.random.normal(shape, key=k1).astype(dtype)
    mx.eval(g, w, v)
    for step in range(3):  # in place from the second step on
        w, v = rmsprop_update(g, w, v, lr, alpha=0.99, eps=1e-8)
        mx.eval(w, v)
    h = hashlib.sha256()
    for a in (w, v):
        h.update(bytes(memoryview(a.view(mx.uint16 if a.dtype != mx.float32 else mx.uint32))))
    out[f"{dtype_name}/{kind}/{shape}"] = h.hexdigest()
print(json.dumps(out))
"""


def _run_split(cases, env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    res = subprocess.run(
        [sys.executable, "-c", _SPLIT_SCRIPT, json.dumps(cases)],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _split_cases(min_per_thread: int):
    """Sizes on both sides of every threshold of the split: 1..4 parts of
    min_per_thread elements, +-1, and the 256-element boundary rounding."""
    sizes = {1, 255, 256, 257}
    for parts in (1, 2, 3, 4):
        for d in (-257, -1, 0, 1, 255, 256, 257):
            sizes.add(max(1, parts * min_per_thread + d))
    cases = []
    for dtype in ("float32", "float16", "bfloat16"):
        for n in sorted(sizes):
            cases.append((dtype, "flat", [n]))
    # Transposed grads are split by blocks of rows: rows x cols around it.
    for rows in (1, 63, 64, 65, 127, 129, 200):
        cols = max(1, (2 * min_per_thread) // rows + 3)
        for dtype in ("float32", "bfloat16"):
            cases.append((dtype, "transposed", [rows, cols]))
    return cases


@pytest.mark.parametrize("min_per_thread", [300, 131072])
def test_split_across_threads_gives_identical_results(min_per_thread):
    env = {"MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD": str(min_per_thread)}
    cases = _split_cases(min_per_thread)
    single = _run_split(cases, {**env, "MLX_FUSED_RMSPROP_NUM_THREADS": "1"})
    for threads in ("2", "3", "4"):
        multi = _run_split(cases, {**env, "MLX_FUSED_RMSPROP_NUM_THREADS": threads})
        assert multi == single, f"{threads} threads differ from 1"


def test_threads_follow_what_bounds_the_leaf():
    """float32 / float64 leaves are memory-bound: at most 8 threads (more only
    add wake-ups once the bus is saturated); 16-bit parameters are
    compute-bound and take every core."""
    assert _ext._split_threads("memory", cores=16) == 8
    assert _ext._split_threads("compute", cores=16) == 16
    assert _ext._split_threads("memory", cores=3) == 3
    assert _ext._split_threads("compute", cores=3) == 3
    with pytest.raises(ValueError, match="'memory' or 'compute'"):
        _ext._split_threads("io", cores=4)
    for dtype, bound in ((mx.float32, "memory"), (mx.float64, "memory"),
                         (mx.float16, "compute"), (mx.bfloat16, "compute")):
        g, w, v = _leaf((64, 48), dtype, 1)
        assert _ext._cpu_bound(g, w, v) == bound, dtype
        assert _ext._cpu_bound(mx.transpose(g), mx.transpose(w), v.T) == bound, dtype
    # A 16-bit parameter with float32 state still converts per element.
    g, w, v = _leaf((64,), mx.bfloat16, 2)
    assert _ext._cpu_bound(g, w, v.astype(mx.float32)) == "compute"


_PARTS_SCRIPT = r"""
import json
from mlx_fused_rmsprop import _ext
sizes = (0, 1, 999, 1000, 1999, 2000, 2999, 3000, 3999, 4000, 10**6)
print(json.dumps({b: [_ext._split_parts(n, b) for n in sizes] for b in ("memory", "compute")}))
"""


def test_a_leaf_is_split_by_its_size_up_to_the_threads_of_its_bound():
    """A thread per MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD elements, at
    least one and at most the threads of the leaf's bound: small leaves are
    not split (a worker's wake-up costs more than it saves)."""
    env = {**os.environ, "MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD": "1000",
           "MLX_FUSED_RMSPROP_NUM_THREADS": "3"}
    res = subprocess.run([sys.executable, "-c", _PARTS_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    parts = json.loads(res.stdout.strip().splitlines()[-1])
    want = [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert parts == {"memory": want, "compute": want}


_THREADS_SCRIPT = r"""
import json
from mlx_fused_rmsprop import _ext
print(json.dumps([_ext._split_threads("memory"), _ext._split_threads("compute")]))
"""


@pytest.mark.parametrize("override", [None, "3"])
def test_this_process_splits_by_the_policy_or_the_override(override):
    env = dict(os.environ)
    env.pop("MLX_FUSED_RMSPROP_NUM_THREADS", None)
    if override is not None:
        env["MLX_FUSED_RMSPROP_NUM_THREADS"] = override
    res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    memory, compute = json.loads(res.stdout.strip().splitlines()[-1])
    if override is not None:
        assert memory == compute == int(override)
    else:
        cores = len(os.sched_getaffinity(0))
        assert (memory, compute) == (min(cores, 8), cores)


_TWO_STREAMS_SCRIPT = r"""
import json, threading
import mlx.core as mx
from mlx_fused_rmsprop import _ext, rmsprop_update

N, STEPS = 1 << 20, 6

def chain(seed, stream):
    # STEPS in-place updates of one 1M-element leaf, each split in two parts.
    with mx.stream(stream):
        k = mx.random.split(mx.random.key(seed), 2)
        w, v = mx.random.normal((N,), key=k[0]), mx.zeros((N,))
        g = mx.random.normal((N,), key=k[1])
        mx.eval(w, v, g)
        for step in range(STEPS):
            w, v = rmsprop_update(g * (step + 1), w, v, mx.array(0.01), alpha=0.9, eps=1e-8)
            mx.eval(w, v)
        return bytes(memoryview(w)) + bytes(memoryview(v))

def both(run_concurrently):
    out = [None, None]
    def worker(i):
        out[i] = chain(10 + i, mx.new_stream(mx.cpu))  # a stream per thread
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    if run_concurrently:
        for t in threads: t.start()
        for t in threads: t.join()
    else:
        for t in threads: t.start(); t.join()
    return out

expected = both(False)
rounds = 0
while True:  # until the pool was found busy at least once
    rounds += 1
    got = both(True)
    if got != expected:
        print(json.dumps({"equal": False, "rounds": rounds}))
        break
    if _ext._split_stats()["busy_fallbacks"] > 0 or rounds == 50:
        print(json.dumps({"equal": True, "rounds": rounds, **_ext._split_stats()}))
        break
"""


def test_two_streams_splitting_at_once_match_sequential_runs():
    """Two streams updating split leaves at the same time: one of them finds
    the worker pool busy and runs every part itself. Results equal running
    the two one after the other, and the busy path was really taken."""
    env = dict(os.environ, MLX_FUSED_RMSPROP_NUM_THREADS="2",
               MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD="4096")
    res = subprocess.run([sys.executable, "-c", _TWO_STREAMS_SCRIPT],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["equal"], report
    assert report["busy_fallbacks"] > 0 and report["pooled"] > 0, report


_FORK_SCRIPT = r"""
import os
from mlx_fused_rmsprop import _ext
parent = _ext.StepPatternRoofline(1 << 20)
parent.run(2)  # the worker pool now exists in this process
pid = os.fork()
if pid == 0:
    # The child has the pool's memory but none of its threads: it must make
    # a pool of its own, or this split waits forever for absent workers.
    child = _ext.StepPatternRoofline(1 << 16)
    child.run(2)
    words = (1 << 16) // 8
    g = 0x0101010101010101
    os._exit(0 if child.sums() == ((words * (2 ^ g)) % 2**64, (words * (3 + g)) % 2**64) else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_splits_work_on_a_pool_of_its_own():
    env = dict(os.environ, MLX_FUSED_RMSPROP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-c", _FORK_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the hung child too
        proc.communicate()
        pytest.fail("the forked child's split never finished")
    assert proc.returncode == 0, err
    assert "child exit 0" in out, out + err


def test_baseline_and_avx2_builds_of_the_loop_agree():
    cases = _split_cases(300)
    default = _run_split(cases, {"MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD": "300"})
    baseline = _run_split(cases, {"MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD": "300",
                                  "MLX_FUSED_RMSPROP_ISA": "baseline"})
    assert default == baseline


# ---- In-place buffer reuse in the training loop.


def _address(a: mx.array) -> int:
    view = np.array(a, copy=False)
    address = view.ctypes.data
    del view
    return address


def _addresses(tree) -> dict[str, int]:
    from mlx.utils import tree_flatten

    return {k: _address(a) for k, a in tree_flatten(tree) if a.ndim > 0}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(64, 256)
        self.l2 = nn.Linear(256, 8)

    def __call__(self, x):
        return self.l2(nn.relu(self.l1(x)))


def _loss(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def test_state_reused_in_place_in_the_one_eval_training_loop():
    """The loop of the issue: loss, grads = value_and_grad(...); update;
    mx.eval(parameters, state). v is read by nothing but the update, so from
    the second step on every v' takes v's buffer (parameters are also read
    by the forward/backward of the same eval: MLX lets them be reused only
    when those have finished, which is timing-dependent)."""
    mx.random.seed(0)
    model, opt = _Net(), fused.RMSprop(learning_rate=1e-3)
    x, y = mx.random.normal((16, 64)), mx.random.normal((16, 8))
    vg = nn.value_and_grad(model, _loss)
    for step in range(3):
        before = _addresses(opt.state)
        loss, grads = vg(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        after = _addresses(opt.state)
        if step > 0:
            assert after == before
        del loss, grads


def test_parameters_and_state_reused_once_grads_are_evaluated():
    """With the gradients evaluated before the step (nothing else reads the
    old parameters any more) every parameter and v is updated in its own
    buffer — Linear weights too, whose gradients are column-major — and the
    step allocates nothing leaf-sized."""
    mx.random.seed(0)
    model, opt = _Net(), fused.RMSprop(learning_rate=1e-3)
    x, y = mx.random.normal((16, 64)), mx.random.normal((16, 8))
    vg = nn.value_and_grad(model, _loss)
    for step in range(3):
        loss, grads = vg(model, x, y)
        mx.eval(loss, grads)
        before = {**_addresses(model.parameters()), **_addresses(opt.state)}
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        extra = max(0, mx.get_peak_memory() - base)
        after = {**_addresses(model.parameters()), **_addresses(opt.state)}
        if step > 0:
            assert after == before
            assert extra < 4096, extra  # a few scalars (step count), no leaf
        del loss, grads


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_step_extra_peak_memory_is_a_small_fraction_of_the_leaf(dtype):
    n = 1 << 20
    model = nn.Module()
    model.w = mx.random.normal((n,)).astype(dtype)
    opt = fused.RMSprop(learning_rate=1e-3)
    g = {"w": mx.random.normal((n,)).astype(dtype)}
    mx.eval(model.parameters(), g)
    for _ in range(3):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state)
        extra = max(0, mx.get_peak_memory() - base) / (n * dtype.size)
    assert extra <= 0.10, extra


def test_a_parameter_still_referenced_is_never_overwritten():
    """Reuse only takes buffers nobody else can see: a handle kept on the old
    parameter (or state) still reads the old values after the step."""
    model = nn.Module()
    model.w = mx.random.normal((100_000,))
    opt = fused.RMSprop(learning_rate=0.1)
    g = {"w": mx.ones((100_000,))}
    mx.eval(model.parameters(), g)
    opt.update(model, g)
    mx.eval(model.parameters(), opt.state)
    old_w, old_v = model.w, opt.state["w"]["v"]
    snapshot_w, snapshot_v = np.array(old_w), np.array(old_v)
    opt.update(model, g)
    mx.eval(model.parameters(), opt.state)
    np.testing.assert_array_equal(np.array(old_w), snapshot_w)
    np.testing.assert_array_equal(np.array(old_v), snapshot_v)
    assert not np.array_equal(np.array(model.w), snapshot_w)


def test_an_update_evaluated_inside_a_grad_trace_keeps_its_graph():
    """Under mx.grad the outputs are tracers: their inputs must survive an
    mx.eval inside the traced function, so differentiating through the step
    still raises the documented error (it used to return zeros when the
    sibling inputs were dropped)."""
    def loss(p):
        p2, v2 = rmsprop_update(p, p, mx.zeros_like(p), mx.array(0.1), alpha=ALPHA, eps=EPS)
        mx.eval(p2)
        return (v2 * 1).sum()

    with pytest.raises(ValueError, match="no vjp"):
        mx.grad(loss)(mx.ones((3,)))


def test_the_update_under_compile_and_grad_tracing_still_matches():
    """Inside mx.compile the graph is traced (tracers): nothing is donated,
    results equal the eager ones."""
    shape = (64, 128)
    g, w, v = _make_layout("grad_transposed", shape, mx.float32, seed=9)
    lr = mx.array(0.01)
    eager = rmsprop_update(g, w, v, lr, alpha=ALPHA, eps=EPS)
    compiled = mx.compile(lambda g, w, v, lr: rmsprop_update(g, w, v, lr, alpha=ALPHA, eps=EPS))
    out = compiled(g, w, v, lr)
    mx.eval(eager, out)
    for a, b in zip(eager, out):
        np.testing.assert_array_equal(bits(a), bits(b))
    # the inputs are intact
    g2, w2, v2 = _make_layout("grad_transposed", shape, mx.float32, seed=9)
    np.testing.assert_array_equal(bits(w), bits(w2))
    np.testing.assert_array_equal(bits(v), bits(v2))
