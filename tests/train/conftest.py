"""Fixtures of the trainer tests."""

import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A fixed text file (this Python's json package sources): a stable corpus of ~40 kB."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / "json"
    path = tmp_path_factory.mktemp("corpus") / "json.txt"
    path.write_bytes(b"".join(p.read_bytes() for p in sorted(folder.glob("*.py"))))
    return path
