"""The project's housekeeping: one version, the license the metadata names, py.typed, readable modules."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import fused_ema
from fused_ema import _version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fused_ema._version.__version__"}
    assert fused_ema.__version__ == _version.__version__
    try:
        installed = importlib.metadata.version("fused_ema")
    except importlib.metadata.PackageNotFoundError:
        return  # running from a source tree that was never installed
    if Path(fused_ema.__file__).resolve().parents[1] != ROOT:
        assert installed == fused_ema.__version__


def test_the_license_file_is_the_one_the_metadata_names():
    assert PYPROJECT["project"]["license"] in ({"text": "BSD-3-Clause"}, "BSD-3-Clause")
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "the fused_ema authors" in text


def test_type_hints_are_shipped():
    assert (ROOT / "fused_ema" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fused_ema"]


@pytest.mark.parametrize("folder", ["fused_ema/bench", "fused_ema/examples/digits"])
def test_split_modules_are_small_enough_to_read_at_once(folder):
    lengths = {path.name: len(path.read_text().splitlines()) for path in (ROOT / folder).glob("*.py")}
    assert lengths and max(lengths.values()) <= 300, lengths
