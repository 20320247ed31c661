"""A dependency-free progress bar for the command line (writes to stderr, hides itself in pipes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str = "", total: int | None = None, width: int = 28) -> Iterator[T]:
    """Yield from ``items`` while drawing ``description [#####.....] 3/10 0:04`` on stderr.

    Example::

        for epoch in progress(range(epochs), "training"):
            train_one_epoch()
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    interactive = sys.stderr.isatty()
    start = time.monotonic()
    done = 0

    def draw(final: bool = False) -> None:
        elapsed = int(time.monotonic() - start)
        clock = f"{elapsed // 60}:{elapsed % 60:02d}"
        if total:
            filled = width * done // total
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        else:
            bar = f"{done}"
        line = f"{description} {bar} {clock}"
        if interactive:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        elif final:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    draw()
    for item in items:
        yield item
        done += 1
        draw()
    draw(final=True)
