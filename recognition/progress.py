"""Progress of a counted job that works without a terminal: a tqdm bar on a TTY, timed log lines elsewhere.

Under ``nohup``, CI, a notebook or ``| tee`` a bar is invisible (or a wall of carriage returns), so a step of
more than a few seconds (imprinting fc7, ``--eval-pretrained``, verification, the advisor, the linear probe's
embedding) logs ``DESC: 1,200/6,000 img (20%), 41.3 img/s, ETA 1m56s`` every ``every`` seconds and one closing
``DESC: 6,000 img in 2m25s (41.4 img/s)`` line instead. On a terminal (stdout is a TTY) it draws tqdm's bar.

    with Progress(total=n, desc="verify lfw", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

logger = logging.getLogger("recognition.progress")

EVERY_SECONDS = 10.0


def stdout_is_tty() -> bool:
    """True when stdout is an interactive terminal (a bar is then drawn, on stderr as tqdm does)."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):  # replaced or closed stdout (notebooks, test harnesses)
        return False


def format_seconds(seconds: float) -> str:
    """``75.2 -> '1m15s'``, ``3725 -> '1h02m'``, ``4.3 -> '4.3s'``."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _emit_default(line: str) -> None:
    # a configured logging setup (the train scripts: stderr + train.log) gets the line; a bare script prints it
    if logging.getLogger().handlers and logger.isEnabledFor(logging.INFO):
        logger.info("%s", line)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """Counts ``update(n)`` calls towards ``total`` (None: unknown, no percentage or ETA); a line at most every
    ``every`` seconds (default :data:`EVERY_SECONDS`).

    ``bar``: None decides by :func:`stdout_is_tty`; True/False forces a tqdm bar / log lines. ``enabled=False``
    shows nothing. ``emit`` receives each log line (default: the ``recognition.progress`` logger when logging is
    set up, else stderr). ``clock`` is ``time.monotonic`` (tests pass a fake one).
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "img", every: Optional[float] = None,
                 enabled: bool = True, bar: Optional[bool] = None, emit: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.every = float(EVERY_SECONDS if every is None else every)
        self.enabled = enabled
        self.count = 0
        self._emit = emit or _emit_default
        self._clock = clock
        self._start = self._last = clock()
        self._lines = 0
        self._bar = None
        self._closed = False
        if enabled and (stdout_is_tty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Units per second so far (0 before the first second has a count)."""
        elapsed = self._clock() - self._start
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The current progress line: count/total (percent), rate, ETA."""
        rate = self.rate()
        if self.total:
            text = f"{self.desc}: {self.count:,}/{self.total:,} {self.unit} ({100.0 * self.count / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {self.count:,} {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", ETA {format_seconds(max(0, self.total - self.count) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        """Add ``n`` done units; a log line when ``every`` seconds passed since the last one."""
        self.count += int(n)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(int(n))
            return
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            self._lines += 1
            self._emit(self.line())

    def close(self) -> None:
        """Close the bar, or log the closing line when any progress line was logged (a long job)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self.enabled and self._lines:
            elapsed = self._clock() - self._start
            self._emit(f"{self.desc}: {self.count:,} {self.unit} in {format_seconds(elapsed)} "
                       f"({self.rate():.1f} {self.unit}/s)")
