"""How ``wait_all`` shows how many jobs are final (``progress=``).

``progress=True`` draws a bar with ``tqdm.auto`` where tqdm is installed (the client's
``progress`` extra): a widget in Jupyter, a bar on stderr in a terminal. Without tqdm
it rewrites one line on stderr (``"12/100 final"``). A callable is called as
``progress(done, total)`` instead; False shows nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

#: ``progress=`` of ``wait_all``: False, True (a bar, or a line on stderr) or ``f(done, total)``.
Progress = bool | Callable[[int, int], None]

# The count reads as the line without tqdm does ("12/100 final"), bar or not.
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} final [{elapsed}<{remaining}]"


class Reporter:
    """Told each new count of final jobs; :meth:`close` once the wait ends, however."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self._report = report

    def __call__(self, done: int, total: int) -> None:
        self._report(done, total)

    def close(self) -> None:
        """Nothing to clean up (a bar overrides this)."""


class _Bar(Reporter):
    """A tqdm bar, drawn at the first count (which gives the total)."""

    def __init__(self, tqdm: Any) -> None:
        super().__init__(self._update)
        self._tqdm = tqdm
        self._bar: Any = None

    def _update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, unit="job", bar_format=BAR_FORMAT)
        self._bar.update(done - self._bar.n)
        if done == total:
            self.close()

    def close(self) -> None:
        # tqdm's close is idempotent; a bar left open would keep a notebook cell's
        # widget "running" and a terminal line without its newline.
        if self._bar is not None:
            self._bar.close()


def reporter(progress: Progress) -> Reporter:
    """What ``progress=`` asks for (see the module docstring)."""
    if progress is True:
        tqdm = _tqdm()
        return _Bar(tqdm) if tqdm is not None else Reporter(_print_progress)
    if progress is False:
        return Reporter(lambda done, total: None)
    return Reporter(progress)


def _tqdm() -> Any:
    """``tqdm.auto.tqdm``, or None without tqdm (imported only when asked for: it
    looks for IPython, which takes a while)."""
    try:
        return importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return None


def _print_progress(done: int, total: int) -> None:
    # One line, rewritten in place; the newline comes once everything is final.
    end = "\n" if done == total else ""
    print(f"\r{done}/{total} final", end=end, file=sys.stderr, flush=True)
