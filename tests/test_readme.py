"""The README's complete Python examples run as written (a bare ``...`` line marks a sketch)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
COMPLETE = [b for b in BLOCKS if all(ln.split("#")[0].strip() != "..." for ln in b.splitlines())]


def test_the_readme_has_complete_examples():
    assert len(COMPLETE) >= 3, "the README's runnable examples went missing"


@pytest.mark.parametrize("block", COMPLETE, ids=[b.splitlines()[0][:40] for b in COMPLETE])
def test_readme_example_runs(block):
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
