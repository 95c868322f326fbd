"""The daemon process (SPEC 3): one root nursery holding the admin server, the engine, signals, watchdog.

Start-up order: open the database (taking the instance lock, migrating), recover interrupted jobs, start
the engine, start the admin server (``nursery.start``: ready means listening), then tell systemd READY.

Shutdown on the first SIGTERM/SIGINT: STOPPING, the admin server stops accepting, the engine stops
claiming and running jobs stop after their current page; after ``shutdown_grace`` seconds whatever still
runs is cancelled (its job is pending again at the next start). A second signal cancels at once. The
database is checkpointed and closed either way, and the process exits 0. Closing has a deadline
(:data:`FETCHER_CLOSE_TIMEOUT`, :data:`DATABASE_CLOSE_TIMEOUT`): a close that hangs is logged and given up,
so that a hanging disk cannot keep a stopping daemon alive (the WAL keeps every committed transaction; the
next start checkpoints it).

A failing database never ends the process (SPEC 7): the engine retries, the admin routes answer 503, and
the watchdog keeps telling systemd that the process is alive (it is: only the database is not), its
STATUS line saying that the database fails.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from daemon import __version__
from daemon.admin.app import create_app
from daemon.admin.server import serve_admin
from daemon.admin.token import load_admin_token
from daemon.config import Config
from daemon.engine.backoff import RetryPolicy
from daemon.engine.runner import Engine, EngineSettings, JobHandler
from daemon.errors import StoreError
from daemon.jobs.backfill import BackfillHandler, BackfillSettings
from daemon.jobs.discovery import DiscoverHandler, DiscoverySettings
from daemon.jobs.resolver import Resolver, ResolverSettings
from daemon.jobs.verified import VerifiedHandler, VerifiedSettings
from daemon.metrics import Metrics
from daemon.net.fetch import Fetcher
from daemon.net.guard import AddressResolver
from daemon.net.hosts import HostLimiter
from daemon.process.health import PING_TIMEOUT, DatabaseProbe
from daemon.process.sdnotify import Notifier
from daemon.store.open import open_database
from daemon.store.postgres import redact

log = structlog.get_logger("backfilld")

# How long the shielded close at shutdown may take, per resource, before it is given up (the unit's
# TimeoutStopSec must cover shutdown_grace plus both).
FETCHER_CLOSE_TIMEOUT = 5.0
DATABASE_CLOSE_TIMEOUT = 10.0


class Daemon:
    """Everything one running backfilld holds. ``await nursery.start(daemon.run)``; then ``stop()``."""

    def __init__(
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        address_resolver: AddressResolver | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.admin_token = load_admin_token(config.admin.token_file)
        self.started_monotonic = time.monotonic()
        self.db = open_database(config.daemon.database)
        net, limits = config.network, config.limits
        self.hosts = HostLimiter(
            per_host_concurrency=net.per_host_concurrency, per_host_rate=net.per_host_rate, now=wall_clock
        )
        self.fetcher = Fetcher(
            network=net,
            max_response_bytes=limits.max_response_bytes,
            hosts=self.hosts,
            resolver=address_resolver,
            wall_clock=wall_clock,
            on_request=self.metrics.observe_request,
            on_pause=self.metrics.host_pauses.inc,
            trusted_pool_size=config.daemon.workers + 4,
        )
        resolver = Resolver(
            self.db,
            self.fetcher,
            ResolverSettings(
                plc_directory=config.atproto.plc_directory,
                relay=config.atproto.relay,
                ttl=limits.did_cache_ttl,
                timeout=limits.page_timeout,
                allow_private_addresses=net.allow_private_addresses,
            ),
            wall_clock=wall_clock,
        )
        handlers: dict[str, JobHandler] = {
            "discover": DiscoverHandler(
                self.db,
                self.fetcher,
                DiscoverySettings(
                    relay=config.atproto.relay,
                    page_size=limits.discovery_page_size,
                    timeout=limits.discovery_timeout,
                    max_pages=limits.max_discovery_pages_per_collection,
                    max_dids=limits.max_discovered_dids,
                ),
                self.metrics,
                ordered=config.sync.ordered_collections,
            ),
            "backfill": self._backfill_handler(resolver),
        }
        self.engine = Engine(
            self.db,
            settings=EngineSettings(
                workers=config.daemon.workers,
                max_records_queue=config.daemon.max_records_queue,
                per_host_jobs=net.per_host_concurrency,
                lease_timeout=config.daemon.lease_timeout if config.daemon.postgres else None,
            ),
            handlers=handlers,
            policy=RetryPolicy(
                max_attempts=config.retry.max_attempts,
                base=config.retry.backoff_base,
                cap=config.retry.backoff_cap,
                rng=rng or random.Random(),
            ),
            metrics=self.metrics,
            wall_clock=wall_clock,
            paused_hosts=self.paused_hosts,
        )
        self.probe = DatabaseProbe(self.db)
        self._queue_depth: int | None = None
        self._depth_asked: float | None = None
        self._stop_requested = trio.Event()
        self._admin_closed = trio.Event()
        self.listening: list[str] = []

    async def database_answers(self) -> bool:
        """True when the database answered a ping within a second (``/healthz``)."""
        return await self.probe.answers()

    def _backfill_handler(self, resolver: Resolver) -> JobHandler:
        """The backfill job of ``sync.mode``: verified (SPEC 6.2) or list (6.3)."""
        limits, sync = self.config.limits, self.config.sync
        if sync.mode == "verified":
            return VerifiedHandler(
                self.db,
                self.fetcher,
                resolver,
                VerifiedSettings(
                    page_timeout=limits.page_timeout,
                    get_blocks_batch=sync.get_blocks_batch,
                    max_car_bytes=sync.max_car_bytes,
                ),
                self.metrics,
            )
        return BackfillHandler(
            self.db,
            self.fetcher,
            resolver,
            BackfillSettings(
                page_size=limits.page_size,
                page_timeout=limits.page_timeout,
                max_pages=limits.max_pages_per_collection,
            ),
            self.metrics,
        )

    def paused_hosts(self) -> dict[str, float]:
        """The PDS hosts paused now (a 429, or a rate-limit window spent) and until when."""
        return self.hosts.paused()

    def hosts_paused_count(self) -> int:
        return len(self.paused_hosts())

    def host_status(self) -> list[dict[str, Any]]:
        """Per-host in-flight requests and pause state, for ``/_admin/status``."""
        running = self.engine.host_jobs
        states = {s.host: s for s in self.hosts.snapshot()}
        out = []
        for host in sorted(set(states) | set(running)):
            state = states.get(host)
            out.append(
                {
                    "host": host,
                    "jobs_running": running.get(host, 0),
                    "in_flight": state.in_flight if state else 0,
                    "waiting": state.waiting if state else 0,
                    "paused": bool(state and state.paused_until),
                    "paused_until": state.paused_until if state else None,
                }
            )
        return out

    def stop(self) -> None:
        """Begin a graceful shutdown (the first signal)."""
        self._stop_requested.set()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped; reports the admin listen addresses when ready."""
        grace = self.config.daemon.shutdown_grace
        try:
            async with trio.open_nursery() as nursery:
                self.probe.attach(nursery)
                engine_scope = trio.CancelScope()
                engine_done = trio.Event()

                async def run_engine(
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                ) -> None:
                    with engine_scope:
                        await self.engine.run(task_status=task_status)
                    engine_done.set()

                await nursery.start(run_engine)
                app = create_app(self)
                self.listening = await nursery.start(
                    serve_admin, app, self.config.admin.listen, self._admin_closed.wait
                )
                if self.notifier.watchdog_interval is not None:
                    nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                self.notifier.notify(READY="1", STATUS=f"listening on {', '.join(self.listening)}")
                log.info(
                    "backfilld ready",
                    version=__version__,
                    admin=self.listening,
                    workers=self.config.daemon.workers,
                    database=redact(str(self.config.daemon.database)),
                    admin_auth="token" if self.admin_token else "disabled",
                )
                task_status.started(self.listening)
                await self._stop_requested.wait()
                self.notifier.notify(STOPPING="1", STATUS="draining running jobs")
                log.info("shutting down: draining running jobs", grace=grace, busy=self.engine.busy)
                self._admin_closed.set()
                self.engine.stop()
                with trio.move_on_after(grace):
                    await engine_done.wait()
                if not engine_done.is_set():
                    log.warning("shutdown grace expired; cancelling running jobs", busy=self.engine.busy)
                    engine_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            self.probe.attach(None)
            await close_within(
                ("fetcher", self.fetcher.aclose, FETCHER_CLOSE_TIMEOUT),
                ("database", self.db.aclose, DATABASE_CLOSE_TIMEOUT),
            )
            if self.listening:  # else it never started, and the caller reports why in one line
                log.info("backfilld stopped")

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` every ``interval`` while the event loop runs, whatever the database does.

        The STATUS line comes from what is known without waiting on the database: ``db.failing``, and a
        queue depth a separate task refreshes (and whether that refresh is stuck behind a hung call).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_queue_depth, interval)
            while True:
                self.notifier.notify(WATCHDOG="1", STATUS=self.status_line())
                await trio.sleep(interval)

    async def _refresh_queue_depth(self, interval: float) -> None:
        while True:
            self._depth_asked = trio.current_time()
            try:
                self._queue_depth = await self.db.run(self.db.store.queue_depth)
            except StoreError:
                pass  # db.failing says why; the STATUS line shows it
            finally:
                self._depth_asked = None
            await trio.sleep(interval)

    def status_line(self) -> str:
        """The systemd STATUS text: workers and queue depth, or why the database is not answering."""
        failing = self.db.failing
        if failing is not None:
            return f"database failing ({failing.code}): {failing.message}; retrying"
        asked = self._depth_asked
        if asked is not None and trio.current_time() - asked > PING_TIMEOUT:
            return "database not answering; waiting"
        busy, total = self.engine.busy, self.config.daemon.workers
        depth = "?" if self._queue_depth is None else str(self._queue_depth)
        return f"{busy}/{total} workers busy; {depth} records queued"


async def close_within(*closers: tuple[str, Callable[[], Awaitable[None]], float]) -> bool:
    """Run each ``(name, aclose, timeout)`` in turn, shielded from cancellation but given up after its
    ``timeout`` seconds (logged); an error is logged too and does not stop the next close. True when every
    close finished cleanly."""
    clean = True
    for name, aclose, timeout in closers:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            try:
                await aclose()
            except Exception:
                clean = False
                log.exception("shutdown: closing failed", resource=name)
        if scope.cancelled_caught:
            clean = False
            log.error("shutdown: closing timed out; giving up", resource=name, timeout=timeout)
    return clean


async def run_until_signalled(daemon: Daemon) -> None:
    """Run ``daemon``; the first SIGTERM/SIGINT drains, a second one cancels at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        log.info("signal received; stopping gracefully", signal=name)
                        daemon.stop()
                    else:
                        log.warning("second signal; cancelling now", signal=name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()
