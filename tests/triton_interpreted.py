"""The "triton" backend with its kernel run by Triton's interpreter on CPU tensors, for tests.

Triton decides at ``@triton.jit`` time whether a kernel is interpreted: TRITON_INTERPRET is read
when the kernel is *defined*, not when triton is imported or the kernel launched. The suite's
conftest has already imported ``fused_ema.backends.triton`` normally (compiled kernels, unavailable
without a GPU), so :func:`backend` loads a second, private copy of that module with
TRITON_INTERPRET=1 set only while it is defined. Tests swap it into the registry with
``monkeypatch.setitem(backends._loaded, "triton", ...)``; other tests never see it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

MODULE_NAME = "_fused_ema_triton_interpreted"


def module() -> ModuleType | None:
    """The interpreted copy of fused_ema.backends.triton (None without triton), loaded once."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":  # the whole run is interpreted already
        return importlib.import_module("fused_ema.backends.triton")
    if MODULE_NAME not in sys.modules:
        origin = importlib.util.find_spec("fused_ema.backends.triton").origin
        spec = importlib.util.spec_from_file_location(MODULE_NAME, origin)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = loaded  # torch.compile re-imports what it traces by name
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[MODULE_NAME]
            raise
        finally:
            del os.environ["TRITON_INTERPRET"]
    return sys.modules[MODULE_NAME]
