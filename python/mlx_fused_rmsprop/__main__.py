"""Command line: ``python -m mlx_fused_rmsprop {verify,bench} [options]``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m mlx_fused_rmsprop {verify,bench} [options]

  verify   check the fused RMSprop against mlx.optimizers.RMSprop on this machine
  bench    benchmark it against mlx.optimizers.RMSprop and the memory roofline

Run a command with --help for its options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as verify_main

        return verify_main(rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
