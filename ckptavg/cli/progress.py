"""The progress bar of an averaging run: drawn on the first progress report, in binary units."""

from __future__ import annotations

import time
from typing import Any, TextIO

from .text import human_bytes

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
_RATE_AFTER_S = 0.5  # a rate over the first instants is noise


class ProgressBar:
    """A `(done, total)` byte-count callback for the library that draws a tqdm bar on `file`.

    The bar is created on the first call, so nothing is drawn before the library's fast checks (inputs
    readable, output free) have passed: an error such as "already exists" comes without an empty bar.
    """

    def __init__(self, file: TextIO, desc: str = "averaging") -> None:
        self._file = file
        self._desc = desc
        self._bar: Any = None
        self._start = 0.0
        self._phase: str | None = None  # the pass shown, when it is not the reading

    def __call__(self, done: int, total: int) -> None:
        if self._phase is not None:  # reading follows another pass: its bar is done
            self.close()
        if self._bar is None:
            from tqdm import tqdm  # 30 ms of imports, paid only when a bar is drawn

            self._start = time.monotonic()
            self._bar = tqdm(total=total, file=self._file, desc=self._desc, bar_format=_FORMAT,
                             postfix=self._counts(done, total))
        self._bar.total = total
        self._bar.set_postfix_str(self._counts(done, total), refresh=False)
        self._bar.update(done - self._bar.n)

    def step(self, phase: str, done: int, total: int) -> None:
        """A pass that is not reading (graft's entropies, evaluations, BatchNorm batches): a bar of its own,
        counted in items (`total` 0: unknown, a counter without a bar)."""
        if self._phase != phase:
            self.close()
            from tqdm import tqdm

            self._phase, self._start = phase, time.monotonic()
            self._bar = tqdm(total=total or None, file=self._file, desc=phase, unit="", leave=True)
        self._bar.update(done - self._bar.n)

    def _counts(self, done: int, total: int) -> str:
        elapsed = time.monotonic() - self._start
        rate = f", {human_bytes(done / elapsed)}/s" if elapsed >= _RATE_AFTER_S else ""
        return f"{human_bytes(done)} of {human_bytes(total)}{rate}"

    @property
    def drawn(self) -> bool:
        """Whether the bar has been drawn (the library reported progress at least once)."""
        return self._bar is not None

    def close(self) -> None:
        """Finish the bar's line, if one was drawn."""
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None
