"""Progress of data preparation: how much of a user's data has been read or encoded, and how long the rest takes.

Reading hundreds of MB of images, audio or text takes minutes, and datasets' and tokenizers' own bars
are switched off (they would draw one bar per map call and cache file, each named by a hash). A
preparation step instead counts its inputs (files or rows), the MB read where the reader knows them,
the rate and the time left, in one of two forms:

- on a terminal, a rich bar;
- in a log (stderr is not a terminal: CI, nohup, a scheduler's log file), a plain line every
  LINE_EVERY_S seconds or every tenth of the total, whichever comes first, and one at the end, each a
  line of its own that ``grep`` and ``tail -f`` read as they are.

A step that finishes within QUIET_S seconds shows nothing: the built-in corpora and small files stay
quiet, and only a preparation long enough to wonder about reports. Only rank 0 of a torchrun job
reports (the others read what it cached).
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

QUIET_S = 2.0  # a step shorter than this prints nothing
LINE_EVERY_S = 10.0  # in a log: at most this long between lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Preparing:
    """``with Preparing("decoding train images", total=len(rows), unit="images") as shown:`` then
    ``shown.advance(count, nbytes)`` as inputs are done; ``total`` None where it is not known
    (a stream of documents), and then no ETA."""

    def __init__(self, description: str, total: int | None = None, unit: str = "files"):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.nbytes = 0, 0
        self.start = self.last_line = time.perf_counter()
        self.last_tenth = 0
        self.shown = False  # whether anything was printed (the end then gets its line)
        self.bar: Progress | None = None
        self.console = Console(stderr=True)
        self.enabled = os.environ.get("RANK", "0") == "0"

    def __enter__(self) -> Preparing:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.shown and kind is None:
            print(f"{self.description}: {self._counts(final=True)}", file=sys.stderr, flush=True)

    def advance(self, count: int = 1, nbytes: int = 0) -> None:
        """``count`` more inputs done, ``nbytes`` more bytes read (0 where unknown)."""
        self.done += count
        self.nbytes += nbytes
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < QUIET_S:
            return
        if self.console.is_terminal:
            self._draw()
            return
        tenth = 10 * self.done // self.total if self.total else 0
        if not self.shown or now - self.last_line >= LINE_EVERY_S or tenth > self.last_tenth:
            print(f"{self.description}: {self._counts()}", file=sys.stderr, flush=True)
            self.shown, self.last_line, self.last_tenth = True, now, tenth

    def _rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _size(self) -> str:
        return f"  {self.nbytes / 1e6:,.1f} MB" if self.nbytes else ""

    def _counts(self, final: bool = False) -> str:
        elapsed = time.perf_counter() - self.start
        if final:
            return f"{self.done:,} {self.unit}{self._size()} in {_duration(elapsed)}"
        of = f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total else f" {self.unit}"
        rate = self._rate()
        left = f"  ETA {_duration((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        return f"{self.done:,}{of}{self._size()}  {rate:,.0f} {self.unit}/s{left}"

    def _draw(self) -> None:
        info = f"{self._size().strip()}  {self._rate():,.0f} {self.unit}/s".strip()
        if self.bar is None:
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            ]
            self.bar = Progress(*columns, console=self.console)
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.done, info=info)
            self.bar.start()
        self.bar.update(self.task, completed=self.done, info=info)
