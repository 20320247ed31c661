"""Worked examples that show weight averaging at work, small enough to run on a laptop CPU.

``fused-ema demo [NAME] [OPTIONS]`` runs one of them (default: ``digits``); each is also a module
runnable on its own::

    fused-ema demo --plot digits.png
    python -m fused_ema.examples.digits --rules ema swa --decays 0.99 0.999
    fused-ema demo --lora             # an EMA of LoRA adapters only (same as: fused-ema demo lora)

The examples need the ``examples`` extra: ``pip install scikit-learn matplotlib``.
"""

from __future__ import annotations

import importlib
import sys

# name -> module; each module has main(argv, prog) -> int
EXAMPLES = {
    "digits": "fused_ema.examples.digits",
    "posthoc": "fused_ema.examples.posthoc_digits",
    "lora": "fused_ema.examples.lora",
}
DEFAULT = "digits"


def main(argv: list[str] | None = None) -> int:
    """Run the example named by ``argv[0]`` (``digits`` when omitted) with the remaining options.

    Returns the process exit code. Example::

        from fused_ema.examples import main
        main(["digits", "--epochs", "5", "--plot", "digits.png"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = DEFAULT
    if argv[:1] == ["--lora"]:  # fused-ema demo --lora
        argv[0] = "lora"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in EXAMPLES:
            print(f"error: unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}", file=sys.stderr)
            return 2
    module = importlib.import_module(EXAMPLES[name])
    return module.main(argv, prog=f"fused-ema demo {name}")
