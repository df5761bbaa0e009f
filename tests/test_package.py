"""The installed package: import-time checks, linking, the verify command."""

import os
import platform
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_fused_rmsprop
from mlx_fused_rmsprop.__main__ import program_name
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


@pytest.mark.parametrize(
    "system,command",
    [("Linux", "pip install 'mlx[cpu]==0.32.4'"), ("Darwin", "pip install 'mlx==0.32.4'")],
)
@pytest.mark.parametrize("found", ["0.32.3", "0.33.0"])
def test_version_mismatch_names_the_one_command_that_fixes_it(system, command, found):
    """On Linux mlx's CPU backend is the separate mlx-cpu distribution:
    `pip install 'mlx==X'` would leave mlx-cpu behind (an undefined symbol at
    import), so the command must carry the [cpu] extra there, and only there.
    It is the only advice: a rebuild against the installed mlx is refused by
    the build (the pin)."""
    with pytest.raises(ImportError) as info:
        mlx_fused_rmsprop._require_matching_mlx("0.32.4", found, system=system)
    message = str(info.value)
    assert f"built against mlx 0.32.4, but mlx {found} is installed" in message
    assert message.endswith(f"Fix: {command}")
    assert message.count("pip install") == 1 and "rebuild" not in message


def test_a_broken_mlx_install_is_named_with_its_fix():
    """`import mlx.core` itself failing (mlx and mlx-cpu of two releases, or
    mlx without its backend) names the installed versions and the command."""
    error = ImportError("libmlx.so: undefined symbol: _ZN3mlx4core5arrayD1Ev")
    message = mlx_fused_rmsprop._broken_mlx_message(
        "0.32.4", error, {"mlx": "0.32.4", "mlx-cpu": "0.32.3"}, system="Linux"
    )
    assert "needs mlx 0.32.4" in message and "undefined symbol" in message
    assert "Installed: mlx 0.32.4, mlx-cpu 0.32.3." in message
    assert message.endswith("Fix: pip install 'mlx[cpu]==0.32.4'")
    message = mlx_fused_rmsprop._broken_mlx_message(
        "0.32.4", error, {"mlx": "0.32.4", "mlx-metal": None}, system="Darwin"
    )
    assert "Installed: mlx 0.32.4, mlx-metal (not installed)." in message
    assert message.endswith("Fix: pip install 'mlx==0.32.4'")


def import_after(prelude: str) -> str:
    """A fresh interpreter runs ``prelude``, then imports the package and
    prints its ImportError, if any, after ``IMPORT ERROR:``; its stdout."""
    out = run_python(
        prelude
        + "try:\n"
        "    import mlx_fused_rmsprop\n"
        "except ImportError as e:\n"
        "    print('IMPORT ERROR:', e)\n"
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_broken_mlx_import_fails_with_that_message():
    """The package's own import, with `import mlx.core` failing (a stand-in
    finder raises what the dynamic loader would), raises the message above,
    reading the installed versions from the metadata."""
    code = (
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx.core':\n"
        "            raise ImportError('core.so: undefined symbol: _ZN3mlx4core')\n"
        "sys.meta_path.insert(0, Broken())\n"
    )
    out = import_after(code)
    assert "`import mlx.core` fails (ImportError: core.so: undefined symbol" in out
    assert f"Installed: mlx {mx.__version__}" in out
    assert f"Fix: pip install '{mlx_fused_rmsprop._mlx_requirement(_build_info.MLX_VERSION)}'" in out


def test_import_fails_cleanly_when_built_for_another_mlx():
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('mlx_fused_rmsprop._build_info')\n"
        "fake.MLX_VERSION = '0.1.0'; fake.HAS_METAL = False\n"
        "sys.modules['mlx_fused_rmsprop._build_info'] = fake\n"
    )
    out = import_after(code)
    assert (
        f"IMPORT ERROR: mlx_fused_rmsprop {mlx_fused_rmsprop.__version__} "
        "was built against mlx 0.1.0"
    ) in out
    assert f"mlx {mx.__version__} is installed" in out
    extra = "" if platform.system() == "Darwin" else "[cpu]"
    assert f"Fix: pip install 'mlx{extra}==0.1.0'" in out


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


def test_verify_marks_where_the_reference_overflows(capsys):
    """In float16 the reference rounds eps=1e-8 to 0 and returns Inf/NaN for a
    few elements: verify says so on its own line and keeps those elements
    out of the maxima, so no PASS sits beside an unexplained inf."""
    assert verify.main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if re.search(r"\binf\b", line)], lines
    (i,) = [i for i, line in enumerate(lines) if line.strip().startswith("float16")]
    note = re.fullmatch(
        r"    mlx returned Inf/NaN for (\d+) of (\d+) elements where the float64 truth is "
        r"finite \(the reference's own overflow; eps rounds to 0 in float16\); ours: 0\. "
        r"The maxima above leave those elements out\.",
        lines[i + 1],
    )
    assert note and 0 < int(note[1]) < int(note[2]), lines[i + 1]
    for dtype in ("float32", "bfloat16", "float64"):
        (j,) = [j for j, line in enumerate(lines) if line.strip().startswith(dtype)]
        assert "Inf/NaN" not in lines[j + 1], (dtype, lines[j + 1])


def test_verify_reports_our_own_overflow(monkeypatch, capsys):
    """An update of ours that overflows where neither the reference nor the
    truth does is counted (and fails the check): one element in each layout's
    first step (later steps start from that Inf, so the truth is Inf too)."""
    real = verify.rmsprop_update

    def overflowing(grad, param, v, lr, *, alpha, eps):
        p, s = real(grad, param, v, lr, alpha=alpha, eps=eps)
        if p.dtype != mx.bfloat16:
            return p, s
        return mx.where(mx.arange(p.size).reshape(p.shape) == 5, mx.inf, p).astype(p.dtype), s

    monkeypatch.setattr(verify, "rmsprop_update", overflowing)
    assert verify.main(["--device", "cpu"]) == 1
    lines = capsys.readouterr().out.splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.strip().startswith("bfloat16")]
    assert lines[i].endswith("FAIL")
    assert any(
        re.fullmatch(r"    ours returned Inf/NaN for 3 of \d+ elements where the float64 truth is finite\.", line)
        for line in lines[i + 1:]
    ), lines


def test_cli_usage():
    out = subprocess.run([sys.executable, "-m", "mlx_fused_rmsprop"], capture_output=True, text=True)
    assert out.returncode == 2 and "verify" in out.stdout and "bench" in out.stdout
    assert out.stdout.startswith("usage: python -m mlx_fused_rmsprop [--version] {verify,bench}")
    out = subprocess.run([sys.executable, "-m", "mlx_fused_rmsprop", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'nope'" in out.stderr


def console_script() -> str:
    script = shutil.which("mlx-fused-rmsprop", path=os.path.dirname(sys.executable))
    assert script, "the console script mlx-fused-rmsprop is not installed beside python"
    return script


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_cli_version(flag):
    for cmd in ([sys.executable, "-m", "mlx_fused_rmsprop", flag], [console_script(), flag]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == (
            f"mlx-fused-rmsprop {mlx_fused_rmsprop.__version__} (mlx {mx.__version__}, "
            f"Python {platform.python_version()})"
        )


def test_cli_usage_names_the_program_as_invoked():
    """The console script's usage, errors and sub-commands' --help name
    `mlx-fused-rmsprop`; `python -m` names itself."""
    script = console_script()
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith("usage: mlx-fused-rmsprop [--version] {verify,bench}")
    assert "python -m" not in out.stdout
    out = subprocess.run([script, "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("mlx-fused-rmsprop: unknown command 'nope'")
    for command in ("verify", "bench"):
        out = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: mlx-fused-rmsprop {command} "), out.stdout
        out = subprocess.run(
            [sys.executable, "-m", "mlx_fused_rmsprop", command, "--help"],
            capture_output=True, text=True, timeout=120,
        )
        assert out.stdout.startswith(f"usage: python -m mlx_fused_rmsprop {command} "), out.stdout


@pytest.mark.parametrize(
    "argv0,prog",
    [("/venv/bin/mlx-fused-rmsprop", "mlx-fused-rmsprop"),
     ("/site-packages/mlx_fused_rmsprop/__main__.py", "python -m mlx_fused_rmsprop"),
     ("-c", "python -m mlx_fused_rmsprop"), ("", "python -m mlx_fused_rmsprop")],
)
def test_program_name(argv0, prog):
    assert program_name(argv0) == prog
