"""What a correct daemon ends up with, predicted from the spec alone (no I/O, deterministic).

The predictions depend on the daemon's settings (:class:`~daemon.simnet.spec.DaemonLimits`), and above all
on its mode. In **list** mode (SPEC 6.3) every PDS mode counts; records whose listed value does not match
their CID (``list_altered``) are skipped, and records only listRecords shows (``list_unsigned``) are
delivered. In **verified** mode (SPEC 6.2) listRecords is not used: the modes of
:data:`~daemon.simnet.behaviours.LIST_ONLY_BEHAVIOURS` end done with every record, the modes that break a
whole host (500s, hangs, trickles, disconnects, redirects, 429s, unavailable accounts) break every endpoint,
and the repo modes of :data:`~daemon.simnet.behaviours.VERIFIED_BEHAVIOURS` have their codes.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from daemon.atproto.keys import PublicKey
from daemon.net.budget import (
    DEFAULT_BUDGET_BYTES,
    GENERIC_DECODE_FACTOR,
    TYPED_DECODE_FACTOR,
)
from daemon.simnet.behaviours import (
    HELD_BLOCK_COST,
    HUGE_SHAPES,
    IDENTITY_BEHAVIOURS,
    LIST_ONLY_BEHAVIOURS,
    PDS_BEHAVIOURS,
    RATE_LIMIT_BEHAVIOURS,
    RELAY_ERRORS,
    RELAY_HUGE_BYTES,
    VERIFIED_BEHAVIOURS,
    junk_per_page,
    param_float,
    param_int,
    param_str,
    rate_limit_times,
)
from daemon.simnet.ids import rev_for
from daemon.simnet.pds import huge_entries
from daemon.simnet.records import Record, make_record, record_json
from daemon.simnet.repos import MIB, account_public_key
from daemon.simnet.spec import Account, DaemonLimits, NetworkSpec
from daemon.simnet.sync import tiny_filler_blocks
from daemon.simnet.views import account_state, effective_behaviour, first_record, pair_listing

RecordTuple = tuple[str, str, str, str]
DEFAULT_LIMITS = DaemonLimits()
# Behaviours under which the pair's listRecords pages are served in full, so only the page cap can fail it.
_LISTED_IN_FULL = frozenset({"", "pds_bad_records", "pds_500_once", "pds_fail_after_page", "pds_moved"})


def pages_needed(count: int, per_page: int, cursor_on_last_page: bool) -> int:
    """listRecords requests that paging through ``count`` records ``per_page`` at a time takes."""
    if count == 0:
        return 1
    return math.ceil(count / per_page) + (1 if cursor_on_last_page else 0)


def _address_code(url: str, limits: DaemonLimits) -> str:
    # Only loopback/private targets are simulated, so a permitted one is a refused connection.
    if limits.allow_private_addresses:
        return "connect_error"
    parts = urlsplit(url)
    if parts.scheme != "https":
        return "insecure_url"
    host = parts.hostname or ""
    if host == "localhost":
        return "blocked_address"
    try:
        return "connect_error" if ipaddress.ip_address(host).is_global else "blocked_address"
    except ValueError:
        return "connect_error"


def pair_error(spec: NetworkSpec, account: Account, collection: str, limits: DaemonLimits) -> str | None:
    """The error code a correct daemon fails the pair with, or None when the pair ends ``done``."""
    override = account.params.get("expected_error")
    if isinstance(override, str):
        return override
    behaviour, params = effective_behaviour(spec, account)
    name = behaviour or ""  # "" is a well-behaved account on a well-behaved host
    if account.is_web and not limits.allow_private_addresses:
        return "insecure_url"  # did:web:localhost%3A<port> may only be fetched over http when allowed
    if name == "doc_pds_url":
        return _address_code(param_str(params, "url"), limits)
    if name in IDENTITY_BEHAVIOURS:
        return IDENTITY_BEHAVIOURS[name]
    if not limits.allow_private_addresses:
        return "insecure_url"  # every simulated PDS is http://127.0.0.1
    if name == "host_down":
        return "connect_error"
    if limits.mode == "list":
        return _list_error(spec, account, collection, limits, name)
    return _verified_error(spec, account, collection, limits, name)


def _list_error(
    spec: NetworkSpec, account: Account, collection: str, limits: DaemonLimits, name: str
) -> str | None:
    behaviour, params = effective_behaviour(spec, account)
    count = len(pair_listing(account, collection, behaviour, params))
    per_page = min(max(limits.page_size, 1), spec.page_size_cap)
    if name == "pds_bad_records":
        per_page -= junk_per_page(per_page)
    pages = pages_needed(count, per_page, spec.cursor_on_last_page)
    if name in _LISTED_IN_FULL or name in VERIFIED_BEHAVIOURS:
        if pages > limits.max_pages_per_collection:
            return "too_many_pages"
        if name == "pds_500_once" and pages + 1 > limits.max_attempts:
            return "http_status"
        failing = name == "pds_fail_after_page" and pages > param_int(params, "page")
        if failing and param_int(params, "failures") + 1 > limits.max_attempts:
            return "http_status"
        return None
    if name in RATE_LIMIT_BEHAVIOURS:
        times = rate_limit_times(name, params)
        if times is None or times > limits.max_rate_limit_waits:
            return "rate_limit_exhausted"
        return "too_many_pages" if pages > limits.max_pages_per_collection else None
    if name == "pds_huge" and param_float(params, "mib") * MIB <= limits.max_response_bytes:
        return _huge_error(params, per_page, account.did, collection)  # small enough to read: its shape
    return PDS_BEHAVIOURS[name]


def _huge_error(params: Mapping[str, object], per_page: int, did: str, collection: str) -> str | None:
    """The code of a pds_huge body under max_response_bytes, by its shape (behaviours.HUGE_SHAPES)."""
    shape = param_str(params, "shape")
    size = param_float(params, "mib") * MIB
    if shape == "minimal_records" and huge_entries(shape, size, did, collection) <= per_page:
        return None  # few enough for a page: every entry is skipped (invalid_uri)
    if shape == "huge_value":
        # the body and its typed decode are held while the value's generic decode reserves its worst case
        cost = size * (1 + TYPED_DECODE_FACTOR) + size * GENERIC_DECODE_FACTOR
        return "response_too_large" if cost > DEFAULT_BUDGET_BYTES else None  # else skipped (cid_mismatch)
    return HUGE_SHAPES[shape]


def _verified_error(
    spec: NetworkSpec, account: Account, collection: str, limits: DaemonLimits, name: str
) -> str | None:
    _, params = effective_behaviour(spec, account)
    if name == "" or name in LIST_ONLY_BEHAVIOURS:
        return None
    if name in RATE_LIMIT_BEHAVIOURS:
        times = rate_limit_times(name, params)
        return "rate_limit_exhausted" if times is None or times > limits.max_rate_limit_waits else None
    if name in ("block_bad_bytes", "block_omitted") and param_str(params, "block") == "record":
        target = first_record(spec, account)
        if target is None or target[0] != collection:
            return None
    if name == "car_huge" and param_float(params, "size_mib") * MIB <= limits.max_car_bytes:
        return _huge_car_error(params)  # under the cap
    if name in VERIFIED_BEHAVIOURS:
        return VERIFIED_BEHAVIOURS[name]
    return PDS_BEHAVIOURS[name]


def _huge_car_error(params: Mapping[str, object]) -> str | None:
    """The code of a car_huge CAR under max_car_bytes: a getRepo holds every dag-cbor block until the walk
    is done, so tiny filler blocks can be more than the memory budget holds; raw blocks (blobs), and the
    extra blocks of getBlocks or getRecord, are dropped."""
    block_bytes = param_int(params, "block_bytes")
    if param_str(params, "endpoint") != "getRepo" or not block_bytes:
        return None
    if param_str(params, "block_codec") != "dag-cbor":
        return None
    blocks = tiny_filler_blocks(block_bytes, int(param_float(params, "size_mib") * MIB))
    return "response_too_large" if blocks * (block_bytes + HELD_BLOCK_COST) > DEFAULT_BUDGET_BYTES else None


def discovery_error(spec: NetworkSpec, collection: str, limits: DaemonLimits = DEFAULT_LIMITS) -> str | None:
    """The error code a correct daemon fails the ``discover`` job of ``collection`` with (None: done).

    relay_huge's page is refused when its generic decode may cost more than the memory budget, else its
    entries are all skipped."""
    mode = spec.relay_behaviour.get(collection)
    if mode is None:
        return None
    if mode == "relay_huge":
        decoded = RELAY_HUGE_BYTES * (1 + GENERIC_DECODE_FACTOR) > DEFAULT_BUDGET_BYTES
        return "response_too_large" if decoded or limits.max_response_bytes < RELAY_HUGE_BYTES else None
    return RELAY_ERRORS[mode]


def _pairs(
    spec: NetworkSpec, dids: Sequence[str] | None, collections: Sequence[str] | None
) -> Iterator[tuple[Account, str]]:
    wanted = None if dids is None else set(dids)
    for account in spec.accounts:
        if wanted is None or account.did in wanted:
            for collection in spec.collections if collections is None else collections:
                yield account, collection


def pair_records(account: Account, collection: str) -> Iterator[Record]:
    """Every record the account's signed repo holds in the collection now, in key order (what a complete
    verified backfill of it yields)."""
    state = account_state(account, collection)
    for index in state.indices:
        yield make_record(account.did, collection, index, state.version(index))


def listed_records(spec: NetworkSpec, account: Account, collection: str) -> Iterator[Record]:
    """Every record listRecords shows of the pair, in key order (``list_unsigned`` adds some the repo lacks;
    with ``list_altered`` some of them are listed with a value that does not match their CID)."""
    behaviour, params = effective_behaviour(spec, account)
    listing = pair_listing(account, collection, behaviour, params)
    for position in range(len(listing)):
        _, index, version = listing.entry(position)
        yield make_record(account.did, collection, index, version)


def delivered_records(
    spec: NetworkSpec, account: Account, collection: str, limits: DaemonLimits = DEFAULT_LIMITS
) -> Iterator[Record]:
    """The records a correct daemon delivers for the pair if it ends done, in key order."""
    if limits.mode == "verified":
        yield from pair_records(account, collection)
        return
    behaviour, params = effective_behaviour(spec, account)
    if behaviour == "pds_404_first":
        return
    listing = pair_listing(account, collection, behaviour, params)
    for record in listed_records(spec, account, collection):
        if not listing.altered(record.index):
            yield record


def expected_records(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DEFAULT_LIMITS,
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> set[RecordTuple]:
    """``(did, collection, rkey, cid)`` of every record a correct daemon must have queued after backfilling
    the pairs of ``dids`` x ``collections`` (default: every account and collection of the spec): all records
    of every pair that ends ``done``, none of junk. Pairs that fail may leave the records of the pages that
    came before the failure; :func:`possible_records` is the upper bound."""
    found: set[RecordTuple] = set()
    for account, collection in _pairs(spec, dids, collections):
        if pair_error(spec, account, collection, limits) is None:
            found.update(r.as_tuple() for r in delivered_records(spec, account, collection, limits))
    return found


def expected_values(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DEFAULT_LIMITS,
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> dict[tuple[str, str, str], tuple[str, dict[str, object]]]:
    """``{(did, collection, rkey): (cid, value)}`` of :func:`expected_records`, with each record's value in
    the atproto JSON form as listRecords writes it (what the records job's ``record`` must equal)."""
    found: dict[tuple[str, str, str], tuple[str, dict[str, object]]] = {}
    for account, collection in _pairs(spec, dids, collections):
        if pair_error(spec, account, collection, limits) is None:
            for r in delivered_records(spec, account, collection, limits):
                found[(r.did, r.collection, r.rkey)] = (
                    r.cid,
                    record_json(r.did, r.collection, r.index, r.version),
                )
    return found


def possible_records(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DEFAULT_LIMITS,
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> set[RecordTuple]:
    """Every current record of the selected pairs (in list mode with those only listRecords shows): nothing
    outside this set may ever reach the records queue."""
    found: set[RecordTuple] = set()
    for account, collection in _pairs(spec, dids, collections):
        records = pair_records(account, collection)
        if limits.mode == "list":
            records = listed_records(spec, account, collection)
        found.update(r.as_tuple() for r in records)
    return found


def expected_failed(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DEFAULT_LIMITS,
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> dict[tuple[str, str], str]:
    """``{(did, collection): error_code}`` of every selected pair a correct daemon ends ``failed``."""
    failed: dict[tuple[str, str], str] = {}
    for account, collection in _pairs(spec, dids, collections):
        code = pair_error(spec, account, collection, limits)
        if code is not None:
            failed[(account.did, collection)] = code
    return failed


def relay_dids(spec: NetworkSpec, collection: str) -> list[str]:
    """The DIDs the relay lists for ``collection``, in its order (sorted): accounts whose signed repo holds
    records in it now."""
    return sorted(a.did for a in spec.accounts if len(account_state(a, collection)) > 0)


def account_rev(spec: NetworkSpec, did: str) -> str:
    """The rev (a TID) of the account's current commit: the ``rev`` of its verified records jobs."""
    return rev_for(did, spec.account(did).generation)


def signing_key(spec: NetworkSpec, did: str) -> PublicKey:
    """The account's current signing key (the ``#atproto`` key of its DID document)."""
    return account_public_key(spec, spec.account(did))
