"""The ``fused-ema`` command: ``info``, ``bench --quick`` and ``demo`` dispatch (output shape, never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fused_ema import backends, benchmark, cli

ROOT = Path(__file__).resolve().parents[1]


def _table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_info_lists_versions_every_backend_and_the_auto_choice(capsys):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert f"torch      {torch.__version__}" in output
    for name, reason in backends.status().items():
        assert f"{name}" in output and cli.backend_line(name, reason) in output
    assert "CPU tensors:" in output and "CUDA tensors:" in output
    assert backends.ENVIRONMENT_VARIABLE in output


def test_info_reports_the_environment_override(monkeypatch, capsys):
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "reference")
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert "CPU tensors: reference" in output
    assert f"{backends.ENVIRONMENT_VARIABLE}=reference" in output


def test_info_runs_as_a_fresh_process():
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-m", "fused_ema.cli", "info"], capture_output=True, text=True, env=environment, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "Backends:" in completed.stdout


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One ``fused-ema bench --quick --json`` run shared by the checks below."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    capture = pytest.MonkeyPatch()
    stdout = []
    capture.setattr(sys, "stdout", types.SimpleNamespace(write=stdout.append, flush=lambda: None))
    try:
        status = cli.main(["bench", "--quick", "--rounds", "3", "--json", str(path)])
    finally:
        capture.undo()
    return status, "".join(stdout), json.loads(path.read_text())


def test_bench_quick_prints_a_table_with_a_row_per_result(quick_bench):
    status, output, raw = quick_bench
    assert status == 0
    rows = _table_rows(output)
    assert rows[0] == list(benchmark.HEADER)
    body = rows[2:]
    assert len(body) == len(raw["results"])
    assert {row[0] for row in body} == set(benchmark.ZOO)
    for name in benchmark.ZOO:
        labels = [row[1] for row in body if row[0] == name]
        assert labels[0].startswith(benchmark.LIMIT)
    for row in body:
        assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0
        assert row[5] == "-" or float(row[5].rstrip("x")) > 0
    assert "Command: fused-ema bench --quick" in output


def test_bench_json_holds_every_sample_and_the_machine(quick_bench):
    _, _, raw = quick_bench
    assert set(raw) == {"environment", "settings", "workloads", "results", "skipped"}
    assert set(raw["workloads"]) == set(benchmark.ZOO)
    assert raw["environment"]["torch"] == torch.__version__
    assert raw["settings"]["size"] == "quick"
    expected_keys = {
        "workload", "contender", "family", "backend", "median", "gb_per_s", "x_of_limit",
        "speedup_vs_torch", "samples", "calls_per_sample", "ideal_bytes", "numel", "tensors",
    }
    for result in raw["results"]:
        assert expected_keys <= set(result)
        assert result["median"] > 0 and result["gb_per_s"] > 0 and result["x_of_limit"] > 0
        assert result["samples"] and all(sample > 0 for sample in result["samples"])
        assert result["speedup_vs_torch"] is None or result["speedup_vs_torch"] > 0
    fused = {r["contender"] for r in raw["results"] if r["family"] == "fused_ema"}
    assert "fused_ema.lerp_ [auto]" in fused and "fused_ema.EMA [foreach]" in fused
    for entry in raw["skipped"]:
        assert set(entry) == {"workload", "contender", "reason"} and entry["reason"]


def test_bench_filters_workloads_and_backends(capsys):
    status = cli.main(["bench", "--quick", "--rounds", "1", "--workload", "transformer", "--backend", "foreach"])
    assert status == 0
    body = _table_rows(capsys.readouterr().out)[2:]
    assert {row[0] for row in body} == {"transformer"}
    fused = [row[1] for row in body if row[1].startswith("fused_ema")]
    assert fused == ["fused_ema.EMA [foreach]", "fused_ema.AveragedModel [foreach]", "fused_ema.lerp_ [foreach]"]


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the optional "plot" extra
    path = tmp_path / "bench.png"
    status = cli.main(["bench", "--quick", "--rounds", "1", "--workload", "small-tensors", "--plot", str(path)])
    assert status == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_names_the_install(monkeypatch, capsys, tmp_path):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    assert cli.main(["bench", "--quick", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_bench_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "no CUDA GPU" in error and "--device" in error


def test_bench_rejects_an_unknown_workload(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "vgg"])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_is_handed_to_the_examples(monkeypatch):
    received = []
    examples = types.ModuleType("fused_ema.examples")
    examples.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fused_ema.examples", examples)
    assert cli.main(["demo", "--epochs", "1"]) == 3
    assert received == [["--epochs", "1"]]


def test_demo_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fused_ema.examples", None)  # `import` then raises
    assert cli.main(["demo"]) == 2
    assert "fused_ema.examples" in capsys.readouterr().err
