"""The store's data models: plain frozen dataclasses, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JOB_STATES = ("pending", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("pending", "running")
OPERATIONS = ("create", "update", "delete")


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim on a running job: every write the job makes names it, and is refused once it is stale.

    ``token`` is the job's fencing token, incremented by every claim: a holder whose job was cancelled, or
    (PostgreSQL) whose lease expired and was taken over, can no longer write anything for it.
    """

    job_id: int
    token: int


@dataclass(frozen=True, slots=True)
class Job:
    """One row of ``jobs``."""

    id: int
    run_id: int | None
    kind: str
    did: str | None
    collection: str
    state: str
    attempts: int
    not_before: float
    error_code: str | None
    last_error: str | None
    cursor: str | None
    pages: int
    records_enqueued: int
    records_skipped: int
    rate_limit_waits: int
    host: str | None
    created_at: float
    updated_at: float
    lease_token: int = 0
    crashes: int = 0
    collection_rank: int = 0
    listing_pass: int = 0
    walk_commit: str | None = None
    full: bool = False

    @property
    def lease(self) -> Lease:
        """The lease this claim of the job holds."""
        return Lease(self.id, self.lease_token)

    def public(self) -> dict[str, Any]:
        """The job as ``/_admin/jobs`` shows it."""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "kind": self.kind,
            "did": self.did,
            "collection": self.collection,
            "state": self.state,
            "attempts": self.attempts,
            "error_code": self.error_code,
            "last_error": self.last_error,
            "records_enqueued": self.records_enqueued,
            "updated_at": self.updated_at,
        }


JOB_COLUMNS = (
    "id, run_id, kind, did, collection, state, attempts, not_before, error_code, last_error, cursor, pages, "
    "records_enqueued, records_skipped, rate_limit_waits, host, created_at, updated_at, lease_token, crashes, "
    "collection_rank, listing_pass, walk_commit, full_rewrite"
)


def job_from_row(row: tuple[Any, ...]) -> Job:
    """A :class:`Job` from a row of :data:`JOB_COLUMNS` (booleans come back as integers)."""
    fields = list(row)
    fields[-1] = bool(fields[-1])
    return Job(*fields)


@dataclass(frozen=True, slots=True)
class ListedRecord:
    """One record as a listing found it: its key, CID and value (atproto JSON text; None if not carried)."""

    rkey: str
    cid: str
    value: str | None


@dataclass(frozen=True, slots=True)
class PageResult:
    """What one page of a listing wrote to the records queue; ``finished``: the job as the listing's last
    page left it (``done``, its lease released), None for any other page."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    finished: Job | None = field(default=None, compare=False)

    @property
    def written(self) -> int:
        """Records jobs written in all."""
        return self.created + self.updated + self.deleted


@dataclass(frozen=True, slots=True)
class Publisher:
    """One row of the DID cache (the seed's ``known_publishers``)."""

    did: str
    pds: str
    signing_key: str | None
    signing_key_id: str | None
    resolved_at: float
    first_seen_at: float
    last_seen_at: float

    def public(self) -> dict[str, Any]:
        """The publisher as ``/_admin/publishers`` shows it."""
        return {
            "did": self.did,
            "pds": self.pds,
            "signing_key": self.signing_key,
            "signing_key_id": self.signing_key_id,
            "resolved_at": self.resolved_at,
            "first_seen_at": self.first_seen_at,
            "last_seen_at": self.last_seen_at,
        }


@dataclass(frozen=True, slots=True)
class DiscoveryProgress:
    """One collection's discovery on a run."""

    pages: int
    dids: int
    error: str | None


@dataclass(frozen=True, slots=True)
class Run:
    """A run and its progress, as ``/_admin/runs/<id>`` shows it."""

    id: int
    mode: str
    collections: tuple[str, ...]
    created_at: float
    finished_at: float | None
    cancelled_at: float | None
    full: bool
    dids: int
    discovery: dict[str, DiscoveryProgress]
    jobs: dict[str, int]
    discovering: bool
    operations: dict[str, int]

    @property
    def state(self) -> str:
        """discovering, running, finished or cancelled (SPEC 5)."""
        if self.cancelled_at is not None:
            return "cancelled"
        if self.discovering:
            return "discovering"
        if self.jobs.get("pending", 0) or self.jobs.get("running", 0):
            return "running"
        return "finished"

    @property
    def replay_from_us(self) -> int:
        """The run's creation time in unix microseconds: where a live stream must start to miss nothing."""
        return int(self.created_at * 1_000_000)

    def public(self) -> dict[str, Any]:
        """The run as ``/_admin/runs/<id>`` shows it."""
        return {
            "run_id": self.id,
            "mode": self.mode,
            "state": self.state,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "collections": list(self.collections),
            "dids": self.dids,
            "discovery": {
                nsid: {"pages": d.pages, "dids": d.dids, "error": d.error}
                for nsid, d in self.discovery.items()
            },
            "jobs": self.jobs,
            "records_enqueued": sum(self.operations.values()),
            "operations": self.operations,
            "replay_from_us": self.replay_from_us,
        }


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """Pairs queued by a request, and pairs that already had a pending or running job."""

    enqueued: int
    already_queued: int


@dataclass(frozen=True, slots=True)
class DiscoveryPageResult:
    """What one discovery page changed: DIDs new to the run, jobs queued, and whether the DID cap is hit."""

    new_dids: int
    jobs_enqueued: int
    cap_reached: bool


@dataclass(frozen=True, slots=True)
class RunCommit:
    """The signed commit verified for an account in a run (verified mode: one fetch and check per run)."""

    commit_cid: str
    data_cid: str
    rev: str
