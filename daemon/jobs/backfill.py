"""The per-pair ``backfill`` job (SPEC 6 step 2): page through listRecords into the records queue.

Every page's records and the job's cursor checkpoint commit in one transaction, so a retried or restarted
job resumes after its last saved page, and a record is never queued twice while unacknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from daemon.atproto.pages import parse_list_records_page
from daemon.engine.context import JobContext
from daemon.errors import AccountUnavailable, Code, ProtocolViolation, UpstreamHTTPError
from daemon.jobs.resolver import Resolver
from daemon.metrics import Metrics
from daemon.net.fetch import Fetcher, Response, origin_key
from daemon.store.database import Database
from daemon.store.models import Job

LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords"

# PDS 400 error names that mean the account is gone or unavailable (SPEC 6.1): failed at once.
ACCOUNT_ERRORS = {
    "RepoNotFound": "repo_not_found",
    "RepoTakendown": "repo_takendown",
    "RepoSuspended": "repo_suspended",
    "RepoDeactivated": "repo_deactivated",
}

log = structlog.get_logger("backfilld.backfill")


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    page_size: int
    page_timeout: float
    max_pages: int


def account_error(response: Response) -> AccountUnavailable | None:
    """The permanent account error a 400 response names, if it names one."""
    try:
        body = response.json()
    except ProtocolViolation:
        return None
    if not isinstance(body, dict):
        return None
    name, message = body.get("error"), body.get("message")
    text = message if isinstance(message, str) else ""
    if isinstance(name, str) and name in ACCOUNT_ERRORS:
        return AccountUnavailable(f"PDS says {name}: {text[:200]}", code=ACCOUNT_ERRORS[name])
    if name == "InvalidRequest" and "could not find repo" in text.lower():
        return AccountUnavailable(f"PDS says InvalidRequest: {text[:200]}", code=Code.REPO_NOT_FOUND)
    return None


class BackfillHandler:
    """Runs ``backfill`` jobs."""

    def __init__(
        self,
        db: Database,
        fetcher: Fetcher,
        resolver: Resolver,
        settings: BackfillSettings,
        metrics: Metrics,
    ) -> None:
        self._db = db
        self._fetcher = fetcher
        self._resolver = resolver
        self._settings = settings
        self._metrics = metrics

    async def __call__(self, job: Job, ctx: JobContext) -> None:
        assert job.did is not None
        identity = await self._resolver.resolve(job.did)
        async with ctx.host_slot(origin_key(identity.pds)):
            await self._pages(job, ctx, identity.pds)

    async def _pages(self, job: Job, ctx: JobContext, pds: str) -> None:
        assert job.did is not None
        settings = self._settings
        url = pds + LIST_RECORDS
        cursor, pages = job.cursor, job.pages
        if pages and cursor is None:
            return  # every page was saved before the process stopped; only the final state was lost
        seen: set[str] = {cursor} if cursor else set()
        pages_metric = self._metrics.pages_fetched.labels(job.collection)
        records_metric = self._metrics.records_enqueued.labels(job.collection)
        skipped_metric = self._metrics.records_skipped.labels(job.collection)
        while True:
            ctx.check_interrupted()
            params: dict[str, str | int] = {
                "repo": job.did,
                "collection": job.collection,
                "limit": settings.page_size,
            }
            if cursor:
                params["cursor"] = cursor
            response = await self._fetcher.get_json(
                url, params=params, timeout=settings.page_timeout, host_class="pds"
            )
            if response.status == 404:
                if pages == 0:
                    log.debug("no such collection on the repo (first-page 404)")
                    return
                raise ProtocolViolation(
                    f"listRecords answered 404 after {pages} pages", code=Code.NOT_FOUND_MID_PAGINATION
                )
            if response.status == 400 and (unavailable := account_error(response)) is not None:
                raise unavailable
            if not 200 <= response.status < 300:
                raise UpstreamHTTPError(
                    f"listRecords answered HTTP {response.status}", status=response.status
                )
            page = parse_list_records_page(
                response.json(), did=job.did, collection=job.collection, page_size=settings.page_size
            )
            if page.cursor is not None and page.cursor in seen:
                raise ProtocolViolation(
                    f"listRecords returned cursor {page.cursor[:100]!r} twice", code=Code.REPEATED_CURSOR
                )
            added = await self._db.run(
                self._db.store.record_page,
                job_id=job.id,
                run_id=job.run_id,
                did=job.did,
                collection=job.collection,
                records=[(r.rkey, r.cid) for r in page.records],
                cursor=page.cursor,
                skipped=page.skipped,
                now=ctx.now(),
            )
            pages += 1
            pages_metric.inc()
            records_metric.inc(added)
            if page.skipped:
                skipped_metric.inc(page.skipped)
                log.warning("skipped invalid records", count=page.skipped, reasons=list(page.skipped_reasons))
            if page.cursor is None:
                return
            if pages >= settings.max_pages:
                raise ProtocolViolation(
                    f"more than {settings.max_pages} listRecords pages (max_pages_per_collection)",
                    code=Code.TOO_MANY_PAGES,
                )
            seen.add(page.cursor)
            cursor = page.cursor
