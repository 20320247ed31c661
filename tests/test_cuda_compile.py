"""The CUDA sources compile for real GPUs, and their host-side logic is right, without a GPU.

- every ``csrc/cuda/*.cu`` compiles to an object for sm_80 and sm_90 with nvcc;
- every ``csrc/cuda/*.cpp`` (the torch glue) compiles against this torch's headers, with the one
  generated header CPU wheels lack (``c10/cuda/impl/cuda_cmake_macros.h``) written to a scratch
  include directory, never shipped;
- the element arithmetic the kernel uses (``csrc/cuda/*.h``) and the chunk table's host functions
  (``csrc/chunk_table.h``) are built for the host and checked against ``fused_ema/rounding.py``,
  torch's lerp and a closed form;
- the kernel's per-chunk code (``csrc/cuda/multi_lerp_chunk.cuh``) is run on the host, block by block
  and thread by thread, over CPU tensors and chunk tables, and compared bit for bit with "reference"
  for every dtype pair, both roundings, several sets, unaligned views and partial chunks.

Needs nvcc (CI has it); skipped only when nvcc is absent.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from fused_ema.backends import chunk_table
from fused_ema.rounding import memory_order_index, rounding_key, stochastic_round_to_bfloat16

from helpers import DTYPES

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")

pytestmark = pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found (on PATH, or in $CUDA_HOME/bin)")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def scratch_include(tmp_path_factory) -> Path:
    """The header CUDA builds of torch generate and CPU wheels lack; its whole content."""
    directory = tmp_path_factory.mktemp("include")
    header = directory / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return directory


@pytest.mark.parametrize("source", sorted(CUDA_SOURCES.glob("*.cu")), ids=lambda path: path.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles(source, arch, tmp_path):
    compute = arch.replace("sm_", "compute_")
    _run([NVCC, "-std=c++20", "-O3", "-c", str(source), "-o", str(tmp_path / "kernel.o"),
          f"-gencode=arch={compute},code={arch}"])


@pytest.mark.parametrize("source", sorted(CUDA_SOURCES.glob("*.cpp")), ids=lambda path: path.name)
def test_glue_compiles_against_torch_headers(source, scratch_include, tmp_path):
    # nvcc hands .cpp files to the host compiler with the CUDA include path, as CUDAExtension does.
    includes = [f"-I{scratch_include}", *(f"-I{path}" for path in include_paths())]
    _run([NVCC, "-std=c++20", "-c", "-Xcompiler", "-fPIC", "-Xcompiler", "-w", *includes,
          "-DTORCH_EXTENSION_NAME=_C", str(source), "-o", str(tmp_path / "glue.o")])


@pytest.fixture(scope="module")
def host_driver(tmp_path_factory) -> Path:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")  # nvcc needs one too, so CI has it
    binary = tmp_path_factory.mktemp("host") / "cuda_host_test"
    _run([compiler, "-std=c++17", "-O2", f"-I{CUDA_SOURCES}", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "cuda_host_test.cpp"),
          "-o", str(binary)])
    return binary


def _ask(binary: Path, lines: list[str]) -> list[str]:
    return _run([str(binary)], input="\n".join(lines) + "\n").stdout.split("\n")[: len(lines)]


def _float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def test_stochastic_rounding_bits_match_rounding_py(host_driver):
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(300, generator=generator) * 10.0 ** torch.randint(-30, 30, (300,), generator=generator),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895314e38, -3.3895314e38, 1e-45, 1.00390625, 1.01171875]),
    ])
    random_state = random.Random(1)
    queries, expected_stochastic = [], []
    for position, value in enumerate(values.tolist()):
        key = rounding_key(random_state.randrange(1 << 20), random_state.randrange(1 << 20), position % 3)
        tensor_index = random_state.randrange(1 << 16)
        element_index = random_state.choice([position, random_state.randrange(1 << 40)])  # > 2**32 too
        single = torch.tensor([value])
        reference = stochastic_round_to_bfloat16(single, key, tensor_index, torch.tensor([element_index]))
        expected_stochastic.append(int(reference.view(torch.int16).item()) & 0xFFFF)
        queries.append(f"R {key} {tensor_index} {element_index} {_float_bits(value)}")
    answers = [tuple(map(int, line.split())) for line in _ask(host_driver, queries)]
    assert [stochastic for stochastic, _ in answers] == expected_stochastic
    nearest = [int(v) & 0xFFFF for v in values.to(torch.bfloat16).view(torch.int16).tolist()]
    assert [near for _, near in answers] == nearest


def test_stochastic_rounding_of_a_tensor_in_memory_order(host_driver):
    # element_index is the offset in memory, so a transposed tensor hashes by its strides.
    values = torch.randn(5, 7).t()
    key, tensor_index = rounding_key(3, 4), 9
    reference = stochastic_round_to_bfloat16(values, key, tensor_index, memory_order_index(values))
    offsets = memory_order_index(values).flatten().tolist()
    queries = [f"R {key} {tensor_index} {offset} {_float_bits(value)}"
               for offset, value in zip(offsets, values.flatten().tolist())]
    answers = [int(line.split()[0]) for line in _ask(host_driver, queries)]
    assert answers == [int(v) & 0xFFFF for v in reference.flatten().view(torch.int16).tolist()]


def test_lerp_matches_torch_bitwise(host_driver):
    generator = torch.Generator().manual_seed(2)
    averages, models = torch.randn(400, generator=generator), torch.randn(400, generator=generator)
    weights = [0.0, 1e-4, 0.3, 0.49999, 0.5, 0.7, 0.999, 1.0]
    queries, expected = [], []
    for weight in weights:
        result = averages.clone().lerp_(models, weight)  # ATen's CPU kernel: the reference
        for a, m, r in zip(averages.tolist(), models.tolist(), result.tolist()):
            queries.append(f"L {_float_bits(a)} {_float_bits(m)} {weight!r}")
            expected.append(_float_bits(r))
    assert [int(line) for line in _ask(host_driver, queries)] == expected
    doubles = averages.double() * 1.1
    result = doubles.clone().lerp_(models.double(), 0.7)
    answers = _ask(host_driver, [f"D {a!r} {m!r} 0.7" for a, m in zip(doubles.tolist(), models.double().tolist())])
    assert [float.fromhex(line) for line in answers] == result.tolist()


@pytest.mark.parametrize("chunk_elements", [4, 64, 2048])
def test_chunk_rows_cover_every_element_once(host_driver, chunk_elements):
    numels = [0, 1, 3, 4, 5, 63, 64, 65, 2048, 2049, 10000, 0]
    answer = _ask(host_driver, [f"C {chunk_elements} {len(numels)} " + " ".join(map(str, numels))])[0]
    rows = [tuple(pair) for pair in torch.tensor(list(map(int, answer.split()))).reshape(-1, 2).tolist()]
    expected = [(slot, start) for slot, numel in enumerate(numels) for start in range(0, numel, chunk_elements)]
    assert rows == expected


# --- the kernel's chunk code, emulated on the host ---------------------------------------------

ELEMENT_TYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # multi_lerp_kernel.h


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    import ctypes

    library = tmp_path_factory.mktemp("emulation") / "emulation.so"
    _run([NVCC, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", f"-I{CUDA_SOURCES}",
          str(ROOT / "tests" / "cuda_kernel_emulation.cu"), "-o", str(library)])
    function = ctypes.CDLL(str(library)).fused_ema_emulate_multi_lerp
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 4
    function.restype = ctypes.c_int
    return function


def _emulated_lerp_(emulator, average_sets, models, weights, keys, chunk_elements):
    from fused_ema.plan import Plan

    plan = Plan(average_sets, models, backend="foreach")  # only for its grouping
    for group in plan.groups:
        assert group.fusable
        table = chunk_table.ChunkTable(group, chunk_elements)
        step_args = table.step_args(weights, keys)
        status = emulator(
            table.model_base.data_ptr(), table.average_base.data_ptr(), table.tensors.data_ptr(),
            table.chunks.data_ptr(), step_args.data_ptr(), table.chunk_count, table.chunk_elements, table.sets,
            ELEMENT_TYPES[group.average_dtype], ELEMENT_TYPES[group.model_dtype], keys is not None,
        )
        assert status == 0


def _tensors(average_dtype, model_dtype, sets, seed):
    generator = torch.Generator().manual_seed(seed)

    def values(count):
        return torch.randn(count, generator=generator, dtype=torch.float64)

    models, average_sets = [], [[] for _ in range(sets)]
    # Sizes around the vector width and the chunk, a 2-D transposed tensor, and views one element
    # into their storage, which are not 16-byte aligned: they take the scalar path.
    for size, offset in [(1, 0), (5, 0), (64, 0), (2051, 0), (4096, 0), (300, 1), (2049, 1), (0, 0)]:
        model = values(size + offset).to(model_dtype)[offset:]
        models.append(model)
        for averages in average_sets:
            averages.append((model.double() + 0.1 * values(size)).to(average_dtype))
            if offset:
                averages[-1] = torch.cat([averages[-1][:1], averages[-1]])[offset:]
    transposed = values(12 * 9).reshape(12, 9).t().to(model_dtype)
    models.append(transposed)
    for averages in average_sets:
        averages.append((transposed.double() + 0.1 * values(108).reshape(12, 9).t()).to(average_dtype))
    return average_sets, models




@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_emulated_kernel_matches_reference_bitwise(emulator, average_dtype, model_dtype, stochastic):
    from fused_ema.plan import Plan

    weights = [0.3, 0.999, 1.0]
    keys = [rounding_key(2, 5, k) for k in range(len(weights))] if stochastic else None
    average_sets, models = _tensors(average_dtype, model_dtype, len(weights), seed=1)
    expected = [[a.clone() for a in averages] for averages in average_sets]
    assert average_sets[0][5].data_ptr() % 16 != 0  # the unaligned case is really there
    _emulated_lerp_(emulator, average_sets, models, weights, keys, chunk_elements=2048)
    Plan(expected, models, backend="reference").lerp_(weights, keys)
    for k, (ours, theirs) in enumerate(zip(average_sets, expected)):
        for i, (a, e) in enumerate(zip(ours, theirs)):
            same = (a == e) | (a.isnan() & e.isnan())
            assert bool(same.all()), f"set {k} tensor {i}: {int((~same).sum())} of {a.numel()} differ"


def test_emulated_kernel_small_chunks(emulator):
    from fused_ema.plan import Plan

    average_sets, models = _tensors(torch.bfloat16, torch.float32, 2, seed=2)
    expected = [[a.clone() for a in averages] for averages in average_sets]
    keys = [rounding_key(0, 1, 0), rounding_key(0, 1, 1)]
    _emulated_lerp_(emulator, average_sets, models, [0.01, 0.2], keys, chunk_elements=12)  # not a power of two
    Plan(expected, models, backend="reference").lerp_([0.01, 0.2], keys)
    for ours, theirs in zip(average_sets, expected):
        for a, e in zip(ours, theirs):
            assert torch.equal(a, e)


def test_vector_accesses_are_128_bit_for_every_dtype_pair(tmp_path):
    # README: "128-bit vector loads and stores for every dtype". Each of the 16 kernel instantiations
    # must load and store its averages through 16-byte vectors, and no vector access may be narrower.
    import re

    ptx = tmp_path / "kernel.ptx"
    _run([NVCC, "-std=c++20", "-O3", "-ptx", "-arch=sm_90", str(CUDA_SOURCES / "multi_lerp_kernel.cu"), "-o", str(ptx)])
    entries = re.split(r"^\.entry ", ptx.read_text(), flags=re.M)[1:]
    assert len(entries) == 16
    bits = {"f32": 32, "u32": 32, "b32": 32, "f64": 64, "u64": 64, "b64": 64, "u16": 16, "b16": 16}
    for entry in entries:
        accesses = re.findall(r"(ld|st)\.global(?:\.nc)?\.v(\d)\.([a-z0-9]+)", entry)
        assert {kind for kind, _, _ in accesses} == {"ld", "st"}, entry.split("(")[0]
        assert all(int(lanes) * bits[element] == 128 for _, lanes, element in accesses), entry.split("(")[0]
