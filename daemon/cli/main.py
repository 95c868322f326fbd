"""The ``backfilld`` command line (``python -m daemon`` is the same).

``run`` is the daemon itself; ``check-config`` validates a config file; ``demo`` runs a complete backfill
against the built-in simulated network. Every other command talks to a running daemon over its admin API
(:mod:`daemon.cli.client`), finding the address and token through the same ``config.toml`` the daemon reads.

Output is a human-readable table by default and JSON with ``--json``; ``records`` always writes JSON lines.
Exit status: 0 success; 1 when the daemon refused or could not be reached (one line on stderr saying why),
or when a waited-for run ended with failed jobs; 2 for usage errors; 130 when interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from daemon import __version__
from daemon.cli.client import UNREACHABLE, AdminClient
from daemon.cli.progress import FINAL_STATES, ProgressDisplay, format_duration, plural, run_elapsed
from daemon.config import CONFIG_ENV, Config, config_path, load_config
from daemon.errors import BackfillError, ConfigError
from daemon.store.sqlite import JOB_STATES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

POLL_INTERVAL = 0.5
# How long `backfill --wait` and `records --follow` keep trying a daemon that stopped answering (a restart).
UNREACHABLE_GRACE = 60.0
MAX_PAGE = 1000
ERROR_WIDTH = 80


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $BACKFILLD_CONFIG, else ./config.toml)",
    )


def _add_json_option(parser: argparse.ArgumentParser, text: str = "print JSON instead of a table") -> None:
    parser.add_argument("--json", action="store_true", help=text)


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (got {text!r})")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="backfilld",
        description="Backfill AT Protocol collections into a durable records queue for an aggregator.",
        epilog="Every command but run, check-config and demo talks to the running daemon's admin API, "
        "whose address and token it finds through the config file.",
    )
    parser.add_argument("--version", action="version", version=f"backfilld {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    _add_config_option(run)

    backfill = commands.add_parser(
        "backfill",
        help="start a backfill run (discover DIDs via the relay, or given DIDs)",
        description="Start a backfill run. Without --did/--dids-file the daemon discovers the DIDs that "
        "publish the collections through the relay; with them it backfills exactly those DIDs.",
    )
    _add_config_option(backfill)
    backfill.add_argument(
        "--did",
        action="append",
        default=[],
        dest="dids",
        metavar="DID",
        help="a DID to backfill (repeatable)",
    )
    backfill.add_argument(
        "--dids-file",
        metavar="FILE",
        help="a file of DIDs, one per line (blank lines and # comments ignored; - for stdin)",
    )
    backfill.add_argument(
        "--collection",
        action="append",
        default=[],
        dest="collections",
        metavar="NSID",
        help="only this configured collection (repeatable; default: all configured collections)",
    )
    backfill.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the run finishes; exit 1 if any job failed",
    )
    _add_json_option(backfill, "print JSON (the run as started, or with --wait as finished)")
    backfill.set_defaults(usage_error=backfill.error)

    status = commands.add_parser("status", help="show the daemon's state, or one run's progress")
    _add_config_option(status)
    status.add_argument("--run", type=_positive_int, metavar="N", help="show run N instead")
    _add_json_option(status)

    jobs = commands.add_parser("jobs", help="list jobs (by state, by run)")
    _add_config_option(jobs)
    jobs.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--run", type=_positive_int, metavar="N", help="only jobs of run N")
    jobs.add_argument(
        "--limit", type=_positive_int, default=100, metavar="N", help="show at most N jobs (default 100)"
    )
    _add_json_option(jobs)

    retry = commands.add_parser(
        "retry",
        help="put failed jobs back to pending",
        description="Put failed (or cancelled) jobs back to pending, with their attempts reset.",
    )
    _add_config_option(retry)
    retry.add_argument("--failed", action="store_true", help="every failed job (of --run N, if given)")
    retry.add_argument("--run", type=_positive_int, metavar="N", help="with --failed: only jobs of run N")
    retry.add_argument("ids", nargs="*", type=_positive_int, metavar="ID", help="job ids to retry")
    _add_json_option(retry)
    retry.set_defaults(usage_error=retry.error)

    records = commands.add_parser(
        "records",
        help="print queued records as JSON lines (optionally acknowledging them)",
        description="Print records jobs from the records queue as JSON lines on stdout, in id order. "
        "With --ack each page is acknowledged (deleted from the queue) once it has been written to stdout "
        "and flushed: handed to the reader, not necessarily stored by it. A reader that must not lose "
        "records should acknowledge through the admin API after storing them (docs/operations.md).",
    )
    _add_config_option(records)
    records.add_argument(
        "--follow", action="store_true", help="keep polling for new records until SIGINT/SIGTERM"
    )
    records.add_argument(
        "--ack", action="store_true", help="acknowledge every record up to the last one written, page by page"
    )
    records.add_argument(
        "--after", type=_non_negative_int, default=0, metavar="ID", help="start after this id"
    )
    records.add_argument("--limit", type=_positive_int, metavar="N", help="stop after N records")
    records.add_argument(
        "--interval", type=_seconds, default=1.0, metavar="SECONDS", help="--follow poll interval (default 1)"
    )
    _add_json_option(records, "accepted for symmetry: the output is always JSON lines")

    check = commands.add_parser(
        "check-config", help="validate the config file and print the effective settings"
    )
    _add_config_option(check)
    _add_json_option(check, "print the effective settings as JSON")

    demo = commands.add_parser(
        "demo",
        help="run a complete backfill against the built-in simulated network (offline, seconds)",
        description="Start a simulated AT Protocol network (relay, PLC directory, PDS hosts, a few hostile "
        "accounts) and a daemon with a temporary database in this process, backfill everything through "
        "the admin API with live progress, and compare the outcome with what the network says to expect. "
        "Exit 0 when it matches. Collections come from the config file when there is one.",
    )
    _add_config_option(demo)
    demo.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep the database and the daemon's log in DIR (default: a temporary directory, removed)",
    )
    _add_json_option(demo, "print the summary as JSON")
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_config(_load(args))


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _config_hint(args: argparse.Namespace) -> str:
    return f" --config {args.config}" if getattr(args, "config", None) else ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; ``right`` names the right-aligned (numeric) columns."""
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if headers[i] in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _short(text: object, width: int = ERROR_WIDTH) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# -- run, check-config -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    # The daemon's imports (trio, structlog, the app) are a quarter second the client commands never need.
    import structlog
    import trio

    from daemon.process.daemon import Daemon, run_until_signalled
    from daemon.process.logsetup import configure_logging

    config = _load(args)
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    log = structlog.get_logger("backfilld")
    try:
        daemon = Daemon(config)
    except BackfillError as exc:
        log.error("cannot start", error_code=exc.code, error=exc.message)
        print(f"backfilld: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    failed: list[BaseException] = []
    try:
        trio.run(run_until_signalled, daemon)
    except* OSError as group:
        # Binding the admin address is the one start-up step that fails this way (port taken, no permission).
        failed.extend(group.exceptions)
    if failed:
        log.error("cannot start", error_code="admin_listen_failed", error=str(failed[0]))
        print(f"backfilld: cannot listen on {config.admin.listen}: {failed[0]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    sections = ("daemon", "admin", "atproto", "limits", "retry", "network")
    if args.json:
        settings: dict[str, object] = {"path": str(config.path)}
        for section in sections:
            values = getattr(config, section)
            settings[section] = {name: _plain(getattr(values, name)) for name in values.__dataclass_fields__}
        _print_json(settings)
        return EXIT_OK
    print(f"{config.path}: OK")
    for section in sections:
        values = getattr(config, section)
        for name in values.__dataclass_fields__:
            print(f"  {section}.{name} = {_plain(getattr(values, name))!r}")
    return EXIT_OK


# -- backfill ----------------------------------------------------------------------------------------


def _read_dids_file(name: str) -> list[str]:
    text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    dids = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            dids.append(entry)
    return dids


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
        if exc.code != UNREACHABLE or not self._answered:
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


def _codes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def cmd_backfill(args: argparse.Namespace) -> int:
    dids = list(args.dids)
    if args.dids_file:
        try:
            dids += _read_dids_file(args.dids_file)
        except (OSError, UnicodeDecodeError) as exc:
            args.usage_error(f"cannot read --dids-file {args.dids_file}: {exc}")
        if not dids:
            args.usage_error(f"--dids-file {args.dids_file} holds no DIDs")
    with _client(args) as client:
        started = client.backfill(dids=dids, collections=args.collections)
        run_id = int(started["run_id"])
        if not args.wait:
            if args.json:
                _print_json(started)
            else:
                print(describe_started(started))
                hint = _config_hint(args)
                print(f"watch it: backfilld status --run {run_id}{hint}   (or start with --wait)")
            return EXIT_OK
        out = sys.stderr if args.json else sys.stdout
        display = ProgressDisplay(out)
        print(describe_started(started), file=out, flush=True)
        try:
            run = wait_for_run(client, run_id, display)
        except KeyboardInterrupt:
            display.note(
                f"stopped waiting; run {run_id} goes on in the daemon (backfilld status --run {run_id})"
            )
            return EXIT_INTERRUPTED
        failed = int(run.get("jobs", {}).get("failed", 0))
        if args.json:
            _print_json(run)
        if failed:
            hint = _config_hint(args)
            print(f"{plural(failed, 'job')} failed ({_codes(failed_by_code(client, run_id))})", file=out)
            print(f"list them: backfilld jobs --state failed --run {run_id}{hint}", file=out)
            print(f"redrive them: backfilld retry --failed --run {run_id}{hint}", file=out)
            return EXIT_FAILED
        if run.get("state") == "cancelled":
            print(f"run {run_id} was cancelled", file=out)
            return EXIT_FAILED
        return EXIT_OK


# -- status, jobs, retry -----------------------------------------------------------------------------


def _print_run(run: Mapping[str, Any]) -> None:
    jobs = run.get("jobs") or {}
    elapsed = run_elapsed(run, time.time())
    print(f"run {run['run_id']} ({run.get('mode')} mode): {run.get('state')}")
    print(f"  created    {_when(run.get('created_at'))}")
    print(f"  finished   {_when(run.get('finished_at'))}   (ran {format_duration(elapsed)})")
    print("  jobs       " + ", ".join(f"{state} {int(jobs.get(state, 0)):,}" for state in JOB_STATES))
    print(
        f"  records    {int(run.get('records_enqueued', 0)):,} enqueued from {plural(int(run.get('dids', 0)), 'DID')}"
    )
    discovery = run.get("discovery") or {}
    if discovery:
        rows = [
            [nsid, d.get("pages"), d.get("dids"), _short(d.get("error") or "")]
            for nsid, d in discovery.items()
        ]
        print("  discovery")
        table = _table(["COLLECTION", "PAGES", "DIDS", "ERROR"], rows, right=["PAGES", "DIDS"])
        print("\n".join("    " + line for line in table.splitlines()))
    else:
        print("  collections " + ", ".join(run.get("collections") or []))


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.run is not None:
            run = client.run(args.run)
            if args.json:
                _print_json(run)
            else:
                _print_run(run)
            return EXIT_OK
        status = client.status()
        where = client.endpoint.display
    if args.json:
        _print_json(status)
        return EXIT_OK
    jobs = status.get("jobs") or {}
    queue = status.get("records_queue") or {}
    workers = status.get("workers") or {}
    uptime = status.get("uptime")
    up = format_duration(uptime if isinstance(uptime, float | int) else None)
    stopping = "  (stopping)" if status.get("stopping") else ""
    print(f"backfilld {status.get('version')} at {where}, up {up}{stopping}")
    print(f"  workers        {workers.get('busy', 0)} busy of {workers.get('total', 0)}")
    depth, cap = int(queue.get("depth", 0)), int(queue.get("max", 0))
    print(f"  records queue  {depth:,} waiting (backfill jobs wait while it holds more than {cap:,})")
    print("  jobs           " + ", ".join(f"{state} {int(jobs.get(state, 0)):,}" for state in JOB_STATES))
    hosts = status.get("hosts") or []
    if hosts:
        now = time.time()
        rows = []
        for host in hosts:
            paused = "-"
            until = host.get("paused_until")
            if host.get("paused") and isinstance(until, int | float):
                clock = time.strftime("%H:%M:%S", time.localtime(until))
                paused = f"until {clock} ({format_duration(until - now)})"
            rows.append(
                [
                    host.get("host"),
                    host.get("jobs_running"),
                    host.get("in_flight"),
                    host.get("waiting"),
                    paused,
                ]
            )
        print("  hosts")
        table = _table(
            ["HOST", "JOBS", "IN FLIGHT", "WAITING", "PAUSED"], rows, right=["JOBS", "IN FLIGHT", "WAITING"]
        )
        print("\n".join("    " + line for line in table.splitlines()))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        # One more than asked tells whether the listing is complete.
        found = list(iter_jobs(client, state=args.state, run_id=args.run, limit=args.limit + 1))
    more = len(found) > args.limit
    shown = found[: args.limit]
    if args.json:
        _print_json({"jobs": shown, "cursor": shown[-1]["id"] if more else None})
        return EXIT_OK
    if not shown:
        print("no jobs match")
        return EXIT_OK
    rows = []
    for job in shown:
        error = ""
        if job.get("error_code"):
            error = _short(f"{job['error_code']}: {job.get('last_error') or ''}")
        rows.append(
            [
                job.get("id"),
                job.get("run_id"),
                job.get("kind"),
                job.get("state"),
                job.get("attempts"),
                f"{int(job.get('records_enqueued') or 0):,}",
                job.get("did"),
                job.get("collection"),
                _when(job.get("updated_at")),
                error,
            ]
        )
    headers = ["ID", "RUN", "KIND", "STATE", "TRIES", "RECORDS", "DID", "COLLECTION", "UPDATED", "ERROR"]
    print(_table(headers, rows, right=["ID", "RUN", "TRIES", "RECORDS"]))
    codes = Counter(
        str(job["error_code"]) for job in shown if job.get("error_code") and job.get("state") == "failed"
    )
    if codes:
        print(f"failed by error code: {_codes(codes)}")
    if more:
        print(f"(first {args.limit:,} shown; more match: raise --limit or use --json)")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    if args.failed and args.ids:
        args.usage_error("give either --failed or job ids, not both")
    if not args.failed and not args.ids:
        args.usage_error("give --failed (optionally with --run N) or one or more job ids")
    if args.run is not None and not args.failed:
        args.usage_error("--run goes with --failed")
    with _client(args) as client:
        result = client.retry(ids=args.ids, state="failed" if args.failed else None, run_id=args.run)
    if args.json:
        _print_json(result)
        return EXIT_OK
    requeued = int(result.get("requeued", 0))
    print(f"requeued {plural(requeued, 'job')}")
    if args.ids and requeued < len(args.ids):
        print(
            "(only failed or cancelled jobs are retried, and not while the same pair is pending or running)"
        )
    return EXIT_OK


# -- records -----------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGINT/SIGTERM; the follow loop checks it between pages and while sleeping."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopped and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def cmd_records(args: argparse.Namespace) -> int:
    stop = _StopFlag()
    if args.follow:
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    out = sys.stdout
    # Only a follower rides out a daemon restart; a one-shot read just reports the error.
    outage = Outage(lambda text: print(f"backfilld: {text}", file=sys.stderr, flush=True))
    after, acked, remaining = args.after, args.after, args.limit
    with _client(args) as client:
        while not stop.stopped:
            size = MAX_PAGE if remaining is None else min(MAX_PAGE, remaining)
            try:
                records = client.records(after=after, limit=size).get("records") or []
            except BackfillError as exc:
                if not (args.follow and outage.tolerate(exc)):
                    raise
                stop.sleep(args.interval)
                continue
            outage.over()
            if records:
                try:
                    for record in records:
                        out.write(json.dumps(record, separators=(",", ":")) + "\n")
                    out.flush()
                except BrokenPipeError:
                    return _output_closed(args, acked)
                after = int(records[-1]["id"])
                if args.ack:
                    try:
                        client.ack(after)
                        acked = after
                    except BackfillError as exc:
                        # Not acknowledged now is acknowledged with the next page: an ack covers every id
                        # up to its own.
                        if not (args.follow and outage.tolerate(exc)):
                            raise
                if remaining is not None:
                    remaining -= len(records)
                    if remaining <= 0:
                        break
            if len(records) < size:
                if not args.follow:
                    break
                stop.sleep(args.interval)
    return EXIT_OK


def _output_closed(args: argparse.Namespace, last_acked: int) -> int:
    # Python would complain again when flushing stdout at exit; point it at /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    if args.ack:
        print(
            f"backfilld: output closed; records after id {last_acked} were not acknowledged", file=sys.stderr
        )
    return EXIT_FAILED


# -- demo --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.cli.demo import run_demo

    explicit = args.config is not None or bool(os.environ.get(CONFIG_ENV))
    path = config_path(args.config)
    config = load_config(path) if explicit or path.exists() else None
    workdir = Path(args.workdir) if args.workdir else None
    return run_demo(config=config, workdir=workdir, as_json=args.json)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "backfill": cmd_backfill,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "retry": cmd_retry,
    "records": cmd_records,
    "check-config": cmd_check_config,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backfilld`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "usage_error"):
        args.usage_error = parser.error
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print("backfilld: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE if args.command == "check-config" else EXIT_FAILED
    except BackfillError as exc:
        print(f"backfilld: {' '.join(exc.message.split())}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``backfilld jobs | head``): not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OK
