from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from daemon.errors import StartupError
from daemon.store.schema import MIGRATIONS, SCHEMA_VERSION
from daemon.store.sqlite import SqliteStore as Store

NOW = 1_700_000_000.0
DID_A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
DID_B = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
COLL = "com.example.record"
COLL2 = "com.example.other"


def test_new_database_is_at_current_schema_in_wal(store: Store, tmp_path: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_migrates_an_older_schema_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO did_cache (did, pds, signing_key, resolved_at, first_seen_at, last_seen_at) "
        "VALUES (?, 'https://pds.example', 'zKey', 1, 1, 1)",
        (DID_A,),
    )
    conn.close()
    store = Store.open(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        publisher = store.get_publisher(DID_A)
        assert publisher is not None and publisher.pds == "https://pds.example"
        assert publisher.signing_key_id is None
        run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
        job = store.list_jobs(run_id=run_id)[0]
        assert job.host == "https://pds.example"  # the v2 column, filled from the cache at enqueue
    finally:
        store.close()


def test_refuses_a_schema_newer_than_it_knows(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StartupError, match="newer"):
        Store.open(path)


def test_second_instance_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = Store.open(path)
    try:
        with pytest.raises(StartupError, match="another backfilld is already running"):
            Store.open(path)
    finally:
        first.close()
    Store.open(path).close()  # released on close


def test_explicit_run_queues_each_pair_once_while_active(store: Store) -> None:
    _, first = store.create_run(mode="explicit", collections=[COLL, COLL2], dids=[DID_A, DID_B], now=NOW)
    assert (first.enqueued, first.already_queued) == (4, 0)
    _, second = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert (second.enqueued, second.already_queued) == (0, 1)


def test_done_or_failed_pair_is_queued_again(store: Store) -> None:
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    store.finish_job(job.id, state="failed", now=NOW, error_code="timeout", last_error="x")
    _, again = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert again.enqueued == 1


def test_claim_marks_running_counts_attempt_and_skips_future_jobs(store: Store) -> None:
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_A, DID_B], now=NOW)
    jobs = store.claim_jobs(now=NOW, limit=1, owner="t", max_records_queue=10)
    assert len(jobs) == 1 and jobs[0].state == "running" and jobs[0].attempts == 1
    store.reschedule_job(jobs[0].id, not_before=NOW + 60, now=NOW, refund_attempt=False)
    rest = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    assert [j.did for j in rest] == [DID_B]
    assert store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10) == []
    assert store.next_due(max_records_queue=10) == NOW + 60
    later = store.claim_jobs(now=NOW + 60, limit=5, owner="t", max_records_queue=10)
    assert [j.attempts for j in later] == [2]


def test_recover_interrupted_puts_running_jobs_back(store: Store) -> None:
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    assert store.recover_interrupted(NOW + 1) == 1
    recovered = store.get_job(job.id)
    assert recovered is not None and recovered.state == "pending" and recovered.attempts == 0


def test_backpressure_claims_only_discover_jobs(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    store.record_page(
        job_id=job.id,
        run_id=run_id,
        did=DID_A,
        collection=COLL,
        records=[(f"3k{i:011d}", "bafyx") for i in range(3)],
        cursor=None,
        skipped=0,
        now=NOW,
    )
    store.finish_job(job.id, state="done", now=NOW)
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_B], now=NOW)
    store.create_run(mode="discover", collections=[COLL], dids=[], now=NOW)
    claimed = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=2)
    assert [j.kind for j in claimed] == ["discover"]
    assert store.ack_records(store.list_records(after=0, limit=10)[1].id) == 2
    assert [j.kind for j in store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=2)] == [
        "backfill"
    ]


def test_record_page_is_idempotent_per_record_and_saves_cursor(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    page = [("3kaaaaaaaaaa2", "bafy1"), ("3kaaaaaaaaaa3", "bafy2")]
    kw = dict(job_id=job.id, run_id=run_id, did=DID_A, collection=COLL, skipped=1, now=NOW)
    assert store.record_page(records=page, cursor="c1", **kw) == 2  # type: ignore[arg-type]
    assert store.record_page(records=page, cursor="c2", **kw) == 0  # type: ignore[arg-type]
    saved = store.get_job(job.id)
    assert saved is not None and (saved.cursor, saved.pages, saved.records_enqueued) == ("c2", 2, 2)
    assert saved.records_skipped == 2
    assert store.queue_depth() == 2
    records = store.list_records(after=0, limit=10)
    assert [r.public()["source"] for r in records] == ["backfill", "backfill"]
    assert records[0].public() == {
        "id": records[0].id,
        "did": DID_A,
        "collection": COLL,
        "rkey": "3kaaaaaaaaaa2",
        "operation": "create",
        "cid": "bafy1",
        "source": "backfill",
        "run_id": run_id,
    }


def test_ack_deletes_through_id_and_ids_are_never_reused(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    kw = dict(job_id=job.id, run_id=run_id, did=DID_A, collection=COLL, cursor=None, skipped=0, now=NOW)
    store.record_page(records=[("a", "c1"), ("b", "c2")], **kw)  # type: ignore[arg-type]
    last = store.list_records(after=0, limit=10)[-1].id
    assert store.ack_records(last) == 2
    assert store.ack_records(last) == 0
    store.record_page(records=[("a", "c1")], **kw)  # type: ignore[arg-type]
    assert store.list_records(after=0, limit=10)[0].id > last
    assert store.queue_depth() == 1


def test_discovery_page_caps_the_union_and_fans_out_pairs(store: Store) -> None:
    run_id, created = store.create_run(mode="discover", collections=[COLL, COLL2], dids=[], now=NOW)
    assert created.enqueued == 2
    discover = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    by_coll = {j.collection: j for j in discover}
    first = store.record_discovery_page(
        job_id=by_coll[COLL].id,
        run_id=run_id,
        collection=COLL,
        dids=[DID_A, DID_A],
        cursor="r1",
        max_dids=2,
        now=NOW,
    )
    assert (first.new_dids, first.jobs_enqueued, first.cap_reached) == (1, 2, False)
    third = "did:plc:cccccccccccccccccccccccc"
    second = store.record_discovery_page(
        job_id=by_coll[COLL2].id,
        run_id=run_id,
        collection=COLL2,
        dids=[DID_A, DID_B, third],
        cursor=None,
        max_dids=2,
        now=NOW,
    )
    assert (second.new_dids, second.jobs_enqueued, second.cap_reached) == (1, 2, True)
    run = store.get_run(run_id)
    assert run is not None and run.dids == 2 and run.state == "discovering"
    assert run.discovery[COLL].pages == 1 and run.discovery[COLL2].dids == 3  # listed by the relay for COLL2
    assert store.get_job(by_coll[COLL].id).cursor == "r1"  # type: ignore[union-attr]


def test_run_state_moves_to_finished_and_back_on_retry(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert store.get_run(run_id).state == "running"  # type: ignore[union-attr]
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    store.finish_job(job.id, state="failed", now=NOW + 1, error_code="timeout", last_error="slow")
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished" and run.finished_at == NOW + 1
    assert run.jobs["failed"] == 1
    assert store.retry_jobs(now=NOW + 2, state="failed", run_id=run_id) == 1
    run = store.get_run(run_id)
    assert run is not None and run.state == "running" and run.finished_at is None
    retried = store.get_job(job.id)
    assert retried is not None and retried.attempts == 0 and retried.error_code is None


def test_retry_skips_a_pair_that_is_active_again(store: Store) -> None:
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    store.finish_job(job.id, state="failed", now=NOW, error_code="x", last_error="x")
    store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    assert store.retry_jobs(now=NOW, ids=[job.id]) == 0


def test_cancel_run_cancels_pending_jobs(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A, DID_B], now=NOW)
    assert store.cancel_run(run_id, NOW) is True
    assert store.cancel_run(run_id, NOW) is False
    assert store.cancel_run(run_id + 100, NOW) is None
    run = store.get_run(run_id)
    assert run is not None and run.state == "cancelled" and run.jobs["cancelled"] == 2


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
    store.put_publisher(did=DID_B, pds="https://c", signing_key=None, signing_key_id=None, now=NOW)
    assert [x.did for x in store.list_publishers(after="", limit=1)] == [DID_A]
    assert [x.did for x in store.list_publishers(after=DID_A, limit=5)] == [DID_B]


def test_cancelling_a_finished_run_changes_nothing(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
    store.finish_job(job.id, state="done", now=NOW + 1)
    assert store.cancel_run(run_id, NOW + 2) is False
    run = store.get_run(run_id)
    assert run is not None and run.state == "finished" and run.finished_at == NOW + 1


def test_cancelled_run_gets_finished_at_once_idle(store: Store) -> None:
    run_id, _ = store.create_run(mode="explicit", collections=[COLL], dids=[DID_A, DID_B], now=NOW)
    [running] = store.claim_jobs(now=NOW, limit=1, owner="t", max_records_queue=10)
    assert store.cancel_run(run_id, NOW + 1) is True
    assert store.get_run(run_id).finished_at is None  # type: ignore[union-attr]
    store.finish_job(running.id, state="cancelled", now=NOW + 2)
    run = store.get_run(run_id)
    assert run is not None and run.state == "cancelled" and run.finished_at == NOW + 2
