"""The pure progress renderers and the terminal/plain display of ``backfill --wait``."""

from __future__ import annotations

import io
from typing import Any

import pytest

from daemon.cli.progress import (
    ProgressDisplay,
    eta_seconds,
    format_duration,
    format_rate,
    plural,
    render_final,
    render_line,
    render_progress,
    run_elapsed,
    summarize,
)


class FakeTerminal(io.StringIO):
    """Captures what is written, and says it is a terminal."""

    def isatty(self) -> bool:
        return True


def snapshot(
    state: str = "running",
    *,
    pending: int = 40,
    running: int = 4,
    done: int = 70,
    failed: int = 10,
    cancelled: int = 0,
    records: int = 6379,
    dids: int = 31,
    discovery: dict[str, Any] | None = None,
    created_at: float = 1000.0,
    finished_at: float | None = None,
) -> dict[str, Any]:
    return {
        "run_id": 7,
        "mode": "discover",
        "state": state,
        "created_at": created_at,
        "finished_at": finished_at,
        "collections": ["com.example.a", "com.example.b"],
        "dids": dids,
        "discovery": discovery
        if discovery is not None
        else {
            "com.example.a": {"pages": 3, "dids": 30, "error": None},
            "com.example.b": {"pages": 1, "dids": 1, "error": None},
        },
        "jobs": {
            "pending": pending,
            "running": running,
            "done": done,
            "failed": failed,
            "cancelled": cancelled,
        },
        "records_enqueued": records,
    }


def test_summarize_counts_jobs_and_discovery() -> None:
    s = summarize(
        snapshot(discovery={"a": {"pages": 2, "dids": 5, "error": "timeout: x"}, "b": {"pages": 1}})
    )
    assert (s.total, s.finished, s.discovery_pages, s.discovery_errors) == (124, 80, 3, 1)
    assert not s.discovering


def test_summarize_tolerates_missing_and_odd_fields() -> None:
    s = summarize({"run_id": 3, "jobs": {"done": True, "failed": "2"}, "discovery": ["x"]})
    assert (s.run_id, s.state, s.total, s.records, s.discovery_pages) == (3, "unknown", 0, 0, 0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "--"),
        (-1.0, "--"),
        (float("nan"), "--"),
        (0.0, "0.0s"),
        (2.46, "2.5s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (185.0, "3m05s"),
        (7620.0, "2h07m"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_plural() -> None:
    assert [plural(n, "page") for n in (0, 1, 2, 1234)] == ["0 pages", "1 page", "2 pages", "1,234 pages"]


@pytest.mark.parametrize(
    ("count", "elapsed", "text"),
    [(10, 0.0, "--/s"), (5, 2.0, "2.5/s"), (6379, 2.5, "2,552/s"), (0, 3.0, "0.0/s")],
)
def test_format_rate(count: int, elapsed: float, text: str) -> None:
    assert format_rate(count, elapsed) == text


def test_eta() -> None:
    assert eta_seconds(summarize(snapshot()), 8.0) == pytest.approx(44 * 8.0 / 80)
    assert eta_seconds(summarize(snapshot("discovering")), 8.0) is None
    assert eta_seconds(summarize(snapshot(done=0, failed=0)), 8.0) is None
    assert eta_seconds(summarize(snapshot("finished", pending=0, running=0)), 8.0) == 0.0


def test_wide_terminal_shows_everything() -> None:
    line = render_progress(snapshot(), 8.0, 200)
    assert line == (
        "run 7 running [###################-----------] 80/124 jobs (10 failed) | 6,379 records | 797/s "
        "| ETA 4.4s | discovery 4 pages, 31 DIDs"
    )


def test_line_never_reaches_the_last_column() -> None:
    for width in range(1, 220):
        for run in (snapshot(), snapshot("discovering", records=10**9, dids=10**6), snapshot("finished")):
            assert len(render_progress(run, 3.0, width)) <= max(1, width - 1), width


def test_narrowing_drops_discovery_then_rate_then_bar_then_eta_then_records() -> None:
    run = snapshot()
    widths = {}
    for width in range(200, 10, -1):
        line = render_progress(run, 8.0, width)
        for part in ("discovery", "/s", "[", "ETA", "records"):
            if part in line:
                widths[part] = width
    # The narrowest width at which each part is still shown: later parts survive narrower terminals.
    assert widths["discovery"] > widths["/s"] > widths["["] > widths["ETA"] > widths["records"]
    assert render_progress(run, 8.0, 40) == "run 7 running 80/124 jobs (10 failed)"


def test_bar_fill_follows_finished_jobs() -> None:
    assert "[" + "#" * 30 + "]" in render_progress(snapshot("finished", pending=0, running=0), 8.0, 200)
    assert "[" + "-" * 30 + "]" in render_progress(snapshot(done=0, failed=0), 8.0, 200)
    assert "[" + "-" * 30 + "]" in render_progress(snapshot(pending=0, running=0, done=0, failed=0), 8.0, 200)


def test_discovering_total_is_open_ended_and_errors_show() -> None:
    run = snapshot("discovering", discovery={"a": {"pages": 2, "dids": 9, "error": "timeout: slow relay"}})
    line = render_progress(run, 8.0, 200)
    assert "80/124+ jobs" in line and "ETA --" in line and "discovery 2 pages, 31 DIDs, 1 failed" in line


def test_plain_line() -> None:
    assert render_line(snapshot(), 8.0) == (
        "run 7 running: 80/124 jobs finished (70 done, 10 failed), 6,379 records (797/s), "
        "discovery 4 pages, 31 DIDs, elapsed 8.0s, ETA 4.4s"
    )
    assert "ETA" not in render_line(snapshot("finished", pending=0, running=0), 8.0)


def test_final_lines_name_failed_discoveries() -> None:
    run = snapshot(
        "finished",
        pending=0,
        running=0,
        discovery={
            "a": {"pages": 1, "dids": 1, "error": None},
            "b": {"pages": 0, "dids": 0, "error": "http_status: 500"},
        },
    )
    assert render_final(run, 75.0) == [
        "run 7 finished after 1m15s: 70 done, 10 failed, 0 cancelled of 80 jobs; 6,379 records enqueued from 31 DIDs",
        "discovery of b failed: http_status: 500",
    ]


def test_run_elapsed() -> None:
    assert run_elapsed(snapshot(created_at=1000.0), 1012.5) == 12.5
    assert run_elapsed(snapshot(created_at=1000.0, finished_at=1003.0), 5000.0) == 3.0
    assert run_elapsed(snapshot(created_at=1000.0), 900.0) == 0.0
    assert run_elapsed({}, 5.0) == 0.0


def test_terminal_redraws_one_line_in_place() -> None:
    terminal = FakeTerminal()
    display = ProgressDisplay(terminal, columns=lambda: 100)
    assert display.interactive
    display.update(snapshot(pending=100, done=10, failed=0, records=100), 1.0)
    display.update(snapshot(pending=90, done=20, failed=0, records=200), 2.0)
    written = terminal.getvalue()
    assert "\n" not in written and written.count("\r") == 2
    frames = written.split("\r")[1:]
    assert "10/114 jobs" in frames[0] and "20/114 jobs" in frames[1]
    assert all(len(frame) <= 99 for frame in frames)


def test_terminal_rubs_out_a_longer_previous_line() -> None:
    terminal = FakeTerminal()
    widths = iter([200, 60])
    display = ProgressDisplay(terminal, columns=lambda: next(widths))
    display.update(snapshot(), 1.0)
    first = terminal.getvalue()
    display.update(snapshot(), 1.0)
    second = terminal.getvalue()[len(first) :]
    assert second.startswith("\r") and len(second) == len(first)
    assert second.endswith(" ")


def test_terminal_finish_ends_the_line_then_prints_the_outcome() -> None:
    terminal = FakeTerminal()
    display = ProgressDisplay(terminal, columns=lambda: 120)
    display.update(snapshot(), 1.0)
    display.note("the daemon did not answer; still trying")
    display.update(snapshot(), 2.0)
    display.finish(snapshot("finished", pending=0, running=0, finished_at=1004.0), 4.0)
    lines = terminal.getvalue().split("\n")
    assert lines[0].startswith("\rrun 7 running [")
    assert lines[1] == "the daemon did not answer; still trying"
    assert lines[2].startswith("\rrun 7 running [") and "\rrun 7 finished [" in lines[2]
    assert lines[3].startswith("run 7 finished after 4.0s: 70 done, 10 failed")
    assert lines[4] == ""


def test_plain_output_prints_a_line_every_interval() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, interval=5.0)
    assert not display.interactive
    for elapsed in (0.5, 1.0, 4.0, 5.5, 6.0, 10.4, 10.6):
        display.update(snapshot(), elapsed)
    display.finish(snapshot("finished", pending=0, running=0), 12.0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("elapsed ")[1].split(",")[0] for line in lines[:3]] == ["0.5s", "5.5s", "11s"]
    assert lines[3].startswith("run 7 finished after 12s:") and len(lines) == 4


def test_interactive_can_be_forced() -> None:
    assert ProgressDisplay(FakeTerminal(), interactive=False).interactive is False
    assert ProgressDisplay(io.StringIO(), interactive=True).interactive is True
