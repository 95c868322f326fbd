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
import sys
from collections.abc import Sequence

from daemon import __version__
from daemon.cli.commands import COMMANDS
from daemon.cli.output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from daemon.errors import BackfillError, ConfigError
from daemon.store.models import JOB_STATES


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
        "--full",
        action="store_true",
        help="write a create for every record found, even unchanged ones (for a consumer that lost its "
        "data); records gone are still deleted",
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
