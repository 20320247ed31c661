"""Builds fused_ema._C, the C++ (and, with a CUDA torch and nvcc, CUDA) kernels.

Install torch first, then build against it without build isolation, so pip never fetches a
second torch:

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

A failed build does not fail the install: fused_ema then compiles the extension on first use
(torch.utils.cpp_extension.load, cached), and without a compiler falls back to backend 'foreach'.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # By path: importing the fused_ema package here would need torch and its own extension.
    spec = importlib.util.spec_from_file_location("fused_ema_build_config", os.path.join(HERE, "fused_ema", "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute ones in ext sources.
    return sorted(os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, pattern)))


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FUSED_EMA_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed: building fused_ema without its C++ extension "
                      "(install torch first, then `pip install --no-build-isolation .`)")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A compile error leaves the extension out instead of failing the install."""

        def build_extension(self, extension) -> None:
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any compiler failure means "not built"
                warnings.warn(f"fused_ema: building {extension.name} failed ({error}); it will be "
                              "compiled on first use, or backend 'foreach' used if that fails too")

    sources = [os.path.relpath(path, HERE) for path in build_config.cpu_sources(Path(HERE) / "csrc")]
    headers = _sources("csrc/**/*.h") + _sources("csrc/**/*.cuh")
    cxx_flags, link_flags = build_config.compile_flags()
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        extension = CUDAExtension(
            "fused_ema._C", sources + cuda_sources, depends=headers,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=link_flags,
        )
    else:
        extension = CppExtension("fused_ema._C", sources, depends=headers, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=link_flags)
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package, so an installed copy can still compile the extension."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "fused_ema", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
