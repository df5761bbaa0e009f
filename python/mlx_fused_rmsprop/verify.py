"""``python -m mlx_fused_rmsprop verify``: a short self-check of this install.

Runs the fused update and mlx.optimizers.RMSprop side by side on the default
device (or --device), for every supported dtype and a few layouts, and prints
the largest differences. PASS means: float32 (and float64, CPU only)
bit-identical to the reference on the CPU, and on the GPU bit-identical to our
own CPU primitive and within 1 ulp of the reference (MLX's GPU kernels divide
less precisely than ours); float16 / bfloat16: no element further from the
float64 truth than the reference's. Elements where the reference itself
returns Inf/NaN and the truth is finite are counted on a line of their own
and left out of the printed maxima. Exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Iterator

import mlx.core as mx

from . import _build_info, rmsprop_update
from ._reference import (
    abs_error,
    count_worse_than_reference,
    float32_contract_failures,
    reference_step,
    rmsprop_truth,
)

LR, ALPHA, EPS = 1e-2, 0.99, 1e-8
STEPS = 3


def _layouts(dtype: mx.Dtype) -> Iterator[tuple[str, Callable[[int], mx.array]]]:
    """(name, make(seed) -> array) of a contiguous and two non-contiguous leaves."""
    def normal(shape, seed):
        return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)

    yield "contiguous (10007,)", lambda s: normal((10007,), s)
    yield "transposed (129, 65)", lambda s: normal((65, 129), s).T
    yield "strided (64, 33)", lambda s: normal((128, 99), s)[::2, ::3]


def _check_dtype(dtype: mx.Dtype, device: mx.Device) -> tuple[bool, str]:
    exact = dtype in (mx.float32, mx.float64)
    max_diff = max_ours = max_ref = 0.0
    elements = ref_overflow = ours_overflow = 0
    failures = []
    for name, make in _layouts(dtype):
        param = make(1)
        ours = ref = (param, mx.zeros_like(param))
        for step in range(STEPS):
            grad = make(10 + step)
            lr = mx.array(LR)
            new_ours = rmsprop_update(grad, *ours, lr, alpha=ALPHA, eps=EPS)
            new_ref = reference_step(grad, *ours, lr, ALPHA, EPS)
            truth = rmsprop_truth(grad, *ours, LR, ALPHA, EPS)
            mx.eval(new_ours, new_ref)
            # Where the reference itself overflows or returns NaN while the
            # float64 truth is finite (float16 rounds eps=1e-8 to 0), its
            # result is counted and kept out of the maxima, which compare
            # finite numbers.
            ref_bad = _non_finite_where_truth_is_finite(new_ref[0], truth[0])
            ours_bad = _non_finite_where_truth_is_finite(new_ours[0], truth[0])
            elements += param.size
            ref_overflow += ref_bad.sum().item()
            ours_overflow += ours_bad.sum().item()
            max_diff = max(max_diff, _max_where_not(abs_error(new_ours[0], new_ref[0]), ref_bad))
            max_ours = max(max_ours, abs_error(new_ours[0], truth[0]).max().item())
            max_ref = max(max_ref, _max_where_not(abs_error(new_ref[0], truth[0]), ref_bad))
            if exact:
                failures += [
                    f"{name}, step {step}: {failure}"
                    for failure in float32_contract_failures(
                        device, new_ours, new_ref, grad, *ours, lr, ALPHA, EPS
                    )
                ]
            else:
                worse = count_worse_than_reference(
                    new_ours, new_ref, grad, *ours, LR, ALPHA, EPS
                )
                if any(worse.values()):
                    failures.append(f"{name}, step {step}: worse than the reference {worse}")
            ours = new_ours
    criterion = (
        ("bit-identical" if device == mx.cpu else "= CPU, <= 1 ulp from mlx")
        if exact
        else "<= reference error"
    )
    line = (
        f"  {str(dtype).split('.')[-1]:9s} max|ours-mlx| {max_diff:.3e}  "
        f"max err vs float64: ours {max_ours:.3e}, mlx {max_ref:.3e}  "
        f"[{criterion}] {'PASS' if not failures else 'FAIL'}"
    )
    notes = []
    if ref_overflow:
        notes.append(
            f"mlx returned Inf/NaN for {ref_overflow} of {elements} elements where "
            f"the float64 truth is finite (the reference's own overflow"
            f"{'; eps rounds to 0 in float16' if dtype == mx.float16 else ''}); "
            f"ours: {ours_overflow}. The maxima above leave those elements out."
        )
    elif ours_overflow:
        notes.append(
            f"ours returned Inf/NaN for {ours_overflow} of {elements} elements "
            "where the float64 truth is finite."
        )
    return not failures, "\n".join([line] + ["    " + f for f in failures + notes])


def _non_finite_where_truth_is_finite(result: mx.array, truth: mx.array) -> mx.array:
    """Elements that are Inf or NaN in ``result`` but finite in ``truth``."""
    s = mx.cpu
    return mx.logical_and(
        mx.logical_not(mx.isfinite(result, stream=s), stream=s),
        mx.isfinite(truth, stream=s),
        stream=s,
    )


def _max_where_not(values: mx.array, excluded: mx.array) -> float:
    """The largest of ``values`` outside ``excluded`` (0 if none is left)."""
    return mx.where(excluded, 0.0, values, stream=mx.cpu).max(stream=mx.cpu).item()


def main(argv: list[str] | None = None, prog: str = "python -m mlx_fused_rmsprop verify") -> int:
    """Entry point of the ``verify`` command; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check the fused RMSprop against mlx.optimizers.RMSprop on this machine.",
    )
    parser.add_argument(
        "--device", choices=["default", "cpu", "gpu"], default="default",
        help="device to check (default: mlx's default device)",
    )
    args = parser.parse_args(argv)
    if args.device != "default":
        if args.device == "gpu" and not mx.metal.is_available():
            print("FAIL: --device gpu, but Metal is not available on this machine.")
            return 1
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    device = mx.default_device()
    on_gpu = device == mx.gpu

    print("mlx_fused_rmsprop verify")
    print(f"  mlx {mx.__version__} (extension built against {_build_info.MLX_VERSION})")
    print(f"  python {platform.python_version()} on {platform.system()} {platform.machine()}")
    print(f"  device: {'gpu (Metal)' if on_gpu else 'cpu'}; "
          f"Metal kernels in this build: {'yes' if _build_info.HAS_METAL else 'no'}")
    print(f"  lr={LR} alpha={ALPHA} eps={EPS}, {STEPS} steps x 3 layouts per dtype")

    dtypes = [mx.float32, mx.float16, mx.bfloat16] + ([] if on_gpu else [mx.float64])
    ok = True
    for dtype in dtypes:
        try:
            passed, report = _check_dtype(dtype, device)
        except Exception as e:  # report, don't crash: this is a diagnostic tool
            passed, report = False, f"  {dtype}: FAIL ({type(e).__name__}: {e})"
        ok &= passed
        print(report)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
