"""Run the simulated network in its own process (for the benchmark).

``python -m daemon.simnet --accounts N --records R --hosts H --collections c1,c2 --latency S
[--hostile mode=count ...] [--rate-limit LIMIT/WINDOW] [--repo-rate-limit LIMIT/WINDOW] [--no-get-blocks]
[--port-file PATH]`` serves until SIGTERM or SIGINT. Once every listener is bound it writes the URLs as JSON
to ``--port-file`` (atomically; removed again at exit) and prints them. The control endpoint
(:mod:`daemon.simnet.control`) reports counters, the served spec and the expectations, and mutates records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import trio

from daemon.errors import ConfigError
from daemon.simnet.model import DEFAULT_COLLECTIONS, HostOptions, NetworkSpec, build_spec, demo_spec
from daemon.simnet.repos import DEFAULT_REPO_CACHE_BYTES
from daemon.simnet.server import DEFAULT_PAGE_CACHE_BYTES, open_network


def _hostile(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODE=COUNT, got {text!r}")
    return name, int(count)


def _rate(text: str) -> tuple[int, int]:
    limit, sep, window = text.partition("/")
    if not sep or not limit.isdigit() or not window.isdigit() or int(limit) < 1 or int(window) < 1:
        raise argparse.ArgumentTypeError(f"expected LIMIT/WINDOW (requests per window seconds), got {text!r}")
    return int(limit), int(window)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m daemon.simnet", description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100, help="well-behaved did:plc accounts")
    parser.add_argument("--web-accounts", type=int, default=0, help="well-behaved did:web accounts")
    parser.add_argument("--records", type=int, default=10, help="records per account and collection")
    parser.add_argument("--hosts", type=int, default=1, help="PDS hosts")
    parser.add_argument("--collections", default=",".join(DEFAULT_COLLECTIONS), help="comma-separated NSIDs")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every PDS response")
    parser.add_argument("--plc-latency", type=float, default=0.0, help="seconds added to every DID document")
    parser.add_argument(
        "--hostile", type=_hostile, action="append", default=[], metavar="MODE=COUNT", help="hostile accounts"
    )
    parser.add_argument("--cursor-on-last-page", action="store_true", help="reference-PDS cursor behaviour")
    parser.add_argument("--demo", action="store_true", help="serve demo_spec() (ignores the sizing options)")
    parser.add_argument("--record-requests", action="store_true", help="keep every path and query seen")
    parser.add_argument("--page-cache-mib", type=int, default=DEFAULT_PAGE_CACHE_BYTES // 1_048_576)
    parser.add_argument("--repo-cache-mib", type=int, default=DEFAULT_REPO_CACHE_BYTES // 1_048_576)
    parser.add_argument(
        "--rate-limit",
        type=_rate,
        metavar="LIMIT/WINDOW",
        help="per-IP limit of every PDS host, e.g. 3000/300",
    )
    parser.add_argument(
        "--repo-rate-limit", type=_rate, metavar="LIMIT/WINDOW", help="getRepo's own limit (default 6000/300)"
    )
    parser.add_argument("--no-get-blocks", action="store_true", help="PDS hosts without sync.getBlocks")
    parser.add_argument("--port-file", type=Path, help="where to write the URLs as JSON")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> NetworkSpec:
    """The spec the command line describes."""
    collections = tuple(c for c in args.collections.split(",") if c)
    options = None
    if args.rate_limit or args.repo_rate_limit or args.no_get_blocks:
        options = HostOptions(
            get_blocks=not args.no_get_blocks,
            rate_limit=args.rate_limit,
            repo_rate_limit=args.repo_rate_limit,
        )
    if args.demo:
        spec = demo_spec(collections)
        if options is None:
            return spec
        return replace(spec, host_options=dict.fromkeys(range(spec.pds_hosts), options))
    return build_spec(
        args.accounts,
        args.records,
        collections,
        args.hosts,
        dict(args.hostile),
        web_accounts=args.web_accounts,
        latency=args.latency,
        plc_latency=args.plc_latency,
        cursor_on_last_page=args.cursor_on_last_page,
        host_options=options,
    )


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


async def run(args: argparse.Namespace, spec: NetworkSpec) -> None:
    """Serve ``spec`` until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_network(
            spec,
            record_requests=args.record_requests,
            page_cache_bytes=args.page_cache_mib * 1_048_576,
            repo_cache_bytes=args.repo_cache_mib * 1_048_576,
        ) as net:
            description = {**net.describe(), "pid": os.getpid(), "accounts": len(spec.accounts)}
            text = json.dumps(description, indent=2)
            if args.port_file is not None:
                await trio.to_thread.run_sync(_write_atomically, args.port_file, text)
            print(text, flush=True)
            try:
                async for _ in signals:
                    break
            finally:
                if args.port_file is not None:
                    args.port_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ConfigError as error:
        print(f"simnet: {error.message}", file=sys.stderr)
        return 2
    trio.run(run, args, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
