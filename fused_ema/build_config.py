"""How the C++ extension is compiled: one place for setup.py and the on-first-use build in ops.py.

Plain Python with no imports from fused_ema or torch, so setup.py can load it by path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cpu_sources(csrc: Path) -> list[Path]:
    """The C++ sources of the CPU extension, below the ``csrc`` directory."""
    return [csrc / "ops.cpp", csrc / "tensor_watch.cpp", csrc / "chunk_table.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) for the CPU sources."""
    # at::parallel_for is a header template whose OpenMP pragma compiles away without -fopenmp:
    # the kernels would then run on one thread. (Apple's clang has no OpenMP: one thread there.)
    if os.name == "nt":
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":
        return ["-O3", "-g0"], []
    return ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"], ["-fopenmp"]
