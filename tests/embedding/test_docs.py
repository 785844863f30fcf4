"""docs/embedding.md shows the examples the tests run, character for character, and the
README leads to it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "embedding.md"


@pytest.mark.parametrize("example", ["host_app.py", "script.py"])
def test_the_doc_shows_the_example_as_it_is(example: str) -> None:
    path = ROOT / "examples" / "embedding" / example
    doc = DOC.read_text()
    assert f"(../examples/embedding/{example})" in doc
    assert f"```python\n{path.read_text()}```\n" in doc, f"docs/embedding.md differs from {path}"


def test_the_readme_leads_to_the_doc() -> None:
    assert "(docs/embedding.md)" in (ROOT / "README.md").read_text()
