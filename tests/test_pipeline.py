"""The backfill pipeline (SPEC 6, 6.1) in a real daemon against the simulated network on loopback."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import trio

from daemon.simnet import (
    Account,
    DaemonLimits,
    build_spec,
    expected_failed,
    expected_records,
    open_network,
    plc_did,
    possible_records,
    with_account,
)
from tests.inprocess import COLL, finish, jobs_of, queued, running_daemon, start_run

LIMITS = DaemonLimits(max_attempts=3)


def single(behaviour: str | None, records: int = 250, params: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    """One good account (index 0) and one account with ``behaviour`` (index 1), on one host."""
    spec = build_spec(1, records, collections=[COLL], hosts=1)
    return with_account(spec, Account(plc_did(1), 0, {COLL: records}, behaviour, params or {}))


def list_records_requests(network, did: str) -> list[dict[str, list[str]]]:  # type: ignore[no-untyped-def]
    stats = network.pds_stats(network.account(did).pds)
    out = []
    for path, query in stats.seen:
        if path.endswith("com.atproto.repo.listRecords"):
            q = parse_qs(query)
            if q.get("repo") == [did]:
                out.append(q)
    return out


async def test_records_become_records_jobs_with_the_right_fields(tmp_path: Path) -> None:
    async with open_network(build_spec(2, 250, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            dids = [a.did for a in network.spec.accounts]
            run_id = await start_run(daemon, dids=dids)
            run = await finish(daemon, run_id)
            records = await daemon.db.run(daemon.db.store.list_records, after=0, limit=10_000)
        assert run.state == "finished" and run.jobs["done"] == 2 and run.records_enqueued == 500
        assert {(r.did, r.collection, r.rkey, r.cid) for r in records} == expected_records(network.spec)
        assert all(r.operation == "create" and r.source == "backfill" and r.run_id == run_id for r in records)
        requests = list_records_requests(network, dids[0])
        assert [q.get("cursor") is None for q in requests] == [True, False, False]  # paged by cursor
        assert all(q["limit"] == ["100"] and q["collection"] == [COLL] for q in requests)


@pytest.mark.parametrize(
    ("behaviour", "code", "attempts"),
    [
        ("plc_404", "did_not_found", 1),
        ("plc_410", "did_tombstoned", 1),
        ("doc_no_pds", "no_pds_service", 1),
        ("doc_wrong_id", "invalid_did_document", 1),
        ("doc_bad_json", "invalid_did_document", 1),
        ("pds_takendown", "repo_takendown", 1),
        ("pds_deactivated", "repo_deactivated", 1),
        ("pds_suspended", "repo_suspended", 1),
        ("pds_could_not_find", "repo_not_found", 1),
        ("pds_repo_not_found", "repo_not_found", 1),
        ("pds_500", "http_status", 3),
        ("pds_404_mid", "not_found_mid_pagination", 3),
        ("pds_too_many_records", "page_too_large", 3),
        ("pds_repeat_cursor", "repeated_cursor", 3),
        ("pds_body_not_object", "bad_response", 3),
        ("pds_missing_records", "bad_response", 3),
        ("pds_cursor_not_string", "bad_response", 3),
        ("pds_invalid_json", "bad_response", 3),
        ("pds_record_not_object", "bad_response", 3),
        ("pds_redirect", "redirect", 3),
        ("pds_hang", "timeout", 3),
        ("pds_trickle", "timeout", 3),
        ("pds_disconnect", "connect_error", 3),
    ],
)
async def test_failure_outcomes(tmp_path: Path, behaviour: str, code: str, attempts: int) -> None:
    spec = single(behaviour)
    hostile = plc_did(1)
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, {"limits": {"page_timeout": 0.5}}) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(0), hostile])
            await finish(daemon, run_id)
            jobs = {j.did: j for j in await jobs_of(daemon, run_id)}
            got = await queued(daemon)
    bad = jobs[hostile]
    assert (bad.state, bad.error_code, bad.attempts) == ("failed", code, attempts)
    assert bad.last_error
    assert expected_failed(network.spec, limits=LIMITS) == {(hostile, COLL): code}
    assert jobs[plc_did(0)].state == "done"  # a failing job does not poison the others
    assert expected_records(network.spec, limits=LIMITS) <= set(got) <= possible_records(network.spec)
    assert len(got) == len(set(got))
    if behaviour.startswith(("plc_", "doc_")):
        assert list_records_requests(network, hostile) == []  # resolver failure: nothing sent to the PDS
    if behaviour == "pds_too_many_records":
        assert not [r for r in got if r[0] == hostile]  # an oversized page is rejected whole
    if behaviour == "pds_repeat_cursor":
        # the first attempt makes exactly 2 calls; each retry resumes at the saved cursor and makes 1
        assert len(list_records_requests(network, hostile)) == 2 + (attempts - 1)
    if behaviour == "pds_redirect":
        stats = network.pds_stats(0)
        assert not [p for p, _ in stats.seen if "redirect-target" in p]


async def test_first_page_404_is_done_with_zero_records(tmp_path: Path) -> None:
    async with open_network(single("pds_404_first")) as network:
        async with running_daemon(tmp_path, network) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(1)])
            run = await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
    assert (job.state, job.records_enqueued, job.attempts) == ("done", 0, 1)
    assert run.records_enqueued == 0


async def test_invalid_records_are_skipped_and_counted(tmp_path: Path) -> None:
    async with open_network(single("pds_bad_records")) as network:
        async with running_daemon(tmp_path, network) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(1)])
            await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
            got = await queued(daemon)
    assert job.state == "done" and job.records_skipped > 0
    assert set(got) == expected_records(network.spec, dids=[plc_did(1)])


async def test_page_cap_is_an_error(tmp_path: Path) -> None:
    async with open_network(single("pds_endless")) as network:
        overrides = {"limits": {"max_pages_per_collection": 3}, "retry": {"max_attempts": 1}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(1)])
            await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
    assert (job.state, job.error_code) == ("failed", "too_many_pages")
    assert len(list_records_requests(network, plc_did(1))) == 3


async def test_resume_after_failure_mid_pagination_fetches_no_page_twice(tmp_path: Path) -> None:
    spec = single("pds_fail_after_page", records=450, params={"page": 2, "failures": 1})
    async with open_network(spec) as network, running_daemon(tmp_path, network) as daemon:
        run_id = await start_run(daemon, dids=[plc_did(1)])
        await finish(daemon, run_id)
        [job] = await jobs_of(daemon, run_id)
        got = await queued(daemon)
    assert (job.state, job.attempts, job.pages) == ("done", 2, 5)
    cursors = [q.get("cursor", [None])[0] for q in list_records_requests(network, plc_did(1))]
    statuses = network.pds_stats(0).statuses
    assert statuses[500] == 1
    # the failed page is asked again once; every page that succeeded was asked exactly once
    assert Counter(cursors).most_common(1)[0][1] == 2 and len(cursors) == 6 and cursors[0] is None
    assert len(got) == len(set(got)) == 450
    assert set(got) == expected_records(network.spec, dids=[plc_did(1)])


async def test_one_job_per_did_and_collection(tmp_path: Path) -> None:
    spec = build_spec(3, 5, collections=[COLL, "com.example.other"])
    async with open_network(spec) as network, running_daemon(tmp_path, network) as daemon:
        dids = [a.did for a in spec.accounts]
        run_id = await start_run(daemon, dids=dids)
        await finish(daemon, run_id)
        jobs = await jobs_of(daemon, run_id)
        got = await queued(daemon)
    assert sorted((j.did, j.collection) for j in jobs) == sorted(
        (d, c) for d in dids for c in (COLL, "com.example.other")
    )
    assert set(got) == expected_records(network.spec)


async def test_rate_limited_account_waits_and_completes(tmp_path: Path) -> None:
    async with open_network(single("pds_429_once", records=50)) as network:
        async with running_daemon(tmp_path, network, {"network": {"rate_limit_pause": 0.2}}) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(1), plc_did(0)])
            await finish(daemon, run_id)
            jobs = {j.did: j for j in await jobs_of(daemon, run_id)}
    hostile = jobs[plc_did(1)]
    assert (hostile.state, hostile.attempts, hostile.rate_limit_waits) == ("done", 1, 1)


async def test_many_page_timeouts_in_a_row_then_requests_still_work(tmp_path: Path) -> None:
    """More timed-out requests than the per-host pool holds (httpcore#1093), then the host still answers."""
    spec = build_spec(0, 0, collections=[COLL], hosts=1, hostile={"pds_hang": 24})
    good = build_spec(4, 120, collections=[COLL])
    for account in good.accounts:
        spec = with_account(spec, Account(plc_did(100 + good.accounts.index(account)), 0, {COLL: 120}))
    async with open_network(spec) as network:
        overrides = {"limits": {"page_timeout": 0.2}, "retry": {"max_attempts": 1}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            hung = [a.did for a in spec.accounts if a.behaviour == "pds_hang"]
            first = await start_run(daemon, dids=hung)
            await finish(daemon, first)
            assert {j.error_code for j in await jobs_of(daemon, first)} == {"timeout"}
            healthy = [a.did for a in spec.accounts if a.behaviour is None]
            second = await start_run(daemon, dids=healthy)
            run = await finish(daemon, second)
    assert run.jobs["done"] == 4 and run.records_enqueued == 480


async def test_discovery_unions_pages_and_fans_out(tmp_path: Path) -> None:
    spec = build_spec(30, 3, collections=[COLL, "com.example.other"])
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, {"limits": {"discovery_page_size": 7}}) as daemon:
            run_id = await start_run(daemon)
            run = await finish(daemon, run_id)
            got = await queued(daemon)
    assert run.mode == "discover" and run.dids == 30
    assert run.discovery[COLL].pages == 5 and run.discovery[COLL].error is None
    assert run.jobs["done"] == 60
    assert set(got) == expected_records(network.spec)


async def test_discovery_cap_limits_distinct_dids(tmp_path: Path) -> None:
    spec = build_spec(30, 1, collections=[COLL, "com.example.other"])
    async with open_network(spec) as network:
        overrides = {"limits": {"discovery_page_size": 4, "max_discovered_dids": 10}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon)
            run = await finish(daemon, run_id)
            jobs = await jobs_of(daemon, run_id)
    assert run.dids == 10
    assert len({j.did for j in jobs if j.kind == "backfill"}) == 10
    relay_pages = sum(1 for p, _ in network.relay_stats.seen if "listReposByCollection" in p)
    assert relay_pages <= 6  # stopped early once the cap was reached (16 pages without the cap)


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("relay_500", "http_status"),
        ("relay_hang", "timeout"),
        ("relay_bad_body", "bad_response"),
        ("relay_repeat_cursor", "repeated_cursor"),
    ],
)
async def test_one_failing_collection_is_recorded_and_others_go_on(
    tmp_path: Path, mode: str, code: str
) -> None:
    spec = build_spec(
        5, 2, collections=[COLL, "com.example.other"], relay_behaviour={"com.example.other": mode}
    )
    async with open_network(spec) as network:
        overrides = {
            "limits": {"discovery_timeout": 0.3, "discovery_page_size": 2},
            "retry": {"max_attempts": 2},
        }
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon)
            run = await finish(daemon, run_id)
            jobs = await jobs_of(daemon, run_id)
    discover = {j.collection: j for j in jobs if j.kind == "discover"}
    assert (discover["com.example.other"].state, discover["com.example.other"].error_code) == ("failed", code)
    assert discover[COLL].state == "done"
    assert (run.discovery["com.example.other"].error or "").startswith(code)
    assert run.discovery[COLL].error is None and run.dids == 5
    assert run.jobs["done"] == 10  # DIDs found through COLL are backfilled for both collections


async def test_junk_relay_entries_are_skipped(tmp_path: Path) -> None:
    spec = build_spec(6, 1, collections=[COLL], relay_behaviour={COLL: "relay_junk_entries"})
    async with open_network(spec) as network, running_daemon(tmp_path, network) as daemon:
        run_id = await start_run(daemon)
        run = await finish(daemon, run_id)
    assert run.dids == 6 and run.jobs["done"] == 6


async def test_did_cache_is_durable_and_reused(tmp_path: Path) -> None:
    async with open_network(build_spec(2, 3, collections=[COLL])) as network:
        dids = [a.did for a in network.spec.accounts]
        async with running_daemon(tmp_path, network) as daemon:
            await finish(daemon, await start_run(daemon, dids=dids))
            plc_requests = network.plc_stats.requests
            await finish(daemon, await start_run(daemon, dids=dids))
            assert network.plc_stats.requests == plc_requests  # served from the cache
            publishers = await daemon.db.run(daemon.db.store.list_publishers, after="", limit=10)
    assert [p.did for p in publishers] == sorted(dids)
    assert all(p.last_seen_at > p.resolved_at for p in publishers)  # seen again on the second run
    assert all(p.pds == network.pds_urls[0] and p.signing_key and p.signing_key_id for p in publishers)


async def test_cancel_run_stops_its_jobs(tmp_path: Path) -> None:
    spec = build_spec(0, 0, collections=[COLL], hostile={"pds_hang": 3})
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, {"limits": {"page_timeout": 30.0}}) as daemon:
            run_id = await start_run(daemon, dids=[a.did for a in spec.accounts])
            with trio.fail_after(10):
                while daemon.engine.busy < 3:
                    await trio.sleep(0.01)
            await daemon.db.run(daemon.db.store.cancel_run, run_id, daemon.wall_clock())
            daemon.engine.cancel_run(run_id)
            run = await finish(daemon, run_id)
            with trio.fail_after(10):
                while True:
                    jobs = await jobs_of(daemon, run_id)
                    if {j.state for j in jobs} == {"cancelled"}:
                        break
                    await trio.sleep(0.01)
    assert run.state == "cancelled" and {j.state for j in jobs} == {"cancelled"}


async def test_concurrent_jobs_of_one_did_share_one_resolution(tmp_path: Path) -> None:
    collections = [COLL, "com.example.other", "com.example.third"]
    spec = build_spec(2, 3, collections=collections, plc_latency=0.2)
    spec = with_account(spec, Account(plc_did(9), 0, dict.fromkeys(collections, 3), "plc_404"))
    async with open_network(spec) as network:
        # enough workers for all nine jobs to start together (a failed lookup is not cached)
        async with running_daemon(tmp_path, network, {"daemon": {"workers": 12}}) as daemon:
            run_id = await start_run(daemon, dids=[a.did for a in spec.accounts])
            run = await finish(daemon, run_id)
            jobs = await jobs_of(daemon, run_id)
    assert run.jobs["done"] == 6 and run.jobs["failed"] == 3
    assert {j.error_code for j in jobs if j.state == "failed"} == {"did_not_found"}
    assert all(j.attempts == 1 for j in jobs)
    assert network.plc_stats.requests == 3  # one lookup per DID, though three jobs each wanted it
