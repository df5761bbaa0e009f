"""nanobind's stubgen for the built _ext, run by CMakeLists.txt at build time.

mlx.core is imported first: it loads libmlx (and registers mlx's types, which
_ext's signatures name), and _ext's RPATH ($ORIGIN/../mlx/lib) only finds
libmlx once installed beside mlx, not in the build tree. Arguments are
stubgen's: python cmake/stubgen.py -q -i <dir of _ext> -m _ext -o _ext.pyi
"""

import sys

import mlx.core  # noqa: F401
from nanobind.stubgen import main

main(sys.argv[1:])
