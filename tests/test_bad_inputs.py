"""The bad-input table of docs/reliability.md is what the code really raises."""

from pathlib import Path

import pytest

from bad_inputs import CASES, markdown_table


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_the_documented_error(case):
    _, run, exc, message = case
    with pytest.raises(exc) as info:
        run()
    assert str(info.value) == message


def test_the_reliability_page_shows_the_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert markdown_table() in page, "regenerate it: python tests/bad_inputs.py"
