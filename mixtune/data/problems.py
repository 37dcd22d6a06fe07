"""Bad rows: the error type, and the per-source accounting that keeps every skip visible.

A row is bad for one reason, named by a short key (`unknown_role`, `no_labels`, ...) so that skips can be
counted by reason. With `on_bad_row: error` the first bad row stops the build; with `skip` it is counted,
and the build still fails when a source's skipped share passes `max_skip_fraction`. Over-long rows are
not bad rows: the recipe says what to do with them (`overlong`), and they are counted on their own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# How many "file:line: problem" examples a report keeps per source, for error messages and the banner.
MAX_EXAMPLES = 5


class DataError(ValueError):
    """Data that cannot be used as the recipe asks. Row problems start with "file:line: "."""


class RowProblem(Exception):
    """One bad row. `reason` is the key it is counted under; `detail` says what is wrong, for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Overlong(Exception):
    """A row longer than `max_length` that the encoder was not allowed to truncate."""


@dataclass
class SourceReport:
    """What happened to the rows of one source (a file or hub split), from reading to the final datasets.

    `read` counts every row read (after `limit`), malformed ones included. `used` counts the distinct
    valid rows the mixture chose (all of them at weight >= 1). Of those, `kept` made it into a dataset,
    `dropped_overlong` were over-long under `overlong: drop`, and the rest are in `skipped`.
    `train_examples` counts copies (weight > 1 repeats rows); `eval_examples` never does.
    """

    source: str
    role: str  # "train" or "eval": which list of the data section the source came from
    format: str = "auto"
    weight: float = 1.0
    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    used: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    train_examples: int = 0
    eval_examples: int = 0

    @property
    def n_skipped(self) -> int:
        """Bad rows skipped, all reasons together."""
        return sum(self.skipped.values())

    def bad_row(self, where: str, problem: RowProblem, on_bad_row: str) -> None:
        """Stop on a bad row, or count it, as `on_bad_row` says."""
        if on_bad_row == "error":
            raise DataError(
                f"{where}: {problem.detail} [{problem.reason}] "
                "(set data.on_bad_row: skip to count and skip bad rows instead)"
            ) from None
        self.skipped[problem.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {problem.detail}")

    def check_skips(self, max_skip_fraction: float) -> None:
        """Fail when skipped rows are more than `max_skip_fraction` of the rows read."""
        if self.read and self.n_skipped > max_skip_fraction * self.read:
            raise DataError(
                f"{self.source}: {self.n_skipped} of {self.read} rows "
                f"({self.n_skipped / self.read:.1%}) are bad, over data.max_skip_fraction "
                f"{max_skip_fraction:g} ({int(max_skip_fraction * self.read)} allowed). "
                f"By reason: {_reasons(self.skipped)}. First ones:\n  " + "\n  ".join(self.examples)
            )

    def line(self) -> str:
        """One line for the start-up banner."""
        text = (
            f"{self.role} {self.source} [{self.format}, weight {self.weight:g}]: read {self.read}, "
            f"skipped {self.n_skipped}, used {self.used}, kept {self.kept} "
            f"-> {self.train_examples} train / {self.eval_examples} eval examples; "
            f"truncated {self.truncated}, dropped over-long {self.dropped_overlong}"
        )
        if self.skipped:
            text += f"\n    skipped by reason: {_reasons(self.skipped)}; first: {self.examples[0]}"
        return text


@dataclass
class DataReport:
    """Row accounting of one build (SFT or preference), one `SourceReport` per source."""

    stage: str
    max_length: int
    overlong: str
    on_bad_row: str
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def train_examples(self) -> int:
        return sum(s.train_examples for s in self.sources)

    @property
    def eval_examples(self) -> int:
        return sum(s.eval_examples for s in self.sources)

    @property
    def skipped(self) -> Counter[str]:
        """Skipped rows by reason, all sources together."""
        return sum((s.skipped for s in self.sources), Counter())

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.sources)

    @property
    def dropped_overlong(self) -> int:
        return sum(s.dropped_overlong for s in self.sources)

    def check_skips(self, max_skip_fraction: float) -> None:
        """Apply the skip threshold to every source on its own, so a broken small source is not hidden
        by a large clean one."""
        for source in self.sources:
            source.check_skips(max_skip_fraction)

    def summary(self) -> str:
        """A few lines for the start-up banner: totals, then one line per source."""
        head = (
            f"data ({self.stage}, max_length {self.max_length}, overlong: {self.overlong}, "
            f"on_bad_row: {self.on_bad_row}): {self.train_examples} train / {self.eval_examples} eval "
            f"examples; skipped {sum(self.skipped.values())}, truncated {self.truncated}, "
            f"dropped over-long {self.dropped_overlong}"
        )
        return "\n".join([head] + ["  " + s.line() for s in self.sources])


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
