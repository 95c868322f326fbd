"""The simulated PDS's sync endpoints, repo hostile modes, account states, rate limits and mutations, driven
over HTTP like the reference PDS (@atproto/pds) is."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.atproto.car import CarReader, read_car
from daemon.atproto.cbor import cid_for_record, decode_record
from daemon.atproto.cid import Cid, format_cid, parse_cid
from daemon.atproto.commit import Commit, decode_commit, verify_commit
from daemon.atproto.keys import PublicKey, parse_multikey
from daemon.atproto.mst import proof_path
from daemon.atproto.mstwalk import KeyRange, MstWalk
from daemon.errors import ProtocolViolation
from daemon.simnet import (
    Account,
    DaemonLimits,
    HostOptions,
    NetworkSpec,
    RunningNetwork,
    build_spec,
    expected_failed,
    expected_records,
    make_record,
    open_network,
    pair_records,
    plc_did,
    record_json,
)
from daemon.simnet.model import account_rev, build_repo
from daemon.simnet.ratelimit import FixedWindow
from daemon.simnet.repos import MIB
from daemon.simnet.sync import huge_repo
from tests.simnetproc import SimnetProcess

C1, C2 = "com.example.simnet.alpha", "com.example.simnet.beta"
XRPC = "/xrpc/com.atproto."
ABSENT = "2222222222222"  # a record key no record has: getRecord of it is a proof of absence
CAR_TYPE = "application/vnd.ipld.car"
Blocks = dict[Cid, bytes]


def spec_with(
    *behaviours: tuple[str | None, dict[str, object]], records: int = 25, hosts: int = 2
) -> NetworkSpec:
    """Two healthy accounts (a secp256k1 and a P-256 key), then one account per behaviour."""
    accounts = [
        Account(plc_did(0), 0, {C1: records, C2: records}),
        Account(plc_did(1), 1, {C1: records, C2: 3}),
    ]
    for offset, (behaviour, params) in enumerate(behaviours):
        accounts.append(Account(plc_did(2 + offset), 0, {C1: records, C2: records}, behaviour, params))
    return NetworkSpec(tuple(accounts), hosts, (C1, C2))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        yield http


async def xrpc(
    client: httpx.AsyncClient, base: str, method: str, params: Sequence[tuple[str, str]], **kwargs: Any
) -> httpx.Response:
    return await client.get(base + XRPC + method, params=list(params), **kwargs)


async def car(
    client: httpx.AsyncClient, base: str, method: str, params: Sequence[tuple[str, str]]
) -> tuple[tuple[Cid, ...], list[tuple[Cid, bytes]]]:
    response = await xrpc(client, base, method, params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CAR_TYPE
    return read_car(response.content)


async def document_key(client: httpx.AsyncClient, net: RunningNetwork, did: str) -> tuple[str, PublicKey]:
    """The PDS endpoint and the ``#atproto`` key the account's DID document names."""
    document = (await client.get(net.did_document_url(did))).json()
    (method,) = document["verificationMethod"]
    assert method["id"].endswith("#atproto") and method["type"] == "Multikey"
    return document["service"][0]["serviceEndpoint"], parse_multikey(method["publicKeyMultibase"])


async def verified_walk(
    client: httpx.AsyncClient,
    net: RunningNetwork,
    did: str,
    collections: Sequence[str] = (C1, C2),
    *,
    whole_repo: bool = False,
) -> tuple[Commit, dict[tuple[str, str], tuple[str, object]]]:
    """What a verified-mode daemon does: resolve, probe the commit with getRecord, check its signature, walk
    the MST with getBlocks (or one getRepo); the records found, {(collection, rkey): (cid, value)}."""
    pds, key = await document_key(client, net, did)
    roots, proof = await car(
        client, pds, "sync.getRecord", [("did", did), ("collection", C1), ("rkey", ABSENT)]
    )
    blocks = dict(proof)
    if roots[0] not in blocks:
        raise ProtocolViolation("the commit was not delivered", code="block_missing")
    commit = decode_commit(blocks[roots[0]], did=did)
    verify_commit(commit, key)
    walk = MstWalk(commit.data, [KeyRange.collection(c) for c in collections])
    if whole_repo:
        repo_roots, repo_blocks = await car(client, pds, "sync.getRepo", [("did", did)])
        assert repo_roots == roots
        for cid, data in repo_blocks:
            walk.feed(cid, data, keep=True)
        walk.finish()
    else:
        for cid, data in proof[1:]:
            walk.feed(cid, data)
        while not walk.done:
            needed = walk.needed(100)
            params = [("did", did), *(("cids", format_cid(cid)) for cid in needed)]
            for cid, data in (await car(client, pds, "sync.getBlocks", params))[1]:
                walk.feed(cid, data)
            walk.check_delivered(needed)
    records: dict[tuple[str, str], tuple[str, object]] = {
        (r.collection, r.rkey): (format_cid(r.cid), decode_record(r.data)) for r in walk.take_records()
    }
    return commit, records


def expected_walk(
    spec: NetworkSpec, did: str, collections: Sequence[str] = (C1, C2)
) -> dict[tuple[str, str], tuple[str, object]]:
    account = spec.account(did)
    return {(r.collection, r.rkey): (r.cid, r.value) for c in collections for r in pair_records(account, c)}


# The sync endpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1])
async def test_get_record_proves_presence_and_absence(client: httpx.AsyncClient, position: int) -> None:
    spec = spec_with()
    did = plc_did(position)
    repo = build_repo(spec, spec.account(did))
    async with open_network(spec) as net:
        pds, key = await document_key(client, net, did)
        record = make_record(did, C1, 7)
        roots, blocks = await car(
            client, pds, "sync.getRecord", [("did", did), ("collection", C1), ("rkey", record.rkey)]
        )
        assert roots == (repo.commit,)
        commit = decode_commit(blocks[0][1], did=did)
        verify_commit(commit, key)
        assert commit.rev == account_rev(spec, did)
        path = proof_path(commit.data, repo.blocks, record.key)
        assert [cid for cid, _ in blocks] == [repo.commit, *path, parse_cid(record.cid)]
        assert decode_record(blocks[-1][1]) == record_json(did, C1, 7)
        walk = MstWalk(commit.data, [KeyRange(record.key.encode(), record.key.encode() + b"\x00")])
        for cid, data in blocks[1:]:
            walk.feed(cid, data)
        assert [(r.key, format_cid(r.cid)) for r in walk.take_records()] == [(record.key, record.cid)]
        absent = await car(
            client, pds, "sync.getRecord", [("did", did), ("collection", C2), ("rkey", ABSENT)]
        )
        assert [cid for cid, _ in absent[1]] == [
            repo.commit,
            *proof_path(commit.data, repo.blocks, f"{C2}/{ABSENT}"),
        ]
        for params, status in (
            ([("did", did), ("collection", C1)], 400),
            ([("did", did), ("collection", C1), ("rkey", "..")], 400),
            ([("did", plc_did(77)), ("collection", C1), ("rkey", ABSENT)], 400),
        ):
            response = await xrpc(client, pds, "sync.getRecord", params)
            assert response.status_code == status
        missing = await xrpc(
            client, pds, "sync.getRecord", [("did", plc_did(77)), ("collection", C1), ("rkey", ABSENT)]
        )
        assert missing.json() == {
            "error": "RepoNotFound",
            "message": f"Could not find repo for DID: {plc_did(77)}",
        }


@pytest.mark.parametrize("whole_repo", [False, True])
async def test_verified_walks_yield_exactly_the_expected_records(
    client: httpx.AsyncClient, whole_repo: bool
) -> None:
    spec = spec_with()
    async with open_network(spec) as net:
        for did in (plc_did(0), plc_did(1)):
            _, records = await verified_walk(client, net, did, whole_repo=whole_repo)
            assert records == expected_walk(spec, did)
            assert {(did, c, rkey, cid) for (c, rkey), (cid, _) in records.items()} == expected_records(
                spec, dids=[did]
            )
            _, only = await verified_walk(client, net, did, (C2,), whole_repo=whole_repo)
            assert only == expected_walk(spec, did, (C2,))
        assert net.repos.built == 2


async def test_get_repo_is_the_whole_repo_streamed_in_no_walk_order(client: httpx.AsyncClient) -> None:
    spec = spec_with()
    did = plc_did(0)
    repo = build_repo(spec, spec.account(did))
    async with open_network(spec) as net:
        response = await xrpc(client, net.pds_url(did), "sync.getRepo", [("did", did)])
        assert response.headers["content-type"] == CAR_TYPE and "content-length" not in response.headers
        roots, blocks = read_car(response.content)
        assert roots == (repo.commit,)
        assert dict(blocks) == repo.blocks and len(blocks) == len(repo.blocks)
        assert [cid for cid, _ in blocks] == sorted(repo.blocks)
        assert blocks[0][0] != repo.commit or blocks[1][0] != repo.root  # not commit-then-root order


async def test_get_blocks_like_the_reference(client: httpx.AsyncClient) -> None:
    spec = spec_with()
    did = plc_did(0)
    repo = build_repo(spec, spec.account(did))
    wanted = [repo.root, repo.commit, parse_cid(make_record(did, C1, 3).cid)]
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        params = [("did", did), *(("cids", format_cid(cid)) for cid in [*wanted, wanted[0]])]
        roots, blocks = await car(client, pds, "sync.getBlocks", params)
        assert roots == ()
        assert sorted(cid for cid, _ in blocks) == sorted(wanted)  # duplicates collapse
        assert all(repo.blocks[cid] == data for cid, data in blocks)
        missing = [
            format_cid(parse_cid(make_record(did, C1, 999).cid)),
            format_cid(parse_cid(make_record(did, C2, 999).cid)),
        ]
        params = [("did", did), ("cids", format_cid(repo.root)), *(("cids", cid) for cid in missing)]
        response = await xrpc(client, pds, "sync.getBlocks", params)
        assert (response.status_code, response.json()) == (
            400,
            {"error": "InvalidRequest", "message": f"Could not find cids: {','.join(missing)}"},
        )
        bad = await xrpc(client, pds, "sync.getBlocks", [("did", did), ("cids", "bafynot")])
        assert (bad.status_code, bad.json()["error"]) == (400, "InvalidRequest")
        none = await xrpc(client, pds, "sync.getBlocks", [("did", did)])
        assert none.status_code == 400


async def test_latest_commit_and_repo_status(client: httpx.AsyncClient) -> None:
    spec = spec_with()
    did = plc_did(1)
    repo = build_repo(spec, spec.account(did))
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        latest = (await xrpc(client, pds, "sync.getLatestCommit", [("did", did)])).json()
        assert latest == {"cid": format_cid(repo.commit), "rev": repo.rev}
        status = (await xrpc(client, pds, "sync.getRepoStatus", [("did", did)])).json()
        assert status == {"did": did, "active": True, "rev": repo.rev}
        unknown = await xrpc(client, pds, "sync.getRepoStatus", [("did", plc_did(5))])
        assert (unknown.status_code, unknown.json()["error"]) == (400, "RepoNotFound")


# Account states -------------------------------------------------------------------------------------------

STATES = [
    # behaviour, listRecords error, sync error, getRepoStatus (None: 400 RepoNotFound)
    ("pds_gone_deactivated", "InvalidRequest", "RepoDeactivated", "deactivated"),
    ("pds_gone_takendown", "InvalidRequest", "RepoTakendown", "takendown"),
    ("pds_gone_deleted", "InvalidRequest", "RepoNotFound", None),
    ("pds_takendown", "RepoTakendown", "RepoTakendown", "takendown"),
    ("pds_deactivated", "RepoDeactivated", "RepoDeactivated", "deactivated"),
    ("pds_suspended", "RepoSuspended", "RepoSuspended", "suspended"),
    ("pds_repo_not_found", "RepoNotFound", "RepoNotFound", None),
    ("pds_could_not_find", "InvalidRequest", "RepoNotFound", None),
]


@pytest.mark.parametrize(("behaviour", "listed", "synced", "status"), STATES)
async def test_account_states(
    client: httpx.AsyncClient, behaviour: str, listed: str, synced: str, status: str | None
) -> None:
    spec = spec_with((behaviour, {}))
    did = plc_did(2)
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        response = await xrpc(client, pds, "repo.listRecords", [("repo", did), ("collection", C1)])
        assert (response.status_code, response.json()["error"]) == (400, listed)
        if listed == "InvalidRequest":
            assert response.json()["message"] == f"Could not find repo: {did}"
        for method, params in (
            ("sync.getRecord", [("collection", C1), ("rkey", ABSENT)]),
            ("sync.getBlocks", [("cids", make_record(did, C1, 0).cid)]),
            ("sync.getLatestCommit", []),
            ("sync.getRepo", []),
        ):
            answer = await xrpc(client, pds, method, [("did", did), *params])
            assert (answer.status_code, answer.json()["error"]) == (400, synced)
        answer = await xrpc(client, pds, "sync.getRepoStatus", [("did", did)])
        if status is None:
            assert (answer.status_code, answer.json()["error"]) == (400, "RepoNotFound")
        else:
            assert answer.json() == {"did": did, "active": False, "status": status}
    code = {"RepoDeactivated": "repo_deactivated", "RepoTakendown": "repo_takendown"}.get(
        synced, "repo_not_found"
    )
    code = "repo_suspended" if behaviour == "pds_suspended" else code
    for mode in ("list", "verified"):
        assert set(expected_failed(spec, limits=DaemonLimits(mode=mode)).values()) == {code}


async def test_a_moved_account(client: httpx.AsyncClient) -> None:
    spec = spec_with(("pds_moved", {}))
    did = plc_did(2)
    async with open_network(spec) as net:
        old, new = net.pds_urls[1], net.pds_urls[0]
        assert (await document_key(client, net, did))[0] == old
        assert (await document_key(client, net, did))[0] == new
        assert (await document_key(client, net, did))[0] == new
        gone = await xrpc(client, old, "repo.listRecords", [("repo", did), ("collection", C1)])
        assert gone.json() == {"error": "InvalidRequest", "message": f"Could not find repo: {did}"}
        for method in ("sync.getLatestCommit", "sync.getRepo", "sync.getRepoStatus"):
            answer = await xrpc(client, old, method, [("did", did)])
            assert (answer.status_code, answer.json()["error"]) == (400, "RepoNotFound")
        _, records = await verified_walk(client, net, did)
        assert records == expected_walk(spec, did)
        net.reset()
        assert (await document_key(client, net, did))[0] == old
    for mode in ("list", "verified"):
        assert not expected_failed(spec, limits=DaemonLimits(mode=mode))
        assert expected_records(spec, limits=DaemonLimits(mode=mode), dids=[did])


async def test_a_rotated_key(client: httpx.AsyncClient) -> None:
    spec = spec_with(("key_rotated", {}))
    did = plc_did(2)
    async with open_network(spec) as net:
        _, old_key = await document_key(client, net, did)  # the first resolution: the key before
        _, blocks = await car(
            client, net.pds_url(did), "sync.getRecord", [("did", did), ("collection", C1), ("rkey", ABSENT)]
        )
        commit = decode_commit(blocks[0][1], did=did)
        with pytest.raises(ProtocolViolation) as failure:
            verify_commit(commit, old_key)
        assert failure.value.code == "invalid_signature"
        _, new_key = await document_key(client, net, did)  # a fresh resolution: the current key
        assert new_key != old_key
        verify_commit(commit, new_key)
        _, records = await verified_walk(client, net, did)
        assert records == expected_walk(spec, did)
    assert not expected_failed(spec)


async def test_host_without_get_blocks(client: httpx.AsyncClient) -> None:
    spec = NetworkSpec(spec_with().accounts, 2, (C1, C2), host_options={0: HostOptions(get_blocks=False)})
    async with open_network(spec) as net:
        did = plc_did(0)
        response = await xrpc(
            client, net.pds_url(did), "sync.getBlocks", [("did", did), ("cids", make_record(did, C1, 0).cid)]
        )
        assert (response.status_code, response.json()["error"]) == (501, "MethodNotImplemented")
        _, records = await verified_walk(client, net, did, whole_repo=True)
        assert records == expected_walk(spec, did)
        _, other = await verified_walk(client, net, plc_did(1))  # host 1 has getBlocks
        assert other == expected_walk(spec, plc_did(1))
    assert not expected_failed(spec)


# Repo hostile modes ---------------------------------------------------------------------------------------


async def test_a_huge_repo_is_streamed_and_getblocks_is_missing(client: httpx.AsyncClient) -> None:
    spec = spec_with(("car_huge", {"size_mib": 2, "declare_length": True}))
    did = plc_did(2)
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        response = await xrpc(
            client, pds, "sync.getBlocks", [("did", did), ("cids", make_record(did, C1, 0).cid)]
        )
        assert response.status_code == 501
        reader = CarReader(max_bytes=MIB)
        size = 0
        with pytest.raises(ProtocolViolation) as failure:
            async with client.stream("GET", pds + XRPC + "sync.getRepo", params={"did": did}) as streamed:
                assert int(streamed.headers["content-length"]) == 2 * MIB
                async for chunk in streamed.aiter_raw():
                    size += len(chunk)
                    reader.feed(chunk)
        assert failure.value.code == "car_too_large" and size <= 2 * MIB
        _, records = await verified_walk(client, net, did, whole_repo=True)  # under a big enough cap: done
        assert records == expected_walk(spec, did)
    repo = build_repo(spec, spec.account(did))
    default = huge_repo(repo, 96 * MIB, True)
    assert default.size == 96 * MIB > DaemonLimits().max_car_bytes
    assert huge_repo(repo, 96 * MIB, False).size is None


@pytest.mark.parametrize("block", ["root", "commit", "record"])
async def test_bad_bytes_in_every_car(client: httpx.AsyncClient, block: str) -> None:
    spec = spec_with(("block_bad_bytes", {"block": block}))
    did = plc_did(2)
    repo = build_repo(spec, spec.account(did))
    target = {"root": repo.root, "commit": repo.commit}.get(block) or parse_cid(make_record(did, C1, 0).cid)
    key = make_record(did, C1, 0).rkey
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        for method, params in (
            ("sync.getRecord", [("did", did), ("collection", C1), ("rkey", key)]),
            ("sync.getBlocks", [("did", did), ("cids", format_cid(target))]),
            ("sync.getRepo", [("did", did)]),
        ):
            response = await xrpc(client, pds, method, params)
            assert response.status_code == 200
            with pytest.raises(ProtocolViolation) as failure:
                read_car(response.content)
            assert failure.value.code == "cid_mismatch"


@pytest.mark.parametrize("block", ["root", "commit", "record"])
async def test_omitted_blocks(client: httpx.AsyncClient, block: str) -> None:
    spec = spec_with(("block_omitted", {"block": block}))
    did = plc_did(2)
    repo = build_repo(spec, spec.account(did))
    target = {"root": repo.root, "commit": repo.commit}.get(block) or parse_cid(make_record(did, C1, 0).cid)
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        roots, blocks = await car(
            client,
            pds,
            "sync.getBlocks",
            [
                ("did", did),
                ("cids", format_cid(target)),
                ("cids", format_cid(repo.commit if block != "commit" else repo.root)),
            ],
        )
        assert roots == () and len(blocks) == 1 and target not in dict(blocks)
        _, proof = await car(
            client,
            pds,
            "sync.getRecord",
            [("did", did), ("collection", C1), ("rkey", make_record(did, C1, 0).rkey)],
        )
        assert target not in dict(proof)
        _, whole = await car(client, pds, "sync.getRepo", [("did", did)])
        assert target not in dict(whole) and len(whole) == len(repo.blocks) - 1
        for whole_repo in (False, True):
            with pytest.raises(ProtocolViolation) as failure:
                await verified_walk(client, net, did, (C1,), whole_repo=whole_repo)
            assert failure.value.code == "block_missing"
        if block == "record":
            _, records = await verified_walk(client, net, did, (C2,))
            assert records == expected_walk(spec, did, (C2,))
    failed = expected_failed(spec)
    assert failed == {(did, c): "block_missing" for c in ((C1,) if block == "record" else (C1, C2))}


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        ("commit_other_key", "invalid_signature"),
        ("commit_high_s", "invalid_signature"),
        ("commit_other_did", "invalid_commit"),
        ("commit_v2", "invalid_commit"),
        ("mst_unordered", "invalid_mst"),
        ("mst_wrong_layer", "invalid_mst"),
    ],
)
async def test_broken_repos_fail_verification(client: httpx.AsyncClient, behaviour: str, code: str) -> None:
    spec = spec_with((behaviour, {}))
    did = plc_did(2)
    async with open_network(spec) as net:
        for whole_repo in (False, True):
            with pytest.raises(ProtocolViolation) as failure:
                await verified_walk(client, net, did, whole_repo=whole_repo)
            assert failure.value.code == code
        # listRecords is unaffected: list mode delivers the records.
        page = (
            await xrpc(
                client,
                net.pds_url(did),
                "repo.listRecords",
                [("repo", did), ("collection", C1), ("limit", "100")],
            )
        ).json()
        assert {(r["uri"].rsplit("/", 1)[1], r["cid"]) for r in page["records"]} == {
            (rkey, cid)
            for _, _, rkey, cid in expected_records(
                spec, limits=DaemonLimits(mode="list"), dids=[did], collections=[C1]
            )
        }
    assert set(expected_failed(spec).values()) == {code}


async def test_listrecords_and_the_repo_disagree(client: httpx.AsyncClient) -> None:
    spec = spec_with(("list_unsigned", {}), ("list_altered", {"every": 5}))
    unsigned, altered = plc_did(2), plc_did(3)
    async with open_network(spec) as net:
        for did in (unsigned, altered):
            _, records = await verified_walk(client, net, did)
            assert records == expected_walk(spec, did)
        page = (
            await xrpc(
                client,
                net.pds_url(unsigned),
                "repo.listRecords",
                [("repo", unsigned), ("collection", C1), ("limit", "100")],
            )
        ).json()
        listed = {r["uri"].rsplit("/", 1)[1]: r for r in page["records"]}
        assert len(listed) == 27
        extra = set(listed) - {r.rkey for r in pair_records(spec.account(unsigned), C1)}
        assert len(extra) == 2
        assert all(cid_for_record(listed[rkey]["value"]) == listed[rkey]["cid"] for rkey in listed)
        list_mode = DaemonLimits(mode="list")
        assert {
            rkey
            for _, _, rkey, _ in expected_records(spec, limits=list_mode, dids=[unsigned], collections=[C1])
        } == set(listed)
        page = (
            await xrpc(
                client,
                net.pds_url(altered),
                "repo.listRecords",
                [("repo", altered), ("collection", C1), ("limit", "100")],
            )
        ).json()
        mismatched = {
            int(r["value"]["name"].split()[2])
            for r in page["records"]
            if cid_for_record(r["value"]) != r["cid"]
        }
        assert mismatched == {0, 5, 10, 15, 20}
        kept = expected_records(spec, limits=list_mode, dids=[altered], collections=[C1])
        assert len(kept) == 20
        record = make_record(altered, C1, 5)
        _, proof = await car(
            client,
            net.pds_url(altered),
            "sync.getRecord",
            [("did", altered), ("collection", C1), ("rkey", record.rkey)],
        )
        assert decode_record(proof[-1][1]) == record_json(altered, C1, 5)


# Host-wide modes on the sync endpoints --------------------------------------------------------------------


async def test_host_breaking_modes_apply_to_the_sync_endpoints(client: httpx.AsyncClient) -> None:
    behaviours = (
        "pds_500",
        "pds_disconnect",
        "pds_hang",
        "pds_redirect",
        "pds_429_once",
        "pds_429_bare",
        "pds_invalid_json",
    )
    spec = spec_with(*((b, {}) for b in behaviours), ("pds_trickle", {"interval": 0.001, "bytes": 40}))
    dids = {b: plc_did(2 + i) for i, b in enumerate((*behaviours, "pds_trickle"))}
    async with open_network(spec) as net:
        pds = net.pds_urls[0]

        async def latest(name: str, **kwargs: Any) -> httpx.Response:
            return await xrpc(client, pds, "sync.getLatestCommit", [("did", dids[name])], **kwargs)

        assert (await latest("pds_500")).status_code == 500
        with pytest.raises(httpx.RemoteProtocolError):
            await latest("pds_disconnect")
        with pytest.raises(httpx.ReadTimeout):
            await latest("pds_hang", timeout=httpx.Timeout(0.2))
        assert (await latest("pds_redirect")).status_code == 302
        assert [(await latest("pds_429_once")).status_code for _ in range(3)] == [429, 200, 200]
        assert (await xrpc(client, pds, "sync.getRepo", [("did", dids["pds_429_once"])])).status_code == 200
        assert {(await latest("pds_429_bare")).status_code for _ in range(3)} == {429}
        assert (await latest("pds_invalid_json")).status_code == 200  # a listRecords-only mode
        trickled = await xrpc(client, pds, "sync.getRepo", [("did", dids["pds_trickle"])])
        roots, _ = read_car(trickled.content)
        assert roots == (build_repo(spec, spec.account(dids["pds_trickle"])).commit,)
        _, records = await verified_walk(client, net, dids["pds_invalid_json"])
        assert records == expected_walk(spec, dids["pds_invalid_json"])


# Rate limits ----------------------------------------------------------------------------------------------


def test_fixed_windows_round_like_the_reference() -> None:
    now = [1000.7]
    bucket = FixedWindow(2, 10, clock=lambda: now[0])
    allowed, headers = bucket.consume("a")
    assert allowed and dict(headers) == {
        b"ratelimit-limit": b"2",
        b"ratelimit-remaining": b"1",
        b"ratelimit-reset": b"1010",
        b"ratelimit-policy": b"2;w=10",
    }
    assert bucket.consume("a")[0] and bucket.consume("b")[0]
    now[0] = 1003.2
    allowed, headers = bucket.consume("a")
    assert (
        not allowed
        and dict(headers)[b"retry-after"] == b"8"
        and dict(headers)[b"ratelimit-remaining"] == b"0"
    )
    now[0] = 1010.7
    allowed, headers = bucket.consume("a")
    assert allowed and dict(headers)[b"ratelimit-reset"] == b"1020"


async def test_rate_limits_like_the_reference_pds(client: httpx.AsyncClient) -> None:
    options = {
        0: HostOptions(rate_limit=(3, 300), repo_rate_limit=(2, 60)),
        1: HostOptions(rate_limit=(50, 300)),
    }
    spec = NetworkSpec(spec_with().accounts, 2, (C1, C2), host_options=options)
    did = plc_did(0)
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        before = time.time()
        answers = [
            await xrpc(client, pds, "repo.listRecords", [("repo", did), ("collection", C1)]) for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        assert {a.headers["ratelimit-policy"] for a in answers} == {"3;w=300"}
        assert {a.headers["ratelimit-limit"] for a in answers} == {"3"}
        reset = int(answers[0].headers["ratelimit-reset"])
        assert math.floor(before) + 299 <= reset <= time.time() + 300
        assert "retry-after" not in answers[0].headers
        assert 1 <= int(answers[3].headers["retry-after"]) <= 300
        assert answers[3].json() == {"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"}
        assert (await xrpc(client, pds, "sync.getLatestCommit", [("did", did)])).status_code == 429
        repos = [await xrpc(client, pds, "sync.getRepo", [("did", did)]) for _ in range(3)]
        assert [r.status_code for r in repos] == [200, 200, 429]
        assert {r.headers["ratelimit-policy"] for r in repos} == {"2;w=60"}
        stats = net.pds_stats(0)
        assert stats.rate_limited == 3 and stats.statuses[429] == 3
        assert stats.snapshot()["rate_limited"] == 3
        other = await xrpc(client, net.pds_url(plc_did(1)), "sync.getRepo", [("did", plc_did(1))])
        assert other.headers["ratelimit-policy"] == "6000;w=300"  # the reference's getRepo bucket
        assert net.pds_stats(1).rate_limited == 0
        net.reset()
        again = await xrpc(client, pds, "repo.listRecords", [("repo", did), ("collection", C1)])
        assert (again.status_code, again.headers["ratelimit-remaining"]) == (200, "2")
        assert net.pds_stats(0).rate_limited == 0
    async with open_network(spec_with(("pds_429_bare", {}))) as net:
        response = await xrpc(client, net.pds_urls[0], "sync.getRepo", [("did", plc_did(2))])
        assert response.status_code == 429 and "ratelimit-policy" not in response.headers
        assert net.pds_stats(0).rate_limited == 0 and net.pds_stats(0).statuses[429] == 1


# Mutations ------------------------------------------------------------------------------------------------


async def test_mutations_are_served(client: httpx.AsyncClient) -> None:
    spec = spec_with(records=6)
    did = plc_did(0)
    async with open_network(spec) as net:
        pds = net.pds_url(did)
        first = (await xrpc(client, pds, "sync.getLatestCommit", [("did", did)])).json()
        _, before = await verified_walk(client, net, did)
        account = net.mutate(did, C1, update=[1], delete=[2], create=2)
        assert account.generation == 1 and net.spec.account(did) is account
        second = (await xrpc(client, pds, "sync.getLatestCommit", [("did", did)])).json()
        assert second["rev"] > first["rev"] and second["cid"] != first["cid"]
        assert second["rev"] == account_rev(net.spec, did)
        _, after = await verified_walk(client, net, did)
        assert after == expected_walk(net.spec, did)
        changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
        rkeys = {make_record(did, C1, i).rkey for i in (1, 2, 6, 7)}
        assert changed == {(C1, rkey) for rkey in rkeys}
        page = (
            await xrpc(client, pds, "repo.listRecords", [("repo", did), ("collection", C1), ("limit", "100")])
        ).json()
        assert {(r["uri"].rsplit("/", 1)[1], r["cid"]) for r in page["records"]} == {
            (rkey, cid) for _, _, rkey, cid in expected_records(net.spec, dids=[did], collections=[C1])
        }
        net.mutate(did, C1, empty=True)
        relay = (
            await client.get(
                net.relay_url + "/xrpc/com.atproto.sync.listReposByCollection", params={"collection": C1}
            )
        ).json()
        assert did not in {entry["did"] for entry in relay["repos"]}
        assert (await xrpc(client, pds, "repo.listRecords", [("repo", did), ("collection", C1)])).json() == {
            "records": []
        }
        _, emptied = await verified_walk(client, net, did)
        assert emptied == expected_walk(net.spec, did) and not any(c == C1 for c, _ in emptied)


async def test_process_mode_control_endpoints(tmp_path: Path) -> None:
    args = [
        "--accounts=2",
        "--records=5",
        "--hosts=1",
        f"--collections={C1},{C2}",
        "--hostile=list_unsigned=1",
        "--rate-limit=100/60",
        "--repo-rate-limit=10/30",
        "--no-get-blocks",
    ]
    net = await trio.to_thread.run_sync(SimnetProcess, tmp_path, args)
    try:
        info = net.info
        spec = await trio.to_thread.run_sync(net.spec)
        options = HostOptions(get_blocks=False, rate_limit=(100, 60), repo_rate_limit=(10, 30))
        assert spec == build_spec(2, 5, (C1, C2), 1, {"list_unsigned": 1}, host_options=options)
        did = plc_did(0)
        async with httpx.AsyncClient(timeout=10) as client:
            pds = info["pds_urls"][0]
            blocks = await xrpc(
                client, pds, "sync.getBlocks", [("did", did), ("cids", make_record(did, C1, 0).cid)]
            )
            assert blocks.status_code == 501 and blocks.headers["ratelimit-policy"] == "100;w=60"
            repo = await xrpc(client, pds, "sync.getRepo", [("did", did)])
            assert repo.headers["ratelimit-policy"] == "10;w=30"
            result = await trio.to_thread.run_sync(lambda: net.mutate(did, C1, update=[0], create=1))
            assert result["generation"] == 1
            mutated = await trio.to_thread.run_sync(net.spec)
            assert mutated.account(did).generation == 1
            latest = (await xrpc(client, pds, "sync.getLatestCommit", [("did", did)])).json()
            assert latest["rev"] == result["rev"] == account_rev(mutated, did)
            got = await trio.to_thread.run_sync(lambda: net.expected(dids=[did], values=True))
            assert {tuple(r) for r in got["records"]} == expected_records(mutated, dids=[did])
            assert got["failed"] == [] and len(got["values"]) == 6 + 5
            listed = await trio.to_thread.run_sync(lambda: net.expected(mode="list", collections=[C1]))
            assert {tuple(r) for r in listed["records"]} == expected_records(
                mutated, limits=DaemonLimits(mode="list"), collections=[C1]
            )
            refused = await client.post(
                info["control_url"] + "/mutate", json={"did": did, "collection": C1, "delete": [99]}
            )
            assert refused.status_code == 400 and "cannot delete" in refused.json()["message"]
            assert (await client.get(info["control_url"] + "/mutate")).status_code == 405
            counters = (await client.get(info["control_url"] + "/repos")).json()
            assert counters["repos_built"] >= 1 and counters["build_us_per_record"] > 0
            stats = (await client.get(info["control_url"] + "/stats")).json()
            assert stats[pds]["rate_limited"] == 0
    finally:
        await trio.to_thread.run_sync(net.stop)
    assert json.loads(json.dumps(got))  # the answers are plain JSON
