"""A fused, drop-in RMSprop optimizer for MLX.

``mlx_fused_rmsprop.RMSprop`` takes the constructor, validation, state layout
and results of :class:`mlx.optimizers.RMSprop`, and updates each parameter with
ONE fused primitive (a C++ kernel on the CPU, a Metal kernel on Apple GPUs)
instead of a chain of element-wise ops.
"""

from __future__ import annotations

import platform as _platform
from typing import Mapping, Optional

__version__ = "0.2.0"


def _mlx_requirement(version: str, system: Optional[str] = None) -> str:
    """The pip requirement that installs mlx ``version`` on ``system``
    (default: this machine): ``mlx[cpu]==X`` on Linux, where mlx's CPU
    backend is the separate ``mlx-cpu`` distribution that must move with it,
    and ``mlx==X`` on macOS."""
    system = _platform.system() if system is None else system
    return f"mlx=={version}" if system == "Darwin" else f"mlx[cpu]=={version}"


def _require_matching_mlx(built: str, found: str, system: Optional[str] = None) -> None:
    """Raise ImportError unless the running mlx is the one _ext was built on.

    The extension links libmlx's C++ API, which is not ABI-stable across
    releases: a mismatch must fail here, not crash later. The message names
    the one command that fixes it on ``system`` (default: this machine).
    """
    if built != found:
        raise ImportError(
            f"mlx_fused_rmsprop {__version__} was built against mlx {built}, "
            f"but mlx {found} is installed. The two must match exactly (the "
            f"extension links libmlx, whose C++ ABI changes between releases). "
            f"Fix: pip install '{_mlx_requirement(built, system)}'"
        )


def _broken_mlx_message(
    pinned: str,
    error: BaseException,
    versions: Optional[Mapping[str, Optional[str]]] = None,
    system: Optional[str] = None,
) -> str:
    """The ImportError message when ``import mlx.core`` itself fails: e.g. on
    Linux ``mlx`` and ``mlx-cpu`` of two releases (an undefined symbol), or
    ``mlx`` without its CPU backend. ``versions`` maps distribution names to
    installed versions (None: not installed); by default they are read from
    the installed metadata."""
    system = _platform.system() if system is None else system
    names = ("mlx", "mlx-metal") if system == "Darwin" else ("mlx", "mlx-cpu")
    if versions is None:
        from importlib import metadata

        versions = {}
        for name in names:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    found = ", ".join(
        f"{name} {versions.get(name) or '(not installed)'}" for name in names
    )
    return (
        f"mlx_fused_rmsprop {__version__} needs mlx {pinned}, but `import "
        f"mlx.core` fails ({type(error).__name__}: {error}). Installed: "
        f"{found}. Fix: pip install '{_mlx_requirement(pinned, system)}'"
    )


try:
    from ._build_info import MLX_VERSION as _BUILT_MLX_VERSION
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "mlx_fused_rmsprop is not built: install it with `pip install .` "
        "from the repository root."
    ) from e

try:
    import mlx.core as _mx
except ImportError as e:
    raise ImportError(_broken_mlx_message(_BUILT_MLX_VERSION, e)) from e

_require_matching_mlx(_BUILT_MLX_VERSION, _mx.__version__)

from .ops import rmsprop_step, rmsprop_update  # noqa: E402
from .optimizer import RMSprop, ShardedStepError  # noqa: E402

__all__ = ["RMSprop", "ShardedStepError", "rmsprop_step", "rmsprop_update"]
