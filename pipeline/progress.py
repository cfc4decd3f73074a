"""Progress of a long loop, for a person to follow: on a terminal one line on stderr, rewritten
in place; in a log (stderr not a terminal) a log record every `every_s` seconds, never a
redraw; nothing when turned off. Imports nothing of the project.

    with Progress("export coco-panoptic", total=len(rows), log=log) as progress:
        for row in rows:
            ...
            progress.advance()
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

EVERY_S = 10.0  # seconds between progress records in a log
REDRAW_S = 0.25  # seconds between redraws of the line on a terminal


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class Progress:
    """`what: done of total unit (rate/s, ETA, note)` of a loop that calls `advance`."""

    def __init__(self, what: str, total: int | None = None, *, unit: str = "images",
                 note: str = "", enabled: bool = True, every_s: float | None = None,
                 log: logging.Logger | None = None, stream: TextIO | None = None) -> None:
        self.what, self.total, self.unit, self.note = what, total, unit, note
        self.enabled, self.every_s = enabled, EVERY_S if every_s is None else every_s
        self.log = log or logging.getLogger(__name__)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and is_terminal(self.stream)
        self.done = 0
        self.started = self._last = time.monotonic()
        self._drawn = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.terminal:
            if now - self._last >= REDRAW_S or self.done == self.total:
                self._last = now
                self._draw(now)
        elif now - self._last >= self.every_s:
            self._last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        seconds = max(now - self.started, 1e-9)
        rate = self.done / seconds
        parts = [f"{rate:.1f} {self.unit}/s"]
        if self.total is not None:
            left = self.total - self.done
            if left > 0 and rate > 0:
                eta = int(left / rate)
                parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        if self.note:
            parts.append(self.note)
        of = f" of {self.total}" if self.total is not None else ""
        return f"{self.what}: {self.done}{of} {self.unit} ({', '.join(parts)})"

    def _draw(self, now: float) -> None:
        self.stream.write(f"\r{self.line(now)}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """On a terminal: the final count stays on its line, and the next output starts below."""
        if self.terminal and self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
