"""How `sandboxctl` writes for people and for scripts: colour and progress only where a
terminal is attached (and `NO_COLOR` is unset), plain text otherwise; durations and tables."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

_CODES = {
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
    "bold": "1",
    "dim": "2",
}
# Statuses and event types by what they mean to an operator; a name not listed (one the
# contracts add later) is printed plain.
_MEANINGS = {
    "green": ("running", "created", "replaced", "resumed", "extended", "reused", "ok", "alive"),
    "yellow": ("provisioning", "stopping", "expiring", "warn", "silent"),
    "cyan": ("paused",),
    "red": ("failed", "lost", "rejected", "fail", "dead", "node_dead"),
    "dim": ("stopped",),
}
COLOURS = {name: colour for colour, names in _MEANINGS.items() for name in names}


def wants_colour(stream: TextIO) -> bool:
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


@dataclass
class Style:
    """Paints text for `stream` when it is a terminal."""

    stream: TextIO = field(default_factory=lambda: sys.stdout)
    enabled: bool | None = None

    def __post_init__(self) -> None:
        if self.enabled is None:
            self.enabled = wants_colour(self.stream)

    def paint(self, text: str, colour: str | None) -> str:
        if not self.enabled or colour is None or colour not in _CODES:
            return text
        return f"\x1b[{_CODES[colour]}m{text}\x1b[0m"

    def meaning(self, text: str, name: str | None = None) -> str:
        """`text` coloured by what `name` (default: the text itself) means."""
        return self.paint(text, COLOURS.get(name if name is not None else text.strip()))


class Progress:
    """A one-line counter on stderr while something long runs, only on a terminal."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._what = what
        isatty = getattr(self._stream, "isatty", None)
        self._on = bool(isatty is not None and isatty())
        self._shown = 0

    def update(self, count: int) -> None:
        if self._on and count - self._shown >= 1000:  # noqa: PLR2004 - often enough to see it move
            self._shown = count
            self._stream.write(f"\r{self._what}… {count:,}")
            self._stream.flush()

    def done(self) -> None:
        if self._on and self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def duration(seconds: float) -> str:
    """`2d3h`, `4h05m`, `3m12s`, `9s`; negative as `-9s` (past)."""
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m{secs:02d}s"
    return f"{sign}{secs}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], style: Style, colour_column: int | None = None) -> str:
    """Columns padded to their widest cell; `colour_column`'s cells coloured by meaning
    (after padding, so escape codes do not shift the columns)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(style.paint(h.ljust(w), "bold") for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.ljust(width)
            cells.append(style.meaning(padded, cell) if i == colour_column else padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
