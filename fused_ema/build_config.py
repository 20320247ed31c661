"""How the extension is built: one place for setup.py and the opt-in build on first use in ops.py.

Sources, flags, where the CUDA toolkit is, and the build record: a small JSON file written beside
the compiled ``_C`` that names the torch it was built against, so that an extension built for
another torch is refused at import instead of crashing in a call.

Plain Python with no imports from fused_ema or torch, so setup.py can load it by path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

RECORD_NAME = "_build_info.json"
"""The build record's file name, in the package directory beside ``_C``."""

NO_EXTENSION_VARIABLE = "FUSED_EMA_NO_EXTENSION"
"""Set to 1 at install to install without the C++ extension (backend 'foreach' then runs)."""

JIT_VARIABLE = "FUSED_EMA_JIT"
"""Set to 1 to let ``import fused_ema`` compile a missing or stale extension (cached per torch)."""

REBUILD_COMMAND = "pip install --no-build-isolation ."
"""Builds and installs the extension against the torch already installed (run in the source tree)."""


def cpu_sources(csrc: Path) -> list[Path]:
    """The C++ sources of the CPU extension, below the ``csrc`` directory."""
    return [csrc / "ops.cpp", csrc / "tensor_watch.cpp", csrc / "pack.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]


def cuda_sources(csrc: Path) -> list[Path]:
    """The CUDA kernels and their torch glue (``csrc/cuda``), added to the CPU sources in a CUDA build."""
    return sorted([*(csrc / "cuda").glob("*.cu"), *(csrc / "cuda").glob("*.cpp")])


def headers(csrc: Path) -> list[Path]:
    """Every header below ``csrc``, at any depth: a changed header rebuilds the extension."""
    return sorted(path for pattern in ("*.h", "*.cuh") for path in csrc.rglob(pattern))


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) for the CPU sources."""
    # at::parallel_for is a header template whose OpenMP pragma compiles away without -fopenmp:
    # the kernels would then run on one thread. (Apple's clang has no OpenMP: one thread there.)
    if os.name == "nt":
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":
        return ["-O3", "-g0"], []
    return ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"], ["-fopenmp"]


def cuda_compile_flags() -> list[str]:
    """nvcc flags for the ``.cu`` sources (the architectures come from TORCH_CUDA_ARCH_LIST)."""
    return ["-O3"]


# --- the CUDA toolkit ------------------------------------------------------------------------


def toolkit_version(home: Path) -> tuple[int, int] | None:
    """(major, minor) of the CUDA toolkit at ``home``; None when it is not a usable toolkit."""
    home = Path(home)
    if not (home / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")).is_file():
        return None
    if not (home / "include" / "cuda_runtime.h").is_file():
        return None
    try:  # CUDA_VERSION in cuda.h is major * 1000 + minor * 10, in every toolkit
        match = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", (home / "include" / "cuda.h").read_text(errors="replace"))
        if match:
            return int(match.group(1)) // 1000, int(match.group(1)) % 1000 // 10
    except OSError:
        pass
    try:
        output = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                                timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def resolve_nvcc(path: str | Path, depth: int = 8) -> Path:
    """The real ``nvcc`` behind ``path``: through symbolic links and small wrapper scripts.

    A wrapper such as ``/usr/local/bin/nvcc`` containing ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``
    resolves to the toolkit's nvcc; torch's own guess (the parent of the wrapper's directory) would
    be ``/usr/local``, which has no CUDA headers.
    """
    path = Path(os.path.realpath(path))
    for _ in range(depth):
        try:
            if path.stat().st_size > 65536:
                return path  # a binary, or at least no wrapper
            with open(path, "rb") as file:
                text = file.read().decode("utf-8", errors="replace")
        except OSError:
            return path
        if not text.startswith("#!"):
            return path
        targets = [Path(target) for target in re.findall(r"(/[^\s\"'`;|&<>$]*/nvcc)(?![\w.-])", text)]
        targets = [target for target in targets if target.is_file() and os.path.realpath(target) != str(path)]
        if not targets:
            return path
        path = Path(os.path.realpath(targets[0]))
    return path


def find_cuda_toolkit(
    torch_cuda: str,
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    default: str = "/usr/local/cuda",
) -> tuple[Path | None, str]:
    """The CUDA toolkit to build with for a torch built with CUDA ``torch_cuda`` (e.g. "13.0").

    Tried in order: ``CUDA_HOME``, ``CUDA_PATH``, the ``nvcc`` on the PATH (resolved through links
    and wrapper scripts to its toolkit), then ``default``. The first with ``bin/nvcc``,
    ``include/cuda_runtime.h`` and torch's CUDA major version wins (torch refuses to build with
    another major version). Returns (the toolkit directory or None, the candidates passed over and why).

    Example::

        home, passed_over = find_cuda_toolkit(torch.version.cuda)
    """
    wanted = int(str(torch_cuda).split(".")[0])
    candidates: list[tuple[str, str]] = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            candidates.append((f"{variable}={environ[variable]}", environ[variable]))
    nvcc = which("nvcc")
    if nvcc:
        real = resolve_nvcc(nvcc)
        candidates.append((f"nvcc on the PATH ({nvcc} -> {real})" if str(real) != nvcc else f"nvcc on the PATH ({nvcc})",
                           str(real.parent.parent)))
    candidates.append((default, default))
    tried = []
    for label, home in candidates:
        version = toolkit_version(Path(home))
        if version is None:
            tried.append(f"{label}: not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)")
        elif version[0] != wanted:
            tried.append(f"{label}: CUDA {version[0]}.{version[1]}, torch needs CUDA {wanted}.x")
        else:
            return Path(os.path.realpath(home)), "; ".join(tried)
    return None, "; ".join(tried)


# --- the build record ------------------------------------------------------------------------


def write_record(directory: str | Path, record: Mapping[str, object]) -> Path:
    """Writes the build record (torch version, extension file, CUDA kernels or why not) into ``directory``."""
    path = Path(directory) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(record), indent=1, sort_keys=True) + "\n")
    return path


def read_record(directory: str | Path) -> dict | None:
    """The build record in ``directory``; None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(directory) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
