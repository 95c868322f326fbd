"""The per-collection ``discover`` job (SPEC 6, discovery): relay listReposByCollection into pairs.

Each page commits its DIDs (up to the run's ``max_discovered_dids`` union cap), the backfill jobs for them
(each new DID times the run's collections) and the relay cursor together, so jobs fan out as pages arrive
and a restart continues where discovery stopped. Failures are recorded on the run; the job itself is
retried like any other, while the other collections go on.

Reaching ``max_discovery_pages_per_collection`` ends that collection's discovery early; it is logged, not
an error, because what was found is still good (decision recorded in docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from daemon.atproto.pages import parse_list_repos_page
from daemon.engine.context import JobContext
from daemon.errors import BackfillError, Code, JobError, ProtocolViolation, UpstreamHTTPError
from daemon.metrics import Metrics
from daemon.net.budget import without_frames
from daemon.net.fetch import Fetcher
from daemon.store.database import Database
from daemon.store.models import Job

LIST_REPOS = "/xrpc/com.atproto.sync.listReposByCollection"

log = structlog.get_logger("backfilld.discovery")


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    relay: str
    page_size: int
    timeout: float
    max_pages: int
    max_dids: int


class DiscoverHandler:
    """Runs ``discover`` jobs."""

    def __init__(
        self,
        db: Database,
        fetcher: Fetcher,
        settings: DiscoverySettings,
        metrics: Metrics,
        *,
        ordered: bool = True,
    ) -> None:
        self._ordered = ordered
        self._db = db
        self._fetcher = fetcher
        self._settings = settings
        self._metrics = metrics

    async def __call__(self, job: Job, ctx: JobContext) -> None:
        assert job.run_id is not None
        try:
            try:
                await self._pages(job, ctx, job.run_id)
            except BackfillError as exc:
                # a relay page and its decoded form must not outlive their memory budget in the frames
                raise without_frames(exc) from None
        except JobError as exc:
            log.warning("discovery failed", error_code=exc.code, error=exc.message)
            await self._db.run(
                self._db.store.set_discovery_error,
                job.lease,
                error=f"{exc.code}: {exc.message}",
                now=ctx.now(),
            )
            raise
        await self._db.run(self._db.store.set_discovery_error, job.lease, error=None, now=ctx.now())

    async def _pages(self, job: Job, ctx: JobContext, run_id: int) -> None:
        settings, store = self._settings, self._db.store
        url = settings.relay + LIST_REPOS
        cursor, pages = job.cursor, job.pages
        if pages and cursor is None:
            return  # every page was saved before the process stopped; only the final state was lost
        seen: set[str] = {cursor} if cursor else set()
        if await self._db.run(store.run_did_count, run_id) >= settings.max_dids:
            log.info("discovery stopped: the run reached max_discovered_dids", max=settings.max_dids)
            return
        while True:
            ctx.check_interrupted()
            if pages >= settings.max_pages:
                log.warning("discovery stopped at max_discovery_pages_per_collection", pages=pages)
                return
            params: dict[str, str | int] = {"collection": job.collection, "limit": settings.page_size}
            if cursor:
                params["cursor"] = cursor
            async with self._fetcher.request(
                url, params=params, timeout=settings.timeout, host_class="relay"
            ) as response:
                if not 200 <= response.status < 300:
                    raise UpstreamHTTPError(
                        f"listReposByCollection answered HTTP {response.status}", status=response.status
                    )
                page = parse_list_repos_page(await response.json_budgeted())
                if page.cursor is not None and page.cursor in seen:
                    raise ProtocolViolation(
                        f"listReposByCollection returned cursor {page.cursor[:100]!r} twice",
                        code=Code.REPEATED_CURSOR,
                    )
                # written while the response still holds its budget, which covers the page's DIDs too
                result = await self._db.run(
                    store.record_discovery_page,
                    job.lease,
                    run_id=run_id,
                    collection=job.collection,
                    dids=page.dids,
                    cursor=page.cursor,
                    max_dids=settings.max_dids,
                    now=ctx.now(),
                    ordered=self._ordered,
                )
                next_cursor = page.cursor
                del page, response
            pages += 1
            self._metrics.discovery_pages.labels(job.collection).inc()
            self._metrics.discovered_dids.inc(result.new_dids)
            if result.jobs_enqueued:
                ctx.notify_new_work()
            if next_cursor is None or result.cap_reached:
                return
            seen.add(next_cursor)
            cursor = next_cursor
