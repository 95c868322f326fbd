"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the daemon's CPU goes.

``python -m bench.profile FILE [--top N]`` prints the samples per thread, the share of each library (by the
innermost frame that belongs to a known library or module), and the top functions by self and by inclusive
samples. ``make bench`` does not need it; ``python -m bench.run a --profile py-spy --keep`` produces FILE.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")

# Library buckets, tested in order against a frame's file path.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("daemon.store (SQL, in its thread)", "daemon/store/"),
    ("daemon.atproto (validation, decoding)", "daemon/atproto/"),
    ("daemon.net (fetch, hosts, guard, rate limits)", "daemon/net/"),
    ("daemon.metrics + prometheus_client", "daemon/metrics.py"),
    ("daemon.metrics + prometheus_client", "prometheus_client/"),
    ("structlog", "structlog/"),
    ("daemon.jobs (backfill, verified walk, resolver)", "daemon/jobs/"),
    ("daemon.engine (dispatcher, workers)", "daemon/engine/"),
    ("daemon.admin (routes)", "daemon/admin/"),
    ("daemon (process, cli, ...)", "daemon/"),
    ("h11", "h11/"),
    ("httpcore", "httpcore/"),
    ("httpx", "httpx/"),
    ("admin server (quart, hypercorn, werkzeug, flask)", "quart"),
    ("admin server (quart, hypercorn, werkzeug, flask)", "hypercorn/"),
    ("admin server (quart, hypercorn, werkzeug, flask)", "werkzeug/"),
    ("admin server (quart, hypercorn, werkzeug, flask)", "flask/"),
    ("json", "json/"),
    ("trio threads (to_thread)", "trio/_threads.py"),
    ("trio threads (to_thread)", "trio/_core/_thread_cache.py"),
    ("trio", "trio/"),
    ("other stdlib / anyio / ...", ""),
)


def parse(path: Path) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(thread, frames outermost first as (function, file), samples) for every line of the profile."""
    stacks = []
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        parts = match["stack"].split(";")
        thread, frames = parts[0], []
        for part in parts[1:]:
            frame = _FRAME.match(part)
            frames.append((frame["func"], frame["file"]) if frame else (part, ""))
        stacks.append((thread, frames, int(match["count"])))
    return stacks


def bucket(frames: list[tuple[str, str]]) -> str:
    """The library the innermost frame belongs to."""
    if not frames:
        return "other stdlib / anyio / ..."
    file = frames[-1][1]
    for name, marker in BUCKETS:
        if marker in file:
            return name
    return "other stdlib / anyio / ..."


def thread_name(thread: str) -> str:
    if "MainThread" in thread:
        return "MainThread (trio)"
    return "other threads (SQLite)"


def summarise(path: Path, top: int, main_only: bool = False) -> str:
    stacks = [s for s in parse(path) if not main_only or "MainThread" in s[0]]
    total = sum(count for _, _, count in stacks)
    threads: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for thread, frames, count in stacks:
        threads[thread_name(thread)] += count
        buckets[bucket(frames)] += count
        if frames:
            func, file = frames[-1]
            self_time[f"{func} ({file})"] += count
        for name in {f"{func} ({file})" for func, file in frames}:
            inclusive[name] += count
    out = [f"{total} samples (non-idle) in {path.name}", "", "by thread:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    out += ["", "by library (innermost frame):"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in buckets.most_common()]
    out += ["", f"top {top} by self samples:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in self_time.most_common(top)]
    out += ["", f"top {top} by inclusive samples:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--main", action="store_true", help="only the main thread (the trio loop)")
    args = parser.parse_args(argv)
    print(summarise(args.profile, args.top, args.main))
    return 0


if __name__ == "__main__":
    sys.exit(main())
