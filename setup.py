"""Builds fused_ema._C: the C++ kernels, plus the CUDA kernels when torch is a CUDA build.

Install torch first (any supported version, CPU or CUDA build), then build against it without
build isolation, so pip never fetches a second torch:

    pip install torch==2.13.0            # or keep the torch you have
    pip install --no-build-isolation .

A compile error fails the install with the compiler's message. ``FUSED_EMA_NO_EXTENSION=1``
installs without the extension (backend 'foreach' then runs; ``fused-ema info`` says why). With a
CUDA torch the CUDA toolkit is looked up in CUDA_HOME, CUDA_PATH, the nvcc on the PATH (through
wrapper scripts) and /usr/local/cuda; when none matches torch's CUDA version, the CPU kernels are
built alone and one line says why. TORCH_CUDA_ARCH_LIST picks the GPU architectures ("8.0;9.0").
Each build writes fused_ema/_build_info.json, naming the torch it was built against.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
# setuptools commands that compile; the others (egg_info, dist_info, sdist) only need metadata.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}


def _load_build_config():
    # By path: importing the fused_ema package here would need torch and its own extension.
    spec = importlib.util.spec_from_file_location("fused_ema_build_config", HERE / "fused_ema" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


def _say(message: str) -> None:
    print(f"fused_ema: {message}", file=sys.stderr, flush=True)


def _relative(paths) -> list[str]:
    # setuptools refuses absolute paths in an extension's sources.
    return [os.path.relpath(path, HERE) for path in paths]


def _extensions() -> tuple[list, dict, dict | None]:
    """(ext_modules, build_ext command, the record of a build without extension or None)."""
    if os.environ.get(build_config.NO_EXTENSION_VARIABLE) == "1":
        reason = f"fused_ema was installed with {build_config.NO_EXTENSION_VARIABLE}=1"
        _say(f"{build_config.NO_EXTENSION_VARIABLE}=1: installing without the C++ extension "
             "(backend 'auto' then uses 'foreach')")
        return [], {}, {"extension": None, "reason": reason}
    try:
        import torch
    except ImportError as error:
        if not set(sys.argv[1:]) & BUILD_COMMANDS:
            return [], {}, None
        sys.exit(
            f"fused_ema: cannot build the C++ extension: torch is not importable here ({error}). Install torch "
            "first, then build against it without build isolation: `pip install torch==2.13.0` (or your own), "
            f"then `{build_config.REBUILD_COMMAND}`. To install without the extension, set "
            f"{build_config.NO_EXTENSION_VARIABLE}=1."
        )

    record: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": False,
                    "cuda_note": None, "cuda_toolkit": None, "cuda_arch_list": None}
    sources = build_config.cpu_sources(CSRC)
    if torch.version.cuda:
        home, passed_over = build_config.find_cuda_toolkit(torch.version.cuda)
        major = torch.version.cuda.split(".")[0]
        if home is None:
            record["cuda_note"] = (
                f"the CUDA kernels were left out at install: no CUDA {major} toolkit was found ({passed_over}); "
                f"to build them, set CUDA_HOME to a CUDA {major}.x toolkit and run `{build_config.REBUILD_COMMAND}` again"
            )
            _say(record["cuda_note"])
        else:
            # torch.utils.cpp_extension reads CUDA_HOME once, at import, and would otherwise guess
            # the parent of the nvcc on the PATH, which can be a wrapper script's directory.
            os.environ["CUDA_HOME"] = str(home)
            record.update(cuda_kernels=True, cuda_toolkit=str(home),
                          cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
            arch = record["cuda_arch_list"] or "unset: the visible GPU's, or every architecture torch knows"
            _say(f"building the CUDA kernels with {home} for TORCH_CUDA_ARCH_LIST={arch}"
                 + (f" (passed over: {passed_over})" if passed_over else ""))
            sources = sources + build_config.cuda_sources(CSRC)

    from torch.utils import cpp_extension

    if record["cuda_kernels"]:
        cpp_extension.CUDA_HOME = record["cuda_toolkit"]  # in case it was imported before the line above
    cxx_flags, link_flags = build_config.compile_flags()
    common = {"sources": _relative(sources), "depends": _relative(build_config.headers(CSRC)), "extra_link_args": link_flags}
    if record["cuda_kernels"]:
        extension = cpp_extension.CUDAExtension(
            "fused_ema._C", extra_compile_args={"cxx": cxx_flags, "nvcc": build_config.cuda_compile_flags()}, **common
        )
    else:
        extension = cpp_extension.CppExtension("fused_ema._C", extra_compile_args={"cxx": cxx_flags}, **common)

    class BuildExtensionWithRecord(cpp_extension.BuildExtension):
        """torch's BuildExtension, failing loudly, which rebuilds a stale ``_C`` and records what it built."""

        def _directories(self, ext) -> set[Path]:
            # Where _C lands (the source package with --inplace or in an editable install) and
            # build/lib, where setuptools builds it first and checks whether it is up to date.
            regular = Path(self.build_lib) / self.get_ext_filename(self.get_ext_fullname(ext.name))
            return {Path(self.get_ext_fullpath(ext.name)).parent, regular.parent}

        def run(self) -> None:
            for ext in self.extensions:
                for directory in self._directories(ext):
                    recorded = build_config.read_record(directory) or {}
                    if any(recorded.get(key) != value for key, value in record.items()):
                        # setuptools skips an extension whose sources are older than it: an _C
                        # built for another torch (or without CUDA kernels) would be kept.
                        self.force = True
            super().run()
            for ext in self.extensions:
                name = Path(self.get_ext_fullpath(ext.name)).name
                for directory in self._directories(ext):
                    build_config.write_record(directory, {**record, "extension": name})

    return [extension], {"build_ext": BuildExtensionWithRecord.with_options(use_ninja=True)}, None


ext_modules, cmdclass, no_extension_record = _extensions()


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (the opt-in build on first use compiles from it)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "fused_ema" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))
        if no_extension_record is not None:
            # An editable install runs from the source tree: the record goes there.
            package = HERE / "fused_ema" if getattr(self, "editable_mode", False) else Path(self.build_lib) / "fused_ema"
            build_config.write_record(package, no_extension_record)


setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
