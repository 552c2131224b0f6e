"""One benchmark section's result and its Markdown rendering.

A section module (``benchmarks/<name>.py``) exposes ``run(quick: bool) -> Section``.
The runner (:mod:`benchmarks.runner`) executes each section in a child process and
moves its :class:`Section` across as JSON, so a section holds only strings and
numbers: rows are already formatted cells, ``data`` keeps the raw measurements for
``--json``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEADLINE_ENV",
    "Section",
    "fmt_spread",
    "markdown_table",
    "render_section",
    "time_left",
]


@dataclass
class Section:
    """The result of one benchmark section.

    Parameters
    ----------
    title
        Heading of the section's table.
    columns
        Column names.
    rows
        Formatted cells, one list per row, each as long as ``columns``.
    notes
        What bounds the numbers, and anything left out (rendered as a bullet list).
    data
        Raw measurements (JSON-serialisable), written by ``--json``.
    """

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    # Filled in by the runner, not by the section.
    name: str = ""
    wall_s: float | None = None
    other_cpu_pct: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        width = len(self.columns)
        for i, row in enumerate(self.rows):
            if len(row) != width:
                raise ValueError(
                    f"rows[{i}]: expected {width} cells (one per column), found {len(row)}: {row}"
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Section:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"section: expected a JSON object, found {type(raw).__name__}")
        return cls(**raw)

    @classmethod
    def failed(cls, name: str, title: str, error: str) -> Section:
        """A section that produced no measurements; rendered as one row naming why."""
        return cls(title=title, columns=["status"], rows=[[error]], name=name, error=error)


def _cell(value: str) -> str:
    # A '|' inside a cell would split it; newlines would end the table.
    return value.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (text left-aligned, numbers right-aligned)."""

    def numeric(col: int) -> bool:
        cells = [r[col] for r in rows if r[col] not in ("", "-", "n/a")]
        return bool(cells) and all(_looks_numeric(c) for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(columns))]
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join(align) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _looks_numeric(cell: str) -> bool:
    head = cell.split(" ", 1)[0].rstrip("x%").replace(",", "")
    try:
        float(head)
    except ValueError:
        return False
    return True


def render_section(section: Section, level: int = 2) -> str:
    """Heading, the section's timing line, its table and its notes."""
    parts = [f"{'#' * level} {section.title}", ""]
    meta = []
    if section.wall_s is not None:
        meta.append(f"section wall time {section.wall_s:.0f} s")
    if section.other_cpu_pct is not None:
        meta.append(f"other processes used {section.other_cpu_pct:.0f} % of the CPU meanwhile")
    if section.error:
        meta.append(f"**incomplete: {section.error}**")
    if meta:
        parts += ["_" + "; ".join(meta) + "._", ""]
    parts.append(markdown_table(section.columns, section.rows))
    if section.notes:
        parts.append("")
        parts += [f"- {note}" for note in section.notes]
    return "\n".join(parts)


def fmt_spread(values: Sequence[float], digits: int = 2, suffix: str = "") -> str:
    """``median [min-max]`` of ``values`` (just the value when there is one)."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{suffix}"
    return f"{med:.{digits}f}{suffix} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


#: Environment variable through which the runner tells a section when its time is up
#: (seconds since the epoch); sections that size their own work read it via
#: :func:`time_left`.
DEADLINE_ENV = "FL_APP_BENCH_DEADLINE"


def time_left(default: float) -> float:
    """Seconds until the runner's deadline for this section (``default`` without one)."""
    raw = os.environ.get(DEADLINE_ENV)
    if not raw:
        return default
    try:
        return max(0.0, float(raw) - time.time())
    except ValueError:
        return default
