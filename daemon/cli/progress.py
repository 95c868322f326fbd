"""Rendering a run's progress (``backfilld backfill --wait``, ``backfilld demo``).

The renderers are pure: they take a run snapshot as ``GET /_admin/runs/<id>`` returns it, the seconds since
the run started and (for the bar) the terminal width, and return text. :class:`ProgressDisplay` only decides
where and when that text is written: on a terminal one line redrawn in place with ``\\r``; elsewhere (a log
file, ``journalctl``, CI) a plain line every few seconds, because carriage returns make a mess there.

Rates and the ETA are averages since the run started: simple, stable, and good enough to tell minutes from
hours. The ETA is shown only once discovery is over, when the number of jobs is known.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

FINAL_STATES = ("finished", "cancelled")
PLAIN_INTERVAL = 5.0
MIN_BAR = 10
MAX_BAR = 30
# What a narrowing terminal gives up, one step at a time: (show the bar, the optional parts shown).
_LEVELS = (
    (True, {"records", "rate", "eta", "discovery"}),
    (True, {"records", "rate", "eta"}),
    (True, {"records", "eta"}),
    (False, {"records", "eta"}),
    (False, {"records"}),
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The numbers a progress line shows, taken from a run snapshot."""

    run_id: int
    state: str
    pending: int
    running: int
    done: int
    failed: int
    cancelled: int
    records: int
    dids: int
    discovery_pages: int
    discovery_errors: int

    @property
    def total(self) -> int:
        return self.pending + self.running + self.done + self.failed + self.cancelled

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def discovering(self) -> bool:
        return self.state == "discovering"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def summarize(run: Mapping[str, Any]) -> RunSummary:
    """The numbers of a ``/_admin/runs/<id>`` snapshot; missing or odd fields count as 0."""
    jobs = run.get("jobs")
    jobs = jobs if isinstance(jobs, Mapping) else {}
    discovery = run.get("discovery")
    entries = (
        [d for d in discovery.values() if isinstance(d, Mapping)] if isinstance(discovery, Mapping) else []
    )
    return RunSummary(
        run_id=_int(run.get("run_id")),
        state=str(run.get("state", "unknown")),
        pending=_int(jobs.get("pending")),
        running=_int(jobs.get("running")),
        done=_int(jobs.get("done")),
        failed=_int(jobs.get("failed")),
        cancelled=_int(jobs.get("cancelled")),
        records=_int(run.get("records_enqueued")),
        dids=_int(run.get("dids")),
        discovery_pages=sum(_int(d.get("pages")) for d in entries),
        discovery_errors=sum(1 for d in entries if d.get("error")),
    )


def plural(count: int, noun: str) -> str:
    """``1 page``, ``2 pages``, ``1,234 DIDs``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def format_duration(seconds: float | None) -> str:
    """``0.4s``, ``42s``, ``3m05s``, ``2h07m``; ``--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_rate(count: int, elapsed: float) -> str:
    """``count`` per second over ``elapsed`` seconds, as ``1,234/s`` (``--/s`` before any time passed)."""
    if elapsed <= 0:
        return "--/s"
    rate = count / elapsed
    return f"{rate:,.1f}/s" if rate < 10 else f"{round(rate):,}/s"


def eta_seconds(summary: RunSummary, elapsed: float) -> float | None:
    """Seconds until the run's jobs are all finished, at the average pace so far; None while unknown."""
    if summary.state in FINAL_STATES:
        return 0.0
    if summary.discovering or summary.finished == 0 or elapsed <= 0:
        return None
    return (summary.total - summary.finished) * elapsed / summary.finished


def _bar(fraction: float, width: int) -> str:
    filled = min(width, max(0, int(fraction * width)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _discovery(summary: RunSummary) -> str:
    text = f"discovery {plural(summary.discovery_pages, 'page')}, {plural(summary.dids, 'DID')}"
    if summary.discovery_errors:
        text += f", {summary.discovery_errors} failed"
    return text


def _jobs(summary: RunSummary) -> str:
    return f"{summary.finished:,}/{summary.total:,}{'+' if summary.discovering else ''} jobs"


def render_progress(run: Mapping[str, Any], elapsed: float, width: int) -> str:
    """The one-line progress bar for a terminal ``width`` columns wide (at most ``width - 1`` characters,
    so that the cursor never wraps to the next line).

    Everything is shown when there is room; on a narrow terminal the discovery figures, the rate, the
    bar, the ETA and the record count are dropped, in that order.
    """
    s = summarize(run)
    limit = max(1, width - 1)
    head = f"run {s.run_id} {s.state}"
    jobs = _jobs(s) + (f" ({s.failed:,} failed)" if s.failed else "")
    parts = {
        "records": plural(s.records, "record"),
        "rate": format_rate(s.records, elapsed),
        "eta": f"ETA {format_duration(eta_seconds(s, elapsed))}",
        "discovery": _discovery(s),
    }
    fraction = s.finished / s.total if s.total else 0.0
    for with_bar, shown in _LEVELS:
        tail = " | ".join([jobs, *(text for name, text in parts.items() if name in shown)])
        if with_bar:
            room = limit - len(head) - len(tail) - 2
            if room >= MIN_BAR + 2:
                return f"{head} {_bar(fraction, min(MAX_BAR, room - 2))} {tail}"
        elif len(head) + 1 + len(tail) <= limit:
            return f"{head} {tail}"
    return f"{head} {jobs}"[:limit]


def render_line(run: Mapping[str, Any], elapsed: float) -> str:
    """A plain progress line for logs and pipes (no bar, no width limit)."""
    s = summarize(run)
    parts = [
        f"run {s.run_id} {s.state}: {_jobs(s)} finished ({s.done:,} done, {s.failed:,} failed)",
        f"{plural(s.records, 'record')} ({format_rate(s.records, elapsed)})",
        _discovery(s),
        f"elapsed {format_duration(elapsed)}",
    ]
    if s.state not in FINAL_STATES:
        parts.append(f"ETA {format_duration(eta_seconds(s, elapsed))}")
    return ", ".join(parts)


def render_final(run: Mapping[str, Any], elapsed: float) -> list[str]:
    """The lines that close a wait: the outcome, and each collection whose discovery failed."""
    s = summarize(run)
    lines = [
        f"run {s.run_id} {s.state} after {format_duration(elapsed)}: {s.done:,} done, {s.failed:,} failed, "
        f"{s.cancelled:,} cancelled of {plural(s.total, 'job')}; {plural(s.records, 'record')} enqueued from "
        f"{plural(s.dids, 'DID')}"
    ]
    operations = run.get("operations")
    if isinstance(operations, Mapping):
        counts = ", ".join(f"{_int(operations.get(op)):,} {op}" for op in ("create", "update", "delete"))
        lines.append(f"changes written: {counts}")
    replay = run.get("replay_from_us")
    if isinstance(replay, int):
        lines.append(f"live stream handoff: start Jetstream at cursor={replay} (or earlier)")
    discovery = run.get("discovery")
    if isinstance(discovery, Mapping):
        for nsid, entry in discovery.items():
            if isinstance(entry, Mapping) and entry.get("error"):
                lines.append(f"discovery of {nsid} failed: {entry['error']}")
    return lines


def run_elapsed(run: Mapping[str, Any], now: float) -> float:
    """Seconds the run has been going (until ``finished_at`` once it has one); both clocks are unix time."""
    created = run.get("created_at")
    if not isinstance(created, int | float):
        return 0.0
    end = run.get("finished_at")
    end = end if isinstance(end, int | float) else now
    return max(0.0, float(end) - float(created))


def terminal_columns() -> int:
    """The width of the terminal (80 when it cannot be told)."""
    return shutil.get_terminal_size((80, 24)).columns


class ProgressDisplay:
    """Writes progress to ``stream``: redrawn in place on a terminal, a plain line every ``interval`` seconds
    of run time elsewhere."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interactive: bool | None = None,
        columns: Callable[[], int] = terminal_columns,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self._stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self._columns = columns
        self._interval = interval
        self._drawn = 0
        self._last_plain: float | None = None

    def update(self, run: Mapping[str, Any], elapsed: float) -> None:
        """Show the run's current state."""
        if self.interactive:
            self._redraw(render_progress(run, elapsed, self._columns()))
        elif self._last_plain is None or elapsed - self._last_plain >= self._interval:
            self._stream.write(render_line(run, elapsed) + "\n")
            self._last_plain = elapsed
        self._stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line, without breaking the bar (which is redrawn at the next update)."""
        self._end_bar()
        self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self, run: Mapping[str, Any], elapsed: float) -> None:
        """Show the final state and the closing lines."""
        if self.interactive:
            self._redraw(render_progress(run, elapsed, self._columns()))
            self._end_bar()
        for line in render_final(run, elapsed):
            self._stream.write(line + "\n")
        self._stream.flush()

    def _redraw(self, line: str) -> None:
        # Spaces rub out the rest of a longer previous line without relying on ANSI escapes.
        self._stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self._drawn = len(line)

    def _end_bar(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._drawn = 0
