"""The benchmark behind ``fused-ema bench`` and ``benchmarks/``: a model zoo, the contenders, one timer.

- :mod:`~fused_ema.bench.zoo`: the models (torch.nn only) and :func:`build_workload`;
- :mod:`~fused_ema.bench.contenders`: the limit, fused_ema per backend, torch and other libraries;
- :mod:`~fused_ema.bench.timer`: :func:`~fused_ema.bench.timer.compare`, the one timer (interleaved
  contenders, medians, ratios to a baseline timed in the same run) every script in ``benchmarks/`` uses;
- :mod:`~fused_ema.bench.suite`: :func:`run`, the zoo against every contender;
- :mod:`~fused_ema.bench.report` and :mod:`~fused_ema.bench.plot`: the table and the chart.

The package re-exports the names of its modules; where a function shares its module's name
(``contenders``, ``plot``) the attribute is the function: import the module by its full name.

Each result is reported against the limit measured in the same run: one float32 ``lerp_`` over a
single flat tensor moving the bytes an ideal single pass moves, i.e. what the memory bus allows.

Example::

    from fused_ema import bench
    report = bench.run(["transformer"], size="quick")
    print(bench.format_table(report))
"""

from __future__ import annotations

from fused_ema.bench import timer
from fused_ema.bench.contenders import (
    BASELINE,
    LIBRARY_CONTENDERS,
    LIMIT,
    NOT_BY_DEFAULT,
    Contender,
    Skip,
    backends_not_run,
    contenders,
    fused_backends,
)
from fused_ema.bench.plot import plot
from fused_ema.bench.report import (
    HEADER,
    NO_STOCHASTIC_ROUNDING,
    Report,
    Result,
    cpu_name,
    derive,
    environment,
    format_table,
    package_version,
    table_rows,
)
from fused_ema.bench.suite import Settings, measure_workload, run
from fused_ema.bench.timer import Comparison, Timing, Update, compare
from fused_ema.bench.zoo import (
    SIZES,
    ZOO,
    Bottleneck,
    ManySmallTensors,
    Workload,
    WorkloadSpec,
    build_workload,
    linear_stack,
    resnet50_shaped,
    transformer_encoder,
)

__all__ = [
    "BASELINE", "HEADER", "LIBRARY_CONTENDERS", "LIMIT", "NOT_BY_DEFAULT", "NO_STOCHASTIC_ROUNDING", "SIZES", "ZOO",
    "Bottleneck", "Comparison", "Contender", "ManySmallTensors", "Report", "Result", "Settings", "Skip", "Timing",
    "Update", "Workload", "WorkloadSpec", "backends_not_run", "build_workload", "compare", "contenders", "cpu_name",
    "derive", "environment", "format_table", "fused_backends", "linear_stack", "measure_workload", "package_version",
    "plot", "resnet50_shaped", "run", "table_rows", "timer", "transformer_encoder",
]
