"""Mutation testing: does the test suite notice a careless edit?

Each mutant in tests/mutants/catalogue.py is one small edit (find -> replace)
of one source file, with the tests that should fail once it is made. This
script copies the repository it lives in (tracked and untracked-not-ignored
files, so uncommitted work counts) into a scratch folder once, makes a venv
there with the build and test requirements read from pyproject.toml, installs
the copy editable with incremental rebuilds, and then for each mutant: applies
it, rebuilds the extension, runs its tests, and restores the file.

    python tests/mutants/run.py                  # the whole catalogue
    python tests/mutants/run.py --only ID [ID ...]
    python tests/mutants/run.py --list           # the catalogue, nothing run
    python tests/mutants/run.py --scratch DIR --timeout 600
    python tests/mutants/run.py --opt=-O1        # rebuild ~3x faster

Too slow for CI: with --opt=-O1 on 2 shared cores a C++ mutant takes ~10 s
(rmsprop.cpp) to ~45 s (the CPU loops) and ~90 s when the shared math header
changes (everything rebuilds), each with its tests; a Python one a few
seconds. The 254 mutants before issue 11 took ~1.5 hours on an idle 2-core
machine; the 318 of issue 11's code, under other jobs' load, ~3 hours of
mutant time (several --only runs in separate --scratch folders at once share
the work out). tests/test_mutant_catalogue.py checks the catalogue itself in
CI.
Exits non-zero when a behaviour-changing mutant survived, did not build, or
no longer applies, or when a mutant marked equivalent was killed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from catalogue import MUTANTS  # noqa: E402

DEFAULT_SCRATCH = Path(tempfile.gettempdir()) / "mlx-fused-rmsprop-mutants"
EDITABLE = ["-Ceditable.rebuild=true", "-Ceditable.verbose=false"]


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def copy_repository(src: Path) -> None:
    """The repository's files into src, keeping a previous run's build/.

    A file whose bytes changed gets a fresh modification time (shutil.copy,
    not copy2): the build must see every change. Copying a file's old time
    over a newer one would hide it -- e.g. after an interrupted run, whose
    objects were compiled from a mutant, the restored file would look older
    than those objects and the mutant would stay in the build."""
    files = {name for name in sh(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                                 cwd=REPO, check=True).stdout.split("\0")
             if name and (REPO / name).is_file()}
    if src.exists():
        for path in sorted(src.rglob("*"), reverse=True):
            name = path.relative_to(src).as_posix()
            if name == "build" or name.startswith("build/"):
                continue
            if path.is_symlink() or path.is_file():
                if name not in files:
                    path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for name in sorted(files):
        source, target = REPO / name, src / name
        if target.is_file() and target.read_bytes() == source.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


def requirements(src: Path) -> list[str]:
    """Build requirements and the test extra, from pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        mlx = "mlx==0.32.4" if platform.system() == "Darwin" else "mlx[cpu]==0.32.4"
        return [mlx, "nanobind==3.1.0", "scikit-build-core>=0.10", "pytest",
                "hypothesis", "numpy", "matplotlib"]
    meta = tomllib.loads((src / "pyproject.toml").read_text())
    return meta["build-system"]["requires"] + meta["project"]["optional-dependencies"]["test"]


def setup(scratch: Path, opt: str) -> Path:
    """Copy, venv, editable install; returns the venv's python. `opt` replaces
    the Release build's -O3 (same results: the extension is built without
    fast-math and with -ffp-contract=off, so no level changes a bit; rmsprop_cpu.cpp
    alone takes ~55 s at -O3 and ~20 s at -O1 on a 2-core machine)."""
    src = scratch / "src"
    src.mkdir(parents=True, exist_ok=True)
    copy_repository(src)
    python = scratch / "venv" / "bin" / "python"
    if not python.exists():
        print(f"creating {scratch / 'venv'}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(scratch / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements(src)],
                       check=True)
    print(f"installing {src} (editable)", flush=True)
    flags = f"-Ccmake.define.CMAKE_CXX_FLAGS_RELEASE={opt} -DNDEBUG"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "-e", ".", *EDITABLE, flags], cwd=src, check=True)
    return python


def build(python: Path, src: Path, mutant: dict) -> str:
    """'' when the mutated tree builds, else the first error line."""
    proc = sh([str(python), "-c", "import mlx_fused_rmsprop"], cwd=src)
    if proc.returncode == 0 and mutant["file"].endswith(".metal"):
        # Only the harness compiles the shader on Linux: compile it as the
        # syntax-gate test does, so a typo is not counted as a kill.
        mlx_inc = sh([str(python), "-m", "mlx", "--cmake-dir"]).stdout.strip() + "/include"
        proc = sh(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++",
                   f"-I{src}/tests/metal_harness", f"-I{src}/kernels", f"-I{src}/csrc",
                   "-isystem", mlx_inc, "-include", "metal_shim.h",
                   "-DRMSPROP_KERNEL(host,func,...)=template decltype(func<__VA_ARGS__>)"
                   " func<__VA_ARGS__>;", mutant["file"]], cwd=src)
    if proc.returncode == 0:
        return ""
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["?"])[0].strip()[:160]


def run_tests(python: Path, src: Path, mutant: dict, timeout: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout', first failing test)."""
    env = {**os.environ, **mutant.get("env", {})}
    cmd = [str(python), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant["tests"]]
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", ""
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode == 0:
        return "passed", ""
    lines = out.splitlines()
    first = next((ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))), "")
    if not first:  # the interpreter died (faulthandler names the test's frame)
        fatal = next((ln for ln in lines if ln.startswith("Fatal Python error")), "")
        frame = next((re.search(r'(tests/test_\w+\.py)", line \d+ in (\w+)', ln)
                      for ln in lines if re.search(r"tests/test_\w+\.py", ln)), None)
        where = f"{frame.group(1)}::{frame.group(2)}" if frame else "?"
        first = f"CRASHED in {where}: {fatal or f'exit {proc.returncode}'}"
    return "failed", first


def run_one(python: Path, src: Path, mutant: dict, timeout: float) -> tuple[str, str]:
    """(status, detail) of one mutant; the file is restored whatever happens."""
    path = src / mutant["file"]
    original = path.read_text()
    if original.count(mutant["find"]) != 1:
        return "NOT APPLIED", f"'find' occurs {original.count(mutant['find'])} times"
    try:
        path.write_text(original.replace(mutant["find"], mutant["replace"]))
        error = build(python, src, mutant)
        if error:
            return "BUILD FAILED", error
        outcome, first = run_tests(python, src, mutant, timeout)
    finally:
        path.write_text(original)
    equivalent = "equivalent" in mutant
    if outcome == "passed":
        return ("EQUIVALENT" if equivalent else "SURVIVED"), ""
    detail = f"timeout after {timeout:.0f} s" if outcome == "timeout" else first
    return ("KILLED (but marked equivalent)" if equivalent else "KILLED"), detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--opt", default="-O3", help="optimization flag of the scratch build "
                    "(default -O3, the Release build's; -O1 rebuilds ~3x faster)")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    args = ap.parse_args()

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m["id"] for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutant ids: {' '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m["id"] in args.only]
    if args.list:
        for m in mutants:
            tag = " [equivalent]" if "equivalent" in m else ""
            print(f"{m['id']:32} {m['file']}{tag}\n    {m['breaks']}")
        return 0

    python = setup(args.scratch.resolve(), args.opt)
    src = args.scratch.resolve() / "src"
    error = build(python, src, {"file": ""})
    if error:
        print(f"the unmutated tree does not build: {error}")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # restore files, then exit

    results = []
    width = max(len(m["id"]) for m in mutants)
    for m in mutants:
        start = time.monotonic()
        status, detail = run_one(python, src, m, args.timeout)
        results.append((m, status, detail))
        line = f"{m['id']:{width}}  {status:12} {time.monotonic() - start:6.1f} s"
        print(f"{line}  {detail}" if detail else line, flush=True)

    counted = [(m, s) for m, s, _ in results if "equivalent" not in m]
    killed = sum(s == "KILLED" for _, s in counted)
    bad = [m["id"] for m, s in counted if s != "KILLED"]
    bad += [m["id"] for m, s, _ in results if "equivalent" in m and s != "EQUIVALENT"]
    print(f"\n{killed} killed, {len(counted) - killed} not killed "
          f"of {len(counted)} behaviour-changing mutants: score "
          f"{100.0 * killed / max(1, len(counted)):.1f}%")
    for m, s, _ in results:
        if s not in ("KILLED", "EQUIVALENT"):
            print(f"  {s}: {m['id']} ({m['breaks']})")
    equivalent = [(m, s) for m, s, _ in results if "equivalent" in m]
    if equivalent:
        print("equivalent mutants (not scored):")
        for m, s in equivalent:
            print(f"  {m['id']} [{s}]: {m['equivalent']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
