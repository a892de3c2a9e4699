"""The check's output: one :class:`Line` per check (``ok``, ``warn`` or ``FAIL``), kept
and printed as it is added by a :class:`Report`, whose exit status ``check`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True)
class Line:
    """One check's outcome: its level, what was checked, and the detail (for a failure:
    what is wrong and what to do)."""

    level: Level
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level:<4} {self.what}: {' '.join(self.detail.split())}"


@dataclass
class Report:
    """The lines so far, each printed as it is added (``out``, or kept only)."""

    out: Any = None
    lines: list[Line] = field(default_factory=list)
    #: ``serve`` would refuse the config itself (its exit status 2).
    config_error: bool = False

    def add(self, level: Level, what: str, detail: str) -> None:
        line = Line(level, what, detail)
        self.lines.append(line)
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def ok(self, what: str, detail: str) -> None:
        self.add("ok", what, detail)

    def warn(self, what: str, detail: str) -> None:
        self.add("warn", what, detail)

    def fail(self, what: str, detail: str) -> None:
        self.add("FAIL", what, detail)

    def failed(self, what: str | None = None) -> bool:
        return any(line.level == "FAIL" and (what is None or line.what == what) for line in self.lines)

    @property
    def exit_code(self) -> int:
        if self.config_error:
            return 2
        return 1 if self.failed() else 0
