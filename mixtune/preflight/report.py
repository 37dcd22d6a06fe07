"""Check results, printed one line each as they come in."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

STATUSES = ("PASS", "WARN", "FAIL", "SKIP")


@dataclass
class Report:
    """Collects (status, check, message) and prints each line as it is added."""

    stream: TextIO = field(default_factory=lambda: sys.stdout)
    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, check: str, message: str) -> None:
        assert status in STATUSES, status
        self.lines.append((status, check, message))
        indent = "\n" + " " * 22
        print(f"{status:<4}  {check:<14}  {indent.join(message.splitlines())}", file=self.stream, flush=True)

    def passed(self, check: str, message: str) -> None:
        self.add("PASS", check, message)

    def warn(self, check: str, message: str) -> None:
        self.add("WARN", check, message)

    def fail(self, check: str, message: str) -> None:
        self.add("FAIL", check, message)

    def skip(self, check: str, message: str) -> None:
        self.add("SKIP", check, message)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.lines)

    def totals(self) -> str:
        counts = Counter(status for status, _, _ in self.lines)
        return f"{len(self.lines)} checks: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
