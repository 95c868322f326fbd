"""The simulated network's real repos, record values, broken artefacts, mutations and expectations (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from daemon.atproto.cbor import cid_for_record, decode_dag_cbor, decode_record, encode_record
from daemon.atproto.cid import cid_for_block, format_cid
from daemon.atproto.commit import decode_commit, verify_commit
from daemon.atproto.keys import K256, P256
from daemon.atproto.mst import decode_node, key_layer, proof_path
from daemon.atproto.mstwalk import KeyRange, MstWalk
from daemon.errors import ConfigError, ProtocolViolation
from daemon.simnet import (
    ACCOUNT_BEHAVIOURS,
    HOST_BEHAVIOURS,
    LIST_ONLY_BEHAVIOURS,
    VERIFIED_BEHAVIOURS,
    Account,
    DaemonLimits,
    HostOptions,
    Mutation,
    NetworkSpec,
    build_spec,
    expected_failed,
    expected_records,
    expected_values,
    make_record,
    pair_records,
    plc_did,
    possible_records,
    record_json,
    signing_key,
    with_account,
    with_mutation,
)
from daemon.simnet.brokentrees import raw_node
from daemon.simnet.control import spec_from_json, spec_to_json
from daemon.simnet.model import (
    FOREIGN_DID,
    RepoCache,
    account_key,
    account_rev,
    build_repo,
    pair_state,
    record_block,
    record_cid,
    record_json_text,
    signing_curve,
)
from daemon.simnet.records import listed_entry
from daemon.simnet.repos import CURVE_ORDERS, Repo

C1, C2 = "com.example.simnet.alpha", "com.example.simnet.beta"
LIST = DaemonLimits(mode="list")
VERIFIED = DaemonLimits()


def account_spec(behaviour: str | None = None, records: int = 25, **params: object) -> NetworkSpec:
    """Two healthy accounts and one with ``behaviour`` (position 2: a secp256k1 key), on two hosts."""
    accounts = (
        Account(plc_did(0), 0, {C1: records, C2: records}),
        Account(plc_did(1), 1, {C1: records, C2: 3}),
        Account(plc_did(2), 0, {C1: records, C2: records}, behaviour, params),
    )
    return NetworkSpec(accounts, 2, (C1, C2))


def walk(repo: Repo, collections: tuple[str, ...] = (C1, C2)) -> dict[tuple[str, str], tuple[str, object]]:
    """Every record of ``collections`` a walk of the repo's tree finds: {(collection, rkey): (cid, value)}."""
    mst = MstWalk(repo.root, [KeyRange.collection(c) for c in collections])
    while not mst.done:
        needed = mst.needed(100)
        for cid in needed:
            mst.feed(cid, repo.blocks[cid])
        mst.check_delivered(needed)
    return {(r.collection, r.rkey): (format_cid(r.cid), decode_record(r.data)) for r in mst.take_records()}


def expected_walk(spec: NetworkSpec, did: str) -> dict[tuple[str, str], tuple[str, object]]:
    account = spec.account(did)
    return {
        (r.collection, r.rkey): (r.cid, r.value) for c in spec.collections for r in pair_records(account, c)
    }


# Record values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3])
def test_record_values_are_real_dag_cbor_in_the_listrecords_json_form(version: int) -> None:
    did = plc_did(4)
    kinds = set()
    for index in [*range(-3, 0), *range(0, 40)]:
        value = record_json(did, C1, index, version)
        text = record_json_text(did, C1, index, version)
        assert text == json.dumps(value, separators=(",", ":"))
        block = record_block(did, C1, index, version)
        assert block == encode_record(value)
        decoded = decode_record(block)
        assert decoded == value and list(decoded) == list(value)  # canonical key order, as listRecords
        assert (
            record_cid(did, C1, index, version) == cid_for_record(value) == format_cid(cid_for_block(block))
        )
        for altered in (False, True):
            cid, listed = listed_entry(did, C1, index, version, altered)
            assert (cid, listed) == (
                record_cid(did, C1, index, version),
                record_json_text(did, C1, index, version, altered=altered),
            )
        kinds |= {key for key in value if key in ("icon", "digest", "license")}
        if "digest" in value:
            assert "=" not in value["digest"]["$bytes"]  # type: ignore[index]
        if "icon" in value:
            icon = value["icon"]
            assert (
                isinstance(icon, dict)
                and icon["$type"] == "blob"
                and icon["ref"]["$link"].startswith("bafkrei")
            )
    assert kinds == {"icon", "digest", "license"}
    assert record_json(did, C1, 5, 1) != record_json(did, C1, 5, 0)
    altered = json.loads(record_json_text(did, C1, 5, altered=True))
    assert cid_for_record(altered) != record_cid(did, C1, 5)
    assert make_record(did, C1, 5, 2).cid == record_cid(did, C1, 5, 2)


# Keys and commits -----------------------------------------------------------------------------------------


def test_keys_alternate_curves_and_are_deterministic() -> None:
    spec = build_spec(4, 1, (C1,))
    curves = [signing_curve(spec, a) for a in spec.accounts]
    assert curves == [K256, P256, K256, P256]
    assert signing_key(spec, plc_did(0)).multikey().startswith("zQ3s")
    assert signing_key(spec, plc_did(1)).multikey().startswith("zDn")
    again = account_key.__wrapped__(plc_did(0), K256)
    assert again.public_key == account_key(plc_did(0), K256).public_key
    assert len({signing_key(spec, a.did).compressed for a in spec.accounts}) == 4


@pytest.mark.parametrize("position", [0, 1])
def test_healthy_repo_commit_and_tree(position: int) -> None:
    spec = account_spec()
    did = plc_did(position)
    repo = build_repo(spec, spec.account(did))
    assert all(cid_for_block(data) == cid for cid, data in repo.blocks.items())
    commit = decode_commit(repo.blocks[repo.commit], did=did)
    verify_commit(commit, signing_key(spec, did))
    assert (commit.version, commit.data, commit.prev, commit.rev) == (
        3,
        repo.root,
        None,
        account_rev(spec, did),
    )
    assert walk(repo) == expected_walk(spec, did)
    assert walk(repo, (C2,)) == {k: v for k, v in expected_walk(spec, did).items() if k[0] == C2}
    for record in [*pair_records(spec.account(did), C1)][:5]:
        nodes, cid = repo.path(record.key)
        assert nodes == proof_path(repo.root, repo.blocks, record.key)
        assert cid is not None and format_cid(cid) == record.cid
    nodes, cid = repo.path(f"{C1}/3zzzzzzzzzzzz")
    assert cid is None and nodes == proof_path(repo.root, repo.blocks, f"{C1}/3zzzzzzzzzzzz")


def test_empty_repo() -> None:
    spec = NetworkSpec((Account(plc_did(0), 0, {}),), 1, (C1,))
    repo = build_repo(spec, spec.accounts[0])
    assert walk(repo, (C1,)) == {}
    assert decode_node(repo.blocks[repo.root]).entries == ()


def test_signature_modes() -> None:
    for behaviour in ("commit_other_key", "commit_high_s"):
        spec = account_spec(behaviour)
        did = plc_did(2)
        repo = build_repo(spec, spec.account(did))
        commit = decode_commit(repo.blocks[repo.commit], did=did)
        with pytest.raises(ProtocolViolation) as failure:
            verify_commit(commit, signing_key(spec, did))
        assert failure.value.code == "invalid_signature"
        assert walk(repo) == expected_walk(spec, did)  # only the signature is wrong
    other = build_repo(account_spec("commit_other_key"), account_spec("commit_other_key").account(plc_did(2)))
    verify_commit(
        decode_commit(other.blocks[other.commit], did=plc_did(2)),
        account_key(plc_did(2), K256, "other").public_key,
    )
    # The high-S signature is a mathematically valid ECDSA signature with s > n/2.
    spec = account_spec("commit_high_s")
    high = build_repo(spec, spec.account(plc_did(2)))
    commit = decode_commit(high.blocks[high.commit], did=plc_did(2))
    r, s = int.from_bytes(commit.sig[:32], "big"), int.from_bytes(commit.sig[32:], "big")
    assert s > CURVE_ORDERS[K256] // 2
    public = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256K1(), signing_key(spec, plc_did(2)).compressed
    )
    public.verify(encode_dss_signature(r, s), commit.unsigned_bytes(), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("behaviour", "field", "value"), [("commit_other_did", "did", FOREIGN_DID), ("commit_v2", "version", 2)]
)
def test_invalid_commits(behaviour: str, field: str, value: object) -> None:
    spec = account_spec(behaviour)
    repo = build_repo(spec, spec.account(plc_did(2)))
    assert decode_dag_cbor(repo.blocks[repo.commit])[field] == value
    with pytest.raises(ProtocolViolation) as failure:
        decode_commit(repo.blocks[repo.commit], did=plc_did(2))
    assert failure.value.code == "invalid_commit"


def test_key_rotated_commit_is_signed_by_the_new_key() -> None:
    spec = account_spec("key_rotated")
    did = plc_did(2)
    repo = build_repo(spec, spec.account(did))
    commit = decode_commit(repo.blocks[repo.commit], did=did)
    verify_commit(commit, signing_key(spec, did))
    with pytest.raises(ProtocolViolation):
        verify_commit(commit, account_key(did, K256, "old").public_key)


# Broken trees ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("records", [0, 1, 2, 25, 300])
@pytest.mark.parametrize("behaviour", ["mst_unordered", "mst_wrong_layer"])
def test_broken_trees_are_consistent_but_break_the_rules_at_the_root(behaviour: str, records: int) -> None:
    spec = account_spec(behaviour, records)
    repo = build_repo(spec, spec.account(plc_did(2)))
    assert all(cid_for_block(data) == cid for cid, data in repo.blocks.items())
    assert decode_commit(repo.blocks[repo.commit], did=plc_did(2)).data == repo.root
    _, items = raw_node(repo.blocks[repo.root])
    keys = [key for key, _, _ in items]
    layers = {key_layer(key) for key in keys}
    assert all(value in repo.blocks for _, value, _ in items)
    if behaviour == "mst_unordered":
        assert keys != sorted(keys) and len(layers) == 1
    else:
        assert keys == sorted(keys) and len(layers) > 1
    with pytest.raises(ProtocolViolation) as failure:
        decode_node(repo.blocks[repo.root])
    assert failure.value.code == "invalid_mst"
    for collection in (C1, C2):
        with pytest.raises(ProtocolViolation):
            walk(repo, (collection,))


# Served blocks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["root", "commit", "record"])
def test_bad_and_omitted_blocks(block: str) -> None:
    for behaviour in ("block_bad_bytes", "block_omitted"):
        spec = account_spec(behaviour, block=block)
        repo = build_repo(spec, spec.account(plc_did(2)))
        first = make_record(plc_did(2), C1, 0)
        target = {"root": repo.root, "commit": repo.commit}.get(block)
        target = target or repo.path(first.key)[1]
        assert target is not None
        if behaviour == "block_omitted":
            assert repo.served(target) is None and repo.omitted == {target}
        else:
            served = repo.served(target)
            assert served is not None and served != repo.blocks[target]
            assert cid_for_block(served) != target
        others = [cid for cid in repo.blocks if cid != target]
        assert all(repo.served(cid) == repo.blocks[cid] for cid in others)


def test_repo_cache_is_bounded_and_keyed_by_commit() -> None:
    spec = build_spec(6, 50, (C1, C2))
    cache = RepoCache(max_bytes=1)
    for account in spec.accounts:
        cache.get(spec, account)
    assert cache.built == 6 and cache.snapshot()["cached_repos"] == 1
    assert cache.records_built == 6 * 100
    cache = RepoCache()
    first = cache.get(spec, spec.accounts[0])
    assert cache.get(spec, spec.accounts[0]) is first
    mutated = with_mutation(spec, plc_did(0), Mutation(C1, delete=(3,)))
    second = cache.get(mutated, mutated.account(plc_did(0)))
    assert second is not first and second.rev > first.rev and cache.built == 2


# Mutations ------------------------------------------------------------------------------------------------


def test_pair_state_applies_mutations_in_order() -> None:
    assert pair_state(3, [], C1).indices == range(3)
    changes = [
        Mutation(C1, update=(1,), delete=(0,), create=2),
        Mutation(C2, delete=(1,)),
        Mutation(C1, update=(1,), recreate=(0,)),
    ]
    state = pair_state(3, changes, C1)
    assert tuple(state.indices) == (0, 1, 2, 3, 4)
    assert [state.version(i) for i in state.indices] == [0, 2, 0, 0, 0]
    assert tuple(pair_state(3, [Mutation(C1, empty=True, create=1)], C1).indices) == (3,)
    for bad in (Mutation(C1, update=(7,)), Mutation(C1, delete=(7,)), Mutation(C1, recreate=(9,))):
        with pytest.raises(ValueError):
            pair_state(3, [bad], C1)


def test_mutations_change_exactly_what_they_say() -> None:
    spec = account_spec(records=6)
    did = plc_did(0)
    before = {r.rkey: r for r in pair_records(spec.account(did), C1)}
    other_before = expected_records(spec, collections=[C2])
    spec2 = with_mutation(spec, did, Mutation(C1, update=(1,), delete=(2,), create=2))
    after = {r.rkey: r for r in pair_records(spec2.account(did), C1)}
    assert set(after) == (set(before) - {before_key(before, 2)}) | {
        make_record(did, C1, i).rkey for i in (6, 7)
    }
    assert after[before_key(before, 1)].cid != before[before_key(before, 1)].cid
    assert {k: r.cid for k, r in after.items() if r.index in (0, 3, 4, 5)} == {
        k: r.cid for k, r in before.items() if r.index in (0, 3, 4, 5)
    }
    assert expected_records(spec2, collections=[C2]) == other_before
    assert account_rev(spec2, did) > account_rev(spec, did)
    assert account_rev(spec2, plc_did(1)) == account_rev(spec, plc_did(1))
    # A delete and a create of the same rkey with the same value: same CIDs, a newer commit.
    spec3 = with_mutation(spec2, did, Mutation(C1, recreate=(0,), delete=(0,)))
    assert expected_records(spec3) == expected_records(spec2)
    assert account_rev(spec3, did) > account_rev(spec2, did)
    emptied = with_mutation(spec3, did, Mutation(C1, empty=True))
    assert not expected_records(emptied, dids=[did], collections=[C1])
    repo = build_repo(emptied, emptied.account(did))
    assert walk(repo) == expected_walk(emptied, did)
    with pytest.raises(ConfigError, match="cannot update"):
        with_mutation(emptied, did, Mutation(C1, update=(1,)))


def before_key(records: Mapping[str, object], index: int) -> str:
    return make_record(plc_did(0), C1, index).rkey


# Expectations ---------------------------------------------------------------------------------------------

VERIFIED_CODES = {
    "commit_other_key": "invalid_signature",
    "commit_high_s": "invalid_signature",
    "commit_other_did": "invalid_commit",
    "commit_v2": "invalid_commit",
    "block_bad_bytes": "cid_mismatch",
    "block_omitted": "block_missing",
    "mst_unordered": "invalid_mst",
    "mst_wrong_layer": "invalid_mst",
    "car_huge": "car_too_large",
    "pds_500": "http_status",
    "pds_hang": "timeout",
    "pds_trickle": "timeout",
    "pds_disconnect": "connect_error",
    "pds_redirect": "redirect",
    "pds_429_reset": "rate_limit_exhausted",
    "pds_429_retry_after_secs": "rate_limit_exhausted",
    "pds_429_retry_after_date": "rate_limit_exhausted",
    "pds_429_html": "rate_limit_exhausted",
    "pds_429_bare": "rate_limit_exhausted",
    "pds_takendown": "repo_takendown",
    "pds_deactivated": "repo_deactivated",
    "pds_suspended": "repo_suspended",
    "pds_repo_not_found": "repo_not_found",
    "pds_could_not_find": "repo_not_found",
    "pds_gone_deactivated": "repo_deactivated",
    "pds_gone_takendown": "repo_takendown",
    "pds_gone_deleted": "repo_not_found",
    "plc_404": "did_not_found",
    "plc_410": "did_tombstoned",
    "plc_hang": "timeout",
    "doc_no_pds": "no_pds_service",
    "doc_wrong_id": "invalid_did_document",
    "doc_bad_json": "invalid_did_document",
    "doc_pds_url": "connect_error",
}


def test_verified_mode_codes_for_every_behaviour() -> None:
    spec = build_spec(2, 25, (C1, C2), 2, {name: 1 for name in sorted(ACCOUNT_BEHAVIOURS)})
    failed = expected_failed(spec, limits=VERIFIED)
    codes = {spec.account(did).behaviour: code for (did, _), code in failed.items()}
    assert codes == VERIFIED_CODES
    assert len(failed) == 2 * len(codes)
    done = ACCOUNT_BEHAVIOURS - set(codes)
    assert (
        LIST_ONLY_BEHAVIOURS | {"pds_moved", "key_rotated", "list_unsigned", "list_altered", "pds_429_once"}
        == done
    )
    records = expected_records(spec, limits=VERIFIED)
    assert {spec.account(did).behaviour for did, _, _, _ in records} == done | {None}
    # Verified mode delivers exactly the signed records, whatever listRecords shows.
    assert len(records) == (len(done) + 2) * 2 * 25
    assert records == possible_records(spec) - {
        r for r in possible_records(spec) if spec.account(r[0]).behaviour in set(codes)
    }


def test_list_mode_differs_where_listrecords_and_the_repo_disagree() -> None:
    for behaviour, extra, missing in (("list_unsigned", 2, 0), ("list_altered", 0, 9)):
        spec = account_spec(behaviour)
        did = plc_did(2)
        signed = expected_records(spec, limits=VERIFIED, dids=[did], collections=[C1])
        listed = expected_records(spec, limits=LIST, dids=[did], collections=[C1])
        assert len(signed) == 25 and len(listed) == 25 + extra - missing
        if extra:
            assert signed < listed and listed <= possible_records(spec, limits=LIST)
            assert not listed <= possible_records(spec)
        else:
            assert listed < signed
        values = expected_values(spec, limits=LIST, dids=[did])
        assert all(cid_for_record(value) == cid for cid, value in values.values())
    # The repo modes are invisible to list mode, the list-only ones to verified mode.
    for behaviour in VERIFIED_BEHAVIOURS:
        assert not expected_failed(account_spec(behaviour), limits=LIST)
    for behaviour in LIST_ONLY_BEHAVIOURS:
        assert not expected_failed(account_spec(behaviour), limits=VERIFIED)


def test_parameters_refine_the_verified_expectations() -> None:
    spec = account_spec("block_omitted", block="record")
    assert expected_failed(spec) == {(plc_did(2), C1): "block_missing"}
    spec = account_spec("block_bad_bytes", block="record")
    emptied = with_mutation(spec, plc_did(2), Mutation(C1, empty=True))
    assert expected_failed(emptied) == {(plc_did(2), C2): "cid_mismatch"}
    assert expected_failed(account_spec("car_huge")) == {(plc_did(2), c): "car_too_large" for c in (C1, C2)}
    spec = account_spec("car_huge", size_mib=2)
    assert not expected_failed(spec)
    assert len(expected_failed(spec, limits=DaemonLimits(max_car_bytes=1_048_576))) == 2
    times = account_spec("pds_429_bare", times=2)
    assert not expected_failed(times)
    assert len(expected_failed(times, limits=DaemonLimits(max_rate_limit_waits=1))) == 2
    # A whole host can take a repo mode.
    hosted = NetworkSpec(
        account_spec().accounts, 2, (C1, C2), host_options={1: HostOptions(behaviour="commit_v2")}
    )
    assert expected_failed(hosted) == {(plc_did(1), c): "invalid_commit" for c in (C1, C2)}
    assert "pds_moved" not in HOST_BEHAVIOURS and "key_rotated" not in HOST_BEHAVIOURS


def test_pds_moved_needs_another_host() -> None:
    with pytest.raises(ConfigError, match="pds_moved"):
        NetworkSpec((Account(plc_did(0), 0, {C1: 1}, "pds_moved"),), 1, (C1,))
    with pytest.raises(ConfigError, match="pds_moved"):
        account_spec("pds_moved", old_pds=0)
    assert account_spec("pds_moved", old_pds=1).old_pds(account_spec("pds_moved").account(plc_did(2))) == 1
    with pytest.raises(ConfigError, match="block"):
        account_spec("block_omitted", block="leaf")
    with pytest.raises(ConfigError, match="rate_limit"):
        NetworkSpec((), 1, (C1,), host_options={0: HostOptions(rate_limit=(0, 300))})
    with pytest.raises(ConfigError, match="mode"):
        DaemonLimits(mode="fast")


def test_spec_json_round_trips() -> None:
    spec = account_spec("pds_moved", old_pds=1)
    spec = with_mutation(spec, plc_did(0), Mutation(C1, update=(1,), delete=(2,), create=3, recreate=(2,)))
    spec = NetworkSpec(
        spec.accounts,
        2,
        spec.collections,
        latency=0.5,
        host_options={1: HostOptions(get_blocks=False, rate_limit=(10, 60), repo_rate_limit=(5, 30))},
        relay_behaviour={C2: "relay_500"},
    )
    again = spec_from_json(json.loads(json.dumps(spec_to_json(spec))))
    assert again == spec
    assert expected_records(again) == expected_records(spec)
    spec = with_account(
        spec, Account(plc_did(9), 0, {C1: 1}, "pds_huge", {"mib": 2.5, "declare_length": True})
    )
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_repos_are_reproducible() -> None:
    spec = account_spec("commit_high_s")
    for did in (plc_did(0), plc_did(1), plc_did(2)):
        first, second = build_repo(spec, spec.account(did)), build_repo(spec, spec.account(did))
        assert (first.commit, first.root, first.blocks) == (second.commit, second.root, second.blocks)
