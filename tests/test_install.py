"""Installing: the CUDA toolkit lookup, loud builds, stale-build refusal, the opt-in compile, info.

Cheap checks only (fake toolkits made of wrapper scripts, copies of the package with a doctored
build record, setup.py on a one-line broken source). The heavy ones (the CUDA build against torch
2.14.1, the wheel in a fresh virtualenv, the suite under both torches) run in .ci/run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fused_ema import build_config, cli, ops

ROOT = Path(__file__).resolve().parents[1]


# --- the CUDA toolkit -------------------------------------------------------------------------


def _toolkit(root: Path, name: str, version: str) -> Path:
    """A fake CUDA toolkit: bin/nvcc, include/cuda_runtime.h and cuda.h with its CUDA_VERSION."""
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    major, minor = map(int, version.split("."))
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {major * 1000 + minor * 10}\n")
    _script(home / "bin" / "nvcc", "echo fake nvcc")
    return home


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _find(torch_cuda: str, environ: dict, nvcc: Path | None, default: Path):
    return build_config.find_cuda_toolkit(torch_cuda, environ=environ,
                                          which=lambda _: None if nvcc is None else str(nvcc), default=str(default))


def test_toolkit_behind_a_wrapper_script_is_found(tmp_path):
    # This machine's layout: /usr/local/bin/nvcc is `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, and
    # torch's own guess from it (the wrapper's parent, /usr/local) has no CUDA headers.
    home = _toolkit(tmp_path, "cuda-13.0", "13.0")
    wrapper = _script(tmp_path / "local" / "bin" / "nvcc", f'exec {home}/bin/nvcc "$@"')
    found, _ = _find("13.0", {}, wrapper, tmp_path / "missing")
    assert found == home


def test_wrappers_and_links_are_followed_to_the_end(tmp_path):
    home = _toolkit(tmp_path, "cuda-13.0", "13.0")
    inner = _script(tmp_path / "shims" / "nvcc", f'exec "{home}/bin/nvcc" "$@"')
    (tmp_path / "bin").mkdir()
    os.symlink(inner, tmp_path / "bin" / "nvcc")
    outer = _script(tmp_path / "outer" / "nvcc", f"exec {tmp_path / 'bin' / 'nvcc'} \"$@\"")
    assert build_config.resolve_nvcc(outer) == home / "bin" / "nvcc"


def test_order_cuda_home_then_cuda_path_then_nvcc_then_default(tmp_path):
    first, second, third, default = (_toolkit(tmp_path, f"cuda-{n}", "13.0") for n in ("a", "b", "c", "d"))
    wrapper = _script(tmp_path / "wrapped" / "nvcc", f'exec {third}/bin/nvcc "$@"')
    assert _find("13.0", {"CUDA_HOME": str(first), "CUDA_PATH": str(second)}, wrapper, default)[0] == first
    assert _find("13.0", {"CUDA_PATH": str(second)}, wrapper, default)[0] == second
    assert _find("13.0", {}, wrapper, default)[0] == third
    assert _find("13.0", {}, None, default)[0] == default


def test_toolkit_of_another_major_version_is_passed_over_with_the_reason(tmp_path):
    old = _toolkit(tmp_path, "cuda-12.4", "12.4")
    new = _toolkit(tmp_path, "cuda-13.0", "13.0")
    found, passed_over = _find("13.0", {"CUDA_HOME": str(old)}, None, new)
    assert found == new
    assert f"CUDA_HOME={old}: CUDA 12.4, torch needs CUDA 13.x" in passed_over


def test_no_toolkit_says_what_was_tried(tmp_path):
    wrapper = _script(tmp_path / "bin" / "nvcc", 'exec "$SOMEWHERE/nvcc" "$@"')  # cannot be resolved
    found, passed_over = _find("13.0", {"CUDA_HOME": str(tmp_path / "nothing")}, wrapper, tmp_path / "missing")
    assert found is None
    assert f"CUDA_HOME={tmp_path / 'nothing'}: not a CUDA toolkit" in passed_over
    assert f"nvcc on the PATH ({wrapper})" in passed_over
    assert f"{tmp_path / 'missing'}: not a CUDA toolkit" in passed_over


def test_headers_are_found_at_any_depth(tmp_path):
    (tmp_path / "cuda" / "detail").mkdir(parents=True)
    for name in ("a.h", "cuda/b.cuh", "cuda/detail/c.h", "cuda/detail/d.cpp"):
        (tmp_path / name).write_text("")
    assert [path.relative_to(tmp_path).as_posix() for path in build_config.headers(tmp_path)] == [
        "a.h", "cuda/b.cuh", "cuda/detail/c.h"]


# --- setup.py ---------------------------------------------------------------------------------


def _source_tree(tmp_path: Path, ops_source: str) -> Path:
    """setup.py and build_config with a tiny csrc/ whose ops.cpp is ``ops_source``."""
    tree = tmp_path / "tree"
    (tree / "fused_ema").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", tree)
    shutil.copy(ROOT / "pyproject.toml", tree)
    shutil.copy(ROOT / "README.md", tree)
    shutil.copy(ROOT / "fused_ema" / "build_config.py", tree / "fused_ema")
    (tree / "fused_ema" / "__init__.py").write_text("")
    (tree / "csrc" / "cpu").mkdir(parents=True)
    (tree / "csrc" / "ops.cpp").write_text(ops_source)
    (tree / "csrc" / "tensor_watch.cpp").write_text("")
    (tree / "csrc" / "pack.cpp").write_text("")
    return tree


def _setup(tree: Path, *arguments: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != build_config.NO_EXTENSION_VARIABLE}
    env.update(environment)
    return subprocess.run([sys.executable, "setup.py", *arguments], cwd=tree, capture_output=True, text=True,
                          env=env, timeout=600, check=False)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_a_compile_error_fails_the_build_with_the_compilers_message(tmp_path):
    tree = _source_tree(tmp_path, "#error fused_ema_compile_error_marker\n")
    completed = _setup(tree, "build_ext", "--inplace")
    assert completed.returncode != 0
    assert "fused_ema_compile_error_marker" in completed.stdout + completed.stderr
    assert not list((tree / "fused_ema").glob("_C*"))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_a_build_for_another_torch_is_rebuilt_not_kept(tmp_path):
    """setuptools skips an extension newer than its sources; setup.py must not keep one built for another torch."""
    tree = _source_tree(tmp_path, "int fused_ema_test_symbol() { return 1; }\n")
    first = _setup(tree, "build_ext", "--inplace")
    assert first.returncode == 0, first.stdout + first.stderr
    record = build_config.read_record(tree / "fused_ema")
    assert record["torch"] == torch.__version__ and record["extension"].startswith("_C")
    directories = [path.parent for path in tree.glob("build/lib*/fused_ema/_C*")] + [tree / "fused_ema"]
    assert len(directories) == 2
    built = next(tree.glob("build/lib*/fused_ema/_C*"))
    unchanged = _setup(tree, "build_ext", "--inplace")  # the control: up to date, so setuptools skips it
    assert unchanged.returncode == 0 and next(tree.glob("build/lib*/fused_ema/_C*")).stat().st_mtime_ns == built.stat().st_mtime_ns
    before = built.stat().st_mtime_ns
    for directory in directories:  # as if built by another torch
        build_config.write_record(directory, {**record, "torch": "2.0.0"})
    again = _setup(tree, "build_ext", "--inplace")
    assert again.returncode == 0, again.stdout + again.stderr
    assert built.stat().st_mtime_ns != before  # linked again, not skipped as up to date
    for directory in directories:
        assert build_config.read_record(directory)["torch"] == torch.__version__


def test_without_torch_the_build_stops_and_says_what_to_do(tmp_path):
    tree = _source_tree(tmp_path, "")
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'build_ext']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300,
                               check=False)
    assert completed.returncode != 0
    assert "torch is not importable" in completed.stderr
    assert "--no-build-isolation" in completed.stderr and build_config.NO_EXTENSION_VARIABLE in completed.stderr


def test_no_extension_is_recorded_and_reported(tmp_path):
    """FUSED_EMA_NO_EXTENSION=1: no compiler runs, and the installed package says why cpu is missing."""
    tree = _source_tree(tmp_path, "#error must not be compiled\n")
    completed = _setup(tree, "build_py", "--build-lib", str(tmp_path / "lib"),
                       **{build_config.NO_EXTENSION_VARIABLE: "1"})
    assert completed.returncode == 0, completed.stderr
    record = build_config.read_record(tmp_path / "lib" / "fused_ema")
    assert record["extension"] is None and build_config.NO_EXTENSION_VARIABLE in record["reason"]


# --- loading: the build record ----------------------------------------------------------------


def _package_copy(tmp_path: Path, record: dict | None, with_extension: bool = True) -> Path:
    """A copy of the fused_ema package (with this build's _C unless told otherwise) and ``record``."""
    target = tmp_path / "site"
    shutil.copytree(ROOT / "fused_ema", target / "fused_ema",
                    ignore=shutil.ignore_patterns("__pycache__", build_config.RECORD_NAME, "*.so", "*.pyd"))
    if with_extension:
        for library in (ROOT / "fused_ema").glob("_C*"):
            shutil.copy(library, target / "fused_ema")
    if record is not None:
        build_config.write_record(target / "fused_ema", record)
    return target


def _run(site: Path, code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != build_config.JIT_VARIABLE}
    env["PYTHONPATH"] = str(site)
    env.update(environment)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=site, capture_output=True, text=True,
                          env=env, timeout=300, check=False)


PROBE = """
    import json, sys, warnings
    import torch
    import fused_ema
    from fused_ema import ops
    models, averages = [torch.randn(100)], [torch.zeros(100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_ema.lerp_(averages, models, 0.5)
    correct = bool(torch.equal(averages[0], models[0] * 0.5))
    try:
        fused_ema.lerp_(averages, models, 0.5, backend="cpu")
        explicit = None
    except RuntimeError as error:
        explicit = str(error)
    print(json.dumps(dict(
        reason=ops.UNAVAILABLE_REASON, loaded="fused_ema._C" in sys.modules, explicit=explicit,
        available=fused_ema.available_backends(), warnings=[str(w.message) for w in caught],
        correct=correct,
    )))
"""


def _probe(site: Path, **environment: str) -> dict:
    completed = _run(site, PROBE, **environment)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.mark.skipif(ops._C is None or ops._C.__name__ != "fused_ema._C", reason="needs the extension built by setup.py")
def test_extension_built_for_another_torch_is_refused_before_it_is_loaded(tmp_path):
    record = {**build_config.read_record(ROOT / "fused_ema"), "torch": "2.0.0"}
    result = _probe(_package_copy(tmp_path, record))
    assert not result["loaded"]  # refused before the library (and its registrations) is loaded
    assert "cpu" not in result["available"]
    for message in (result["reason"], result["explicit"]):
        assert "torch 2.0.0" in message and f"torch {torch.__version__}" in message
        assert build_config.REBUILD_COMMAND in message and build_config.JIT_VARIABLE in message
    assert len(result["warnings"]) == 1 and "torch 2.0.0" in result["warnings"][0]  # auto: foreach, warned once
    assert result["correct"]


@pytest.mark.skipif(ops._C is None or ops._C.__name__ != "fused_ema._C", reason="needs the extension built by setup.py")
def test_extension_without_a_build_record_is_refused(tmp_path):
    result = _probe(_package_copy(tmp_path, None))
    assert not result["loaded"] and "no build record" in result["reason"]


@pytest.mark.skipif(ops._C is None or ops._C.__name__ != "fused_ema._C", reason="needs the extension built by setup.py")
def test_extension_built_for_this_torch_loads(tmp_path):
    result = _probe(_package_copy(tmp_path, build_config.read_record(ROOT / "fused_ema")))
    assert result["loaded"] and result["reason"] is None and "cpu" in result["available"]


def test_no_extension_install_says_why_in_info(tmp_path):
    site = _package_copy(tmp_path, {"extension": None, "reason": "fused_ema was installed with FUSED_EMA_NO_EXTENSION=1"},
                         with_extension=False)
    result = _probe(site)
    assert "FUSED_EMA_NO_EXTENSION=1" in result["reason"] and result["correct"]
    assert len(result["warnings"]) == 1 and "'auto' uses 'foreach'" in result["warnings"][0]
    completed = _run(site, "from fused_ema import cli; cli.main(['info'])")
    assert completed.returncode == 0, completed.stderr
    cpu_line = next(line for line in completed.stdout.splitlines() if line.strip().startswith("cpu "))
    assert "not available" in cpu_line and "FUSED_EMA_NO_EXTENSION=1" in cpu_line


def test_no_compiler_runs_unless_opted_in(tmp_path):
    """A missing extension is not compiled inside the user's process without FUSED_EMA_JIT=1."""
    site = _package_copy(tmp_path, None, with_extension=False)
    shutil.copytree(ROOT / "csrc", site / "fused_ema" / "csrc")  # sources an installed copy carries
    code = textwrap.dedent("""
        import torch.utils.cpp_extension as cpp_extension
        def refuse(*args, **kwargs):
            raise SystemExit("a compiler was started")
        cpp_extension.load = refuse
    """) + textwrap.dedent(PROBE)
    result = json.loads(_run(site, code).stdout.splitlines()[-1])
    assert "not built" in result["reason"] and build_config.JIT_VARIABLE in result["reason"]
    completed = _run(site, code, **{build_config.JIT_VARIABLE: "1"})
    assert "a compiler was started" in completed.stderr  # opted in: it does compile


def test_opt_in_compile_includes_the_cuda_sources_when_a_toolkit_matches(tmp_path, monkeypatch):
    """#15 item 3: with a CUDA torch and a toolkit, the build on first use compiles csrc/cuda too."""
    from torch.utils import cpp_extension

    home = _toolkit(tmp_path, "cuda-13.0", "13.0")
    calls = []

    def load(**kwargs):
        calls.append(dict(kwargs, cuda_home=cpp_extension.CUDA_HOME))
        return ops._C

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "cache"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/c++")
    saved = cpp_extension.CUDA_HOME
    _, cuda_note = ops._compile()
    sources = [Path(source).name for source in calls[0]["sources"]]
    assert cuda_note is None and calls[0]["with_cuda"] and calls[0]["cuda_home"] == str(home)
    assert {path.name for path in build_config.cuda_sources(ROOT / "csrc")} <= set(sources)
    assert "ops.cpp" in sources and torch.__version__ in calls[0]["build_directory"]
    assert cpp_extension.CUDA_HOME == saved  # pointed at the toolkit for that build only

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "none"))
    monkeypatch.setattr(build_config, "find_cuda_toolkit", lambda *args, **kwargs: (None, "nothing found"))
    _, cuda_note = ops._compile()
    assert not calls[1]["with_cuda"] and "nothing found" in cuda_note
    assert not {path.name for path in build_config.cuda_sources(ROOT / "csrc")} & {
        Path(source).name for source in calls[1]["sources"]}


# --- fused-ema info ---------------------------------------------------------------------------


def test_info_lists_gpu_backends_as_needing_a_gpu_under_a_cuda_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli.backend_line("cuda", "no CUDA device is visible to torch")
    assert line.startswith("needs a GPU")
    if importlib.util.find_spec("triton") is not None:
        assert cli.backend_line("triton", "no CUDA device is visible to torch").startswith("needs a GPU")
    assert cli.backend_line("cpu", "some reason") == "not available: some reason"


def test_info_on_a_cpu_torch_says_not_available(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cli.backend_line("cuda", "this torch is a CPU build").startswith("not available: ")


# --- torch's NumPy warning --------------------------------------------------------------------


def test_no_numpy_warning_from_fused_ema_commands(tmp_path):
    """In an environment without numpy, torch warns "Failed to initialize NumPy" at import; not through us."""
    stub = tmp_path / "no_numpy" / "numpy"  # first on the path: `import numpy` fails as if it were absent
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    environment = {"PYTHONPATH": os.pathsep.join([str(stub.parent), str(ROOT)])}
    control = _run(ROOT, "import torch", **environment)
    if "Failed to initialize NumPy" not in control.stderr:
        pytest.skip("this torch does not warn without numpy")
    completed = _run(ROOT, "from fused_ema import cli; cli.main(['info'])", **environment)
    assert completed.returncode == 0, completed.stderr
    assert "Backends:" in completed.stdout
    assert "Failed to initialize NumPy" not in completed.stderr
