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
    BackfillError,
    Code,
    LimitExceeded,
    ProtocolViolation,
    SyntaxValidationError,
    UpstreamHTTPError,
)
from daemon.jobs.account import AccountMoved, unavailable_account
from daemon.jobs.resolver import Resolver
from daemon.metrics import Metrics
from daemon.net.budget import GENERIC_DECODE_FACTOR, TYPED_DECODE_FACTOR, without_frames
from daemon.net.fetch import Fetcher, Response, origin_key
from daemon.store.database import Database
from daemon.store.models import Job, ListedRecord

LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords"
SKIP_CID_MISMATCH = "cid_mismatch"

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
        cursor, pages = job.cursor, job.pages
        if pages and cursor is None and not moved:
            return  # every page was saved before the process stopped; only the final state was lost
        seen: set[str] = {cursor} if cursor else set()
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
            try:
                next_cursor = await self._page(job, ctx, pds, params, pages=pages, seen=seen)
            except BackfillError as exc:
                raise without_frames(exc) from None
            pages += 1
            if next_cursor is None:
                return
            seen.add(next_cursor)
            cursor = next_cursor

    async def _page(
        self,
        job: Job,
        ctx: JobContext,
        pds: str,
        params: dict[str, str | int],
        *,
        pages: int,
        seen: set[str],
    ) -> str | None:
        """Fetch, check and write one page; its next cursor.

        The response's memory budget (its body and the decode's worst case, which also covers the page's
        records as kept for the write) is held until the page is written, and nothing of the page outlives
        this call: the next page is fetched with none of this one still in memory.
        """
        assert job.did is not None
        settings = self._settings
        async with self._fetcher.request(
            pds + LIST_RECORDS, params=params, timeout=settings.page_timeout, host_class="pds"
        ) as response:
            if response.status == 404:
                if pages == 0:
                    log.debug("no such collection on the repo (first-page 404)")
                    records: Sequence[ListedRecord] = ()
                    next_cursor: str | None = None
                    skipped, reasons = 0, ()
                    present: tuple[str, ...] = ()
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
                skipped = page.skipped + len(mismatched)
                reasons = (*page.skipped_reasons, *((SKIP_CID_MISMATCH,) if mismatched else ()))
                present = (*page.present, *mismatched)  # skipped, but still in the collection
                del page
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
                present=present,
            )
        ctx.finished(result.finished)
        self._metrics.pages_fetched.labels(job.collection).inc()
        self._metrics.records_enqueued.labels(job.collection).inc(result.written)
        if skipped:
            self._metrics.records_skipped.labels(job.collection).inc(skipped)
            log.warning("skipped invalid records", count=skipped, reasons=list(reasons))
        return next_cursor


async def _checked_records(
    response: Response, refs: Sequence[RecordRef]
) -> tuple[list[ListedRecord], list[str]]:
    """The page's records whose value re-encodes to their CID, as JSON text; and the keys of those that
    did not.

    Values are decoded one at a time, so the worst case of the largest one's decode is reserved from the
    memory budget once for the page, and given back once the decoded values are gone (the texts kept are
    covered by the page's own reservation).
    """
    largest = max((len(ref.value) for ref in refs if ref.value is not None), default=0)
    reserved = GENERIC_DECODE_FACTOR * largest
    await response.reserve_bytes(reserved)
    checked: list[ListedRecord] = []
    mismatched: list[str] = []
    try:
        for ref in refs:
            text = None if ref.value is None else _checked_text(ref.value, ref.cid)
            if text is None:
                mismatched.append(ref.rkey)
            else:
                checked.append(ListedRecord(ref.rkey, ref.cid, text))
    finally:
        if response.holder is not None:
            response.holder.give(reserved)
    return checked, mismatched


def _checked_text(raw: bytes, cid: str) -> str | None:
    """The value as compact JSON text if it re-encodes to ``cid``, else None (nothing decoded outlives it)."""
    try:
        value = msgspec.json.decode(raw)
        if cid_for_record(value) != cid:
            return None
    except (msgspec.DecodeError, ProtocolViolation, SyntaxValidationError, RecursionError):
        return None
    return msgspec.json.encode(value).decode()
