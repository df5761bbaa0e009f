"""A fused, drop-in RMSprop optimizer for MLX.

``mlx_fused_rmsprop.RMSprop`` takes the constructor, validation, state layout
and results of :class:`mlx.optimizers.RMSprop`, and updates each parameter with
ONE fused primitive (a C++ kernel on the CPU, a Metal kernel on Apple GPUs)
instead of a chain of element-wise ops.
"""

import mlx.core as _mx


def _require_matching_mlx(built: str, found: str) -> None:
    """Raise ImportError unless the running mlx is the one _ext was built on.

    The extension links libmlx's C++ API, which is not ABI-stable across
    releases: a mismatch must fail here, not crash later.
    """
    if built != found:
        raise ImportError(
            f"mlx_fused_rmsprop was built against mlx {built}, but mlx {found} "
            f"is installed. The two must match exactly (mlx's C++ ABI changes "
            f"between releases): pip install 'mlx=={built}', or rebuild "
            f"mlx_fused_rmsprop against mlx {found}."
        )


try:
    from ._build_info import MLX_VERSION as _BUILT_MLX_VERSION
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "mlx_fused_rmsprop is not built: install it with `pip install .` "
        "from the repository root."
    ) from e

_require_matching_mlx(_BUILT_MLX_VERSION, _mx.__version__)

from ._ext import rmsprop_update  # noqa: E402
from .ops import rmsprop_step  # noqa: E402
from .optimizer import RMSprop, ShardedStepError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RMSprop", "ShardedStepError", "rmsprop_step", "rmsprop_update"]
