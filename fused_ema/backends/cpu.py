"""The fused C++ kernel for CPU tensors: one call updates every pair of a group (csrc/cpu).

A thin wrapper: the chunk table lives in a C++ ``CpuTable`` kept in ``group.cache``, so an update
passes only the weights and rounding keys. (Under ``torch.compile`` the plan calls the operator
``torch.ops.fused_ema.multi_lerp_`` instead, which the compiler sees as one node.)
"""

from __future__ import annotations

from collections.abc import Sequence

from fused_ema.backends.base import FusedBackend, Group, StalePlanError


def _ops():
    from fused_ema import ops  # loads (or compiles) the extension on first use

    return ops


class CpuBackend(FusedBackend):
    """Runs a group with the C++ kernel: every pair and every average set in one parallel pass.

    ``averages[k][i] <- lerp(averages[k][i], models[i], weights[k])`` with ATen's formula, in float32
    (float64 when either side is), rounded once; bfloat16 averages are rounded stochastically when
    rounding keys are given. Needs dense pairs with matching strides (``group.fusable``).

    Example::

        plan = Plan([averages], models, backend="cpu")
        plan.lerp_([1 - 0.999])
    """

    name = "cpu"
    device_types = ("cpu",)

    def unavailable_reason(self) -> str | None:
        return _ops().UNAVAILABLE_REASON

    def table_is_stale(self, group: Group) -> bool:
        table = group.cache.get("cpu_table")
        if table is None:
            # First update: the tensors may have changed since planning; a table that cannot be
            # built means the group is stale, and regrouping reports the change with its cause.
            if not group.unchanged():
                return True
            try:
                table = self._table(group)
            except (ValueError, TypeError):
                return True
        # Also follows storages swapped in place (param.data = t), rebuilding the table silently.
        return table.refresh() == _ops()._C.WatchState.STALE

    def run_table(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        if not self._table(group).lerp_(weights, rounding_keys):
            raise StalePlanError

    def checked_lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        if "cpu_table" not in group.cache:
            super().checked_lerp_(group, weights, rounding_keys)  # the first update builds the table
        else:
            self.run_table(group, weights, rounding_keys)  # the table's lerp_ checks, then runs, in one call

    @staticmethod
    def _table(group: Group):
        table = group.cache.get("cpu_table")
        if table is None:
            averages = [average for averages in group.averages for average in averages]
            table = group.cache["cpu_table"] = _ops()._C.CpuTable(
                averages, group.models, group.tensor_indices, len(group.averages)
            )
        return table


BACKEND = CpuBackend()
