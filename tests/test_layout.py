"""The project's housekeeping: one version, the license the metadata names, py.typed, readable modules."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
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


def test_the_old_binding_module_name_still_works_and_says_it_moved(monkeypatch):
    from fused_ema import binding

    monkeypatch.delitem(sys.modules, "fused_ema.modules", raising=False)
    with pytest.warns(DeprecationWarning, match="fused_ema.modules is deprecated.*fused_ema.binding"):
        from fused_ema import modules
    for name in ("Binding", "clone_module", "pack_", "pair_by_name", "check_loadable", "unwrap", "CannotCopyError"):
        assert getattr(modules, name) is getattr(binding, name)
    assert modules._watch_registrations is binding._watch_registrations  # private names resolve too
    from fused_ema.modules import Binding

    assert Binding is binding.Binding
    with pytest.raises(AttributeError, match="see fused_ema.binding"):
        modules.no_such_name  # noqa: B018


def test_importing_the_package_warns_nothing():
    # A fresh interpreter: in this one the deprecated aliases may already have been imported.
    script = (
        "import warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "warnings.filterwarnings('ignore', category=DeprecationWarning, module='(?!fused_ema)')\n"
        "import fused_ema, fused_ema.rules\n"
        "import sys\n"
        "assert 'fused_ema.modules' not in sys.modules and 'fused_ema.benchmark' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
