"""The install's own checks, each tried on both sides of what it guards:

- the mlx pin, at import (``_require_matching_mlx``) and at build time
  (``cmake/mlx_pin.cmake``): only the pinned release passes; an older, a
  newer, a patch-different (either way) or a pre-/post-release mlx stops;
- ``verify``: per dtype, one element of the fused result broken makes that
  dtype's line FAIL under its documented criterion (bit-identical for
  float32 and float64 on the CPU, no worse than the reference for float16
  and bfloat16), the other dtypes still PASS, and the run FAIL.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_rmsprop
from mlx_fused_rmsprop import _build_info, verify
from test_packaging import run_pin_check

PIN = _build_info.MLX_PINNED_VERSION


def _others(pin: str) -> dict[str, str]:
    major, minor, patch = (int(x) for x in pin.split(".")[:3])
    return {
        "older_patch": f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.9",
        "newer_patch": f"{major}.{minor}.{patch + 1}",
        "older_minor": f"{major}.{minor - 1}.{patch}" if minor else f"{major - 1}.9.{patch}",
        "newer_minor": f"{major}.{minor + 1}.0",
        "newer_major": f"{major + 1}.0.0",
        "pre_release": f"{pin}rc1",
        "post_release": f"{pin}.post1",
    }


OTHERS = _others(PIN)


@pytest.mark.parametrize("found", OTHERS.values(), ids=OTHERS.keys())
def test_the_import_refuses_every_mlx_but_the_pinned_one(found):
    with pytest.raises(ImportError, match=rf"built against mlx {PIN}, but mlx {found} is installed"):
        mlx_fused_rmsprop._require_matching_mlx(PIN, found)
    mlx_fused_rmsprop._require_matching_mlx(PIN, PIN)


@pytest.mark.parametrize("found", OTHERS.values(), ids=OTHERS.keys())
def test_the_build_refuses_every_mlx_but_the_pinned_one(found):
    out = run_pin_check(f"MLX_FOUND_VERSION={found}")
    assert out.returncode != 0, out.stdout
    assert f"but this build environment has mlx {found}" in " ".join(out.stderr.split())
    assert run_pin_check(f"MLX_FOUND_VERSION={PIN}").returncode == 0


# ---- verify, per dtype.

CRITERIA = {
    mx.float32: "[bit-identical]",
    mx.float64: "[bit-identical]",
    mx.float16: "[<= reference error]",
    mx.bfloat16: "[<= reference error]",
}


def _broken(dtype: mx.Dtype, real):
    """verify's rmsprop_update with element 3 of each ``dtype`` parameter
    broken: one ulp up for the exact dtypes (the smallest error that breaks
    bit-identity), +1 for the halves (far worse than the reference)."""

    def update(grad, param, v, lr, *, alpha, eps):
        p, s = real(grad, param, v, lr, alpha=alpha, eps=eps)
        if p.dtype != dtype:
            return p, s
        flat = np.array(p.reshape(-1).astype(mx.float64 if dtype == mx.float64 else mx.float32))
        if dtype in (mx.float32, mx.float64):
            flat[3] = np.nextafter(flat[3], np.inf)
        else:
            flat[3] += 1.0
        return mx.array(flat).astype(dtype).reshape(p.shape), s

    return update


def _dtype_lines(out: str) -> dict:
    lines = out.splitlines()
    return {dtype: next(line for line in lines if line.strip().startswith(str(dtype).split(".")[-1]))
            for dtype in CRITERIA}


@pytest.mark.parametrize("dtype", list(CRITERIA), ids=lambda d: str(d).split(".")[-1])
def test_verify_fails_the_dtype_with_one_broken_element(monkeypatch, capsys, dtype):
    assert verify.main(["--device", "cpu"]) == 0
    for line in _dtype_lines(capsys.readouterr().out).values():
        assert line.endswith("PASS"), line
    monkeypatch.setattr(verify, "rmsprop_update", _broken(dtype, verify.rmsprop_update))
    assert verify.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "FAIL"
    for other, line in _dtype_lines(out).items():
        assert CRITERIA[other] in line, line
        assert line.endswith("FAIL" if other == dtype else "PASS"), line
