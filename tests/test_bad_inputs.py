"""The README's bad-input table is what the code really raises."""

from pathlib import Path

import pytest

from bad_inputs import CASES, markdown_table


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_the_documented_error(case):
    _, run, exc, message = case
    with pytest.raises(exc) as info:
        run()
    assert str(info.value) == message


def test_readme_shows_the_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python tests/bad_inputs.py"
