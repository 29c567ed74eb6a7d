"""Progress reporting for long work (bulk loads, bootstraps), without dependencies.

Theory of operation
-------------------
A :class:`Progress` is told how far the work has come (:meth:`Progress.update`
with an absolute count, or :meth:`Progress.advance` by a step) and decides
when to say so:

* on a terminal (``stream.isatty()``), one line redrawn in place with ``\\r``
  at most every ``interval`` seconds (0.1 s by default)::

      load [##########..........]  50.1%  5.2 MB/10.4 MB  2.1 MB/s  ETA 0:03  41,000 records

* otherwise (a log file, a pipe, CI), a plain line every ``interval`` seconds
  (10 s by default), so logs stay readable::

      load: 5.2 MB/10.4 MB (50.1%), 2.1 MB/s, ETA 0:03, 41,000 records

:meth:`Progress.close` always writes a final line (with the elapsed time) and,
on a terminal, ends the redrawn line. The rate is the average since the start;
the ETA is the remaining work at that rate. Without a ``total`` there is no
percent, bar or ETA. Time comes from the ``clock`` parameter (seconds, any
origin), so tests drive it by hand.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_count", "format_duration"]

_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def format_count(value: float, unit: str = "") -> str:
    """``1234567`` -> ``"1,234,567"``; with ``unit="B"``, ``"1.2 MB"`` (decimal
    units); another unit is appended after a space."""
    if unit == "B":
        size = float(value)
        for name in _BYTE_UNITS:
            if abs(size) < 1000 or name == _BYTE_UNITS[-1]:
                return f"{size:.0f} {name}" if name == "B" else f"{size:.1f} {name}"
            size /= 1000
    text = f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}" if unit else text


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; negative or non-finite: ``"?"``."""
    if not 0 <= seconds < float("inf"):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


class Progress:
    """A progress reporter (see the module docstring).

    ``total`` (None: unknown) and ``unit`` (``"B"`` formats bytes; anything
    else is a label) describe the work; ``label`` starts each line.
    ``stream`` defaults to ``sys.stderr``; ``tty`` (default: ask the stream)
    picks the redrawn line over log lines; ``interval`` is the minimum time
    between two outputs (default 0.1 s on a terminal, 10 s otherwise).
    Writing never raises for a closed or broken stream: progress output is
    best effort and never fails the work it describes.
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "",
        unit: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int = 20,
    ) -> None:
        self.total = total if total is None or total > 0 else None
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError, OSError):
                tty = False
        self.tty = tty
        self.interval = interval if interval is not None else (0.1 if tty else 10.0)
        self.clock = clock
        self.width = width
        self.done = 0
        self.note = ""
        self.start = clock()
        self._last_output = self.start
        self._last_len = 0
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ input

    def update(self, done: int, *, note: str | None = None) -> None:
        """The work has reached ``done`` (absolute); ``note`` (if given)
        replaces the text after the numbers. Writes if ``interval`` has
        passed since the last output."""
        self.done = done
        if note is not None:
            self.note = note
        now = self.clock()
        if not self._closed and now - self._last_output >= self.interval:
            self._last_output = now
            self._emit(now, final=False)

    def advance(self, step: int = 1, *, note: str | None = None) -> None:
        """The work has grown by ``step``; as :meth:`update`."""
        self.update(self.done + step, note=note)

    def close(self) -> None:
        """Write the final line (elapsed time instead of the ETA). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._emit(self.clock(), final=True)

    # ------------------------------------------------------------ output

    def render(self, now: float, *, final: bool = False) -> str:
        """The text of one report at time ``now`` (without ``\\r`` or newline)."""
        elapsed = max(now - self.start, 0.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        amount = format_count(self.done, self.unit)
        if self.total is not None:
            amount = f"{amount}/{format_count(self.total, self.unit)}"
        rate_text = f"{format_count(rate, self.unit)}/s"
        if final:
            timing = f"in {format_duration(elapsed)}"
        elif self.total is not None and rate > 0:
            timing = f"ETA {format_duration(max(self.total - self.done, 0) / rate)}"
        else:
            timing = "ETA ?"
        percent = None
        if self.total is not None:
            percent = min(self.done / self.total, 1.0) * 100
        if self.tty:
            parts = [self.label] if self.label else []
            if percent is not None:
                filled = int(self.width * percent / 100)
                parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {percent:5.1f}%")
            parts += [amount, rate_text, timing]
            if self.note:
                parts.append(self.note)
            return "  ".join(parts)
        head = f"{self.label}: " if self.label else ""
        middle = amount if percent is None else f"{amount} ({percent:.1f}%)"
        tail = f", {self.note}" if self.note else ""
        return f"{head}{middle}, {rate_text}, {timing}{tail}"

    def _emit(self, now: float, *, final: bool) -> None:
        text = self.render(now, final=final)
        try:
            if self.tty:
                pad = " " * max(self._last_len - len(text), 0)
                self._last_len = len(text)
                self.stream.write(f"\r{text}{pad}" + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: progress is best effort
