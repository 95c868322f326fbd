"""The backfill pipeline (SPEC 6, 6.1, 6.2, 6.3) in a real daemon against the simulated network on loopback.

Every outcome is predicted by the simulated network's expectation functions for the daemon's mode
(``DaemonLimits(mode=...)``) and checked against what the daemon did: the job's state, error code and
attempts (a permanent failure takes one, a transient one ``max_attempts``), and exactly the records queued.
Small real timeouts, no timing assertions (see tests/inprocess.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import cbrrr
import pytest
import trio

from daemon.atproto.cid import parse_cid
from daemon.atproto.mstwalk import MstRecord
from daemon.errors import ProtocolViolation
from daemon.jobs.verified import VerifiedHandler, _Walked
from daemon.simnet import (
    VERIFIED_BEHAVIOURS,
    Account,
    DaemonLimits,
    HostOptions,
    NetworkSpec,
    RunningNetwork,
    account_rev,
    build_spec,
    expected_failed,
    expected_records,
    expected_values,
    open_network,
    plc_did,
    possible_records,
    with_account,
)
from daemon.simnet.model import listed_records, pair_records
from daemon.store.models import Job
from tests.inprocess import (
    COLL,
    FAST,
    finish,
    jobs_of,
    queued,
    queued_records,
    running_daemon,
    start_run,
)

OTHER = "com.example.other"
MODES = ("verified", "list")
MAX_ATTEMPTS = FAST["retry"]["max_attempts"]
# SPEC 6.1: what fails at once; every other code is retried until max_attempts.
PERMANENT = frozenset(
    {
        "did_not_found",
        "did_tombstoned",
        "no_pds_service",
        "invalid_did_document",
        "blocked_address",
        "insecure_url",
        "repo_takendown",
        "repo_deactivated",
        "repo_suspended",
        "repo_not_found",
        "invalid_signature",
        "no_signing_key",
        "too_many_pages",
    }
)
LIST_RECORDS = "com.atproto.repo.listRecords"
GET_RECORD = "com.atproto.sync.getRecord"
GET_BLOCKS = "com.atproto.sync.getBlocks"
GET_REPO = "com.atproto.sync.getRepo"
GET_REPO_STATUS = "com.atproto.sync.getRepoStatus"
SYNC = frozenset({GET_RECORD, GET_BLOCKS, GET_REPO, GET_REPO_STATUS, "com.atproto.sync.getLatestCommit"})


def limits(mode: str, **values: Any) -> DaemonLimits:
    """The expectations' view of the daemon as tests/inprocess.py configures it, in ``mode``."""
    return DaemonLimits(max_attempts=MAX_ATTEMPTS, mode=mode, **values)


def settings(mode: str, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config overrides: ``sync.mode = mode`` and the ``sections`` given."""
    overrides: dict[str, dict[str, Any]] = {"sync": {"mode": mode}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return overrides


def attempts_for(code: str | None) -> int:
    """The attempts a job ends with: 1 when done or failed permanently, else all of them."""
    return 1 if code is None or code in PERMANENT else MAX_ATTEMPTS


def single(
    behaviour: str | None,
    records: int = 250,
    params: dict[str, object] | None = None,
    *,
    collections: Sequence[str] = (COLL,),
    hosts: int = 1,
) -> NetworkSpec:
    """One good account (index 0) and one account with ``behaviour`` (index 1), both on host 0."""
    spec = build_spec(1, records, collections=collections, hosts=hosts)
    counts = dict.fromkeys(collections, records)
    return with_account(spec, Account(plc_did(1), 0, counts, behaviour, params or {}))


def pds_requests(
    network: RunningNetwork, did: str, host: int | None = None
) -> list[tuple[str, dict[str, list[str]]]]:
    """``(xrpc method, query)`` of every request for ``did`` that a PDS host received (all hosts by default)."""
    hosts = range(len(network.pds_urls)) if host is None else [host]
    out = []
    for index in hosts:
        for path, query in network.pds_stats(index).seen:
            q = parse_qs(query)
            if did in q.get("repo", []) or did in q.get("did", []):
                out.append((path.rsplit("/", 1)[-1], q))
    return out


def methods(network: RunningNetwork, did: str, host: int | None = None) -> Counter[str]:
    return Counter(method for method, _ in pds_requests(network, did, host))


def list_records_requests(network: RunningNetwork, did: str) -> list[dict[str, list[str]]]:
    return [q for method, q in pds_requests(network, did) if method == LIST_RECORDS]


def plc_requests(network: RunningNetwork, did: str) -> int:
    """How many times the PLC directory was asked for ``did``'s document."""
    return sum(1 for path, _ in network.plc_stats.seen if path == f"/{did}")


def check_queue(
    spec: NetworkSpec,
    records: list[dict[str, Any]],
    mode_limits: DaemonLimits,
    *,
    dids: Sequence[str],
    collections: Sequence[str] | None = None,
) -> None:
    """The queue holds exactly the expected records of every pair that ended done, nothing of a failed
    pair but what its pages before the failure could hold, each once, each with its exact value, its
    commit's rev (verified mode) or none (list mode), and ``verified`` set by mode."""
    selection: dict[str, Any] = {"limits": mode_limits, "dids": dids, "collections": collections}
    failed = expected_failed(spec, **selection)
    got = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records]
    assert len(got) == len(set(got)), "a record was queued twice"
    assert {r for r in got if (r[0], r[1]) not in failed} == expected_records(spec, **selection)
    assert {r for r in got if (r[0], r[1]) in failed} <= possible_records(spec, **selection)
    values = expected_values(spec, **selection)
    verified = mode_limits.mode == "verified"
    for record in records:
        key = (record["did"], record["collection"], record["rkey"])
        if key in values:
            assert (record["cid"], record["record"]) == values[key], key
        assert record["verified"] is verified
        assert record["rev"] == (account_rev(spec, record["did"]) if verified else None)
        assert (record["operation"], record["source"]) == ("create", "backfill")


async def backfill(
    tmp_path: Path,
    spec: NetworkSpec,
    mode: str,
    dids: Sequence[str],
    *,
    collections: Sequence[str] | None = None,
    **sections: dict[str, Any],
) -> tuple[RunningNetwork, dict[tuple[str | None, str], Job], list[dict[str, Any]]]:
    """Serve ``spec``, backfill ``dids`` in ``mode`` to the end; the network, the jobs by pair, the queue."""
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, settings(mode, **sections)) as daemon:
            run_id = await start_run(daemon, dids=dids, collections=collections)
            await finish(daemon, run_id)
            jobs = {(j.did, j.collection): j for j in await jobs_of(daemon, run_id) if j.kind == "backfill"}
            records = await queued_records(daemon)
    return network, jobs, records


# -- the records jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_records_become_records_jobs_with_the_right_fields(tmp_path: Path, mode: str) -> None:
    spec = build_spec(2, 250, collections=[COLL])
    dids = [a.did for a in spec.accounts]
    async with open_network(spec) as network:
        async with running_daemon(tmp_path, network, settings(mode)) as daemon:
            run_id = await start_run(daemon, dids=dids)
            run = await finish(daemon, run_id)
            records = await queued_records(daemon)
    assert run.state == "finished" and run.jobs["done"] == 2
    assert run.public()["records_enqueued"] == 500 and run.operations == {
        "create": 500,
        "update": 0,
        "delete": 0,
    }
    # record: the exact JSON value; rev: the signed commit's (verified) or null (list); verified by mode
    check_queue(network.spec, records, limits(mode), dids=dids)
    assert len(records) == 500
    assert all(r["run_id"] == run_id for r in records)
    assert {r["verified"] for r in records} == {mode == "verified"}
    if mode == "verified":
        assert {r["rev"] for r in records if r["did"] == dids[0]} == {account_rev(network.spec, dids[0])}
        # one commit probe per account, and listRecords is not used at all
        for did in dids:
            found = methods(network, did)
            assert found[GET_RECORD] == 1 and not found[LIST_RECORDS]
            assert set(found) <= SYNC
    else:
        assert {r["rev"] for r in records} == {None}
        for did in dids:
            requests = list_records_requests(network, did)
            assert [q.get("cursor") is None for q in requests] == [True, False, False]  # paged by cursor
            assert all(q["limit"] == ["100"] and q["collection"] == [COLL] for q in requests)
            assert set(methods(network, did)) == {LIST_RECORDS}


# -- SPEC 6.1 outcomes, in both modes --------------------------------------------------------------------

# (behaviour, list mode's code, verified mode's code); None: the pair ends done. In verified mode the
# listRecords-only modes do not matter (the signed repo is read through the sync endpoints).
OUTCOMES = [
    ("plc_404", "did_not_found", "did_not_found"),
    ("plc_410", "did_tombstoned", "did_tombstoned"),
    ("doc_no_pds", "no_pds_service", "no_pds_service"),
    ("doc_wrong_id", "invalid_did_document", "invalid_did_document"),
    ("doc_bad_json", "invalid_did_document", "invalid_did_document"),
    ("pds_takendown", "repo_takendown", "repo_takendown"),
    ("pds_deactivated", "repo_deactivated", "repo_deactivated"),
    ("pds_suspended", "repo_suspended", "repo_suspended"),
    ("pds_could_not_find", "repo_not_found", "repo_not_found"),
    ("pds_repo_not_found", "repo_not_found", "repo_not_found"),
    ("pds_500", "http_status", "http_status"),
    ("pds_404_mid", "not_found_mid_pagination", None),
    ("pds_too_many_records", "page_too_large", None),
    ("pds_repeat_cursor", "repeated_cursor", None),
    ("pds_body_not_object", "bad_response", None),
    ("pds_missing_records", "bad_response", None),
    ("pds_cursor_not_string", "bad_response", None),
    ("pds_invalid_json", "bad_response", None),
    ("pds_record_not_object", "bad_response", None),
    ("pds_redirect", "redirect", "redirect"),
    ("pds_hang", "timeout", "timeout"),
    ("pds_trickle", "timeout", "timeout"),
    ("pds_disconnect", "connect_error", "connect_error"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("behaviour", "list_code", "verified_code"), OUTCOMES)
async def test_outcomes(
    tmp_path: Path, mode: str, behaviour: str, list_code: str | None, verified_code: str | None
) -> None:
    spec = single(behaviour)
    good, hostile = plc_did(0), plc_did(1)
    code = list_code if mode == "list" else verified_code
    # the table here and the simulated network's own prediction agree
    assert expected_failed(spec, limits=limits(mode)) == ({} if code is None else {(hostile, COLL): code})
    network, jobs, records = await backfill(tmp_path, spec, mode, [good, hostile])
    bad = jobs[(hostile, COLL)]
    assert (bad.state, bad.error_code, bad.attempts) == (
        "failed" if code else "done",
        code,
        attempts_for(code),
    )
    assert bool(bad.last_error) == bool(code)
    assert (jobs[(good, COLL)].state, jobs[(good, COLL)].attempts) == ("done", 1)  # no poisoning
    check_queue(network.spec, records, limits(mode), dids=[good, hostile])
    if code is not None and code in PERMANENT:
        assert not [r for r in records if r["did"] == hostile]  # failed at once: nothing written
    if behaviour.startswith(("plc_", "doc_")):
        assert pds_requests(network, hostile) == []  # resolver failure: nothing sent to any PDS
    if mode == "verified":
        assert not list_records_requests(network, hostile) and not list_records_requests(network, good)
    if behaviour == "pds_too_many_records" and mode == "list":
        assert not [r for r in records if r["did"] == hostile]  # an oversized page is rejected whole
    if behaviour == "pds_repeat_cursor" and mode == "list":
        # the first attempt makes exactly 2 calls; each retry resumes at the saved cursor and makes 1
        assert len(list_records_requests(network, hostile)) == 2 + (MAX_ATTEMPTS - 1)
    if behaviour == "pds_redirect":
        assert not [p for p, _ in network.pds_stats(0).seen if "redirect-target" in p]


@pytest.mark.parametrize("mode", MODES)
async def test_first_page_404(tmp_path: Path, mode: str) -> None:
    """List mode: a first-page 404 means no such collection, done with 0 records; verified mode reads the
    signed repo instead and finds every record."""
    network, jobs, records = await backfill(tmp_path, single("pds_404_first"), mode, [plc_did(1)])
    job = jobs[(plc_did(1), COLL)]
    assert (job.state, job.attempts) == ("done", 1)
    assert job.records_enqueued == (0 if mode == "list" else 250)
    check_queue(network.spec, records, limits(mode), dids=[plc_did(1)])


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_records_are_skipped_and_counted(tmp_path: Path, mode: str) -> None:
    network, jobs, records = await backfill(tmp_path, single("pds_bad_records"), mode, [plc_did(1)])
    job = jobs[(plc_did(1), COLL)]
    assert job.state == "done"
    if mode == "list":
        assert job.records_skipped > 0  # the junk listRecords mixes in
    else:
        assert job.records_skipped == 0  # the signed repo has none
    check_queue(network.spec, records, limits(mode), dids=[plc_did(1)])
    assert len(records) == 250


# -- verified mode's hostile network, in both modes ------------------------------------------------------


def hostile_case(behaviour: str, params: dict[str, object] | None = None) -> Any:
    return pytest.param(behaviour, params or {}, id="-".join([behaviour, *map(str, (params or {}).values())]))


HOSTILE = [
    hostile_case("commit_other_key"),
    hostile_case("commit_high_s"),
    hostile_case("key_rotated"),
    hostile_case("commit_other_did"),
    hostile_case("commit_v2"),
    *(hostile_case("block_bad_bytes", {"block": block}) for block in ("root", "commit", "record")),
    *(hostile_case("block_omitted", {"block": block}) for block in ("root", "commit", "record")),
    hostile_case("mst_unordered"),
    hostile_case("mst_wrong_layer"),
    hostile_case("car_huge", {"size_mib": 3}),
    # a getRecord proof whose commit comes after ~1,000 tiny blocks: the probe keeps it all the same
    hostile_case(
        "car_huge",
        {
            "size_mib": 0.05,
            "block_bytes": 8,
            "block_codec": "dag-cbor",
            "endpoint": "getRecord",
            "filler_first": True,
        },
    ),
    hostile_case("list_unsigned"),
    hostile_case("list_altered"),
    hostile_case("pds_gone_deactivated"),
    hostile_case("pds_gone_takendown"),
    hostile_case("pds_gone_deleted"),
    hostile_case("pds_moved"),
    hostile_case("no_get_blocks"),  # not a behaviour: the host has no getBlocks
]
SMALL_CAR = 1_048_576  # sync.max_car_bytes for these tests, so that car_huge is cut off cheaply


def test_every_verified_behaviour_is_covered() -> None:
    covered = {case.values[0] for case in HOSTILE}
    assert set(VERIFIED_BEHAVIOURS) <= covered


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("behaviour", "params"), HOSTILE)
async def test_hostile_repos_and_accounts(
    tmp_path: Path, mode: str, behaviour: str, params: dict[str, object]
) -> None:
    collections = (COLL, OTHER)
    good, hostile = plc_did(0), plc_did(1)
    if behaviour == "no_get_blocks":
        # enough records for a sparse walk (getBlocks) to be the daemon's choice where the host had it
        spec = single(None, 600, collections=collections, hosts=2)
        spec = dataclasses.replace(spec, host_options={0: HostOptions(get_blocks=False)})
    else:
        spec = single(behaviour, 250, params, collections=collections, hosts=2)
    mode_limits = limits(mode, max_car_bytes=SMALL_CAR)
    failed = expected_failed(spec, limits=mode_limits)
    network, jobs, records = await backfill(
        tmp_path, spec, mode, [good, hostile], sync={"max_car_bytes": SMALL_CAR}
    )
    for collection in collections:
        code = failed.get((hostile, collection))
        job = jobs[(hostile, collection)]
        assert (job.state, job.error_code, job.attempts) == (
            "failed" if code else "done",
            code,
            attempts_for(code),
        ), collection
        assert jobs[(good, collection)].state == "done"
        if code is not None:
            # nothing of a failed pair reaches the queue: each fault is met before any record is proven
            assert not [r for r in records if (r["did"], r["collection"]) == (hostile, collection)]
    check_queue(network.spec, records, mode_limits, dids=[good, hostile])
    account = network.account(hostile)
    found = methods(network, hostile)
    if mode == "verified":
        assert not found[LIST_RECORDS]
        if behaviour in ("block_bad_bytes", "block_omitted") and params["block"] == "record":
            # the first record of the account's first collection: only that pair fails
            assert set(failed) == {(hostile, COLL)}
        if not failed:
            # one commit fetch (and check) per account per run, at the host the account lives on
            assert methods(network, hostile, account.pds)[GET_RECORD] == 1
    else:
        assert set(found) <= {LIST_RECORDS, GET_REPO_STATUS}
    if behaviour == "list_altered":
        for collection in collections:
            listed = list(listed_records(network.spec, account, collection))
            altered = [r for r in listed if r.index % 3 == 0]
            assert altered
            job = jobs[(hostile, collection)]
            if mode == "list":
                # altered values do not hash to their CID: skipped, counted, never queued
                assert job.records_skipped == len(altered)
                assert job.records_enqueued == len(listed) - len(altered)
                assert not {r.as_tuple() for r in altered} & {
                    (q["did"], q["collection"], q["rkey"], q["cid"]) for q in records
                }
            else:
                assert job.records_skipped == 0 and job.records_enqueued == len(listed)
    if behaviour == "list_unsigned":
        extra = sum(1 for c in collections for r in listed_records(network.spec, account, c) if r.index < 0)
        assert extra == 4  # two per collection, that only listRecords shows
        queued_hostile = sum(1 for r in records if r["did"] == hostile)
        assert queued_hostile == 500 + (extra if mode == "list" else 0)
    if behaviour == "key_rotated":
        # the first document names the old key: the signature fails, one fresh resolution finds the new one
        assert plc_requests(network, hostile) == (2 if mode == "verified" else 1)
    if behaviour.startswith("pds_gone_"):
        # each job resolves afresh once when the PDS says the account is not there (the second job
        # starts from the cached resolution), and only list mode needs getRepoStatus for the reason
        assert plc_requests(network, hostile) == 1 + len(collections)
        assert found[GET_REPO_STATUS] == (len(collections) if mode == "list" else 0)
    if behaviour == "pds_moved":
        old, new = network.spec.old_pds(account), account.pds
        assert old != new
        # the old host was asked once (the cached resolution named it), said "not here", and served
        # nothing else; the fresh resolution named the new host, where every record came from
        assert plc_requests(network, hostile) == 2
        assert sum(methods(network, hostile, old).values()) == 1
        assert network.pds_stats(old).statuses == Counter({400: 1})
        new_methods = methods(network, hostile, new)
        assert new_methods[LIST_RECORDS if mode == "list" else GET_RECORD] >= 1
        assert sum(1 for r in records if r["did"] == hostile) == 500
    if behaviour == "no_get_blocks":
        assert set(failed) == set()
        if mode == "verified":
            # the daemon asked getBlocks (the sparse walk it prefers for a repo this size), got 501, and
            # fetched the repo whole from then on: at most one 501 per account (two accounts' first walks
            # may ask at once before either answer is in), and one getRepo serves both collections
            statuses = network.pds_stats(0).statuses
            assert 1 <= statuses[501] <= 2 and set(statuses) == {200, 501}
            assert found[GET_BLOCKS] <= 1 and found[GET_REPO] == 1
    if behaviour == "car_huge" and mode == "verified" and "endpoint" not in params:
        assert set(failed) == {(hostile, COLL), (hostile, OTHER)}
        assert {jobs[(hostile, c)].error_code for c in collections} == {"car_too_large"}
    if params.get("filler_first"):
        # the commit came after the filler in the getRecord proof, and the probe kept it: no other fetch
        # of the commit, and every pair done
        assert not failed and found["com.atproto.sync.getLatestCommit"] == 0


# -- accounts that are gone, with their precise reason -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        ("pds_gone_deactivated", "repo_deactivated"),
        ("pds_gone_takendown", "repo_takendown"),
        ("pds_gone_deleted", "repo_not_found"),
        ("pds_could_not_find", "repo_not_found"),
    ],
)
async def test_gone_accounts_get_the_precise_reason(
    tmp_path: Path, mode: str, behaviour: str, code: str
) -> None:
    spec = single(behaviour)
    hostile = plc_did(1)
    assert expected_failed(spec, limits=limits(mode), dids=[hostile]) == {(hostile, COLL): code}
    network, jobs, records = await backfill(tmp_path, spec, mode, [hostile])
    job = jobs[(hostile, COLL)]
    assert (job.state, job.error_code, job.attempts) == ("failed", code, 1)
    assert records == []
    assert plc_requests(network, hostile) == 2  # the first resolution and one fresh one, no more
    found = methods(network, hostile)
    if mode == "list":
        # listRecords says only "Could not find repo": one getRepoStatus names the reason
        assert found == Counter({LIST_RECORDS: 1, GET_REPO_STATUS: 1})
    else:
        # the sync endpoints name the state themselves (pds_could_not_find's sync answer: RepoNotFound)
        assert found == Counter({GET_RECORD: 1})


# -- the cost of verified mode in requests -------------------------------------------------------------------

COST_FIGURES: dict[int, dict[str, int]] = {}


@pytest.mark.parametrize("n", [10, 300, 3000])
async def test_request_cost_of_verified_mode(tmp_path: Path, n: int) -> None:
    """One pair of ``n`` records, beside three other collections of 50 records each: the PDS requests of
    verified mode against list mode's ceil(n/100) + 1 (the reference PDS's trailing empty page)."""
    others = ("com.example.a", "com.example.b", "com.example.c")
    did = plc_did(1)
    spec = NetworkSpec(
        (Account(did, 0, {COLL: n, **dict.fromkeys(others, 50)}),),
        1,
        (COLL, *others),
        cursor_on_last_page=True,
    )
    counts: dict[str, int] = {}
    for mode in MODES:
        network, jobs, records = await backfill(tmp_path / mode, spec, mode, [did], collections=[COLL])
        assert (jobs[(did, COLL)].state, len(jobs)) == ("done", 1)
        check_queue(network.spec, records, limits(mode), dids=[did], collections=[COLL])
        assert len(records) == n
        assert network.pds_stats(0).requests == len(pds_requests(network, did))  # all for this one pair
        counts[mode] = network.pds_stats(0).requests
        if mode == "verified":
            counts.update({f"verified {m}": c for m, c in methods(network, did).items()})
    COST_FIGURES[n] = counts
    print(f"\nrequest cost, {n} records: {counts}")
    assert counts["list"] == math.ceil(n / 100) + 1
    assert counts["verified"] <= 2.5 * counts["list"]
    assert counts["verified"] <= (1 + n) / 4  # far below one request per record


# -- the page cap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_page_cap_is_checked_before_fetching_and_is_permanent(tmp_path: Path, mode: str) -> None:
    spec = single(None, 500)
    did = plc_did(1)
    network, jobs, records = await backfill(
        tmp_path, spec, mode, [did], limits={"max_pages_per_collection": 2}
    )
    job = jobs[(did, COLL)]
    mode_limits = limits(mode, max_pages_per_collection=2)
    if mode == "verified":
        # no listRecords pages in verified mode: the cap does not apply
        assert expected_failed(spec, limits=mode_limits, dids=[did]) == {}
        assert (job.state, job.attempts, len(records)) == ("done", 1, 500)
        return
    assert expected_failed(spec, limits=mode_limits, dids=[did]) == {(did, COLL): "too_many_pages"}
    assert (job.state, job.error_code, job.attempts, job.pages) == ("failed", "too_many_pages", 1, 2)
    # exactly the first two pages (listRecords pages newest first) and no third request
    assert len(list_records_requests(network, did)) == 2
    newest = list(pair_records(network.account(did), COLL))[-200:]
    assert {(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records} == {
        r.as_tuple() for r in newest
    }
    assert len(records) == 200
    check_queue(network.spec, records, mode_limits, dids=[did])


async def test_an_endless_listing_stops_at_the_cap(tmp_path: Path) -> None:
    network, jobs, records = await backfill(
        tmp_path, single("pds_endless"), "list", [plc_did(1)], limits={"max_pages_per_collection": 3}
    )
    job = jobs[(plc_did(1), COLL)]
    assert (job.state, job.error_code, job.attempts) == ("failed", "too_many_pages", 1)
    assert len(list_records_requests(network, plc_did(1))) == 3
    assert records == []


# -- resuming, job fan-out, rate limits, pools ---------------------------------------------------------


async def test_resume_after_failure_mid_pagination_fetches_no_page_twice(tmp_path: Path) -> None:
    spec = single("pds_fail_after_page", records=450, params={"page": 2, "failures": 1})
    network, jobs, records = await backfill(tmp_path, spec, "list", [plc_did(1)])
    job = jobs[(plc_did(1), COLL)]
    assert (job.state, job.attempts, job.pages) == ("done", 2, 5)
    cursors = [q.get("cursor", [None])[0] for q in list_records_requests(network, plc_did(1))]
    assert network.pds_stats(0).statuses[500] == 1
    # the failed page is asked again once; every page that succeeded was asked exactly once
    assert Counter(cursors).most_common(1)[0][1] == 2 and len(cursors) == 6 and cursors[0] is None
    assert len(records) == 450
    check_queue(network.spec, records, limits("list"), dids=[plc_did(1)])


@pytest.mark.parametrize("mode", MODES)
async def test_one_job_per_did_and_collection(tmp_path: Path, mode: str) -> None:
    spec = build_spec(3, 5, collections=[COLL, OTHER])
    dids = [a.did for a in spec.accounts]
    network, jobs, records = await backfill(tmp_path, spec, mode, dids)
    assert sorted(jobs) == sorted((d, c) for d in dids for c in (COLL, OTHER))
    check_queue(network.spec, records, limits(mode), dids=dids)
    if mode == "verified":
        for did in dids:
            assert methods(network, did)[GET_RECORD] == 1  # one commit per account, whatever the collections


@pytest.mark.parametrize("mode", MODES)
async def test_rate_limited_account_waits_and_completes(tmp_path: Path, mode: str) -> None:
    network, jobs, records = await backfill(
        tmp_path,
        single("pds_429_once", records=50),
        mode,
        [plc_did(1), plc_did(0)],
        network={"rate_limit_pause": 0.2},
    )
    hostile = jobs[(plc_did(1), COLL)]
    assert (hostile.state, hostile.attempts, hostile.rate_limit_waits) == ("done", 1, 1)
    check_queue(network.spec, records, limits(mode), dids=[plc_did(0), plc_did(1)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "behaviour",
    ["pds_429_reset", "pds_429_retry_after_secs", "pds_429_retry_after_date", "pds_429_html", "pds_429_bare"],
)
async def test_every_kind_of_429_is_waited_out_without_spending_an_attempt(
    tmp_path: Path, mode: str, behaviour: str
) -> None:
    """JSON or HTML, with RateLimit-Reset, Retry-After (seconds or a date) or nothing: the host pauses (at
    least a second), the job waits without spending an attempt, and ends done with every record."""
    spec = single(behaviour, records=150, params={"times": 1})
    did = plc_did(1)
    assert expected_failed(spec, limits=limits(mode), dids=[did]) == {}
    network, jobs, records = await backfill(tmp_path, spec, mode, [did], network={"rate_limit_pause": 0.2})
    job = jobs[(did, COLL)]
    assert (job.state, job.attempts, job.rate_limit_waits) == ("done", 1, 1)
    assert network.pds_stats(0).statuses[429] == 1
    check_queue(network.spec, records, limits(mode), dids=[did])
    assert len(records) == 150


async def test_many_page_timeouts_in_a_row_then_requests_still_work(tmp_path: Path) -> None:
    """More timed-out requests than the per-host pool holds (httpcore#1093), then the host still answers."""
    spec = build_spec(0, 0, collections=[COLL], hosts=1, hostile={"pds_hang": 24})
    good = build_spec(4, 120, collections=[COLL])
    for account in good.accounts:
        spec = with_account(spec, Account(plc_did(100 + good.accounts.index(account)), 0, {COLL: 120}))
    async with open_network(spec) as network:
        overrides = {"limits": {"page_timeout": 0.2}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            hung = [a.did for a in spec.accounts if a.behaviour == "pds_hang"]
            first = await start_run(daemon, dids=hung)
            await finish(daemon, first)
            assert {(j.error_code, j.attempts) for j in await jobs_of(daemon, first)} == {
                ("timeout", MAX_ATTEMPTS)
            }
            healthy = [a.did for a in spec.accounts if a.behaviour is None]
            second = await start_run(daemon, dids=healthy)
            run = await finish(daemon, second)
    assert run.jobs["done"] == 4 and run.public()["records_enqueued"] == 480


# -- discovery ---------------------------------------------------------------------------------------------


async def test_discovery_unions_pages_and_fans_out(tmp_path: Path) -> None:
    spec = build_spec(30, 3, collections=[COLL, OTHER])
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
    spec = build_spec(30, 1, collections=[COLL, OTHER])
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
    spec = build_spec(5, 2, collections=[COLL, OTHER], relay_behaviour={OTHER: mode})
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
    assert (discover[OTHER].state, discover[OTHER].error_code) == ("failed", code)
    assert discover[COLL].state == "done"
    assert (run.discovery[OTHER].error or "").startswith(code)
    assert run.discovery[COLL].error is None and run.dids == 5
    assert run.jobs["done"] == 10  # DIDs found through COLL are backfilled for both collections


async def test_junk_relay_entries_are_skipped(tmp_path: Path) -> None:
    spec = build_spec(6, 1, collections=[COLL], relay_behaviour={COLL: "relay_junk_entries"})
    async with open_network(spec) as network, running_daemon(tmp_path, network) as daemon:
        run_id = await start_run(daemon)
        run = await finish(daemon, run_id)
    assert run.dids == 6 and run.jobs["done"] == 6


# -- the DID cache -----------------------------------------------------------------------------------------


async def test_did_cache_is_durable_and_reused(tmp_path: Path) -> None:
    offset = [0.0]

    def wall_clock() -> float:
        return time.time() + offset[0]

    async with open_network(build_spec(2, 3, collections=[COLL])) as network:
        dids = [a.did for a in network.spec.accounts]
        async with running_daemon(tmp_path, network, wall_clock=wall_clock) as daemon:
            await finish(daemon, await start_run(daemon, dids=dids))
            plc_requests_before = network.plc_stats.requests
            # later, but well within did_cache_ttl: past the interval at which last_seen_at is written
            offset[0] = 120.0
            await finish(daemon, await start_run(daemon, dids=dids))
            assert network.plc_stats.requests == plc_requests_before == 2  # served from the cache
            publishers = await daemon.db.run(daemon.db.store.list_publishers, after="", limit=10)
    assert [p.did for p in publishers] == sorted(dids)
    assert all(p.last_seen_at >= p.resolved_at + 120.0 for p in publishers)  # seen again on the second run
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


@pytest.mark.parametrize("mode", MODES)
async def test_concurrent_jobs_of_one_did_share_one_resolution(tmp_path: Path, mode: str) -> None:
    collections = [COLL, OTHER, "com.example.third"]
    spec = build_spec(2, 3, collections=collections, plc_latency=0.2)
    spec = with_account(spec, Account(plc_did(9), 0, dict.fromkeys(collections, 3), "plc_404"))
    async with open_network(spec) as network:
        # enough workers for all nine jobs to start together (a failed lookup is not cached), and no
        # ordering of an account's collections, which would start them one after the other
        overrides = settings(mode, daemon={"workers": 12}, sync={"ordered_collections": False})
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon, dids=[a.did for a in spec.accounts])
            run = await finish(daemon, run_id)
            jobs = await jobs_of(daemon, run_id)
    assert run.jobs["done"] == 6 and run.jobs["failed"] == 3
    assert {j.error_code for j in jobs if j.state == "failed"} == {"did_not_found"}
    assert all(j.attempts == 1 for j in jobs)
    assert network.plc_stats.requests == 3  # one lookup per DID, though three jobs each wanted it


# -- record blocks the walk found --------------------------------------------------------------------------


def test_a_record_block_that_is_not_canonical_fails_the_walk_and_a_float_is_a_skip() -> None:
    """SPEC 6.2: blocks are canonical DAG-CBOR (a block that is not fails the attempt, retried like any
    broken block); a canonical record outside the data model (a float) is skipped, counted, and kept as
    present so that reconcile does not take it for deleted."""
    handler = VerifiedHandler.__new__(VerifiedHandler)
    job: Any = SimpleNamespace(collection=COLL)
    unsorted = bytes.fromhex("a2616201616102")  # {"b": 1, "a": 2}: map keys out of canonical order
    floating = cbrrr.encode_dag_cbor({"$type": COLL, "value": 1.5})  # canonical, but a float
    cid = parse_cid("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")
    walked = _Walked()
    handler._collect(job, [MstRecord(f"{COLL}/3kaaaaaaaaaaa", cid, floating)], walked)
    assert (walked.records, walked.skipped, walked.reasons) == ([], 1, {"invalid_record"})
    assert walked.present == ["3kaaaaaaaaaaa"]
    with pytest.raises(ProtocolViolation) as caught:
        handler._collect(job, [MstRecord(f"{COLL}/3kaaaaaaaaaab", cid, unsorted)], walked)
    assert caught.value.code == "invalid_cbor"
