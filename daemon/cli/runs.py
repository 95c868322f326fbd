"""Following a run from the CLI (``backfill --wait``, the demo): start line, waiting, failed jobs."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from daemon.cli.client import AdminClient
from daemon.cli.output import MAX_PAGE, POLL_INTERVAL, UNREACHABLE_GRACE
from daemon.cli.progress import FINAL_STATES, ProgressDisplay, plural, run_elapsed
from daemon.errors import BackfillError, Code


def describe_started(started: Mapping[str, Any]) -> str:
    """One line about a run that ``POST /_admin/backfill`` just started."""
    collections = plural(len(started.get("collections") or []), "collection")
    if started.get("mode") == "explicit":
        scope = f"explicit mode, {plural(int(started.get('dids') or 0), 'DID')} x {collections}"
    else:
        scope = f"discover mode, {collections}"
    line = f"run {started['run_id']} started ({scope}): {plural(int(started.get('jobs_enqueued', 0)), 'job')} queued"
    if started.get("jobs_already_queued"):
        already = plural(int(started["jobs_already_queued"]), "pair")
        line += f", {already} already queued by an earlier run (not repeated)"
    return line


class Outage:
    """Rides out a daemon that stops answering for up to :data:`UNREACHABLE_GRACE` seconds (a restart).

    :meth:`tolerate` says whether an error may be waited out: only ``admin_unreachable``, only once the
    daemon has answered at least once (a daemon that was never reachable is a mistake to report at once),
    and only until the outage has lasted the grace period. The first error of an outage goes to ``note``.
    """

    def __init__(
        self,
        note: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        answered: bool = False,
    ) -> None:
        self._note = note
        self._clock = clock
        self._answered = answered
        self._since: float | None = None

    def tolerate(self, exc: BackfillError) -> bool:
        if exc.code != Code.ADMIN_UNREACHABLE or not self._answered:
            return False
        now = self._clock()
        if self._since is None:
            self._since = now
            self._note(f"{exc.message}; still trying for {UNREACHABLE_GRACE:.0f}s")
        return now - self._since <= UNREACHABLE_GRACE

    def over(self) -> None:
        """The daemon answered."""
        self._answered = True
        self._since = None


def wait_for_run(
    client: AdminClient,
    run_id: int,
    display: ProgressDisplay,
    *,
    poll_interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll ``/_admin/runs/<id>`` until the run is finished or cancelled, showing progress; returns the run.

    The daemon has just started the run, so one that stops answering (a restart) is polled again for up to
    a minute before giving up.
    """
    outage = Outage(display.note, clock, answered=True)
    while True:
        try:
            run = client.run(run_id)
        except BackfillError as exc:
            if not outage.tolerate(exc):
                raise
            sleep(poll_interval)
            continue
        outage.over()
        elapsed = run_elapsed(run, clock())
        if run.get("state") in FINAL_STATES:
            display.finish(run, elapsed)
            return run
        display.update(run, elapsed)
        sleep(poll_interval)


def iter_jobs(
    client: AdminClient, *, state: str | None = None, run_id: int | None = None, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Every job matching ``state`` and ``run_id`` in id order (at most ``limit``), page by page."""
    after, remaining = 0, limit
    while remaining is None or remaining > 0:
        size = MAX_PAGE if remaining is None else min(MAX_PAGE, remaining)
        page = client.jobs(state=state, run_id=run_id, after=after, limit=size)
        jobs = page.get("jobs") or []
        yield from jobs
        if remaining is not None:
            remaining -= len(jobs)
        if page.get("cursor") is None or not jobs:
            return
        after = int(page["cursor"])


def failed_by_code(client: AdminClient, run_id: int) -> Counter[str]:
    """How many of the run's jobs failed with each error code."""
    return Counter(
        str(job.get("error_code") or "unknown") for job in iter_jobs(client, state="failed", run_id=run_id)
    )
