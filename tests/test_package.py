"""The installed package: import-time checks, linking, the verify command."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_fused_rmsprop
from mlx_fused_rmsprop import _build_info, _ext, verify


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_built_against_the_running_mlx():
    assert _build_info.MLX_VERSION == mx.__version__ == _ext.built_mlx_version
    assert _build_info.HAS_METAL == _ext.has_metal_kernels


def test_version_mismatch_is_an_import_error_naming_both_versions():
    with pytest.raises(ImportError, match=r"built against mlx 0\.32\.4.*mlx 0\.99\.0 is installed"):
        mlx_fused_rmsprop._require_matching_mlx("0.32.4", "0.99.0")
    mlx_fused_rmsprop._require_matching_mlx("0.32.4", "0.32.4")


def test_import_fails_cleanly_when_built_for_another_mlx():
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('mlx_fused_rmsprop._build_info')\n"
        "fake.MLX_VERSION = '0.1.0'; fake.HAS_METAL = False\n"
        "sys.modules['mlx_fused_rmsprop._build_info'] = fake\n"
        "try:\n"
        "    import mlx_fused_rmsprop\n"
        "except ImportError as e:\n"
        "    print('IMPORT ERROR:', e)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "IMPORT ERROR: mlx_fused_rmsprop was built against mlx 0.1.0" in out.stdout
    assert f"mlx {mx.__version__} is installed" in out.stdout


def test_imports_with_no_library_path_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "PYTHONPATH")}
    out = run_python(
        "import mlx.core as mx, mlx_fused_rmsprop as m\n"
        "from mlx_fused_rmsprop._reference import reference_step, bit_equal\n"
        "args = (mx.ones(3), mx.ones(3), mx.zeros(3), mx.array(0.5))\n"
        "ours = m.rmsprop_update(*args, alpha=0.5, eps=1.0)\n"
        "ref = reference_step(*args, 0.5, 1.0)\n"
        "print(bit_equal(ours[0], ref[0]) and bit_equal(ours[1], ref[1]))",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_gpu_stream_without_metal_raises_clearly():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal: the GPU path is exercised by the device-parametrized tests")
    with pytest.raises(ValueError, match="gpu|GPU|Metal"):
        p, v = mlx_fused_rmsprop.rmsprop_update(
            mx.ones(3), mx.ones(3), mx.zeros(3), mx.array(0.1), alpha=0.9, eps=1e-8, stream=mx.gpu
        )
        mx.eval(p, v)


def test_verify_command_passes():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_fused_rmsprop", "verify"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "PASS"
    assert any(line.strip().startswith(f"mlx {mx.__version__}") for line in lines)
    for dtype in ("float32", "float16", "bfloat16"):
        assert any(line.strip().startswith(dtype) and line.endswith("PASS") for line in lines), dtype


def test_verify_fails_when_the_update_is_wrong(monkeypatch, capsys):
    real = verify.rmsprop_update

    def off_by_one_ulp(grad, param, v, lr, *, alpha, eps):
        p, s = real(grad, param, v, lr, alpha=alpha, eps=eps)
        return mx.where(mx.arange(p.size).reshape(p.shape) == 3, p * (1 + 2**-10), p), s

    monkeypatch.setattr(verify, "rmsprop_update", off_by_one_ulp)
    assert verify.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "FAIL"


def test_cli_usage():
    out = subprocess.run([sys.executable, "-m", "mlx_fused_rmsprop"], capture_output=True, text=True)
    assert out.returncode == 2 and "verify" in out.stdout and "bench" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mlx_fused_rmsprop", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'nope'" in out.stderr
