"""fused_ema.bench: the model zoo, contenders, timer and report arithmetic (never a timing)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from fused_ema import bench

# Closed forms of the default sizes: torchvision's ResNet-50 has 25,557,032 parameters; a BERT-base
# encoder layer has 7,087,872 (in_proj 768x2304, out_proj 768x768, 768x3072 and back, two LayerNorms).
DEFAULT_SHAPES = {
    "small-tensors": (4000 * 256, 4000, 4000 * 256),
    "transformer": (12 * 7_087_872, 144, 12 * 7_087_872),
    "resnet50": (25_557_032, 161, None),
    "bf16-model": (12 * (2048 * 2048 + 2048), 24, None),
}


@pytest.mark.parametrize("name", list(DEFAULT_SHAPES))
def test_default_sizes_match_the_models_they_stand_for(name):
    parameters, parameter_tensors, averaged = DEFAULT_SHAPES[name]
    workload = bench.build_workload(name, "default", "meta")  # meta: shapes without memory
    assert sum(p.numel() for p in workload.model.parameters()) == parameters
    assert len(list(workload.model.parameters())) == parameter_tensors
    if averaged is not None:
        assert workload.numel == averaged


def test_resnet_has_the_batchnorm_buffers_of_resnet50():
    workload = bench.build_workload("resnet50", "default", "meta")
    norms = [m for m in workload.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 53
    # running_mean and running_var are averaged; num_batches_tracked (integer) is not.
    assert len(workload.models) == 161 + 2 * 53
    assert all(t.is_floating_point() for t in workload.models)


@pytest.mark.parametrize("name", list(bench.ZOO))
def test_quick_workloads_are_small_and_typed_as_specified(name):
    spec = bench.ZOO[name]
    workload = bench.build_workload(name, "quick")
    assert 0 < workload.numel < 300_000
    assert all(t.dtype == spec.model_dtype for t in workload.models)
    assert workload.average_dtype == (spec.average_dtype or spec.model_dtype)
    assert workload.weights == pytest.approx([1 - decay for decay in spec.decays])
    averages = workload.new_averages()
    assert all(a.dtype == workload.average_dtype and a.shape == m.shape for a, m in zip(averages, workload.models))
    assert all(a.data_ptr() != m.data_ptr() for a, m in zip(averages, workload.models))
    # Ideal single pass: read each model element once, read and write it in every average.
    expected = sum(
        m.numel() * (m.element_size() + 2 * len(spec.decays) * workload.average_dtype.itemsize)
        for m in workload.models
    )
    assert workload.ideal_bytes == expected


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="small-tensors"):
        bench.build_workload("vgg")
    with pytest.raises(ValueError, match="quick"):
        bench.build_workload("resnet50", "huge")


def _quick_settings() -> bench.Settings:
    return bench.Settings(seconds_per_workload=0, min_rounds=2, max_rounds=2, min_sample_s=0)


# Contenders that cannot do a workload by design, with the reason they give.
EXPECTED_SKIPS = {
    ("bf16-model", "fused_ema.AveragedModel [auto]"): "model's dtype",
    ("bf16-model", bench.BASELINE): "model's dtype",
    ("bf16-model", "torch._foreach_lerp_ (prebuilt lists)"): "matching dtypes",
}


@pytest.mark.parametrize("name", list(bench.ZOO))
def test_every_contender_runs_or_says_why_not(name):
    workload = bench.build_workload(name, "quick")
    candidates = bench.contenders("cpu")
    results, skipped = bench.measure_workload(workload, candidates, _quick_settings(), show_progress=False)
    measured = {result.contender for result in results}
    reasons = {entry["contender"]: entry["reason"] for entry in skipped}
    assert measured | set(reasons) == {c.name for c in candidates}
    assert not [reason for reason in reasons.values() if reason.startswith("failed")]
    for contender, reason in reasons.items():
        if (name, contender) in EXPECTED_SKIPS:
            assert EXPECTED_SKIPS[name, contender] in reason
        else:  # only an optional library that is not installed may be missing
            assert "pip install --no-deps" in reason, (contender, reason)
    for result in results:
        assert result.median > 0 and result.gb_per_s > 0 and len(result.samples) == 2
        assert result.x_of_limit is not None and result.x_of_limit > 0
    limit = next(r for r in results if r.family == "limit")
    assert limit.x_of_limit == 1.0


@pytest.mark.parametrize(
    "module, package",
    [("torch_ema", "torch_ema"), ("ema_pytorch", "ema-pytorch")],
)
def test_a_missing_library_skips_its_row(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    workload = bench.build_workload("small-tensors", "quick")
    contender = next(c for c in bench.LIBRARY_CONTENDERS if package.replace("-", "") in c.name.replace("-", ""))
    with pytest.raises(bench.Skip, match=f"pip install --no-deps {package}"):
        contender.make(workload)


def test_missing_timm_skips_its_row(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real_find_spec(name, *a)
    )
    workload = bench.build_workload("small-tensors", "quick")
    contender = next(c for c in bench.LIBRARY_CONTENDERS if c.name.startswith("timm"))
    with pytest.raises(bench.Skip, match="pip install --no-deps timm"):
        contender.make(workload)


def test_a_failing_contender_is_reported_not_raised():
    def broken(workload):
        raise RuntimeError("boom")

    workload = bench.build_workload("small-tensors", "quick")
    candidates = [
        next(c for c in bench.contenders("cpu") if c.family == "limit"),
        bench.Contender("broken", "library", broken),
    ]
    results, skipped = bench.measure_workload(workload, candidates, _quick_settings(), show_progress=False)
    assert [r.contender for r in results] == [bench.LIMIT]
    assert skipped == [{"workload": "small-tensors", "contender": "broken", "reason": "failed: RuntimeError: boom"}]


def test_backends_filter_names_the_fused_rows():
    names = [c.name for c in bench.contenders("cpu", ["foreach"]) if c.family == "fused_ema"]
    assert names == ["fused_ema.EMA [foreach]", "fused_ema.AveragedModel [foreach]", "fused_ema.lerp_ [foreach]"]
    with pytest.raises(ValueError, match="backend must be one of"):
        bench.contenders("cpu", ["fastest"])


def test_default_rows_cover_every_available_backend_but_the_oracle():
    available = [name for name, reason in bench.fused_backends("cpu").items() if reason is None]
    rows = [c.name for c in bench.contenders("cpu")]
    for name in available:
        assert (f"fused_ema.EMA [{name}]" in rows) == (name not in bench.NOT_BY_DEFAULT)
    left_out = {entry["contender"] for entry in bench.backends_not_run("cpu")}
    assert {f"fused_ema.EMA [{name}]" for name in bench.NOT_BY_DEFAULT} <= left_out


def _result(contender: str, family: str, samples: list[float]) -> bench.Result:
    return bench.Result("w", contender, family, None, None, 10, 1, 120, samples, 1, None)


def test_ratios_are_medians_over_the_limit_and_the_baseline():
    results = [
        _result(bench.LIMIT, "limit", [1.0, 2.0, 9.0]),
        _result(bench.BASELINE, "torch", [8.0, 8.0, 1.0]),
        _result("fast", "fused_ema", [4.0, 3.0, 5.0]),
    ]
    bench.derive(results)
    limit, baseline, fast = results
    assert (limit.median, baseline.median, fast.median) == (2.0, 8.0, 4.0)
    assert fast.x_of_limit == 2.0 and fast.speedup_vs_torch == 2.0
    assert baseline.speedup_vs_torch == 1.0 and limit.x_of_limit == 1.0
    assert fast.gb_per_s == pytest.approx(120 / 4.0 / 1e9)


def test_table_has_a_header_and_a_row_per_result():
    results = [_result(bench.LIMIT, "limit", [1e-3]), _result("fast", "fused_ema", [2e-3])]
    bench.derive(results)
    report = bench.Report(results, [], {"w": "a workload"}, bench.environment(), {"size": "quick"})
    lines = bench.format_table(report).splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == list(bench.HEADER)
    assert lines[2].split("|")[2].strip() == bench.LIMIT
    assert lines[3].split("|")[2].strip() == "fast" and lines[3].split("|")[3].strip() == "2.00"
    assert lines[3].split("|")[6].strip() == "-"  # no baseline measured: no speed-up claimed


# The timer: which calls it makes and the arithmetic of its report (never a duration).


def _logging_contenders(log: list[str], names: str = "ABC") -> dict[str, object]:
    return {name: (lambda name=name: log.append(name)) for name in names}


def test_timer_interleaves_and_rotates_the_contenders():
    log: list[str] = []
    times = bench.compare(_logging_contenders(log), rounds=3, warmup=1)
    assert "".join(log) == "ABC" + "ABC" + "BCA" + "CAB"  # warm-up round, then one rotation per round
    assert [len(timing.samples) for timing in times.timings.values()] == [3, 3, 3]
    assert all(sample >= 0 for timing in times.timings.values() for sample in timing.samples)


def test_timer_calls_per_sample_warm_calls_and_sparse_contenders():
    log: list[str] = []
    times = bench.compare(
        _logging_contenders(log, "AB"), rounds=4, warmup=0, calls={"A": 3}, warm_each_sample=True, sparse={"B"}
    )
    # A: 4 samples of 3 calls, each after one untimed call; B: only the middle and last rounds (2 and 3).
    assert log.count("A") == 4 * (3 + 1) and log.count("B") == 2 * (1 + 1)
    assert (times.timings["A"].calls, len(times.timings["A"].samples)) == (3, 4)
    assert (times.timings["B"].calls, len(times.timings["B"].samples)) == (1, 2)


def test_timer_runs_before_each_timed_call_untimed():
    log: list[str] = []
    contenders = _logging_contenders(log, "AB")
    bench.compare(contenders, rounds=2, warmup=1, calls={"A": 2}, before={"A": lambda: log.append("a")})
    # Warm-up "aA", "B"; round 0: A's two calls each after "a", then B; round 1 rotated: B, then A.
    assert "".join(log) == "aAB" + "aAaAB" + "BaAaA"
    with pytest.raises(ValueError, match="not contenders"):
        bench.compare(contenders, before={"C": lambda: None})


def test_timer_drops_rounds_past_the_minimum_once_out_of_time():
    log: list[str] = []
    times = bench.compare(_logging_contenders(log, "AB"), rounds=10, warmup=0, min_rounds=2, max_seconds=-1.0)
    assert [len(timing.samples) for timing in times.timings.values()] == [2, 2]


def test_timer_ratios_are_medians_over_the_baseline():
    times = bench.Comparison(
        {"flat": bench.Timing("flat", [1.0, 2.0, 9.0], 1), "slow": bench.Timing("slow", [8.0, 1.0, 8.0], 1)},
        baseline="flat",
    )
    assert (times.median("flat"), times.median("slow")) == (2.0, 8.0)
    assert times.ratio("slow") == 4.0 and times.speedup("flat", over="slow") == 4.0
    assert times.ratio("flat", to="slow") == 0.25
    header, flat, slow = times.format().splitlines()
    assert header.split()[-3:] == ["time", "/", "flat"]
    assert flat.split()[0] == "flat" and flat.split()[-1] == "1.00" and slow.split()[-1] == "4.00"
    with pytest.raises(ValueError, match="baseline"):
        bench.Comparison(times.timings).ratio("slow")


def test_timer_rejects_an_unknown_baseline_and_no_rounds():
    with pytest.raises(ValueError, match="baseline must be one of the contenders"):
        bench.compare({"A": lambda: None}, baseline="B")
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        bench.compare({"A": lambda: None}, rounds=0)


def test_the_old_module_name_still_works_and_says_it_moved(monkeypatch):
    monkeypatch.delitem(sys.modules, "fused_ema.benchmark", raising=False)
    with pytest.warns(DeprecationWarning, match="fused_ema.bench"):
        from fused_ema import benchmark
    assert benchmark.ZOO is bench.ZOO and benchmark.run is bench.run and benchmark._derive is bench.derive
    assert benchmark._limit is importlib.import_module("fused_ema.bench.contenders")._limit
    with pytest.raises(AttributeError, match="fused_ema.bench"):
        benchmark.no_such_name  # noqa: B018
