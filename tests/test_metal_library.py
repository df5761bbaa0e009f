"""Where the GPU kernels come from, and the GPU path itself.

eval_gpu takes the kernels from mlx_fused_rmsprop.metallib beside the
extension when the build made one, and otherwise compiles the shader source
embedded in the extension (once per process). On macOS the build makes the
metallib only when `xcrun -sdk macosx -f metal` finds Apple's Metal compiler.
The choice and the compiler check run anywhere and are tested here; the tests
marked `gpu` need a Mac with Metal and are skipped elsewhere (this project's
Linux CI included) -- there the shader runs as C++ in test_metal_emulation.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_fused_rmsprop import _build_info, _ext, rmsprop_update
from oracle import bit_equal

ROOT = Path(__file__).resolve().parents[1]
JIT_ENV = "MLX_FUSED_RMSPROP_METAL_JIT"

needs_gpu = pytest.mark.skipif(
    not mx.metal.is_available(), reason="needs a Metal GPU (a Mac); none on this machine"
)


# ---------------------------------------------------------------- the choice


def test_metallib_beside_the_extension_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv(JIT_ENV, raising=False)
    assert _ext._metal_library_plan(str(tmp_path)) == ("source", "")
    metallib = tmp_path / "mlx_fused_rmsprop.metallib"
    metallib.write_bytes(b"\0")
    assert _ext._metal_library_plan(str(tmp_path)) == ("metallib", str(metallib))


def test_a_library_of_another_name_is_not_ours(tmp_path, monkeypatch):
    """MLX caches libraries by name for the whole process: ours is named for
    the package, never a generic "rmsprop"."""
    monkeypatch.delenv(JIT_ENV, raising=False)
    (tmp_path / "rmsprop.metallib").write_bytes(b"\0")
    assert _ext._metal_library_plan(str(tmp_path)) == ("source", "")


@pytest.mark.parametrize("value,plan", [("1", "source"), ("yes", "source"), ("0", "metallib"), ("", "metallib")])
def test_environment_variable_forces_the_embedded_source(tmp_path, monkeypatch, value, plan):
    (tmp_path / "mlx_fused_rmsprop.metallib").write_bytes(b"\0")
    monkeypatch.setenv(JIT_ENV, value)
    assert _ext._metal_library_plan(str(tmp_path))[0] == plan


def test_extension_dir_is_where_the_extension_is():
    assert Path(_ext.extension_dir) == Path(_ext.__file__).parent


def test_linux_builds_have_no_metallib():
    if _build_info.HAS_METAL:
        pytest.skip("a Metal build of mlx: the metallib depends on the Metal compiler")
    assert not _build_info.HAS_METALLIB
    assert not (Path(_ext.extension_dir) / "mlx_fused_rmsprop.metallib").exists()


# ---------------------------------------------------------------- the build


def _find_metal_compiler(tmp_path: Path, xcrun: str | None, *defines: str) -> subprocess.CompletedProcess:
    """Run cmake/metal_compiler.cmake's check with a stand-in `xcrun` (a
    shell script body) first on PATH, or none at all."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if xcrun is not None:
        script = bin_dir / "xcrun"
        script.write_text("#!/bin/sh\n" + xcrun)
        script.chmod(0o755)
    probe = tmp_path / "probe.cmake"
    probe.write_text(
        textwrap.dedent(f"""\
            cmake_minimum_required(VERSION 3.20)
            include({ROOT / "cmake" / "metal_compiler.cmake"})
            rmsprop_find_metal_compiler(found)
            message(STATUS "found=${{found}}")
            """)
    )
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    return subprocess.run(
        [cmake, *defines, "-P", str(probe)], capture_output=True, text=True, env=env, timeout=60
    )


def test_build_skips_the_metallib_with_one_message_when_xcrun_fails(tmp_path):
    """`xcrun: error: unable to find utility "metal"` (Command Line Tools only,
    or Xcode without its Metal Toolchain): the build goes on without the
    metallib and says once what happens instead."""
    out = _find_metal_compiler(
        tmp_path, 'echo \'xcrun: error: unable to find utility "metal"\' >&2; exit 72\n'
    )
    assert out.returncode == 0, out.stderr
    assert "-- found=OFF" in out.stdout
    assert out.stderr.count("no Metal compiler") == 1
    assert "compiled from the source embedded in the extension" in out.stderr


def test_build_skips_the_metallib_when_there_is_no_xcrun_at_all(tmp_path):
    out = _find_metal_compiler(tmp_path, None)
    assert out.returncode == 0 and "-- found=OFF" in out.stdout


def test_build_makes_the_metallib_when_the_metal_compiler_is_found(tmp_path):
    out = _find_metal_compiler(tmp_path, "echo /Applications/Xcode.app/usr/bin/metal\n")
    assert out.returncode == 0 and "-- found=ON" in out.stdout
    assert "no Metal compiler" not in out.stderr


def test_build_can_skip_the_metallib_on_purpose(tmp_path):
    out = _find_metal_compiler(
        tmp_path, "echo /Applications/Xcode.app/usr/bin/metal\n", "-DRMSPROP_BUILD_METALLIB=OFF"
    )
    assert out.returncode == 0 and "-- found=OFF" in out.stdout


# ---------------------------------------------------------------- on a GPU


def _layouts(dtype):
    key = mx.random.key(7)
    k = mx.random.split(key, 3)
    g, w, v = (mx.random.normal((65, 130), key=k[i]).astype(dtype) for i in range(3))
    v = mx.abs(v)
    yield "contiguous", g, w, v
    yield "transposed grad", mx.random.normal((130, 65), key=k[0]).astype(dtype).T, w, v
    yield "broadcast grad", mx.broadcast_to(g[:1], g.shape), w, v
    yield "strided", g[:, ::2], w[:, ::2], v[:, 1::2]


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_gpu_equals_the_cpu_primitive_bit_for_bit(dtype):
    for name, g, w, v in _layouts(dtype):
        gpu = rmsprop_update(g, w, v, mx.array(1e-2), alpha=0.9, eps=1e-8, stream=mx.gpu)
        cpu = rmsprop_update(g, w, v, mx.array(1e-2), alpha=0.9, eps=1e-8, stream=mx.cpu)
        assert bit_equal(gpu[0], cpu[0]) and bit_equal(gpu[1], cpu[1]), name


VARIANT_OPTIONS = [
    dict(momentum=0.9, nesterov=True, centered=True, weight_decay=0.01, bias_correction=True),
    dict(momentum=0.5, lr_inside_momentum=True, eps_in_sqrt=True, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
]


@needs_gpu
@pytest.mark.parametrize("dtype,state_dtype", [
    (mx.float32, mx.float32), (mx.float16, mx.float16), (mx.bfloat16, mx.float32),
], ids=str)
def test_gpu_variants_equal_the_cpu_primitive_bit_for_bit(dtype, state_dtype):
    from mlx_fused_rmsprop import rmsprop_step

    for options in VARIANT_OPTIONS:
        names = ["v"] + (["mean"] if options.get("centered") else []) + (
            ["momentum_buffer"] if options.get("momentum") else [])
        for name, g, w, v in _layouts(dtype):
            state = {n: mx.abs(v).astype(state_dtype) * (i + 1) for i, n in enumerate(names)}
            outs = {}
            for device in (mx.gpu, mx.cpu):
                outs[device] = rmsprop_step(
                    g, w, state, mx.array(1e-2), step=4, stream=device, **options
                )
            assert bit_equal(outs[mx.gpu][0], outs[mx.cpu][0]), (name, options)
            for n in names:
                assert bit_equal(outs[mx.gpu][1][n], outs[mx.cpu][1][n]), (name, n, options)


@needs_gpu
def test_float64_learning_rate_on_a_gpu_stream():
    """Metal has no float64: a float64 lr is converted on the CPU."""
    _, g, w, v = next(_layouts(mx.float32))
    f64 = rmsprop_update(g, w, v, mx.array(1e-2, dtype=mx.float64), alpha=0.9, eps=1e-8, stream=mx.gpu)
    f32 = rmsprop_update(g, w, v, mx.array(1e-2), alpha=0.9, eps=1e-8, stream=mx.gpu)
    assert bit_equal(f64[0], f32[0]) and bit_equal(f64[1], f32[1])


RUN_ON_GPU = """
import sys, mlx.core as mx
from mlx_fused_rmsprop import rmsprop_update
out = []
for dtype in (mx.float32, mx.float16, mx.bfloat16):
    k = mx.random.split(mx.random.key(3), 3)
    g, w, v = (mx.random.normal((257, 33), key=k[i]).astype(dtype) for i in range(3))
    for grad in (g, mx.random.normal((33, 257), key=k[0]).astype(dtype).T):
        p, s = rmsprop_update(grad, w, mx.abs(v), mx.array(1e-2), alpha=0.9, eps=1e-8, stream=mx.gpu)
        mx.eval(p, s)
        out += [bytes(memoryview(p)), bytes(memoryview(s))]
sys.stdout.buffer.write(b"".join(out))
"""


@needs_gpu
def test_run_time_compiled_kernels_equal_the_metallib_ones():
    """MLX_FUSED_RMSPROP_METAL_JIT=1 compiles the embedded source: same bits
    as the installed metallib (or, in a build without one, as the default)."""
    runs = {}
    for value in ("0", "1"):
        env = dict(os.environ, **{JIT_ENV: value})
        proc = subprocess.run(
            [sys.executable, "-c", RUN_ON_GPU], capture_output=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr.decode()
        runs[value] = proc.stdout
    assert runs["0"] == runs["1"] and runs["0"]
