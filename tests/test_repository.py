"""The repository's own text: no unresolved merge, and every file the docs cite exists."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
TEXT = (".py", ".md", ".h", ".cpp", ".sh", ".toml", ".cfg", ".txt", ".yml", ".yaml")


def _files(exts):
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and os.path.relpath(os.path.join(top, d), ROOT) != "bench/results"]
        for f in files:
            if f.endswith(exts):
                yield os.path.join(top, f)


def test_no_merge_conflict_markers():
    bad = []
    for path in _files(TEXT):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{i}")
    assert not bad, f"unresolved merge conflicts at {bad}"


# Folders the docs tell the reader to create (git-ignored), not files of the repository.
MADE_BY_THE_READER = {"bench/wheels"}
_CITED = re.compile(r"`((?:lossfuse|csrc|tests|bench|docs|examples|\.ci)/[\w./-]*\w)`")


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "bench/README.md"])
def test_cited_files_exist(doc):
    path = os.path.join(ROOT, doc)
    if not os.path.exists(path):
        pytest.skip(f"{doc} is not in this checkout")
    with open(path, encoding="utf-8") as fh:
        cited = set(_CITED.findall(fh.read()))
    assert cited, f"{doc} cites no file: the pattern is stale"
    missing = sorted(c for c in cited - MADE_BY_THE_READER if not os.path.exists(os.path.join(ROOT, c)))
    assert not missing, f"{doc} cites files that do not exist: {missing}"
