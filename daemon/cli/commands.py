"""The ``backfilld`` subcommands, one ``cmd_<name>(args) -> exit status`` each."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    MAX_PAGE,
    config_hint,
    load,
    open_client,
    print_json,
    render_table,
    short,
    when,
)
from daemon.cli.progress import ProgressDisplay, format_duration, plural, run_elapsed
from daemon.cli.runs import Outage, describe_started, failed_by_code, iter_jobs, wait_for_run
from daemon.config import CONFIG_ENV, SECTIONS, config_path, load_config
from daemon.errors import BackfillError, Code
from daemon.store.models import JOB_STATES

# -- run, check-config -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until a signal stops it.

    Logging is configured before the daemon's modules are imported, so that even their import-time
    warnings come out as log events. A start-up failure (the database or the admin address cannot be used)
    is one line on stderr, exit status 1: a JSON log event with ``log_format = "json"``, else
    ``backfilld: <message>``. Anything else that ends the process early is logged with its traceback
    (rendered into the event) and exits 1.
    """
    from daemon.process.logsetup import configure_logging

    config = load(args)  # an invalid config is reported by main(), before the log format is known
    chosen = configure_logging(config.daemon.log_format, config.daemon.log_level, process_errors=True)

    # The daemon's imports (trio, structlog, the app) are a quarter second the client commands never need.
    import structlog
    import trio

    from daemon.process.daemon import Daemon, run_until_signalled

    log = structlog.get_logger("backfilld")

    def cannot_start(code: str, message: str) -> int:
        if chosen == "json":
            log.error("cannot start", error_code=code, error=message)
        else:
            print(f"backfilld: {message}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    try:
        daemon = Daemon(config)
    except BackfillError as exc:
        return cannot_start(exc.code, " ".join(exc.message.split()))
    except OSError as exc:
        return cannot_start(Code.DATABASE_UNUSABLE, f"cannot start: {exc}")
    try:
        trio.run(run_until_signalled, daemon)
    except Exception as exc:  # the process's last word on anything that escaped
        unbound = _listen_error(exc) if not daemon.listening else None
        if unbound is not None:
            # Binding the admin address is the one start-up step that fails this way (port taken, no
            # permission).
            return cannot_start(
                Code.ADMIN_LISTEN_FAILED, f"cannot listen on {config.admin.listen}: {unbound}"
            )
        log.critical("backfilld crashed", exc_info=exc)
        return EXIT_FAILED
    return EXIT_OK


def _listen_error(exc: BaseException) -> OSError | None:
    """The OSError in ``exc`` (maybe inside exception groups), if that is all it holds."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(OSError)
        if matched is not None and rest is None:
            return _listen_error(matched.exceptions[0])
    return None


def _plain(value: object, redact: Callable[[str], str]) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
        return redact(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args)
    sections = SECTIONS
    # a PostgreSQL URL must also reach its server, with a schema this backfilld reads (imported here:
    # the database drivers are time the other client commands never need)
    from daemon.store.open import check_database
    from daemon.store.postgres import redact

    reached = check_database(config.daemon.database)
    if args.json:
        settings: dict[str, object] = {"path": str(config.path)}
        for section in sections:
            values = getattr(config, section)
            settings[section] = {
                name: _plain(getattr(values, name), redact) for name in values.__dataclass_fields__
            }
        print_json(settings)
        return EXIT_OK
    print(f"{config.path}: OK")
    if reached is not None:
        print(f"  database: {reached}")
    for section in sections:
        values = getattr(config, section)
        for name in values.__dataclass_fields__:
            print(f"  {section}.{name} = {_plain(getattr(values, name), redact)!r}")
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
    with open_client(args) as client:
        started = client.backfill(dids=dids, collections=args.collections, full=args.full)
        run_id = int(started["run_id"])
        if not args.wait:
            if args.json:
                print_json(started)
            else:
                print(describe_started(started))
                hint = config_hint(args)
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
            print_json(run)
        if failed:
            hint = config_hint(args)
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
    print(f"  created    {when(run.get('created_at'))}")
    print(f"  finished   {when(run.get('finished_at'))}   (ran {format_duration(elapsed)})")
    print("  jobs       " + ", ".join(f"{state} {int(jobs.get(state, 0)):,}" for state in JOB_STATES))
    print(
        f"  records    {int(run.get('records_enqueued', 0)):,} enqueued from {plural(int(run.get('dids', 0)), 'DID')}"
    )
    discovery = run.get("discovery") or {}
    if discovery:
        rows = [
            [nsid, d.get("pages"), d.get("dids"), short(d.get("error") or "")]
            for nsid, d in discovery.items()
        ]
        print("  discovery")
        table = render_table(["COLLECTION", "PAGES", "DIDS", "ERROR"], rows, right=["PAGES", "DIDS"])
        print("\n".join("    " + line for line in table.splitlines()))
    else:
        print("  collections " + ", ".join(run.get("collections") or []))


def cmd_status(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.run is not None:
            run = client.run(args.run)
            if args.json:
                print_json(run)
            else:
                _print_run(run)
            return EXIT_OK
        status = client.status()
        where = client.endpoint.display
    if args.json:
        print_json(status)
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
        table = render_table(
            ["HOST", "JOBS", "IN FLIGHT", "WAITING", "PAUSED"], rows, right=["JOBS", "IN FLIGHT", "WAITING"]
        )
        print("\n".join("    " + line for line in table.splitlines()))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        # One more than asked tells whether the listing is complete.
        found = list(iter_jobs(client, state=args.state, run_id=args.run, limit=args.limit + 1))
    more = len(found) > args.limit
    shown = found[: args.limit]
    if args.json:
        print_json({"jobs": shown, "cursor": shown[-1]["id"] if more else None})
        return EXIT_OK
    if not shown:
        print("no jobs match")
        return EXIT_OK
    rows = []
    for job in shown:
        error = ""
        if job.get("error_code"):
            error = short(f"{job['error_code']}: {job.get('last_error') or ''}")
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
                when(job.get("updated_at")),
                error,
            ]
        )
    headers = ["ID", "RUN", "KIND", "STATE", "TRIES", "RECORDS", "DID", "COLLECTION", "UPDATED", "ERROR"]
    print(render_table(headers, rows, right=["ID", "RUN", "TRIES", "RECORDS"]))
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
    with open_client(args) as client:
        result = client.retry(ids=args.ids, state="failed" if args.failed else None, run_id=args.run)
    if args.json:
        print_json(result)
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
    with open_client(args) as client:
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
