"""The benchmark suite behind ``python -m mlx_fused_rmsprop bench``.

Installed inside the package as ``mlx_fused_rmsprop.bench``; ``main(argv)``
parses its own arguments (``--help`` lists them) and returns an exit code.
"""

from .runner import main

__all__ = ["main"]
