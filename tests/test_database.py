"""The store's thread: ordering, group commit with per-call savepoints, cancellation while queued."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from daemon.store.database import Database
from daemon.store.sqlite import SqliteStore as Store


def _job(store: Store, did: str) -> int:
    run_id, _ = store.create_run(mode="explicit", collections=["com.example.a"], dids=[did], now=1.0)
    (job,) = store.list_jobs(run_id=run_id)
    return job.id


async def test_calls_return_their_results_and_errors(tmp_path: Path) -> None:
    db = Database(Store.open(tmp_path / "db.sqlite3"))
    try:
        assert await db.run(db.store.ping) is True

        def boom() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await db.run(boom)
        assert await db.run(db.store.queue_depth) == 0
    finally:
        await db.aclose()


async def test_a_group_commits_every_call_and_a_failing_call_rolls_back_alone(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    db = Database(store)
    job_id = _job(store, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    gate = threading.Event()
    kw = {"run_id": 1, "did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "collection": "com.example.a", "skipped": 0}
    results: dict[str, object] = {}

    def failing_write() -> None:
        with store._tx() as conn:
            conn.execute("UPDATE queue_stats SET depth = 999 WHERE id = 1")
            raise sqlite3.IntegrityError("refused")

    async def call(name: str, fn: object, *args: object, **kwargs: object) -> None:
        try:
            results[name] = await db.run(fn, *args, **kwargs)  # type: ignore[arg-type]
        except sqlite3.Error as exc:
            results[name] = exc

    try:
        async with trio.open_nursery() as nursery:
            # Hold the thread so that the next calls queue up and run as one group.
            nursery.start_soon(call, "hold", gate.wait)
            await trio.sleep(0.05)
            nursery.start_soon(
                lambda: call(
                    "p1", store.record_page, job_id=job_id, records=[("a", "c1")], cursor="x", now=2.0, **kw
                )
            )
            await trio.sleep(0.01)
            nursery.start_soon(call, "bad", failing_write)
            await trio.sleep(0.01)
            nursery.start_soon(
                lambda: call(
                    "p2", store.record_page, job_id=job_id, records=[("b", "c2")], cursor=None, now=3.0, **kw
                )
            )
            await trio.sleep(0.05)
            gate.set()
        assert results["p1"] == 1 and results["p2"] == 1
        assert isinstance(results["bad"], sqlite3.IntegrityError)
        assert store.queue_depth() == 2
        assert [(r.rkey, r.cid) for r in store.list_records(after=0, limit=10)] == [("a", "c1"), ("b", "c2")]
    finally:
        await db.aclose()


async def test_a_queued_call_can_be_cancelled_and_never_runs(tmp_path: Path) -> None:
    db = Database(Store.open(tmp_path / "db.sqlite3"))
    gate = threading.Event()
    ran: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.run, gate.wait)
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await db.run(ran.append, "late")
            assert scope.cancelled_caught
            gate.set()
        assert await db.run(db.store.ping)
        assert ran == []
    finally:
        await db.aclose()


async def test_records_json_matches_the_public_form(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    job_id = _job(store, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    store.record_page(
        job_id=job_id,
        run_id=1,
        did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        collection="com.example.a",
        records=[(f"k{i}", f"c{i}") for i in range(1500)],
        cursor=None,
        skipped=0,
        now=2.0,
    )
    import json

    text, last = store.list_records_json(after=0, limit=1000)
    entries = store.list_records(after=0, limit=1000)
    assert json.loads(text) == [e.public() for e in entries]
    assert last == entries[-1].id
    assert store.list_records_json(after=10_000, limit=10) == ("[]", None)
    assert store.queue_depth() == 1500
    store.close()
