"""Command line: ``mlx-fused-rmsprop {verify,bench} [options]``, also run as
``python -m mlx_fused_rmsprop``."""

from __future__ import annotations

import os
import sys
from typing import Optional

USAGE = """usage: {prog} [--version] {{verify,bench}} [options]

  verify     check the fused RMSprop against mlx.optimizers.RMSprop on this machine
  bench      benchmark it against mlx.optimizers.RMSprop and the memory roofline
  --version  print the versions of this package, mlx and Python

Run a command with --help for its options."""


def program_name(argv0: Optional[str] = None) -> str:
    """How the user invoked the command line: ``mlx-fused-rmsprop`` (the
    console script) or ``python -m mlx_fused_rmsprop``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = os.path.basename(argv0)
    if not name or name in ("__main__.py", "-c", "-m") or name.endswith(".py"):
        return "python -m mlx_fused_rmsprop"
    return name


def version_text() -> str:
    """``mlx-fused-rmsprop X (mlx Y, Python Z)``: this package and the mlx it
    runs on (the import has already checked that it is the mlx it was built
    against)."""
    import platform

    import mlx.core as mx

    from . import __version__

    return (
        f"mlx-fused-rmsprop {__version__} (mlx {mx.__version__}, "
        f"Python {platform.python_version()})"
    )


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = program_name() if prog is None else prog
    usage = USAGE.format(prog=prog)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as verify_main

        return verify_main(rest, prog=f"{prog} verify")
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest, prog=f"{prog} bench")
    print(f"{prog}: unknown command {command!r}\n\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
