"""Reconcile (SPEC 6.4) through a real daemon against the simulated network, in both sync modes.

A consumer applies the records queue in order (create/update set the record, delete removes it); after
any sequence of backfills, mutations of the simulated accounts and cancels, its state must equal the
network's records exactly, and a re-backfill of what did not change writes nothing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.process.daemon import Daemon
from daemon.simnet import DaemonLimits, RunningNetwork, build_spec, expected_values, open_network
from daemon.simnet.records import pair_state
from daemon.store.models import Run
from tests.inprocess import finish, jobs_of, running_daemon

A = "com.example.a"
B = "com.example.b"
C = "com.example.c"
Key = tuple[str, str, str]

pytestmark = pytest.mark.parametrize("mode", ["verified", "list"])


class Consumer:
    """An indexer that applies the queue in id order, as a real one would, and acknowledges it."""

    def __init__(self) -> None:
        self.state: dict[Key, tuple[str, object]] = {}
        self.entries: list[dict[str, Any]] = []

    async def drain(self, daemon: Daemon) -> list[dict[str, Any]]:
        """Apply and ack everything queued; the entries applied."""
        store = daemon.db.store
        text, last = await daemon.db.run(store.list_records_json, after=0, limit=1_000_000)
        entries: list[dict[str, Any]] = json.loads(text)
        for entry in entries:
            key = (entry["did"], entry["collection"], entry["rkey"])
            if entry["operation"] == "delete":
                assert entry["cid"] == "" and entry["record"] is None
                assert key in self.state, f"delete of a record never created: {key}"
                del self.state[key]
            else:
                if entry["operation"] == "update":
                    assert key in self.state and self.state[key][0] != entry["cid"]
                self.state[key] = (entry["cid"], entry["record"])
        if last is not None:
            await daemon.db.run(store.ack_records, last)
        self.entries.extend(entries)
        return entries

    def matches(self, network: RunningNetwork, mode: str) -> bool:
        return self.state == expected_values(network.spec, limits=DaemonLimits(mode=mode))


def network_spec(accounts: int = 3, records: int = 120) -> Any:
    return build_spec(accounts, records, collections=[A, B, C], hosts=2, cursor_on_last_page=True)


async def backfill(daemon: Daemon, network: RunningNetwork, *, full: bool = False, **kw: Any) -> Run:
    run_id, _ = await daemon.db.run(
        daemon.db.store.create_run,
        mode="explicit",
        collections=list(network.spec.collections),
        dids=[a.did for a in network.spec.accounts],
        now=daemon.wall_clock(),
        full=full,
        **kw,
    )
    daemon.engine.notify()
    return await finish(daemon, run_id)


def ops(entries: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["operation"] for e in entries)


async def test_a_rebackfill_writes_exactly_the_changes(tmp_path: Path, mode: str) -> None:
    async with open_network(network_spec()) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            first = await backfill(daemon, network)
            assert ops(await consumer.drain(daemon)) == {"create": 3 * 3 * 120}
            assert first.operations == {"create": 1080, "update": 0, "delete": 0}
            assert consumer.matches(network, mode)

            unchanged = await backfill(daemon, network)
            assert await consumer.drain(daemon) == [] and unchanged.operations["create"] == 0

            one, two, three = (a.did for a in network.spec.accounts)
            network.mutate(one, A, update=[0, 5, 7], delete=[1, 2], create=4)
            network.mutate(two, B, empty=True)
            network.mutate(three, C, delete=[10], recreate=[10])  # deleted and recreated, same CID
            changed = await backfill(daemon, network)
            written = await consumer.drain(daemon)
            assert ops(written) == {"create": 4, "update": 3, "delete": 2 + 120}
            assert changed.operations == {"create": 4, "update": 3, "delete": 122}
            assert changed.replay_from_us == int(changed.created_at * 1_000_000)
            assert consumer.matches(network, mode)
            for entry in written:
                if entry["operation"] != "delete":
                    assert entry["verified"] is (mode == "verified")
                    assert (entry["rev"] is not None) is (mode == "verified")


async def test_full_rewrites_every_record_and_still_deletes(tmp_path: Path, mode: str) -> None:
    async with open_network(network_spec(accounts=1, records=30)) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            await backfill(daemon, network)
            await consumer.drain(daemon)
            (did,) = (a.did for a in network.spec.accounts)
            network.mutate(did, A, delete=[3])
            await backfill(daemon, network, full=True)
            written = await consumer.drain(daemon)
            assert ops(written) == {"create": 3 * 30 - 1, "delete": 1}
            assert consumer.matches(network, mode)


async def test_a_record_that_fails_its_check_is_skipped_not_deleted(tmp_path: Path, mode: str) -> None:
    """Records the account still has but that fail a check this time (list mode: listRecords alters
    their values, so they no longer match their CIDs) are skipped and counted, never written as deletes;
    verified mode reads the signed repo, where nothing changed."""
    async with open_network(network_spec(accounts=2, records=30)) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            await backfill(daemon, network)
            await consumer.drain(daemon)
            first, second = (a.did for a in network.spec.accounts)
            network.set_behaviour(first, "list_altered", {"every": 3})
            network.mutate(second, A, delete=[4])
            run = await backfill(daemon, network)
            written = await consumer.drain(daemon)
            jobs = await jobs_of(daemon, run.id)
    assert [(e["did"], e["operation"]) for e in written] == [(second, "delete")]
    skipped = sum(j.records_skipped for j in jobs if j.did == first)
    assert skipped == (3 * 10 if mode == "list" else 0)  # every third record of each collection
    assert all(j.state == "done" for j in jobs)


async def test_a_cancelled_listing_writes_no_delete(tmp_path: Path, mode: str) -> None:
    spec = build_spec(4, 400, collections=[A, B, C], hosts=2, cursor_on_last_page=True, latency=0.01)
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            await backfill(daemon, network)
            await consumer.drain(daemon)
            for account in network.spec.accounts:
                for collection in (A, B, C):
                    network.mutate(account.did, collection, delete=list(range(390, 400)))
            run_id, _ = await daemon.db.run(
                daemon.db.store.create_run,
                mode="explicit",
                collections=[A, B, C],
                dids=[a.did for a in network.spec.accounts],
                now=daemon.wall_clock(),
            )
            daemon.engine.notify()
            with trio.fail_after(30):
                while not any(j.pages for j in await jobs_of(daemon, run_id)):
                    await trio.sleep(0.005)
            await daemon.db.run(daemon.db.store.cancel_run, run_id, daemon.wall_clock())
            daemon.engine.cancel_run(run_id)
            run = await finish(daemon, run_id)
            jobs = {(j.did, j.collection): j.state for j in await jobs_of(daemon, run_id)}
            assert run.state == "cancelled" and "cancelled" in jobs.values()
            deletes = [e for e in await consumer.drain(daemon) if e["operation"] == "delete"]
            # only a listing that completed may delete: a cancelled job never wrote one
            assert all(jobs[(e["did"], e["collection"])] == "done" for e in deletes), (
                jobs,
                [(e["did"][-4:], e["collection"], e["rkey"]) for e in deletes],
            )
            assert len(deletes) == 10 * sum(1 for state in jobs.values() if state == "done")


async def test_collections_enter_the_queue_in_the_configured_order(tmp_path: Path, mode: str) -> None:
    async with open_network(network_spec(accounts=4, records=150)) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            await backfill(daemon, network)
            entries = await consumer.drain(daemon)
            for account in network.spec.accounts:
                ids = {
                    c: [e["id"] for e in entries if e["did"] == account.did and e["collection"] == c]
                    for c in (A, B, C)
                }
                assert max(ids[A]) < min(ids[B]) and max(ids[B]) < min(ids[C])


async def test_random_sequences_end_with_the_networks_records(tmp_path: Path, mode: str) -> None:
    rng = random.Random(20261201)
    async with open_network(network_spec(accounts=3, records=40)) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            for _ in range(6):
                for did in [a.did for a in network.spec.accounts]:
                    for collection in (A, B, C):
                        account = network.spec.account(did)
                        live = list(
                            pair_state(
                                account.records.get(collection, 0), account.mutations, collection
                            ).indices
                        )
                        rng.shuffle(live)
                        roll = rng.random()
                        if roll < 0.4 and live:
                            network.mutate(
                                did, collection, update=live[:2], delete=live[2:4], create=rng.randrange(3)
                            )
                        elif roll < 0.5:
                            network.mutate(did, collection, empty=True)
                        elif roll < 0.7:
                            network.mutate(did, collection, create=rng.randrange(1, 5))
                await backfill(daemon, network, full=rng.random() < 0.2)
                await consumer.drain(daemon)
                assert consumer.matches(network, mode)
            assert await backfill(daemon, network) and await consumer.drain(daemon) == []


async def test_deletes_need_a_complete_listing_even_after_failures(tmp_path: Path, mode: str) -> None:
    async with open_network(network_spec(accounts=1, records=50)) as network:
        async with running_daemon(tmp_path, network, {"sync": {"mode": mode}}) as daemon:
            consumer = Consumer()
            await backfill(daemon, network)
            await consumer.drain(daemon)
            (did,) = (a.did for a in network.spec.accounts)
            network.mutate(did, A, delete=[0, 1])
            with trio.fail_after(30):
                await backfill(daemon, network)
            assert ops(await consumer.drain(daemon)) == {"delete": 2}
            assert consumer.matches(network, mode)
