"""Progress of long work: a live bar in a terminal, plain lines in a batch job's log.

A bar redraws itself with carriage returns several times a second, which a terminal shows as one line
but a Slurm or PBS log keeps as every redraw (hundreds of megabytes over a days-long pretraining, and
unreadable with ``less``). Where the stream is not a terminal, ``progress`` prints a line every
``NEUROX_PROGRESS_SECONDS`` (default 60) instead: what, how far, the rate, the time left, and the
figures the caller reports (loss, windows/s). ``NEUROX_PROGRESS=lines`` or ``bar`` chooses either.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, file=None):
    """A tqdm bar in a terminal, else a ``LineProgress``; both take ``update``, ``set_postfix``,
    ``write`` and ``close`` (``close(stopped=True)`` where the work was cut short), and iterate over ``iterable``
    when given."""
    file = file or sys.stderr
    mode = os.environ.get("NEUROX_PROGRESS") or ("bar" if getattr(file, "isatty", lambda: False)() else "lines")
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if mode == "bar":
        return _Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True)
    if mode != "lines":
        raise ValueError(f"NEUROX_PROGRESS={mode!r}: choose bar or lines")
    interval = float(os.environ.get("NEUROX_PROGRESS_SECONDS", 60))
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                        interval=interval)


class _Bar(tqdm):
    def write(self, message: str) -> None:  # above the bar, on the bar's stream (tqdm's default is stdout)
        tqdm.write(message, file=self.fp)

    def close(self, stopped: bool = False) -> None:  # a bar left where it stopped says so by itself
        super().close()


class LineProgress:
    """Progress as whole lines: at the start, at most every ``interval`` seconds, and at the end."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, disable=False, file=None,
                 interval=60.0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.disable, self.file, self.interval = disable, file or sys.stderr, interval
        self.postfix: dict[str, str] = {}
        self.started = self.last = time.monotonic()
        self.closed = False
        self._print(f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit} (starting)")

    def __iter__(self):
        finished = False
        try:
            for item in self.iterable:
                yield item
                self.update(1)
            finished = True
        finally:  # a loop cut by an error, a signal or a break still gets its last line
            self.close(stopped=not finished)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(self._status(now))

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def write(self, message: str) -> None:  # as tqdm's: shown even when the progress itself is not
        print(message, file=self.file, flush=True)

    def close(self, stopped: bool = False) -> None:
        """The last line: "(done)", or with ``stopped`` (a signal, an error) "(stopped)"."""
        if not self.closed:
            self.closed = True
            end = " (stopped)" if stopped else " (done)"
            self._print(self._status(time.monotonic()) + end if self.n > self.initial or stopped else "")

    def _status(self, now: float) -> str:
        elapsed = now - self.started
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        text += f" {self.unit}, {rate:.2f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            text += f", about {_duration((self.total - self.n) / rate)} left"
        return text + "".join(f", {k} {v}" for k, v in self.postfix.items())

    def _print(self, text: str) -> None:
        if text and not self.disable:
            print(text, file=self.file, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
