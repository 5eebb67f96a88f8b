"""House rules that a reader of the code and docs relies on: lines of at most 120 characters
(`[tool.ruff] line-length`; Markdown table rows inside docstrings may be longer), and no
development history (issue numbers) in the code or the docs: git log holds it."""

import os
import re

import pytest

from tests.conftest import REPO

LINE_LENGTH = 120
SOURCES = ("keras_mfm", "tests", "benchmarks")


def _files(folders, extensions):
    roots = [os.path.join(REPO, folder) for folder in folders]
    found = [os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith(extensions)]
    for root in roots:
        for parent, folders_below, names in os.walk(root):
            folders_below[:] = [f for f in folders_below if not f.startswith((".", "__pycache__"))]
            found += [os.path.join(parent, name) for name in names if name.endswith(extensions)]
    return sorted(found)


def test_lines_are_at_most_120_characters():
    long_lines = []
    for path in _files(SOURCES, (".py",)):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.rstrip("\n")
                if len(line) > LINE_LENGTH and not line.lstrip().startswith("|"):
                    long_lines.append(f"{os.path.relpath(path, REPO)}:{number} ({len(line)})")
    assert not long_lines, "lines over 120 characters: " + ", ".join(long_lines)


@pytest.mark.parametrize("extensions", [(".py",), (".md",)])
def test_no_issue_numbers_in_code_or_docs(extensions):
    pattern = re.compile(r"issue [0-9]", re.IGNORECASE)
    hits = []
    for path in _files((*SOURCES, "docs"), extensions):
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8") as handle:
            hits += [f"{os.path.relpath(path, REPO)}:{n}" for n, line in enumerate(handle, 1) if pattern.search(line)]
    assert not hits, "issue numbers (development history) in: " + ", ".join(hits)
