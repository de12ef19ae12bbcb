"""A progress line for long commands: on a terminal only, and only after a second.

::

    with Progress("verifying", total=len(ids)) as progress:
        for session_id in ids:
            ...
            progress.advance()

It writes to stderr (so ``--json`` output on stdout stays clean), draws nothing
during the first second (quick commands never flicker), then redraws one line
(``\\r``) at most ten times a second: the label, count/total, percentage, rate
and time left. When the stream is not a terminal it writes nothing at all. On
exit it clears its line.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import ClassVar, TextIO

__all__ = ["Progress"]

DELAY = 1.0
"""Seconds of silence before the first draw."""
INTERVAL = 0.1
"""Seconds between two draws, at least."""
BAR_WIDTH = 20


class Progress:
    """A context manager drawing ``label  [####      ] 123/456  27%  1.2k/s  ETA 0:03``.

    Args:
        label: what is being counted ("verifying").
        total: how many there will be; ``None`` shows the count and rate only.
        stream: where to draw (default: ``sys.stderr``).
        enabled: draw at all (default: whether ``stream`` is a terminal).
    """

    clock: ClassVar[Callable[[], float]] = time.monotonic
    """The time source, in seconds (a class attribute so that tests can replace it)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.count = 0
        self._start = type(self).clock()
        self._drawn_at: float | None = None
        self._width = 0  # characters on the line now

    def __enter__(self) -> Progress:
        self._start = type(self).clock()
        return self

    def __exit__(self, *exc: object) -> None:
        """Clear the line, if anything was drawn on it."""
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more done; redraw if it is time to."""
        self.count += n
        if not self.enabled:
            return
        now = type(self).clock()
        if now - self._start < DELAY:
            return
        if self._drawn_at is not None and now - self._drawn_at < INTERVAL:
            return
        self._drawn_at = now
        self._draw(now - self._start)

    def render(self, elapsed: float) -> str:
        """The text of the line after ``elapsed`` seconds."""
        rate = self.count / elapsed if elapsed > 0 else 0.0
        parts = [self.label]
        if self.total:
            done = min(self.count / self.total, 1.0)
            filled = int(done * BAR_WIDTH)
            parts.append("[" + "#" * filled + " " * (BAR_WIDTH - filled) + "]")
            parts.append(f"{self.count}/{self.total}")
            parts.append(f"{done * 100:3.0f}%")
        else:
            parts.append(str(self.count))
        parts.append(f"{_human(rate)}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration(max(self.total - self.count, 0) / rate)}")
        return "  ".join(parts)

    def _draw(self, elapsed: float) -> None:
        columns = shutil.get_terminal_size().columns
        text = self.render(elapsed)[: max(columns - 1, 1)]
        pad = " " * max(self._width - len(text), 0)  # rub out a longer previous line
        self._write("\r" + text + pad)
        self._width = len(text)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _human(rate: float) -> str:
    """1234.5 -> '1.2k'; 12 -> '12.0'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= limit:
            return f"{rate / limit:.1f}{suffix}"
    return f"{rate:.1f}"


def _duration(seconds: float) -> str:
    """Seconds as ``m:ss``, or ``h:mm:ss`` from an hour up."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
