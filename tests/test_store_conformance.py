"""The store contract, run against every backend (River's driver conformance suite is the model).

Every test takes the ``store`` fixture, parametrized over SQLite and PostgreSQL (a throwaway server the
suite starts itself); nothing here knows which backend it talks to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from daemon.errors import JobLost
from daemon.store.models import Job, ListedRecord, PageResult, RunCommit
from daemon.store.store import ACK_CHUNK, MAX_CRASH_RECOVERIES, Store

NOW = 1_700_000_000.0
DID_A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
DID_B = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
DID_C = "did:plc:cccccccccccccccccccccccc"
COLL = "com.example.record"
COLL2 = "com.example.other"
COLL3 = "com.example.third"


def explicit(store: Store, dids: Sequence[str], collections: Sequence[str] = (COLL,), **kw: Any) -> int:
    run_id, _ = store.create_run(mode="explicit", collections=collections, dids=dids, now=NOW, **kw)
    return run_id


def claim(store: Store, limit: int = 10, *, now: float = NOW, **kw: Any) -> list[Job]:
    kw.setdefault("max_records_queue", 1_000_000)
    return store.claim_jobs(now=now, limit=limit, owner="test", **kw)


def listed(*pairs: tuple[str, str]) -> list[ListedRecord]:
    return [ListedRecord(rkey, cid, json.dumps({"$type": COLL, "v": cid})) for rkey, cid in pairs]


def page(
    store: Store,
    job: Job,
    records: Sequence[ListedRecord],
    *,
    cursor: str | None = None,
    complete: bool | None = None,
    **kw: Any,
) -> PageResult:
    assert job.did is not None
    return store.apply_page(
        job.lease,
        did=job.did,
        collection=job.collection,
        records=records,
        cursor=cursor,
        skipped=kw.pop("skipped", 0),
        complete=cursor is None if complete is None else complete,
        now=NOW,
        **kw,
    )


def queue(store: Store, after: int = 0) -> list[dict[str, Any]]:
    text, _ = store.list_records_json(after=after, limit=1000)
    entries: list[dict[str, Any]] = json.loads(text)
    return entries


def ops(store: Store, after: int = 0) -> list[tuple[str, str, str]]:
    return [(e["operation"], e["rkey"], e["cid"]) for e in queue(store, after)]


def backfill_once(
    store: Store, did: str, records: Sequence[ListedRecord], *, present: Sequence[str] = (), **kw: Any
) -> PageResult:
    """A whole one-page listing of (did, COLL) in a new run (``present``: keys it skipped)."""
    explicit(store, [did], **kw)
    [job] = claim(store)
    result = page(store, job, records, present=present)
    assert result.finished is not None  # the listing's one page finished the job
    return result


# -- runs and claims ------------------------------------------------------------------------------------


def test_explicit_run_queues_each_pair_once_while_active(store: Store) -> None:
    _, first = store.create_run(mode="explicit", collections=[COLL, COLL2], dids=[DID_A, DID_B], now=NOW)
    assert (first.enqueued, first.already_queued) == (4, 0)
    _, second = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert (second.enqueued, second.already_queued) == (0, 1)


def test_a_done_or_failed_pair_is_queued_again(store: Store) -> None:
    explicit(store, [DID_A])
    [job] = claim(store)
    store.finish_job(job.lease, state="failed", now=NOW, error_code="timeout", last_error="x")
    _, again = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert again.enqueued == 1


def test_claim_leases_counts_attempts_and_skips_future_jobs(store: Store) -> None:
    explicit(store, [DID_A, DID_B])
    [first] = claim(store, 1)
    assert first.state == "running" and first.attempts == 1 and first.lease_token == 1
    store.reschedule_job(first.lease, not_before=NOW + 60, now=NOW, refund_attempt=False)
    assert [j.did for j in claim(store)] == [DID_B]
    assert claim(store) == []
    assert store.next_due(max_records_queue=10) == NOW + 60
    [again] = claim(store, now=NOW + 60)
    assert (again.id, again.attempts, again.lease_token) == (first.id, 2, 2)


def test_a_stale_lease_can_write_nothing(store: Store) -> None:
    explicit(store, [DID_A])
    [job] = claim(store)
    store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=True)
    [fresh] = claim(store)
    assert fresh.lease_token == job.lease_token + 1
    with pytest.raises(JobLost):
        page(store, job, listed(("a", "c1")))
    with pytest.raises(JobLost):
        store.finish_job(job.lease, state="done", now=NOW)
    with pytest.raises(JobLost):
        store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=True)
    assert queue(store) == []
    finished = page(store, fresh, listed(("a", "c1"))).finished
    assert finished is not None and finished.state == "done"


def test_backpressure_claims_only_discover_jobs(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2"), ("c", "c3")))
    explicit(store, [DID_B])
    store.create_run(mode="discover", collections=[COLL], dids=[], now=NOW)
    assert [j.kind for j in claim(store, max_records_queue=2)] == ["discover"]
    assert store.next_due(max_records_queue=2) is None
    store.ack_records(queue(store)[1]["id"])
    assert [j.kind for j in claim(store, max_records_queue=2)] == ["backfill"]


def test_jobs_of_excluded_hosts_are_left_alone(store: Store) -> None:
    store.put_publisher(did=DID_A, pds="https://a.example", signing_key=None, signing_key_id=None, now=NOW)
    store.put_publisher(did=DID_B, pds="https://b.example", signing_key=None, signing_key_id=None, now=NOW)
    explicit(store, [DID_A, DID_B, DID_C])
    claimed = claim(store, excluded_hosts=["https://a.example"])
    assert sorted(j.did or "" for j in claimed) == [DID_B, DID_C]
    assert store.next_due(max_records_queue=10, excluded_hosts=["https://a.example"]) is None
    assert [j.did for j in claim(store)] == [DID_A]


def test_ordered_collections_wait_for_the_accounts_earlier_ones(store: Store) -> None:
    explicit(store, [DID_A, DID_B], collections=[COLL, COLL2, COLL3])
    first = claim(store)
    assert sorted((j.did or "", j.collection) for j in first) == [(DID_A, COLL), (DID_B, COLL)]
    assert claim(store) == [] and store.next_due(max_records_queue=10) is None
    by_did = {j.did: j for j in first}
    store.finish_job(by_did[DID_A].lease, state="failed", now=NOW, error_code="x", last_error="x")
    [second] = claim(store)
    assert (second.did, second.collection) == (DID_A, COLL2)
    store.finish_job(second.lease, state="done", now=NOW)
    [third] = claim(store)
    assert (third.did, third.collection) == (DID_A, COLL3)


def test_unordered_runs_claim_every_collection_at_once(store: Store) -> None:
    explicit(store, [DID_A], collections=[COLL, COLL2, COLL3], ordered=False)
    assert len(claim(store)) == 3


def test_cancel_stops_pending_and_running_jobs_of_the_run(store: Store) -> None:
    run_id = explicit(store, [DID_A, DID_B, DID_C])
    running = claim(store, 2)
    assert store.cancel_run(run_id, NOW + 1) is True
    assert store.cancel_run(run_id, NOW + 1) is False
    assert store.cancel_run(run_id + 100, NOW) is None
    # a job that was claimed (or between two pages) can write nothing more for the cancelled run
    with pytest.raises(JobLost):
        page(store, running[0], listed(("a", "c1")), cursor="next")
    with pytest.raises(JobLost):
        store.reschedule_job(running[1].lease, not_before=NOW, now=NOW, refund_attempt=False)
    assert claim(store) == [] and queue(store) == []
    run = store.get_run(run_id)
    assert run is not None and run.state == "cancelled" and run.jobs["cancelled"] == 3
    assert run.finished_at == NOW + 1


def test_a_listings_last_page_finishes_its_job_and_a_cancel_leaves_it_done(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    backfill_once(store, DID_B, listed(("a", "c1")))
    last = queue(store)[-1]["id"]
    run_id = explicit(store, [DID_A, DID_B])
    complete, unfinished = sorted(claim(store), key=lambda job: job.did or "")
    assert page(store, unfinished, listed(("a", "c1")), cursor="more").finished is None
    result = page(store, complete, listed(("a", "c1")))
    assert result == PageResult(deleted=1)
    assert result.finished is not None and result.finished.state == "done"
    assert (result.finished.pages, result.finished.records_enqueued) == (1, 1)
    assert store.get_job(complete.id) == result.finished
    # done, its lease released, in the page's own transaction: nothing more to write or renew
    assert store.renew_leases([complete.lease], owner="test", until=NOW + 60) == set()
    for state in ("done", "cancelled"):
        with pytest.raises(JobLost):
            store.finish_job(complete.lease, state=state, now=NOW + 1)
    assert store.cancel_run(run_id, NOW + 1) is True
    # the delete came from a complete listing: its job stays done, never cancelled
    assert [(e["did"], e["operation"], e["rkey"]) for e in queue(store, last)] == [(DID_A, "delete", "b")]
    assert store.get_job(unfinished.id).state == "cancelled"  # type: ignore[union-attr]
    run = store.get_run(run_id)
    assert run is not None and run.state == "cancelled"
    assert run.jobs["done"] == run.jobs["cancelled"] == 1


def test_the_last_page_of_the_last_job_finishes_the_run(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    [job] = claim(store)
    page(store, job, listed(("a", "c1")))
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished" and run.finished_at == NOW


def test_cancelling_a_finished_run_changes_nothing(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    [job] = claim(store)
    store.finish_job(job.lease, state="done", now=NOW + 1)
    assert store.cancel_run(run_id, NOW + 2) is False
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished" and run.finished_at == NOW + 1


def test_recovery_refunds_the_attempt_and_fails_a_crash_loop(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    for death in range(1, MAX_CRASH_RECOVERIES):
        [job] = claim(store)
        assert store.recover_jobs(NOW, expired_only=False) == (1, 0)
        recovered = store.get_job(job.id)
        assert recovered is not None and recovered.state == "pending"
        assert (recovered.attempts, recovered.crashes) == (0, death)
    claim(store)
    assert store.recover_jobs(NOW, expired_only=False) == (0, 1)
    failed = store.get_job(job.id)
    assert failed is not None and failed.state == "failed" and failed.error_code == "crash_loop"
    assert failed.last_error is not None and "consecutive" in failed.last_error
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished"


def test_progress_resets_the_crash_count(store: Store) -> None:
    explicit(store, [DID_A])
    for _ in range(MAX_CRASH_RECOVERIES + 2):
        [job] = claim(store)
        page(store, job, listed(("a", "c1")), cursor="more")
        store.recover_jobs(NOW, expired_only=False)
    assert store.get_job(job.id).state == "pending"  # type: ignore[union-attr]


def test_only_expired_leases_are_recovered_in_a_cluster(store: Store) -> None:
    explicit(store, [DID_A, DID_B])
    a, b = claim(store, 1, lease_until=NOW + 10) + claim(store, 1, lease_until=NOW + 100)
    assert store.recover_jobs(NOW + 50, expired_only=True) == (1, 0)
    assert store.get_job(a.id).state == "pending"  # type: ignore[union-attr]
    assert store.get_job(b.id).state == "running"  # type: ignore[union-attr]
    with pytest.raises(JobLost):
        page(store, a, listed(("x", "c")))
    assert store.renew_leases([a.lease, b.lease], owner="test", until=NOW + 200) == {b.id}
    assert store.renew_leases([b.lease], owner="another daemon", until=NOW + 200) == set()
    assert store.recover_jobs(NOW + 150, expired_only=True) == (0, 0)


# -- reconcile (SPEC 6.4) -------------------------------------------------------------------------------


def test_a_first_listing_creates_every_record_with_its_value(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    [job] = claim(store)
    first = page(store, job, listed(("a", "c1"), ("b", "c2")), cursor="p2")
    second = page(store, job, listed(("c", "c3")), rev="3kaaaaaaaaaa2", verified=True)
    assert (first, second) == (PageResult(created=2), PageResult(created=1))
    entries = queue(store)
    assert entries[0] == {
        "id": entries[0]["id"],
        "did": DID_A,
        "collection": COLL,
        "rkey": "a",
        "operation": "create",
        "cid": "c1",
        "record": {"$type": COLL, "v": "c1"},
        "rev": None,
        "verified": False,
        "source": "backfill",
        "run_id": run_id,
    }
    assert (entries[2]["rev"], entries[2]["verified"]) == ("3kaaaaaaaaaa2", True)
    saved = store.get_job(job.id)
    assert saved is not None and (saved.cursor, saved.pages, saved.records_enqueued) == (None, 2, 3)
    assert store.queue_depth() == 3


def test_an_unchanged_account_writes_nothing(store: Store) -> None:
    records = listed(("a", "c1"), ("b", "c2"))
    backfill_once(store, DID_A, records)
    assert backfill_once(store, DID_A, records) == PageResult()
    assert len(queue(store)) == 2


def test_updates_creates_and_deletes_are_exactly_the_difference(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2"), ("c", "c3")))
    last = queue(store)[-1]["id"]
    result = backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2-new"), ("d", "c4")))
    assert result == PageResult(created=1, updated=1, deleted=1)
    assert ops(store, last) == [("update", "b", "c2-new"), ("create", "d", "c4"), ("delete", "c", "")]
    delete = queue(store, last)[-1]
    assert delete["record"] is None and delete["verified"] is False
    assert queue(store, last)[0]["record"] == {"$type": COLL, "v": "c2-new"}


def test_deletes_wait_for_the_complete_listing(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    explicit(store, [DID_A])
    [job] = claim(store)
    assert page(store, job, listed(("a", "c1")), cursor="more") == PageResult()
    store.finish_job(job.lease, state="failed", now=NOW, error_code="timeout", last_error="x")
    assert ops(store, last) == []  # a failed listing proves nothing about "b"


def test_an_emptied_collection_deletes_everything_it_had(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    assert backfill_once(store, DID_A, []) == PageResult(deleted=2)
    assert ops(store, last) == [("delete", "a", ""), ("delete", "b", "")]
    assert backfill_once(store, DID_A, []) == PageResult()


def test_delete_and_recreate_with_the_same_cid_is_no_change(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1")))
    assert backfill_once(store, DID_A, listed(("a", "c1"))) == PageResult()


def test_a_retried_page_writes_nothing_twice(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    explicit(store, [DID_A])
    [job] = claim(store)
    changed = listed(("a", "c1-new"), ("z", "c9"))
    assert page(store, job, changed, cursor="p2") == PageResult(created=1, updated=1)
    store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=False)
    [retry] = claim(store)
    assert page(store, retry, changed, cursor="p2") == PageResult()  # the same page again
    assert page(store, retry, []) == PageResult(deleted=1)
    assert ops(store, last) == [("update", "a", "c1-new"), ("create", "z", "c9"), ("delete", "b", "")]


def test_full_rewrites_every_record_once_and_still_deletes(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    explicit(store, [DID_A], full=True)
    [job] = claim(store)
    assert job.full
    assert page(store, job, listed(("a", "c1")), cursor="p2") == PageResult(created=1)
    store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=False)
    [retry] = claim(store)
    assert page(store, retry, listed(("a", "c1")), cursor="p2") == PageResult()
    assert page(store, retry, []) == PageResult(deleted=1)
    assert ops(store, last) == [("create", "a", "c1"), ("delete", "b", "")]


def test_full_writes_a_changed_record_as_a_create_too(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    explicit(store, [DID_A], full=True)
    [job] = claim(store)
    assert page(store, job, listed(("a", "c1"), ("b", "c3"))) == PageResult(created=2)
    assert ops(store, last) == [("create", "a", "c1"), ("create", "b", "c3")]
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c3")))  # the set took the new CID
    assert ops(store, last) == [("create", "a", "c1"), ("create", "b", "c3")]


def test_a_record_skipped_but_still_listed_is_not_deleted(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2"), ("c", "c3")))
    last = queue(store)[-1]["id"]
    # "b" fails a check this time (its value no longer matches its CID): skipped, but still there
    backfill_once(store, DID_A, listed(("a", "c1")), present=["b"])
    assert ops(store, last) == [("delete", "c", "")]
    # once it is listed properly again, it is unchanged: the set kept its CID
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    assert ops(store, last) == [("delete", "c", "")]
    # a key the set never had is only stamped if present: nothing written, nothing added
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")), present=["zz"])
    assert ops(store, last) == [("delete", "c", "")]
    backfill_once(store, DID_A, listed(("a", "c1")))
    assert ops(store, last) == [("delete", "c", ""), ("delete", "b", "")]


def test_a_skipped_record_listed_valid_later_in_the_same_pass_is_still_written(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    for full in (False, True):
        explicit(store, [DID_A], full=full)
        [job] = claim(store)
        # "b" fails its check on the first page (say, on the PDS the account moved from), then is listed
        # with a new CID: written as an update (a create with full), and not deleted
        assert page(store, job, listed(("a", "c1")), cursor="p2", present=["b"]) == PageResult(
            created=int(full)
        )
        assert page(store, job, listed(("b", f"c3{full}"))) == PageResult(
            created=int(full), updated=int(not full)
        )
    assert ops(store, last) == [
        ("update", "b", "c3False"),
        ("create", "a", "c1"),
        ("create", "b", "c3True"),
    ]


def test_a_walk_restarted_at_a_newer_commit_keeps_deletes_exact(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    explicit(store, [DID_A])
    [job] = claim(store)
    assert store.begin_walk(job.lease, commit_cid="commit1", now=NOW) is None
    page(store, job, listed(("a", "c1"), ("b", "c2")), cursor="b", complete=False)
    assert store.begin_walk(job.lease, commit_cid="commit1", now=NOW) == "b"  # resume at the same commit
    # the account deleted "b" and a newer commit appeared: the walk starts over in a new pass
    assert store.begin_walk(job.lease, commit_cid="commit2", now=NOW) is None
    assert page(store, job, listed(("a", "c1")), cursor="a", complete=True) == PageResult(deleted=1)
    assert ops(store, last) == [("delete", "b", "")]


def test_each_pair_has_its_own_set(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1")))
    assert backfill_once(store, DID_B, listed(("a", "c1"))) == PageResult(created=1)
    explicit(store, [DID_A], collections=[COLL2])
    [job] = claim(store)
    assert page(store, job, []) == PageResult()
    assert backfill_once(store, DID_A, listed(("a", "c1"))) == PageResult()


def test_a_page_that_repeats_a_record_writes_it_once(store: Store) -> None:
    assert backfill_once(store, DID_A, listed(("a", "c1"), ("a", "c1"))) == PageResult(created=1)


def test_runs_report_operations_and_replay_time(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    backfill_once(store, DID_A, listed(("a", "c1-new"), ("c", "c3")))
    runs = store.list_runs(after=0, limit=10)
    assert [r.operations for r in runs] == [
        {"create": 2, "update": 0, "delete": 0},
        {"create": 1, "update": 1, "delete": 1},
    ]
    public = runs[1].public()
    assert public["records_enqueued"] == 3 and public["replay_from_us"] == int(NOW * 1_000_000)
    assert public["state"] == "finished" and public["jobs"]["done"] == 1
    assert [r.id for r in store.list_runs(after=runs[0].id, limit=1)] == [runs[1].id]


# -- the records queue ----------------------------------------------------------------------------------


def test_ack_deletes_through_id_and_ids_are_never_reused(store: Store) -> None:
    backfill_once(store, DID_A, listed(("a", "c1"), ("b", "c2")))
    last = queue(store)[-1]["id"]
    assert store.ack_records(last) == 2
    assert store.ack_records(last) == 0
    backfill_once(store, DID_B, listed(("a", "c1")))
    assert queue(store)[0]["id"] > last
    assert store.queue_depth() == 1


def test_ack_of_more_than_a_chunk(store: Store) -> None:
    records = listed(*[(f"k{i:06d}", f"c{i}") for i in range(ACK_CHUNK + 5)])
    backfill_once(store, DID_A, records)
    assert store.ack_records(10**15) == ACK_CHUNK + 5
    assert store.queue_depth() == 0 and queue(store) == []


def test_a_records_page_ends_early_past_its_value_budget(store: Store) -> None:
    big = "x" * 5000
    records = [ListedRecord(f"k{i}", f"c{i}", json.dumps({"v": big})) for i in range(10)]
    backfill_once(store, DID_A, records)
    text, last = store.list_records_json(after=0, limit=100, max_value_bytes=12_000)
    assert len(json.loads(text)) == 2 and last == json.loads(text)[-1]["id"]
    text, _ = store.list_records_json(after=0, limit=100, max_value_bytes=10)
    assert len(json.loads(text)) == 1  # at least one record, whatever its size
    assert store.list_records_json(after=10**12, limit=10) == ("[]", None)


def test_the_records_page_budget_counts_bytes_not_characters(store: Store) -> None:
    wide = "é" * 2500  # 2,500 characters, 5,000 bytes of UTF-8
    records = [ListedRecord(f"k{i}", f"c{i}", json.dumps({"v": wide}, ensure_ascii=False)) for i in range(10)]
    backfill_once(store, DID_A, records)
    text, _ = store.list_records_json(after=0, limit=100, max_value_bytes=12_000)
    assert len(json.loads(text)) == 2  # counted in characters, four would fit


# -- discovery, retries, publishers, commits ------------------------------------------------------------


def test_discovery_page_caps_the_union_and_fans_out_pairs(store: Store) -> None:
    run_id, created = store.create_run(mode="discover", collections=[COLL, COLL2], dids=[], now=NOW)
    assert created.enqueued == 2
    by_coll = {j.collection: j for j in claim(store)}
    first = store.record_discovery_page(
        by_coll[COLL].lease,
        run_id=run_id,
        collection=COLL,
        dids=[DID_A, DID_A],
        cursor="r1",
        max_dids=2,
        now=NOW,
    )
    assert (first.new_dids, first.jobs_enqueued, first.cap_reached) == (1, 2, False)
    second = store.record_discovery_page(
        by_coll[COLL2].lease,
        run_id=run_id,
        collection=COLL2,
        dids=[DID_A, DID_B, DID_C],
        cursor=None,
        max_dids=2,
        now=NOW,
    )
    assert (second.new_dids, second.jobs_enqueued, second.cap_reached) == (1, 2, True)
    run = store.get_run(run_id)
    assert run is not None and run.dids == 2 and run.state == "discovering"
    assert run.discovery[COLL].pages == 1 and run.discovery[COLL2].dids == 3
    assert store.get_job(by_coll[COLL].id).cursor == "r1"  # type: ignore[union-attr]
    assert store.run_did_count(run_id) == 2
    # the fanned-out pairs keep the configured order
    backfills = [j for j in claim(store) if j.kind == "backfill"]
    assert sorted((j.did or "", j.collection) for j in backfills) == [(DID_A, COLL), (DID_B, COLL)]


def test_a_cancelled_discovery_writes_no_page(store: Store) -> None:
    run_id, _ = store.create_run(mode="discover", collections=[COLL], dids=[], now=NOW)
    [job] = claim(store)
    store.cancel_run(run_id, NOW)
    with pytest.raises(JobLost):
        store.record_discovery_page(
            job.lease, run_id=run_id, collection=COLL, dids=[DID_A], cursor=None, max_dids=10, now=NOW
        )
    assert store.run_did_count(run_id) == 0


def test_run_state_moves_to_finished_and_back_on_retry(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    assert store.get_run(run_id).state == "running"  # type: ignore[union-attr]
    [job] = claim(store)
    store.finish_job(job.lease, state="failed", now=NOW + 1, error_code="timeout", last_error="slow")
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished" and run.finished_at == NOW + 1
    assert store.retry_jobs(now=NOW + 2, state="failed", run_id=run_id) == 1
    run = store.get_run(run_id)
    assert run is not None and run.state == "running" and run.finished_at is None
    retried = store.get_job(job.id)
    assert retried is not None and retried.attempts == 0 and retried.error_code is None


def test_retry_skips_a_pair_that_is_active_again(store: Store) -> None:
    explicit(store, [DID_A])
    [job] = claim(store)
    store.finish_job(job.lease, state="failed", now=NOW, error_code="x", last_error="x")
    explicit(store, [DID_A])
    assert store.retry_jobs(now=NOW, ids=[job.id]) == 0


def test_publisher_refresh_keeps_first_seen(store: Store) -> None:
    store.put_publisher(did=DID_A, pds="https://a", signing_key="zA", signing_key_id="#atproto", now=NOW)
    store.put_publisher(did=DID_A, pds="https://b", signing_key="zB", signing_key_id="#atproto", now=NOW + 10)
    p = store.get_publisher(DID_A)
    assert p is not None and (p.pds, p.first_seen_at, p.resolved_at, p.last_seen_at) == (
        "https://b",
        NOW,
        NOW + 10,
        NOW + 10,
    )
    store.touch_publisher(DID_A, NOW + 20)
    assert store.get_publisher(DID_A).last_seen_at == NOW + 20  # type: ignore[union-attr]
    store.put_publisher(did=DID_B, pds="https://c", signing_key=None, signing_key_id=None, now=NOW)
    assert [x.did for x in store.list_publishers(after="", limit=1)] == [DID_A]
    assert [x.did for x in store.list_publishers(after=DID_A, limit=5)] == [DID_B]


def test_one_verified_commit_per_account_per_run(store: Store) -> None:
    run_id = explicit(store, [DID_A])
    [job] = claim(store)
    assert store.get_run_commit(run_id, DID_A) is None
    first, second = (
        RunCommit("bafycommit1", "bafydata1", "3kaaaaaaaaaa2"),
        RunCommit("bafycommit2", "bafydata2", "3kaaaaaaaaaa3"),
    )
    store.put_run_commit(job.lease, did=DID_A, commit=first, now=NOW)
    store.put_run_commit(job.lease, did=DID_A, commit=second, now=NOW)
    assert store.get_run_commit(run_id, DID_A) == second
    assert store.get_run_commit(run_id + 1, DID_A) is None
    # a stale holder's commit never lands
    store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=True)
    with pytest.raises(JobLost):
        store.put_run_commit(job.lease, did=DID_A, commit=first, now=NOW)
    assert store.get_run_commit(run_id, DID_A) == second


def test_a_stale_discover_job_cannot_set_its_collections_error(store: Store) -> None:
    run_id, _ = store.create_run(mode="discover", collections=[COLL], dids=None, now=NOW)
    [job] = claim(store)
    assert job.kind == "discover"
    store.set_discovery_error(job.lease, error="timeout: the relay did not answer", now=NOW)
    run = store.get_run(run_id)
    assert run is not None and run.discovery[COLL].error == "timeout: the relay did not answer"
    store.reschedule_job(job.lease, not_before=NOW, now=NOW, refund_attempt=True)
    with pytest.raises(JobLost):
        store.set_discovery_error(job.lease, error=None, now=NOW)
    [fresh] = claim(store)
    store.set_discovery_error(fresh.lease, error=None, now=NOW)
    run = store.get_run(run_id)
    assert run is not None and run.discovery[COLL].error is None


def test_counts_by_state_and_kind(store: Store) -> None:
    explicit(store, [DID_A, DID_B])
    store.create_run(mode="discover", collections=[COLL], dids=[], now=NOW)
    claim(store, 1)
    assert store.job_counts()["running"] == 1 and store.job_counts()["pending"] == 2
    assert (
        store.job_counts_by_kind()[("discover", "pending")]
        + store.job_counts_by_kind().get(("discover", "running"), 0)
        == 1
    )
    assert store.ping() is True
