"""The "cuda" backend: the CUDA kernel of csrc/cuda, one launch per group, no host-device sync.

A thin wrapper. Eager updates call the extension's private ``_C._multi_lerp_table_`` with the
group's device-resident chunk table (built once by :mod:`fused_ema.backends.chunk_table`, shared
with the "triton" backend), so an update passes five tensors instead of lists of thousands. (Not a
``torch.library`` operator: it writes through the table's pointers, which no schema can declare.) Under
``torch.compile`` the list operator ``torch.ops.fused_ema.multi_lerp_`` (CUDA dispatch key, fake in
:mod:`fused_ema.ops`) runs instead, which the compiler sees as one node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_ema.backends import capture, chunk_table
from fused_ema.backends.base import FusedBackend, Group

_REBUILD = "set CUDA_HOME to the CUDA toolkit and reinstall with `pip install --no-build-isolation .`"


def _ops():
    from fused_ema import ops  # loads (or compiles) the extension on first use

    return ops


def _reason() -> str | None:
    if torch.version.cuda is None:
        return (
            f"this torch ({torch.__version__}) is a CPU build, so the CUDA kernels cannot be built or run; "
            "install a CUDA build of torch, " + _REBUILD + ", or use backend='foreach'"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch; run on a machine with an NVIDIA GPU or use backend='foreach'"
    reason = _ops().UNAVAILABLE_REASON
    if reason is not None:
        return f"the C++ extension did not load ({reason})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_ema::multi_lerp_", "CUDA"):
        return _ops().CUDA_NOTE or (
            "the C++ extension was built without its CUDA kernels (nvcc was not found at install, or "
            "torch was a CPU build then); " + _REBUILD
        )
    return None


class CudaBackend(FusedBackend):
    name = "cuda"
    device_types = ("cuda",)
    takes_device_weights = True

    def unavailable_reason(self) -> str | None:
        return _reason()

    def table_is_stale(self, group: Group) -> bool:
        return chunk_table.is_stale(group)

    def run_table(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        table = chunk_table.table(group)
        self._launch(table, table.step_args(weights, rounding_keys), rounding_keys is not None)

    def run_table_device(self, group: Group, weights: torch.Tensor) -> None:
        """A capturable update: ``weights`` is a 1-d tensor on the group's device (see capture.py)."""
        self._launch(chunk_table.table(group), capture.step_args(weights), False)

    @staticmethod
    def _launch(table: chunk_table.ChunkTable, step_args: torch.Tensor, stochastic: bool) -> None:
        if table.chunk_count:
            with torch.cuda.device(table.device):  # the current stream of the tables' device
                table.on_current_stream()
                _ops()._C._multi_lerp_table_(
                    table.model_base, table.average_base, table.tensors, table.chunks, step_args,
                    table.sets, table.chunk_elements, stochastic,
                )


BACKEND = CudaBackend()
