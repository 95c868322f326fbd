"""The store's data models: plain frozen dataclasses, the same for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JOB_STATES = ("pending", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("pending", "running")


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
    "records_enqueued, records_skipped, rate_limit_waits, host, created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """One record job on the records queue."""

    id: int
    did: str
    collection: str
    rkey: str
    operation: str
    cid: str
    source: str
    run_id: int | None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "did": self.did,
            "collection": self.collection,
            "rkey": self.rkey,
            "operation": self.operation,
            "cid": self.cid,
            "source": self.source,
            "run_id": self.run_id,
        }


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
    dids: int
    discovery: dict[str, DiscoveryProgress]
    jobs: dict[str, int]
    discovering: bool
    records_enqueued: int

    @property
    def state(self) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        if self.discovering:
            return "discovering"
        if self.jobs.get("pending", 0) or self.jobs.get("running", 0):
            return "running"
        return "finished"

    def public(self) -> dict[str, Any]:
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
            "records_enqueued": self.records_enqueued,
        }


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    enqueued: int
    already_queued: int


@dataclass(frozen=True, slots=True)
class DiscoveryPageResult:
    """What one discovery page changed: DIDs new to the run, jobs queued, and whether the DID cap is hit."""

    new_dids: int
    jobs_enqueued: int
    cap_reached: bool
