"""What every CLI command shares: exit statuses, loading the config, the admin client, tables."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from daemon.cli.client import AdminClient
from daemon.config import Config, config_path, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

POLL_INTERVAL = 0.5
# How long `backfill --wait` and `records --follow` keep trying a daemon that stopped answering (a restart).
UNREACHABLE_GRACE = 60.0
MAX_PAGE = 1000
ERROR_WIDTH = 80


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def open_client(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_config(load(args))


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def config_hint(args: argparse.Namespace) -> str:
    return f" --config {args.config}" if getattr(args, "config", None) else ""


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = ()
) -> str:
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


def when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def short(text: object, width: int = ERROR_WIDTH) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
