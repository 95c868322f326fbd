"""The simulated AT Protocol network: the pure model, and the real HTTP servers driven with httpx."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from daemon.errors import ConfigError
from daemon.simnet import (
    ACCOUNT_BEHAVIOURS,
    DEFAULT_COLLECTIONS,
    PDS_BEHAVIOURS,
    VERIFIED_BEHAVIOURS,
    Account,
    DaemonLimits,
    HostOptions,
    NetworkSpec,
    OriginStats,
    RunningNetwork,
    build_spec,
    demo_spec,
    expected_failed,
    expected_records,
    make_record,
    open_network,
    plc_did,
    possible_records,
    relay_dids,
    with_account,
)
from daemon.simnet.model import (
    JUNK_KINDS,
    RATE_LIMIT_BEHAVIOURS,
    pair_keys,
    record_value,
    records_before,
    tid_from_int,
    tid_to_int,
)

C1, C2 = "com.example.simnet.alpha", "com.example.simnet.beta"
LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords"
LIST_REPOS = "/xrpc/com.atproto.sync.listReposByCollection"
DID_PLC = re.compile(r"^did:plc:[a-z2-7]{24}$")
TID = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
CID = re.compile(r"^bafyrei[a-z2-7]{52}$")
SHORT = httpx.Timeout(0.2)
REPO_ROOT = Path(__file__).resolve().parents[1]

# Every account behaviour once, on two hosts, 25 records per collection (3 pages of 10).
ALL_MODES = {name: 1 for name in sorted(ACCOUNT_BEHAVIOURS)}
LIST = DaemonLimits(mode="list")


def did_with(spec: NetworkSpec, behaviour: str | None) -> str:
    """The first account of ``spec`` with ``behaviour``."""
    return next(a.did for a in spec.accounts if a.behaviour == behaviour)


@pytest.fixture
def spec() -> NetworkSpec:
    return build_spec(3, 25, (C1, C2), 2, ALL_MODES)


@pytest.fixture
async def net(spec: NetworkSpec) -> AsyncIterator[RunningNetwork]:
    async with open_network(spec) as network:
        yield network


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        yield http


async def list_records(
    client: httpx.AsyncClient,
    net: RunningNetwork,
    did: str,
    collection: str = C1,
    *,
    limit: int | str = 10,
    cursor: str | None = None,
    timeout: httpx.Timeout | None = None,
) -> httpx.Response:
    params = {"repo": did, "collection": collection, "limit": str(limit)}
    if cursor is not None:
        params["cursor"] = cursor
    url = net.pds_url(did) + LIST_RECORDS
    if timeout is None:
        return await client.get(url, params=params)
    return await client.get(url, params=params, timeout=timeout)


def valid_entry(entry: object, did: str, collection: str) -> tuple[str, str, str, str] | None:
    """What a correct daemon keeps of one listed record (None: it skips it)."""
    assert isinstance(entry, dict)
    uri, cid = entry["uri"], entry["cid"]
    prefix = f"at://{did}/{collection}/"
    if not uri.startswith(prefix) or not TID.match(uri[len(prefix) :]) or not CID.match(cid):
        return None
    return (did, collection, uri[len(prefix) :], cid)


async def page_through(
    client: httpx.AsyncClient, net: RunningNetwork, did: str, collection: str, limit: int = 10
) -> tuple[set[tuple[str, str, str, str]], int]:
    """Page a pair like a correct daemon would (retrying 5xx and 429s in place): records kept, pages."""
    found: set[tuple[str, str, str, str]] = set()
    cursor: str | None = None
    pages = 0
    for _ in range(50):
        response = await list_records(client, net, did, collection, limit=limit, cursor=cursor)
        if response.status_code in (429, 500):
            continue
        pages += 1
        if response.status_code == 404 and cursor is None:
            return found, pages
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["records"]) <= limit
        kept = {valid_entry(entry, did, collection) for entry in body["records"]}
        found |= {record for record in kept if record is not None}
        cursor = body.get("cursor")
        if cursor is None:
            return found, pages
    raise AssertionError("pagination did not end")


# Model ----------------------------------------------------------------------------------------------------


def test_identifiers_are_well_formed_and_deterministic() -> None:
    dids = [plc_did(index) for index in range(500)]
    assert all(DID_PLC.match(did) for did in dids)
    assert len(set(dids)) == 500
    assert dids == [plc_did(index) for index in range(500)]
    records = [make_record(dids[0], C1, index) for index in range(300)]
    assert all(TID.match(r.rkey) and CID.match(r.cid) for r in records)
    assert len({r.cid for r in records}) == 300
    assert [r.rkey for r in records] == sorted(r.rkey for r in records)
    assert make_record(dids[1], C1, 0).cid != records[0].cid
    assert records[5].uri == f"at://{dids[0]}/{C1}/{records[5].rkey}"


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_tid_encoding_round_trips(value: int) -> None:
    tid = tid_from_int(value)
    assert TID.match(tid)
    assert tid_to_int(tid) == value


@pytest.mark.parametrize("text", ["", "3jzfcijpj2z21", "zzzzzzzzzzzzz", "3JZFCIJPJ2Z2A", "3jzfcijpj2z2aa"])
def test_tid_decoding_rejects_invalid(text: str) -> None:
    assert tid_to_int(text) is None


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=10_000))
def test_records_before_inverts_record_keys(index: int, count: int) -> None:
    keys = pair_keys(plc_did(1), C1)
    cursor = tid_to_int(keys.rkey(index))
    assert cursor is not None
    assert records_before(cursor, count, keys.clock) == min(index, count)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"behaviour": "pds_bogus"}, "unknown behaviour"),
        ({"pds": 5}, "out of range"),
        ({"behaviour": "pds_huge", "params": {"mib": "big"}}, "must be a number"),
        ({"behaviour": "pds_huge", "params": {"colour": 1}}, "unknown parameter"),
        ({"behaviour": "doc_bad_json", "params": {"variant": "other"}}, "variant"),
        ({"records": {"not.in.spec": 1}}, "bad record count"),
    ],
)
def test_invalid_specs_are_rejected(kwargs: dict[str, object], fragment: str) -> None:
    fields: dict[str, object] = {"did": plc_did(0), "pds": 0, "records": {C1: 1}, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        NetworkSpec((Account(**fields),), 1, (C1,))  # type: ignore[arg-type]


def test_duplicate_dids_and_bad_hosts_are_rejected() -> None:
    account = Account(plc_did(0), 0, {C1: 1})
    with pytest.raises(ConfigError, match="duplicate"):
        NetworkSpec((account, account), 1, (C1,))
    with pytest.raises(ConfigError, match="host 3"):
        NetworkSpec((account,), 1, (C1,), host_options={3: HostOptions(behaviour="pds_500")})
    with pytest.raises(ConfigError, match="relay"):
        NetworkSpec((account,), 1, (C1,), relay_behaviour={C1: "relay_sulk"})


def test_expected_failed_codes(spec: NetworkSpec) -> None:
    failed = expected_failed(spec, limits=LIST)
    codes = {spec.account(did).behaviour: code for (did, _), code in failed.items()}
    assert codes == {
        "plc_404": "did_not_found",
        "plc_410": "did_tombstoned",
        "plc_hang": "timeout",
        "doc_no_pds": "no_pds_service",
        "doc_wrong_id": "invalid_did_document",
        "doc_bad_json": "invalid_did_document",
        "doc_pds_url": "connect_error",
        "pds_404_mid": "not_found_mid_pagination",
        "pds_500": "http_status",
        "pds_hang": "timeout",
        "pds_trickle": "timeout",
        "pds_disconnect": "connect_error",
        "pds_huge": "response_too_large",
        "pds_429_reset": "rate_limit_exhausted",
        "pds_429_retry_after_secs": "rate_limit_exhausted",
        "pds_429_retry_after_date": "rate_limit_exhausted",
        "pds_429_html": "rate_limit_exhausted",
        "pds_429_bare": "rate_limit_exhausted",
        "pds_too_many_records": "page_too_large",
        "pds_repeat_cursor": "repeated_cursor",
        "pds_body_not_object": "bad_response",
        "pds_invalid_json": "bad_response",
        "pds_missing_records": "bad_response",
        "pds_record_not_object": "bad_response",
        "pds_cursor_not_string": "bad_response",
        "pds_takendown": "repo_takendown",
        "pds_deactivated": "repo_deactivated",
        "pds_suspended": "repo_suspended",
        "pds_repo_not_found": "repo_not_found",
        "pds_could_not_find": "repo_not_found",
        "pds_redirect": "redirect",
        "pds_endless": "too_many_pages",
        "pds_gone_deactivated": "repo_deactivated",
        "pds_gone_takendown": "repo_takendown",
        "pds_gone_deleted": "repo_not_found",
    }
    assert len(failed) == 2 * len(codes)
    recovering = {
        "pds_404_first",
        "pds_500_once",
        "pds_fail_after_page",
        "pds_429_once",
        "pds_bad_records",
        "pds_moved",
    }
    assert {name for name, code in PDS_BEHAVIOURS.items() if code is None} == recovering


def test_expectations_follow_the_daemon_limits(spec: NetworkSpec) -> None:
    small = DaemonLimits(page_size=10, max_attempts=3, mode="list")
    codes = {
        spec.account(did).behaviour: code for (did, _), code in expected_failed(spec, limits=small).items()
    }
    # 25 records in pages of 10 take 3 requests; failing each once needs 4 attempts.
    assert codes["pds_500_once"] == "http_status"
    assert "pds_fail_after_page" not in codes  # 2 failures need 3 attempts
    assert expected_failed(spec, limits=DaemonLimits(page_size=10, max_pages_per_collection=2, mode="list"))[
        (plc_did(0), C1)
    ] == ("too_many_pages")
    huge = did_with(spec, "pds_huge")
    big = DaemonLimits(max_response_bytes=100 * 1_048_576, mode="list")
    assert expected_failed(spec, limits=big)[(huge, C1)] == "bad_response"
    strict = expected_failed(spec, limits=DaemonLimits(allow_private_addresses=False))
    assert strict[(plc_did(0), C1)] == "insecure_url"
    assert strict[(did_with(spec, "plc_404"), C1)] == "did_not_found"
    assert strict[(did_with(spec, "doc_pds_url"), C1)] == "insecure_url"


def test_expected_records_cover_exactly_the_recovering_pairs(spec: NetworkSpec) -> None:
    expected = expected_records(spec, limits=LIST)
    by_behaviour = {spec.account(did).behaviour for did, _, _, _ in expected}
    repo_modes = set(VERIFIED_BEHAVIOURS)
    listed = {None, "pds_500_once", "pds_fail_after_page", "pds_429_once", "pds_bad_records", "pds_moved"}
    assert by_behaviour == listed | repo_modes
    # 3 healthy accounts and one per other mode; list_unsigned adds 2 records per pair, list_altered hides the
    # 9 of 25 whose index is a multiple of 3.
    assert len(expected) == (3 + len(by_behaviour) - 3) * 2 * 25 + 2 * 27 + 2 * 16
    assert expected < possible_records(spec, limits=LIST)
    assert len(possible_records(spec)) == len(spec.accounts) * 2 * 25
    only = expected_records(spec, dids=[plc_did(0)], collections=[C2])
    records = [make_record(plc_did(0), C2, index) for index in range(25)]
    assert only == {(plc_did(0), C2, r.rkey, r.cid) for r in records}


def test_override_of_the_expected_error() -> None:
    spec = build_spec(1, 5, (C1,))
    account = Account(plc_did(9), 0, {C1: 5}, "doc_pds_url", {"expected_error": "blocked_address"})
    assert expected_failed(with_account(spec, account)) == {(plc_did(9), C1): "blocked_address"}


def test_rate_limit_modes_recover_after_their_times() -> None:
    accounts = tuple(
        Account(plc_did(index), 0, {C1: 5}, name, {"times": 2})
        for index, name in enumerate(RATE_LIMIT_BEHAVIOURS)
    )
    spec = NetworkSpec(accounts, 1, (C1,))
    assert expected_failed(spec) == {}
    assert expected_failed(spec, limits=DaemonLimits(max_rate_limit_waits=1)).keys() == {
        (a.did, C1) for a in accounts
    }


def test_demo_spec() -> None:
    spec = demo_spec()
    assert spec.collections == DEFAULT_COLLECTIONS
    assert 2000 <= len(expected_records(spec)) <= 10_000
    behaviours = {a.behaviour for a in spec.accounts} - {None}
    assert {"plc_404", "pds_takendown", "pds_500_once", "pds_429_once", "pds_bad_records"} <= behaviours
    assert set(expected_failed(spec).values()) == {"did_not_found", "no_pds_service", "repo_takendown"}
    assert any(count == 0 for a in spec.accounts for count in a.records.values())
    assert any(count > 100 for a in spec.accounts for count in a.records.values())
    assert demo_spec() == spec


def test_peak_rate_over_any_window() -> None:
    stats = OriginStats()
    for moment in (0.0, 0.1, 0.5, 0.95, 1.0, 1.2, 3.0):
        stats.started("/", "", moment)
    assert stats.peak_rate(1.0) == 4
    assert stats.peak_rate(0.2) == 2
    assert stats.peak_in_flight == 7
    stats.finished(200)
    stats.reset()
    assert (stats.requests, stats.seen, stats.timestamps, stats.peak_in_flight) == (0, [], [], 6)
    assert stats.peak_rate() == 0


# PDS ------------------------------------------------------------------------------------------------------


async def test_paging_yields_every_record_newest_first(
    net: RunningNetwork, client: httpx.AsyncClient
) -> None:
    did = plc_did(0)
    response = await list_records(client, net, did, limit=10)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert [r["uri"].rsplit("/", 1)[1] for r in body["records"]] == [
        make_record(did, C1, index).rkey for index in range(24, 14, -1)
    ]
    first = body["records"][0]
    assert first == {
        "uri": make_record(did, C1, 24).uri,
        "cid": make_record(did, C1, 24).cid,
        "value": record_value(did, C1, 24),
    }
    assert body["cursor"] == make_record(did, C1, 15).rkey
    found, pages = await page_through(client, net, did, C1)
    assert pages == 3
    assert found == expected_records(net.spec, dids=[did], collections=[C1])


async def test_limit_is_clamped_and_validated(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    spec = with_account(net.spec, Account(plc_did(99), 0, {C1: 150}))
    async with open_network(spec) as big:
        assert len((await list_records(client, big, plc_did(99), limit=1000)).json()["records"]) == 100
        assert len((await list_records(client, big, plc_did(99), limit=0)).json()["records"]) == 1
        bad = await list_records(client, big, plc_did(99), limit="ten")
        assert (bad.status_code, bad.json()["error"]) == (400, "InvalidRequest")
        bad = await list_records(client, big, plc_did(99), cursor="not-a-cursor")
        assert bad.status_code == 400


async def test_repo_errors_and_empty_collections(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    missing = await client.get(
        net.pds_urls[0] + LIST_RECORDS, params={"repo": plc_did(777), "collection": C1}
    )
    # What the reference PDS says for an account it does not have (deleted, or never there).
    assert (missing.status_code, missing.json()) == (
        400,
        {"error": "InvalidRequest", "message": f"Could not find repo: {plc_did(777)}"},
    )
    # Accounts only exist on their own host.
    elsewhere = await client.get(
        net.pds_urls[1] + LIST_RECORDS, params={"repo": plc_did(0), "collection": C1}
    )
    assert elsewhere.json()["error"] == "InvalidRequest"
    empty = await list_records(client, net, plc_did(0), "com.example.simnet.unused")
    assert (empty.status_code, empty.json()) == (200, {"records": []})
    no_repo = await client.get(net.pds_urls[0] + LIST_RECORDS, params={"collection": C1})
    assert no_repo.status_code == 400
    other = await client.get(net.pds_urls[0] + "/xrpc/com.atproto.sync.listBlobs")
    assert (other.status_code, other.json()["error"]) == (501, "MethodNotImplemented")
    assert (await client.get(net.pds_urls[0] + "/elsewhere")).status_code == 404


async def test_cursor_on_last_page_ends_with_an_empty_page(client: httpx.AsyncClient) -> None:
    spec = build_spec(1, 20, (C1,), cursor_on_last_page=True)
    async with open_network(spec) as net:
        found, pages = await page_through(client, net, plc_did(0), C1)
        assert pages == 3
        assert found == expected_records(spec)


async def test_expected_records_match_what_paging_yields(
    net: RunningNetwork, client: httpx.AsyncClient
) -> None:
    spec = net.spec
    recovering = {
        None,
        "pds_404_first",
        "pds_500_once",
        "pds_fail_after_page",
        "pds_429_once",
        "pds_bad_records",
    }
    dids = [a.did for a in spec.accounts if a.behaviour in recovering]
    found: set[tuple[str, str, str, str]] = set()
    for did in dids:
        for collection in (C1, C2):
            records, _ = await page_through(client, net, did, collection)
            found |= records
    limits = DaemonLimits(page_size=10, mode="list")
    assert found == expected_records(spec, limits=limits, dids=dids)
    assert not any(key[0] in dids for key in expected_failed(spec, limits=limits))


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("pds_takendown", "RepoTakendown"),
        ("pds_deactivated", "RepoDeactivated"),
        ("pds_suspended", "RepoSuspended"),
        ("pds_repo_not_found", "RepoNotFound"),
        ("pds_could_not_find", "InvalidRequest"),
    ],
)
async def test_unavailable_accounts(
    net: RunningNetwork, client: httpx.AsyncClient, behaviour: str, error: str
) -> None:
    did = did_with(net.spec, behaviour)
    response = await list_records(client, net, did)
    assert (response.status_code, response.json()["error"]) == (400, error)
    if behaviour == "pds_could_not_find":
        assert response.json()["message"] == f"Could not find repo: {did}"


async def test_not_found_first_and_mid(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    assert (await list_records(client, net, did_with(net.spec, "pds_404_first"))).status_code == 404
    mid = did_with(net.spec, "pds_404_mid")
    first = await list_records(client, net, mid, limit=100)
    assert first.status_code == 200 and len(first.json()["records"]) == 25
    second = await list_records(client, net, mid, limit=100, cursor=first.json()["cursor"])
    assert second.status_code == 404


async def test_server_errors(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    always = did_with(net.spec, "pds_500")
    assert [(await list_records(client, net, always)).status_code for _ in range(3)] == [500, 500, 500]
    once = did_with(net.spec, "pds_500_once")
    statuses = [(await list_records(client, net, once)).status_code for _ in range(3)]
    assert statuses == [500, 200, 200]
    cursor = (await list_records(client, net, once)).json()["cursor"]
    statuses = [(await list_records(client, net, once, cursor=cursor)).status_code for _ in range(2)]
    assert statuses == [500, 200]
    net.reset()
    assert (await list_records(client, net, once)).status_code == 500


async def test_fail_after_page(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    did = did_with(net.spec, "pds_fail_after_page")
    first = await list_records(client, net, did)
    assert first.status_code == 200
    cursor = first.json()["cursor"]
    statuses = [(await list_records(client, net, did, cursor=cursor)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await list_records(client, net, did)).status_code == 200


async def test_hang_and_trickle_time_out(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await list_records(client, net, did_with(net.spec, "pds_hang"), timeout=SHORT)
    trickle = did_with(net.spec, "pds_trickle")
    url = net.pds_url(trickle) + LIST_RECORDS
    async with client.stream(
        "GET", url, params={"repo": trickle, "collection": C1}, timeout=SHORT
    ) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await response.aread()


async def test_trickle_finishes_when_short(client: httpx.AsyncClient) -> None:
    account = Account(plc_did(0), 0, {C1: 3}, "pds_trickle", {"interval": 0.01, "bytes": 5})
    async with open_network(NetworkSpec((account,), 1, (C1,))) as net:
        response = await list_records(client, net, account.did)
        assert response.content == b'     {"records":[]}'


@pytest.mark.parametrize("declare_length", [False, True])
async def test_huge_bodies_are_streamed(client: httpx.AsyncClient, declare_length: bool) -> None:
    account = Account(plc_did(0), 0, {C1: 3}, "pds_huge", {"mib": 2, "declare_length": declare_length})
    async with open_network(NetworkSpec((account,), 1, (C1,))) as net:
        url = net.pds_url(account.did) + LIST_RECORDS
        async with client.stream("GET", url, params={"repo": account.did, "collection": C1}) as response:
            assert ("content-length" in response.headers) == declare_length
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
        assert size >= 2 * 1_048_576
        if declare_length:
            assert size == int(response.headers["content-length"])


async def test_rate_limits(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    responses = {
        name: await list_records(client, net, did_with(net.spec, name))
        for name in sorted(RATE_LIMIT_BEHAVIOURS)
    }
    assert {response.status_code for response in responses.values()} == {429}
    assert int(responses["pds_429_reset"].headers["ratelimit-reset"]) > 1_700_000_000
    assert responses["pds_429_retry_after_secs"].headers["retry-after"] == "1"
    assert responses["pds_429_retry_after_date"].headers["retry-after"].endswith(" GMT")
    assert responses["pds_429_html"].headers["content-type"].startswith("text/html")
    assert "retry-after" not in responses["pds_429_html"].headers
    bare = responses["pds_429_bare"]
    assert bare.json()["error"] == "RateLimitExceeded"
    assert not {"retry-after", "ratelimit-reset"} & set(bare.headers)
    assert responses["pds_429_once"].headers["retry-after"] == "1"
    assert (await list_records(client, net, did_with(net.spec, "pds_429_once"))).status_code == 200
    assert (await list_records(client, net, did_with(net.spec, "pds_429_bare"))).status_code == 429


async def test_protocol_violations(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    spec = net.spec

    async def body(name: str, **kwargs: object) -> object:
        response = await list_records(client, net, did_with(spec, name), **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 200
        try:
            return response.json()
        except json.JSONDecodeError:
            return None

    too_many = await body("pds_too_many_records", limit=10)
    assert isinstance(too_many, dict) and len(too_many["records"]) == 11
    assert not isinstance(await body("pds_body_not_object"), dict)
    assert await body("pds_invalid_json") is None
    missing = await body("pds_missing_records")
    assert isinstance(missing, dict) and "records" not in missing
    not_objects = await body("pds_record_not_object")
    assert isinstance(not_objects, dict) and not any(isinstance(r, dict) for r in not_objects["records"])
    cursor = await body("pds_cursor_not_string")
    assert isinstance(cursor, dict) and not isinstance(cursor["cursor"], str) and cursor["records"]
    repeat = did_with(spec, "pds_repeat_cursor")
    first = (await list_records(client, net, repeat)).json()["cursor"]
    second = (await list_records(client, net, repeat, cursor=first)).json()
    assert second["cursor"] == first and second["records"]
    cursors: list[str] = []
    endless = did_with(spec, "pds_endless")
    for _ in range(20):
        page = (await list_records(client, net, endless, cursor=cursors[-1] if cursors else None)).json()
        cursors.append(page["cursor"])
    assert len(set(cursors)) == 20


async def test_bad_records_are_mixed_in(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    did = did_with(net.spec, "pds_bad_records")
    page = (await list_records(client, net, did, limit=20)).json()["records"]
    assert len(page) == 20
    junk = [entry for entry in page if valid_entry(entry, did, C1) is None]
    assert len(junk) == len(JUNK_KINDS)
    found, _ = await page_through(client, net, did, C1, limit=20)
    assert found == expected_records(net.spec, dids=[did], collections=[C1])


async def test_redirect_is_not_followed(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    response = await list_records(client, net, did_with(net.spec, "pds_redirect"))
    assert response.status_code == 302
    assert response.headers["location"].startswith(net.pds_url(did_with(net.spec, "pds_redirect")))
    target = await client.get(response.headers["location"])
    assert target.json() == {"records": []}


async def test_disconnect_and_host_down(client: httpx.AsyncClient) -> None:
    accounts = (Account(plc_did(0), 0, {C1: 1}, "pds_disconnect"), Account(plc_did(1), 1, {C1: 1}))
    spec = NetworkSpec(accounts, 2, (C1,), host_options={1: HostOptions(behaviour="host_down")})
    async with open_network(spec) as net:
        with pytest.raises(httpx.RemoteProtocolError):
            await list_records(client, net, plc_did(0))
        with pytest.raises(httpx.ConnectError):
            await list_records(client, net, plc_did(1))
        assert expected_failed(net.spec) == {
            (plc_did(0), C1): "connect_error",
            (plc_did(1), C1): "connect_error",
        }


async def test_host_wide_behaviour_and_latency(client: httpx.AsyncClient) -> None:
    spec = build_spec(4, 3, (C1,), 2)
    spec = NetworkSpec(
        spec.accounts, 2, (C1,), host_options={1: HostOptions(latency=0.01, behaviour="pds_takendown")}
    )
    async with open_network(spec) as net:
        for account in spec.accounts:
            response = await list_records(client, net, account.did)
            assert response.status_code == (200 if account.pds == 0 else 400)
    assert spec.host_latency(1) == 0.01
    assert {code for code in expected_failed(spec).values()} == {"repo_takendown"}


# Stats ----------------------------------------------------------------------------------------------------


async def test_stats_count_requests_and_peak_in_flight(
    net: RunningNetwork, client: httpx.AsyncClient
) -> None:
    did = plc_did(0)
    await list_records(client, net, did)
    stats = net.pds_stats(net.account(did).pds)
    assert stats.requests == 1
    assert stats.seen[0][0] == LIST_RECORDS
    assert f"repo={did.replace(':', '%3A')}" in stats.seen[0][1] or f"repo={did}" in stats.seen[0][1]
    assert stats.statuses[200] == 1
    hang = did_with(net.spec, "pds_hang")
    hang_stats = net.pds_stats(net.account(hang).pds)
    hang_stats.reset()

    async def hung() -> None:
        with pytest.raises(httpx.ReadTimeout):
            await list_records(client, net, hang, timeout=httpx.Timeout(5.0))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(hung)
        with trio.fail_after(5):
            while hang_stats.in_flight < 3:
                await trio.sleep(0.01)
        assert hang_stats.peak_in_flight == 3
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        while hang_stats.in_flight:
            await trio.sleep(0.01)
    assert hang_stats.peak_in_flight == 3
    assert len(hang_stats.timestamps) == 3
    net.reset()
    assert all(s.requests == 0 and s.peak_in_flight == 0 for s in net.stats.values())


# Identity -------------------------------------------------------------------------------------------------


async def test_plc_documents(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    did = plc_did(0)
    response = await client.get(net.did_document_url(did))
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["id"] == did
    assert document["alsoKnownAs"][0].startswith("at://")
    (method,) = document["verificationMethod"]
    assert (method["id"], method["type"], method["controller"]) == (f"{did}#atproto", "Multikey", did)
    assert re.match(r"^zQ3s[1-9A-HJ-NP-Za-km-z]{45}$", method["publicKeyMultibase"])
    (service,) = document["service"]
    assert service["id"] in ("#atproto_pds", f"{did}#atproto_pds")
    assert service["type"] == "AtprotoPersonalDataServer"
    assert service["serviceEndpoint"] == net.pds_url(did)
    encoded = await client.get(f"{net.plc_url}/{did.replace(':', '%3A')}")
    assert encoded.json() == document
    assert (await client.get(f"{net.plc_url}/{plc_did(12345)}")).status_code == 404


async def test_service_id_forms_both_occur(client: httpx.AsyncClient) -> None:
    spec = build_spec(12, 0, (C1,))
    async with open_network(spec) as net:
        ids = {
            (await client.get(net.did_document_url(a.did))).json()["service"][0]["id"] for a in spec.accounts
        }
    assert "#atproto_pds" in ids and len(ids) > 1


async def test_hostile_documents(net: RunningNetwork, client: httpx.AsyncClient) -> None:
    async def fetch(name: str, timeout: httpx.Timeout | None = None) -> httpx.Response:
        url = net.did_document_url(did_with(net.spec, name))
        return await (client.get(url) if timeout is None else client.get(url, timeout=timeout))

    assert (await fetch("plc_404")).status_code == 404
    assert (await fetch("plc_410")).status_code == 410
    with pytest.raises(httpx.ReadTimeout):
        await fetch("plc_hang", SHORT)
    no_pds = (await fetch("doc_no_pds")).json()
    assert not any(s["type"] == "AtprotoPersonalDataServer" for s in no_pds["service"])
    assert (await fetch("doc_wrong_id")).json()["id"] != did_with(net.spec, "doc_wrong_id")
    with pytest.raises(json.JSONDecodeError):
        (await fetch("doc_bad_json")).json()
    assert (await fetch("doc_pds_url")).json()["service"][0]["serviceEndpoint"] == "http://127.0.0.1:1"


async def test_document_variants(client: httpx.AsyncClient) -> None:
    accounts = (
        Account(plc_did(0), 0, {C1: 1}, "doc_bad_json", {"variant": "not_object"}),
        Account(plc_did(1), 0, {C1: 1}, "doc_pds_url", {"url": "https://10.0.0.1"}),
    )
    async with open_network(NetworkSpec(accounts, 1, (C1,))) as net:
        assert isinstance((await client.get(net.did_document_url(plc_did(0)))).json(), list)
        document = (await client.get(net.did_document_url(plc_did(1)))).json()
        assert document["service"][0]["serviceEndpoint"] == "https://10.0.0.1"
    strict = DaemonLimits(allow_private_addresses=False)
    assert (
        expected_failed(NetworkSpec(accounts, 1, (C1,)), limits=strict)[(plc_did(1), C1)] == "blocked_address"
    )


async def test_did_web_accounts(client: httpx.AsyncClient) -> None:
    spec = build_spec(1, 4, (C1,), web_accounts=2)
    async with open_network(spec) as net:
        web = [a for a in net.spec.accounts if a.is_web]
        assert len(web) == 2 and len(net.web_dids) == 2
        for account in web:
            port = int(account.did.rsplit("%3A", 1)[1])
            assert account.did == f"did:web:localhost%3A{port}"
            assert net.did_web_urls[account.did] == f"http://127.0.0.1:{port}"
            document = (await client.get(f"http://localhost:{port}/.well-known/did.json")).json()
            assert document["id"] == account.did
            assert document["verificationMethod"][0]["id"] == "#atproto"
            assert document["service"][0]["serviceEndpoint"] == net.pds_url(account.did)
            assert (await client.get(f"http://127.0.0.1:{port}/{account.did}")).status_code == 404
            assert (await client.get(net.did_document_url(account.did))).json() == document
            found, _ = await page_through(client, net, account.did, C1)
            assert found == expected_records(net.spec, dids=[account.did])
        assert (await client.get(f"{net.plc_url}/{web[0].did}")).status_code == 404


# Relay ----------------------------------------------------------------------------------------------------


async def relay_page(
    client: httpx.AsyncClient, net: RunningNetwork, collection: str, limit: int, cursor: str | None = None
) -> httpx.Response:
    params = {"collection": collection, "limit": str(limit)}
    if cursor is not None:
        params["cursor"] = cursor
    return await client.get(net.relay_url + LIST_REPOS, params=params)


async def test_relay_pages_in_a_stable_order(client: httpx.AsyncClient) -> None:
    accounts = tuple(Account(plc_did(i), 0, {C1: i % 3, C2: 1}) for i in range(30))
    spec = NetworkSpec(accounts, 1, (C1, C2))
    async with open_network(spec) as net:
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            body = (await relay_page(client, net, C1, 7, cursor)).json()
            pages += 1
            seen += [entry["did"] for entry in body["repos"]]
            cursor = body.get("cursor")
            if cursor is None:
                break
        assert seen == relay_dids(spec, C1) == sorted(a.did for a in accounts if a.records[C1])
        assert pages == 3  # 20 DIDs in pages of 7
        assert (await relay_page(client, net, "com.example.nobody", 7)).json() == {"repos": []}
        assert (await client.get(net.relay_url + LIST_REPOS)).status_code == 400
        assert len((await relay_page(client, net, C2, 100_000)).json()["repos"]) == 30


async def test_relay_hostile_modes(client: httpx.AsyncClient) -> None:
    modes = ("relay_hang", "relay_500", "relay_bad_body", "relay_missing_repos")
    collections = (*(f"com.example.{m.replace('_', '')}" for m in modes), C1, C2)
    accounts = tuple(Account(plc_did(i), 0, dict.fromkeys(collections, 1)) for i in range(12))
    relay = dict(zip(collections, modes, strict=False)) | {
        C1: "relay_repeat_cursor",
        C2: "relay_junk_entries",
    }
    async with open_network(NetworkSpec(accounts, 1, collections, relay_behaviour=relay)) as net:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(net.relay_url + LIST_REPOS, params={"collection": collections[0]}, timeout=SHORT)
        assert (await relay_page(client, net, collections[1], 5)).status_code == 500
        assert not isinstance((await relay_page(client, net, collections[2], 5)).json(), dict)
        assert "repos" not in (await relay_page(client, net, collections[3], 5)).json()
        first = (await relay_page(client, net, C1, 5)).json()
        second = (await relay_page(client, net, C1, 5, first["cursor"])).json()
        assert second["cursor"] == first["cursor"]
        assert len(second["repos"]) == 5
        junk = (await relay_page(client, net, C2, 100)).json()["repos"]
        good = [e["did"] for e in junk if isinstance(e, dict) and isinstance(e.get("did"), str)]
        assert [did for did in good if DID_PLC.match(did)] == relay_dids(net.spec, C2)
        assert len(junk) > 12 and len(good) > 12


# Determinism and process mode -----------------------------------------------------------------------------


async def test_pages_are_identical_across_runs(client: httpx.AsyncClient) -> None:
    spec = build_spec(2, 30, (C1,))
    bodies = []
    for _ in range(2):
        async with open_network(spec) as net:
            bodies.append((await list_records(client, net, plc_did(1), limit=100)).content)
    assert bodies[0] == bodies[1]


async def test_process_mode(tmp_path: Path, client: httpx.AsyncClient) -> None:
    port_file = tmp_path / "simnet.json"
    command = [
        sys.executable,
        "-m",
        "daemon.simnet",
        "--accounts=3",
        "--records=12",
        "--hosts=2",
        f"--collections={C1},{C2}",
        "--hostile",
        "pds_500=1",
        "--record-requests",
        f"--port-file={port_file}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(command, env=env, check=False, task_status=task_status)
        )
        with trio.fail_after(20):
            while not port_file.exists():
                await trio.sleep(0.05)
        info = json.loads(port_file.read_text())
        assert info["pid"] == process.pid
        spec = build_spec(3, 12, (C1, C2), 2, {"pds_500": 1})
        did = spec.accounts[1].did
        response = await client.get(
            info["pds_urls"][1] + LIST_RECORDS, params={"repo": did, "collection": C2, "limit": "100"}
        )
        assert len(response.json()["records"]) == 12
        plc = await client.get(f"{info['plc_url']}/{did}")
        assert plc.json()["service"][0]["serviceEndpoint"] == info["pds_urls"][1]
        stats = (await client.get(info["control_url"] + "/stats")).json()
        assert stats[info["pds_urls"][1]]["requests"] == 1
        assert stats[info["pds_urls"][1]]["statuses"] == {"200": 1}
        await client.get(info["control_url"] + "/reset")
        assert (await client.get(info["control_url"] + "/stats")).json()[info["pds_urls"][1]]["requests"] == 0
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert not port_file.exists()
