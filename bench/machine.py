"""What machine a benchmark ran on: CPU, cores, memory, mlx and device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

import mlx.core as mx


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> list[str]:
    """The SIMD extensions the CPU kernel may use (x86 Linux only)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("sse2", "avx2", "f16c", "avx512f") if x in flags]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        return round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (Unix), to tell how busy a
    shared machine was around a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def kernel_threads() -> dict[str, int]:
    """Threads the fused CPU kernel splits a large leaf across, by what bounds
    it: float32 / float64 leaves are memory-bound, 16-bit ones compute-bound
    (asked from the kernel itself: MLX_FUSED_RMSPROP_NUM_THREADS, else its
    policy on this process's cores)."""
    from mlx_fused_rmsprop import _ext

    return {bound: _ext._split_threads(bound) for bound in ("memory", "compute")}


def kernel_isa() -> str:
    """The instruction-set build of the CPU loops this process runs."""
    from mlx_fused_rmsprop import _ext

    return _ext._cpu_isa()


def describe() -> dict[str, Any]:
    import mlx_fused_rmsprop

    device = mx.default_device()
    return {
        "cpu": _cpu_model(),
        "cpu_simd": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_fused_rmsprop": mlx_fused_rmsprop.__version__,
        "device": "gpu" if device == mx.gpu else "cpu",
        "metal_available": bool(mx.metal.is_available()),
        "kernel_threads": kernel_threads(),
        "kernel_isa": kernel_isa(),
    }


def one_line(m: dict[str, Any]) -> str:
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    simd = f" [{' '.join(m['cpu_simd'])}]" if m.get("cpu_simd") else ""
    threads = m["kernel_threads"]
    return (
        f"{m['cpu']}{simd}, {m['usable_cores']} usable of {m['logical_cores']} cores"
        f"{mem}, {m['os']} {m['arch']}; mlx {m['mlx']}, device {m['device']}; "
        f"mlx-fused-rmsprop {m['mlx_fused_rmsprop']} (CPU kernel: {m['kernel_isa']} build, "
        f"{threads['memory']} threads for float32, {threads['compute']} for 16-bit); "
        f"Python {m['python']}"
    )
