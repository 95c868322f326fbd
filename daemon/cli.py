"""The ``backfilld`` command line (``python -m daemon`` is the same)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from daemon import __version__
from daemon.config import Config, config_path, load_config
from daemon.errors import BackfillError, ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $BACKFILLD_CONFIG, else ./config.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="backfilld",
        description="Backfill AT Protocol collections into a durable records queue for an aggregator.",
    )
    parser.add_argument("--version", action="version", version=f"backfilld {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    _add_config_option(run)

    check = commands.add_parser(
        "check-config", help="validate the config file and print the effective settings"
    )
    _add_config_option(check)
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.logsetup import configure_logging
    from daemon.runtime import Daemon, run_until_signalled

    config = _load(args)
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    log = structlog.get_logger("backfilld")
    try:
        daemon = Daemon(config)
    except BackfillError as exc:
        log.error("cannot start", error_code=exc.code, error=exc.message)
        print(f"backfilld: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    trio.run(run_until_signalled, daemon)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{config.path}: OK")
    for section in ("daemon", "admin", "atproto", "limits", "retry", "network"):
        values = getattr(config, section)
        for name in values.__dataclass_fields__:
            value = getattr(values, name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            print(f"  {section}.{name} = {value!r}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "check-config": cmd_check_config}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``backfilld`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print("backfilld: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE if args.command == "check-config" else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
