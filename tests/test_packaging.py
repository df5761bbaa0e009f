"""What the package promises about itself: one mlx pin (pyproject.toml) that
the build enforces and the import reports, the type information it ships,
its metadata (license, URLs, changelog), and an sdist that ships the README
with every docs page and file it links."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

from packaging.requirements import Requirement

import docs_pages
import mlx_fused_rmsprop
from mlx_fused_rmsprop import _build_info, _ext

ROOT = Path(__file__).resolve().parents[1]
PIN_SCRIPT = ROOT / "cmake" / "mlx_pin.cmake"


def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def mlx_pins(requirements: list[str]) -> dict[str, str]:
    """{marker: version} of every mlx requirement."""
    pins = {}
    for text in requirements:
        req = Requirement(text)
        if req.name == "mlx":
            (spec,) = req.specifier
            assert spec.operator == "==", text
            pins[str(req.marker)] = spec.version
    return pins


def test_one_mlx_pin_everywhere():
    """pyproject.toml pins one mlx for the build and the run (with the cpu
    extra on Linux); the build recorded that pin, compiled against it, and
    it is the mlx running these tests."""
    data = pyproject()
    build = mlx_pins(data["build-system"]["requires"])
    run = mlx_pins(data["project"]["dependencies"])
    assert set(build) == set(run) and len(build) == 2
    assert len(set(build.values()) | set(run.values())) == 1
    (pin,) = set(run.values())
    linux = next(r for r in data["project"]["dependencies"] if "Linux" in r)
    assert Requirement(linux).extras == {"cpu"}
    assert _build_info.MLX_PINNED_VERSION == _build_info.MLX_VERSION == pin
    assert _ext.built_mlx_version == mx.__version__ == pin


def test_package_version_is_the_metadata_version():
    assert mlx_fused_rmsprop.__version__ == metadata.version("mlx-fused-rmsprop")
    assert mlx_fused_rmsprop.__version__ == pyproject()["project"]["version"]


def run_pin_check(*defines: str, pyproject_path: Path | None = None) -> subprocess.CompletedProcess:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    args = [cmake, f"-DPYPROJECT={pyproject_path or ROOT / 'pyproject.toml'}"]
    args += [f"-D{d}" for d in defines]
    return subprocess.run(
        args + ["-P", str(PIN_SCRIPT)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "platform,requirement", [("Linux", "mlx[cpu]==0.32.4"), ("Darwin", "mlx==0.32.4")]
)
def test_the_build_stops_against_another_mlx(platform, requirement):
    """The check CMakeLists.txt runs right after finding mlx, with the version
    it would compile against replaced by another: one message, the versions,
    and the fix for that platform."""
    out = run_pin_check("MLX_FOUND_VERSION=0.32.3", f"MLX_PIN_PLATFORM={platform}")
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert "mlx-fused-rmsprop must be built against mlx 0.32.4 (its pin in pyproject.toml), " \
        "but this build environment has mlx 0.32.3" in message
    assert f"Fix: pip install '{requirement}' in this environment" in message
    assert "without --no-build-isolation" in message


def test_the_build_goes_on_with_the_pinned_mlx():
    out = run_pin_check(f"MLX_FOUND_VERSION={_build_info.MLX_PINNED_VERSION}")
    assert out.returncode == 0, out.stderr
    assert f"mlx pin: {_build_info.MLX_PINNED_VERSION}" in out.stdout


def test_the_build_stops_on_pins_that_disagree(tmp_path):
    """Editing one pin of pyproject.toml and not the others fails the build."""
    text = (ROOT / "pyproject.toml").read_text()
    pin = _build_info.MLX_PINNED_VERSION
    edited = text.replace(f'"mlx[cpu]=={pin};', '"mlx[cpu]==0.33.0;', 1)
    assert edited != text
    (tmp_path / "pyproject.toml").write_text(edited)
    out = run_pin_check(pyproject_path=tmp_path / "pyproject.toml")
    assert out.returncode != 0
    assert "must pin mlx to exactly one version" in " ".join(out.stderr.split())
    assert "0.33.0" in out.stderr and pin in out.stderr


def test_the_build_ran_the_check():
    """CMakeLists.txt calls the check with the version find_package(MLX)
    found, before the extension is compiled."""
    text = (ROOT / "CMakeLists.txt").read_text()
    check = text.index('rmsprop_check_mlx_version("${MLX_PINNED_VERSION}" "${MLX_VERSION}"')
    assert text.index("find_package(MLX CONFIG REQUIRED)") < check < text.index("nanobind_add_module(")


def installed_files() -> dict[str, Path]:
    """The package's installed files by name (the Python sources and the
    build's outputs may sit in two directories in an editable install)."""
    dirs = {Path(mlx_fused_rmsprop.__file__).parent, Path(_ext.__file__).parent}
    return {f.name: f for d in dirs for f in d.iterdir()}


def test_type_information_is_installed():
    files = installed_files()
    assert "py.typed" in files
    stub = files["_ext.pyi"].read_text()
    assert (
        "def rmsprop_update(grad: mlx.core.array, param: mlx.core.array, v: mlx.core.array, "
        "lr: mlx.core.array | float, *, alpha: float = 0.99, eps: float = 1e-08, "
        "stream: mlx.core.Stream | mlx.core.Device | None = None) "
        "-> tuple[mlx.core.array, mlx.core.array]:" in stub
    )
    for name in ("class RMSpropOptions", "def rmsprop_step(", "def optimizer_step("):
        assert name in stub, name


def test_rmsprop_update_has_the_class_defaults():
    import inspect

    params = inspect.signature(mlx_fused_rmsprop.rmsprop_update).parameters
    init = inspect.signature(mlx_fused_rmsprop.RMSprop.__init__).parameters
    for name in ("alpha", "eps"):
        assert params[name].default == init[name].default
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    args = (mx.ones(3), mx.ones(3), mx.zeros(3), mx.array(0.1))
    ours = mlx_fused_rmsprop.rmsprop_update(*args)
    explicit = _ext.rmsprop_update(*args, alpha=0.99, eps=1e-8)
    assert all(mx.array_equal(a, b).item() for a, b in zip(ours, explicit))
    # The binding itself has the same defaults (what _ext.pyi shows).
    assert all(mx.array_equal(a, b).item() for a, b in zip(_ext.rmsprop_update(*args), explicit))


def test_metadata_license_urls():
    meta = metadata.metadata("mlx-fused-rmsprop")
    assert meta["License-Expression"] == "MIT"
    files = [str(f) for f in metadata.distribution("mlx-fused-rmsprop").files]
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), files
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Permission is hereby granted" in license_text
    urls = meta.get_all("Project-URL") or []
    assert urls and all(re.match(r"[^,]+, https://\S+$", u) for u in urls), urls


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(mlx_fused_rmsprop.__version__)}\]?\b", text, re.M)


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory) -> set[str]:
    """The files of the source distribution the build backend makes from this
    tree (scikit-build-core: every file .gitignore does not exclude), as
    paths in the repository."""
    out = tmp_path_factory.mktemp("sdist")
    build = subprocess.run(
        [sys.executable, "-c",
         "import sys; from scikit_build_core.build import build_sdist; print(build_sdist(sys.argv[1]))",
         str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        return {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}


def test_the_readme_and_docs_ship_in_the_sdist_with_every_file_they_link(sdist_members):
    """The README is the index page (project.readme). Its links to docs/ are
    relative: on PyPI they do not resolve (docs/compatibility.md says so),
    in the repository and in the sdist they do: the sdist holds every page
    and every file a page links."""
    assert pyproject()["project"]["readme"] == "README.md"
    pages = docs_pages.pages()
    assert {docs_pages.name(p) for p in pages} <= sdist_members
    for page in pages:
        for target in filter(docs_pages.is_relative, docs_pages.links(page)):
            path = target.split("#")[0]
            if path:
                linked = (page.parent / path).resolve().relative_to(ROOT).as_posix()
                assert linked in sdist_members, (docs_pages.name(page), target)


def test_bench_duration_is_the_benchmark_pages():
    """`bench --help` and docs/benchmarks.md state the same duration of a default run."""
    from mlx_fused_rmsprop.bench import runner

    help_text = " ".join(runner.build_parser().format_help().split())
    (in_help,) = re.findall(r"The default run takes about ([^.]+)\.", help_text)
    page = docs_pages.read("docs/benchmarks.md")
    (in_page,) = re.findall(r"python -m mlx_fused_rmsprop bench +# about (.+)", page)
    assert in_help == in_page.strip()
