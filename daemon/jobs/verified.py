"""The per-pair ``backfill`` job in verified mode (SPEC 6.2): records proven against the signed commit.

For each account, once per run, the handler probes ``com.atproto.sync.getRecord`` for a key at the start
of the job's collection: its proof CAR holds the signed commit and the MST nodes down to that key. The
commit's signature is checked under the ``#atproto`` key of the DID document (after one fresh resolution
if it fails: the key may have rotated), and the verified commit is saved for the run, so the account's other
collections neither fetch nor check it again.

Then the job walks the MST from ``commit.data``, only into subtrees that can hold ``<collection>/...``
keys, resuming after the last key it wrote at the same commit (:meth:`Store.begin_walk`). The blocks it
still needs come from the cache of this account's blocks, then from ``getBlocks`` (``get_blocks_batch``
CIDs a request), or, for a small repo (the root node's layer tells) or a PDS without ``getBlocks``, from
one ``getRepo`` of the whole repo. Every block is hashed against its CID, every node checked
(:mod:`daemon.atproto.mstwalk`); a block the PDS does not deliver is an error, never a skip. Records come
out in key order and each batch is written with its checkpoint in one transaction, reconciled against the
pair's delivered set; the walk's end is the listing's end, where deletes are written.

If the repo moved on meanwhile (``getBlocks`` says "Could not find cids": the PDS deletes blocks a newer
commit no longer needs), the account's commit is fetched and verified again and the walk starts over at
the newer commit, in a new listing pass, so reconcile stays exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import structlog
import trio

from daemon.atproto.car import CarReader
from daemon.atproto.cbor import decode_record
from daemon.atproto.cid import RAW, Cid, format_cid, parse_cid
from daemon.atproto.commit import Commit, decode_commit, verify_commit
from daemon.atproto.diddoc import DidIdentity
from daemon.atproto.keys import PublicKey, parse_multikey
from daemon.atproto.mst import decode_node, key_layer
from daemon.atproto.mstwalk import KeyRange, MstRecord, MstWalk
from daemon.atproto.syntax import is_valid_record_key
from daemon.engine.context import JobContext
from daemon.errors import (
    Code,
    IdentityError,
    InvalidSignature,
    JobError,
    ProtocolViolation,
    SyntaxValidationError,
    UpstreamHTTPError,
)
from daemon.jobs.account import AccountMoved, account_error, not_implemented, unavailable_account
from daemon.jobs.blockcache import BLOCK_OVERHEAD, BlockCache
from daemon.jobs.resolver import Resolver
from daemon.metrics import Metrics
from daemon.net.budget import BudgetHolder
from daemon.net.fetch import Fetcher, Response, StreamedResponse, origin_key
from daemon.store.database import Database
from daemon.store.models import Job, ListedRecord, RunCommit

GET_RECORD = "/xrpc/com.atproto.sync.getRecord"
GET_LATEST_COMMIT = "/xrpc/com.atproto.sync.getLatestCommit"
GET_BLOCKS = "/xrpc/com.atproto.sync.getBlocks"
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
# The least record key ("-" sorts before every other record-key character): the probe's proof path then
# leads to the start of the collection, where the walk begins.
PROBE_RKEY = "-"
# A repo whose root node is at this layer or lower (about 4^(layer+1) keys or fewer) is fetched whole:
# one getRepo beats the two or more round trips of a sparse walk.
SMALL_REPO_LAYER = 3
# Up to this root layer (about 16,000 keys) a repo that is mostly the wanted collection is fetched whole.
MOSTLY_ONE_COLLECTION_LAYER = 5
# What a getRepo block held until the walk is done counts against the memory budget beyond its bytes: half
# as much again as its traced overhead, because the allocator's arenas that a flood of tiny blocks fills
# stay in the RSS after they are freed (tests/test_memory.py: 270-305 MB of peak RSS counted at 200).
HELD_BLOCK_OVERHEAD = BLOCK_OVERHEAD * 3 // 2
# A getRecord proof is the commit, the nodes on one path from the root (a repo of billions of keys is some
# 16 layers deep) and the record: more blocks than this are not a proof, and only the first are kept.
PROBE_MAX_BLOCKS = 64
# Restarts at a newer commit within one attempt before giving up (the account writes fast).
MAX_RESTARTS = 2
# A repo fetched whole that is at most this large stays in the block cache for the account's other jobs.
WHOLE_REPO_CACHE_BYTES = 1024 * 1024
# How every MST node block begins: a two-entry map whose first key is "e".
MST_NODE_START = b"\xa2\x61\x65"
SKIP_INVALID_RKEY = "invalid_rkey"
SKIP_OTHER_TYPE = "other_type"
SKIP_INVALID_RECORD = "invalid_record"

log = structlog.get_logger("backfilld.verified")


@dataclass(frozen=True, slots=True)
class VerifiedSettings:
    page_timeout: float
    get_blocks_batch: int
    max_car_bytes: int


@dataclass(slots=True)
class _Probe:
    """One account's commit being fetched and verified, which its other jobs wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    commit: RunCommit | None = None
    error: JobError | None = None


class _CommitMoved(ProtocolViolation):
    """The PDS no longer has the blocks of the commit being walked: walk the newer one."""

    def __init__(self) -> None:
        super().__init__(
            "the PDS no longer has the commit's blocks (a newer commit)", code=Code.BLOCK_MISSING
        )


@dataclass(slots=True)
class _Walked:
    """What a job's walk has found but not yet written."""

    records: list[ListedRecord] = field(default_factory=list)
    skipped: int = 0
    reasons: set[str] = field(default_factory=set)
    present: list[str] = field(default_factory=list)  # keys skipped, but in the collection
    last_key: str | None = None


class VerifiedHandler:
    """Runs ``backfill`` jobs in verified mode."""

    def __init__(
        self,
        db: Database,
        fetcher: Fetcher,
        resolver: Resolver,
        settings: VerifiedSettings,
        metrics: Metrics,
        *,
        cache: BlockCache | None = None,
    ) -> None:
        self._db = db
        self._fetcher = fetcher
        self._resolver = resolver
        self._settings = settings
        self._metrics = metrics
        self._cache = cache if cache is not None else BlockCache()
        self._probes: dict[tuple[int | None, str], _Probe] = {}
        # hosts that answered getBlocks with "not implemented": their repos are fetched whole
        self._no_get_blocks: set[str] = set()
        self._keys: dict[str, PublicKey] = {}

    async def __call__(self, job: Job, ctx: JobContext) -> None:
        assert job.did is not None
        identity = await self._resolver.resolve(job.did)
        try:
            async with ctx.host_slot(origin_key(identity.pds)):
                await self._run(job, ctx, identity)
        except AccountMoved as moved:
            log.info("account moved to another PDS; continuing there", pds=moved.identity.pds)
            try:
                async with ctx.host_slot(origin_key(moved.identity.pds)):
                    await self._run(job, ctx, moved.identity, fresh=True)
            except AccountMoved:
                raise ProtocolViolation("the account moved again while it was being read") from None

    async def _run(self, job: Job, ctx: JobContext, identity: DidIdentity, *, fresh: bool = False) -> None:
        commit = await self._account_commit(job, ctx, identity, fresh=fresh)
        for _ in range(MAX_RESTARTS + 1):
            try:
                await self._walk(job, ctx, identity, commit)
                return
            except _CommitMoved:
                log.info("the repo moved on during the walk; starting over at its newer commit")
                commit = await self._account_commit(job, ctx, identity, fresh=True, stale=commit)
        raise ProtocolViolation(
            f"the repo changed {MAX_RESTARTS + 1} times during the walk", code=Code.BLOCK_MISSING
        )

    # -- the commit ---------------------------------------------------------------------------------

    async def _account_commit(
        self,
        job: Job,
        ctx: JobContext,
        identity: DidIdentity,
        *,
        fresh: bool,
        stale: RunCommit | None = None,
    ) -> RunCommit:
        """The account's verified commit for this run: from the store, or fetched and checked once."""
        did = identity.did
        store = self._db.store
        if job.run_id is not None and not fresh:
            saved = await self._db.run(store.get_run_commit, job.run_id, did)
            if saved is not None:
                return saved
        key = (job.run_id, did)
        while (probe := self._probes.get(key)) is not None:
            await probe.done.wait()
            if probe.commit is not None and probe.commit != stale:
                return probe.commit
            if probe.error is not None:
                raise probe.error
        probe = self._probes[key] = _Probe()
        try:
            commit = await self._probe(job, identity)
            if job.run_id is not None:
                await self._db.run(store.put_run_commit, job.lease, did=did, commit=commit, now=ctx.now())
            probe.commit = commit
            return commit
        except JobError as exc:
            probe.error = exc
            raise
        finally:
            del self._probes[key]
            probe.done.set()

    async def _probe(self, job: Job, identity: DidIdentity) -> RunCommit:
        """Fetch the signed commit (a getRecord proof CAR) and verify it; keep the proof's blocks."""
        did = identity.did
        params: dict[str, str | int | list[str]] = {
            "did": did,
            "collection": job.collection,
            "rkey": PROBE_RKEY,
        }
        blocks: dict[Cid, bytes] = {}
        root: Cid | None = None
        reader = CarReader(max_bytes=self._settings.max_car_bytes)

        def keep(cid: Cid, data: bytes) -> None:
            # the commit (the CAR's root) whatever comes before it; of the rest, the first few
            if len(blocks) < PROBE_MAX_BLOCKS or cid in reader.roots:
                blocks[cid] = data

        async with self._car(identity, GET_RECORD, params) as car:
            if car is not None:
                roots = await _read_car(car, keep, self._settings.max_car_bytes, reader)
                if len(roots) != 1:
                    raise ProtocolViolation(
                        "getRecord's CAR must have one root, the commit", code=Code.INVALID_CAR
                    )
                root = roots[0]
        if root is None:  # no getRecord: getLatestCommit names the commit, getBlocks brings it
            root = await self._latest_commit(identity)
            if not await self._get_blocks(identity, [root], blocks.__setitem__):
                raise ProtocolViolation(
                    "the PDS has neither getRecord nor getBlocks", code=Code.BLOCK_MISSING
                )
        block = blocks.get(root)
        if block is None:
            raise ProtocolViolation(
                f"the PDS did not deliver the commit {format_cid(root)}", code=Code.BLOCK_MISSING
            )
        commit = decode_commit(block, did=did)
        await self._verify(commit, identity)
        for cid, data in blocks.items():
            self._cache.put(cid, data)
        return RunCommit(format_cid(root), format_cid(commit.data), commit.rev)

    async def _latest_commit(self, identity: DidIdentity) -> Cid:
        response = await self._fetcher.get_json(
            identity.pds + GET_LATEST_COMMIT,
            params={"did": identity.did},
            timeout=self._settings.page_timeout,
            host_class="pds",
            max_bytes=65_536,
        )
        await self._refuse(identity, response, "getLatestCommit")
        body = response.json()
        cid = body.get("cid") if isinstance(body, dict) else None
        if not isinstance(cid, str):
            raise ProtocolViolation("getLatestCommit answered no commit CID")
        try:
            return parse_cid(cid)
        except SyntaxValidationError as exc:
            raise ProtocolViolation(f"getLatestCommit answered a bad CID: {exc.message}") from None

    async def _verify(self, commit: Commit, identity: DidIdentity) -> None:
        """Check the commit's signature; after a failure, once more under a freshly resolved key."""
        try:
            verify_commit(commit, self._key(identity))
            return
        except (ProtocolViolation, IdentityError) as first:
            log.info("commit signature did not verify; resolving the DID afresh", error=first.message)
        fresh = await self._resolver.resolve(identity.did, fresh=True)
        if origin_key(fresh.pds) != origin_key(identity.pds):
            raise AccountMoved(fresh)
        try:
            verify_commit(commit, self._key(fresh))
        except ProtocolViolation as exc:
            raise InvalidSignature(exc.message, code=Code.INVALID_SIGNATURE) from None

    def _key(self, identity: DidIdentity) -> PublicKey:
        multikey = identity.signing_key
        if multikey is None:
            raise IdentityError(
                f"the DID document of {identity.did} has no usable #atproto signing key",
                code=Code.NO_SIGNING_KEY,
            )
        key = self._keys.get(multikey)
        if key is None:
            try:
                key = parse_multikey(multikey)
            except ProtocolViolation as exc:
                raise IdentityError(exc.message, code=Code.INVALID_KEY) from None
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[multikey] = key
        return key

    # -- the walk -----------------------------------------------------------------------------------

    async def _walk(self, job: Job, ctx: JobContext, identity: DidIdentity, commit: RunCommit) -> None:
        cursor = await self._db.run(
            self._db.store.begin_walk, job.lease, commit_cid=commit.commit_cid, now=ctx.now()
        )
        walk = MstWalk(parse_cid(commit.data_cid), [KeyRange.collection(job.collection, after=cursor)])
        self._from_cache(walk)
        walked = _Walked(last_key=cursor)
        holder = self._fetcher.budget.holder()
        try:
            whole: bool | None = None  # decided once the root node is known
            while not walk.done:
                ctx.check_interrupted()
                if whole is None:
                    whole = self._fetch_whole(job.collection, commit)
                no_get_blocks = origin_key(identity.pds) in self._no_get_blocks
                if whole or no_get_blocks:
                    try:
                        await self._whole_repo(identity, commit, walk, holder)
                    except ProtocolViolation as exc:
                        if no_get_blocks or exc.code not in (Code.CID_MISMATCH, Code.INVALID_CAR):
                            raise
                        # a broken block anywhere in the repo spoils the whole CAR: fetch only what this
                        # collection needs instead (the walk was fed nothing from the broken CAR)
                        log.info(
                            "the repo's CAR failed its checks; walking it block by block", error=exc.message
                        )
                        holder.release()  # the broken CAR's blocks are gone
                        whole = False
                        continue
                    walk.finish()
                else:
                    batch = walk.needed(self._settings.get_blocks_batch)
                    if not await self._get_blocks(identity, batch, walk.feed, cache=True):
                        continue  # no getBlocks on this PDS: the repo is fetched whole instead
                    walk.check_delivered(batch)
                    self._from_cache(walk)
                self._collect(job, walk.take_records(), walked)
                if walked.records and not walk.done:
                    await self._write(job, ctx, commit, walked, complete=False)
            self._collect(job, walk.take_records(), walked)
            await self._write(job, ctx, commit, walked, complete=True)
        finally:
            holder.release()

    def _fetch_whole(self, collection: str, commit: RunCommit) -> bool | None:
        """Whether one getRepo is cheaper than a sparse walk, from the root node (None: not known yet).

        Yes for a small repo (the root's layer is at most :data:`SMALL_REPO_LAYER`), and for a repo of
        moderate size that is mostly this collection (at least half of the root's entries are its keys):
        the sparse walk would fetch nearly every block anyway, a round trip per layer.
        """
        root = self._cache.get(parse_cid(commit.data_cid))
        if root is None:
            return None
        node = decode_node(root)
        if not node.entries:
            return True
        layer = key_layer(node.entries[0].key)
        if layer <= SMALL_REPO_LAYER:
            return True
        if layer > MOSTLY_ONE_COLLECTION_LAYER:
            return False
        span = KeyRange.collection(collection)
        inside = sum(1 for entry in node.entries if span.start <= entry.key < span.end)
        return 2 * inside >= len(node.entries)

    def _from_cache(self, walk: MstWalk) -> None:
        """Feed the walk every block it needs that the cache holds (repeatedly: each may uncover more)."""
        while True:
            found = [(cid, data) for cid in walk.needed() if (data := self._cache.get(cid)) is not None]
            if not found:
                return
            for cid, data in found:
                walk.feed(cid, data)

    def _collect(self, job: Job, records: Sequence[MstRecord], walked: _Walked) -> None:
        """The walk's records as the queue takes them (atproto JSON values); invalid ones skipped."""
        for record in records:
            walked.last_key = record.rkey
            reason = None
            value: object = None
            if not is_valid_record_key(record.rkey):
                reason = SKIP_INVALID_RKEY
            else:
                try:
                    value = decode_record(record.data)
                except ProtocolViolation as exc:
                    if exc.code == Code.INVALID_CBOR:
                        raise  # a block that is not canonical DAG-CBOR fails the walk (SPEC 6.2), never a skip
                    reason = SKIP_INVALID_RECORD
                else:
                    if not isinstance(value, dict) or value.get("$type") != job.collection:
                        reason = SKIP_OTHER_TYPE
            if reason is not None:
                walked.skipped += 1
                walked.reasons.add(reason)
                if reason != SKIP_INVALID_RKEY:
                    walked.present.append(record.rkey)  # still in the collection: not a delete
                continue
            text = msgspec.json.encode(value).decode()
            walked.records.append(ListedRecord(record.rkey, format_cid(record.cid), text))

    async def _write(
        self, job: Job, ctx: JobContext, commit: RunCommit, walked: _Walked, *, complete: bool
    ) -> None:
        assert job.did is not None
        result = await self._db.run(
            self._db.store.apply_page,
            job.lease,
            did=job.did,
            collection=job.collection,
            records=walked.records,
            cursor=walked.last_key,
            skipped=walked.skipped,
            complete=complete,
            now=ctx.now(),
            rev=commit.rev,
            verified=True,
            present=walked.present,
        )
        ctx.finished(result.finished)
        self._metrics.records_enqueued.labels(job.collection).inc(result.written)
        if walked.skipped:
            self._metrics.records_skipped.labels(job.collection).inc(walked.skipped)
            log.warning("skipped invalid records", count=walked.skipped, reasons=sorted(walked.reasons))
        walked.records, walked.skipped, walked.reasons, walked.present = [], 0, set(), []

    # -- fetching blocks ----------------------------------------------------------------------------

    async def _get_blocks(
        self,
        identity: DidIdentity,
        cids: Sequence[Cid],
        sink: Callable[[Cid, bytes], object],
        *,
        cache: bool = False,
    ) -> bool:
        """Fetch ``cids`` with getBlocks and hand each verified block asked for to ``sink(cid, data)`` (the
        others are dropped as they arrive, so a PDS that sends more than asked costs no memory).

        False when the PDS has no getBlocks (remembered: its repos are fetched whole from then on).
        """
        wanted = frozenset(cids)
        params: dict[str, str | int | list[str]] = {
            "did": identity.did,
            "cids": [format_cid(c) for c in cids],
        }
        async with self._car(identity, GET_BLOCKS, params) as car:
            if car is None:
                self._no_get_blocks.add(origin_key(identity.pds))
                return False

            def keep(cid: Cid, data: bytes) -> None:
                if cid not in wanted:
                    return
                if cache and data[:3] == MST_NODE_START:
                    self._cache.put(cid, data)
                sink(cid, data)

            await _read_car(car, keep, self._settings.max_car_bytes)
        return True

    async def _whole_repo(
        self, identity: DidIdentity, commit: RunCommit, walk: MstWalk, holder: BudgetHolder
    ) -> None:
        """Fetch the whole repo (getRepo) and feed the walk every block; its blocks count against the
        memory budget until the walk is done (they come in no walk order). Raw blocks (blobs) are dropped
        as they arrive: only DAG-CBOR blocks can be nodes or records."""
        blocks: dict[Cid, bytes] = {}
        async with self._car(identity, GET_REPO, {"did": identity.did}) as car:
            if car is None:
                raise ProtocolViolation("the PDS has neither getBlocks nor getRepo", code=Code.BLOCK_MISSING)
            reader = CarReader(max_bytes=self._settings.max_car_bytes)
            async for chunk in car.chunks:
                for cid, data in reader.feed(chunk):
                    if cid[1] == RAW:
                        continue  # a blob's bytes: never an MST node nor a record, so never needed
                    await holder.take(len(data) + HELD_BLOCK_OVERHEAD, "a getRepo CAR")
                    blocks[cid] = data
            reader.finish()
        if reader.roots != (parse_cid(commit.commit_cid),):
            # getRepo serves the repo as it is now: a newer commit than the one this run verified
            raise _CommitMoved()
        small = sum(len(data) for data in blocks.values()) <= WHOLE_REPO_CACHE_BYTES
        for cid, data in blocks.items():
            walk.feed(cid, data, keep=True)
            if small:
                self._cache.put(cid, data)

    @asynccontextmanager
    async def _car(
        self, identity: DidIdentity, method: str, params: dict[str, str | int | list[str]]
    ) -> AsyncIterator[StreamedResponse | None]:
        """A sync endpoint's CAR body, streamed; None when the PDS does not implement the method."""
        async with self._fetcher.stream(
            identity.pds + method,
            params=params,
            timeout=self._settings.page_timeout,
            host_class="pds",
            max_bytes=self._settings.max_car_bytes,
            too_large_code=Code.CAR_TOO_LARGE,
        ) as car:
            if car.status in (404, 501):
                yield None
                return
            if not 200 <= car.status < 300:
                response = await _complete(car)
                if response.status == 400 and not_implemented(response):
                    yield None
                    return
                if (
                    response.status == 400
                    and "could not find cids" in response.body.decode("utf-8", "replace").lower()
                    and account_error(response) is None
                ):
                    raise _CommitMoved()
                await self._refuse(identity, response, method.rsplit(".", 1)[-1])
            yield car

    async def _refuse(self, identity: DidIdentity, response: Response, what: str) -> None:
        """Raise what a non-2xx answer means (the account is gone or moved, or an HTTP error)."""
        if 200 <= response.status < 300:
            return
        if response.status == 400:
            await unavailable_account(
                self._fetcher,
                self._resolver,
                identity.did,
                identity.pds,
                response,
                timeout=self._settings.page_timeout,
            )
        raise UpstreamHTTPError(f"{what} answered HTTP {response.status}", status=response.status)


async def _read_car(
    car: StreamedResponse,
    sink: Callable[[Cid, bytes], object],
    max_bytes: int,
    reader: CarReader | None = None,
) -> tuple[Cid, ...]:
    """Stream a CAR body into ``sink`` block by block (each hashed against its CID); its roots.

    ``reader``: the caller's own (whose ``roots`` it may read while blocks arrive)."""
    reader = reader or CarReader(max_bytes=max_bytes)
    async for chunk in car.chunks:
        for cid, data in reader.feed(chunk):
            sink(cid, data)
    reader.finish()
    return reader.roots


async def _complete(car: StreamedResponse, limit: int = 65_536) -> Response:
    """An error answer's body (small: anything past ``limit`` is dropped)."""
    body = bytearray()
    async for chunk in car.chunks:
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return Response(car.status, car.headers, bytes(body))
