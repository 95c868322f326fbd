"""The per-pair ``backfill`` job in list mode (SPEC 6 step 2, 6.3): listRecords pages into the queue.

Every page is reconciled against the pair's delivered set and committed with the job's cursor checkpoint
in one transaction (:meth:`daemon.store.store.Store.apply_page`), so a retried or restarted job resumes
after its last saved page and never writes one change twice; the last page (no cursor) completes the
listing, which is when records gone from the account are written as deletes.

Each record's value is re-encoded to DAG-CBOR and must hash to the CID listRecords gave; a record whose
value does not match (or has none) is skipped and counted as ``cid_mismatch``: list mode proves nothing
about the account's signature (that is verified mode), but a consumer never gets a value whose CID lies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import structlog

from daemon.atproto.cbor import cid_for_record
from daemon.atproto.pages import RecordRef, parse_list_records_page
from daemon.engine.context import JobContext
from daemon.errors import (
    Code,
    LimitExceeded,
    ProtocolViolation,
    SyntaxValidationError,
    UpstreamHTTPError,
)
from daemon.jobs.account import AccountMoved, unavailable_account
from daemon.jobs.resolver import Resolver
from daemon.metrics import Metrics
from daemon.net.budget import GENERIC_DECODE_FACTOR, TYPED_DECODE_FACTOR
from daemon.net.fetch import Fetcher, Response, origin_key
from daemon.store.database import Database
from daemon.store.models import Job, ListedRecord

LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords"
SKIP_CID_MISMATCH = "cid_mismatch"
# A value this large is decoded only with its worst-case cost reserved from the memory budget first.
LARGE_VALUE_BYTES = 65_536

log = structlog.get_logger("backfilld.backfill")


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    page_size: int
    page_timeout: float
    max_pages: int


class BackfillHandler:
    """Runs ``backfill`` jobs in list mode."""

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
        try:
            async with ctx.host_slot(origin_key(identity.pds)):
                await self._pages(job, ctx, identity.pds)
        except AccountMoved as moved:
            log.info("account moved to another PDS; continuing there", pds=moved.identity.pds)
            try:
                async with ctx.host_slot(origin_key(moved.identity.pds)):
                    await self._pages(job, ctx, moved.identity.pds, moved=True)
            except AccountMoved:
                raise ProtocolViolation("the account moved again while it was being read") from None

    async def _pages(self, job: Job, ctx: JobContext, pds: str, *, moved: bool = False) -> None:
        assert job.did is not None
        settings = self._settings
        url = pds + LIST_RECORDS
        cursor, pages = job.cursor, job.pages
        if pages and cursor is None and not moved:
            return  # every page was saved before the process stopped; only the final state was lost
        seen: set[str] = {cursor} if cursor else set()
        pages_metric = self._metrics.pages_fetched.labels(job.collection)
        records_metric = self._metrics.records_enqueued.labels(job.collection)
        skipped_metric = self._metrics.records_skipped.labels(job.collection)
        while True:
            ctx.check_interrupted()
            if pages >= settings.max_pages:
                # checked before fetching: a retry would only fetch (and write) one page more each time
                raise LimitExceeded(
                    f"more than {settings.max_pages} listRecords pages (max_pages_per_collection)",
                    code=Code.TOO_MANY_PAGES,
                )
            params: dict[str, str | int] = {
                "repo": job.did,
                "collection": job.collection,
                "limit": settings.page_size,
            }
            if cursor:
                params["cursor"] = cursor
            async with self._fetcher.request(
                url, params=params, timeout=settings.page_timeout, host_class="pds"
            ) as response:
                if response.status == 404:
                    if pages == 0:
                        log.debug("no such collection on the repo (first-page 404)")
                        records: Sequence[ListedRecord] = ()
                        next_cursor: str | None = None
                        skipped, reasons = 0, ()
                    else:
                        raise ProtocolViolation(
                            f"listRecords answered 404 after {pages} pages",
                            code=Code.NOT_FOUND_MID_PAGINATION,
                        )
                else:
                    if response.status == 400:
                        await unavailable_account(
                            self._fetcher,
                            self._resolver,
                            job.did,
                            pds,
                            response,
                            timeout=settings.page_timeout,
                        )
                    if not 200 <= response.status < 300:
                        raise UpstreamHTTPError(
                            f"listRecords answered HTTP {response.status}", status=response.status
                        )
                    await response.reserve(TYPED_DECODE_FACTOR)
                    page = parse_list_records_page(
                        response.body, did=job.did, collection=job.collection, page_size=settings.page_size
                    )
                    next_cursor = page.cursor
                    if next_cursor is not None and next_cursor in seen:
                        raise ProtocolViolation(
                            f"listRecords returned cursor {next_cursor[:100]!r} twice",
                            code=Code.REPEATED_CURSOR,
                        )
                    records, mismatched = await _checked_records(response, page.records)
                    skipped = page.skipped + mismatched
                    reasons = (*page.skipped_reasons, *((SKIP_CID_MISMATCH,) if mismatched else ()))
            result = await self._db.run(
                self._db.store.apply_page,
                job.lease,
                did=job.did,
                collection=job.collection,
                records=records,
                cursor=next_cursor,
                skipped=skipped,
                complete=next_cursor is None,
                now=ctx.now(),
            )
            pages += 1
            pages_metric.inc()
            records_metric.inc(result.written)
            if skipped:
                skipped_metric.inc(skipped)
                log.warning("skipped invalid records", count=skipped, reasons=list(reasons))
            if next_cursor is None:
                return
            seen.add(next_cursor)
            cursor = next_cursor


async def _checked_records(response: Response, refs: Sequence[RecordRef]) -> tuple[list[ListedRecord], int]:
    """The page's records whose value re-encodes to their CID, as JSON text; and how many did not."""
    checked: list[ListedRecord] = []
    mismatched = 0
    for ref in refs:
        if ref.value is None:
            mismatched += 1
            continue
        if len(ref.value) > LARGE_VALUE_BYTES:
            await response.reserve_bytes(GENERIC_DECODE_FACTOR * len(ref.value))
        try:
            value = msgspec.json.decode(ref.value)
            matches = cid_for_record(value) == ref.cid
        except (msgspec.DecodeError, ProtocolViolation, SyntaxValidationError, RecursionError):
            matches = False
        if not matches:
            mismatched += 1
            continue
        checked.append(ListedRecord(ref.rkey, ref.cid, msgspec.json.encode(value).decode()))
    return checked, mismatched
