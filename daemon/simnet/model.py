"""The pure model of the simulated AT Protocol network: who exists, what they publish, how they misbehave.

Everything here is deterministic and free of I/O: identifiers and records are derived from indices with
SHA-256, so the same spec always yields the same DIDs, record keys, CIDs and record bodies, and the
expectation functions (:func:`expected_records`, :func:`expected_failed`) can say what a correct daemon ends
up with without running anything.

Hostile behaviours are named strings (see :data:`ACCOUNT_BEHAVIOURS`, :data:`HOST_BEHAVIOURS` and
:data:`RELAY_BEHAVIOURS`) with optional parameters in a mapping; :data:`BEHAVIOUR_PARAMS` lists the
parameters each one reads. Any account may carry ``params["expected_error"]`` to override the error code the
expectation functions predict for it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from daemon.errors import ConfigError

TID_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"
# Record n of a pair is stamped TID_EPOCH_US + n * TID_STEP_US (2023-11-14, one second apart).
TID_EPOCH_US: Final = 1_700_000_000_000_000
TID_STEP_US: Final = 1_000_000
CID_PREFIX: Final = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32-byte digest
WEB_PLACEHOLDER_SUFFIX: Final = ".simnet.invalid"
HANDLE_SUFFIX: Final = ".simnet.test"
DEFAULT_COLLECTIONS: Final = (
    "com.emdashcms.experimental.package.profile",
    "com.emdashcms.experimental.package.release",
    "com.emdashcms.experimental.publisher.profile",
    "com.emdashcms.experimental.publisher.verification",
)
# Collection and DID that junk records name when they must point somewhere else.
FOREIGN_COLLECTION: Final = "com.example.simnet.foreign"
FOREIGN_DID: Final = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
# Kinds of records pds_bad_records mixes into each page; a correct daemon skips every one of them.
JUNK_KINDS: Final = (
    "other_collection",
    "other_did",
    "empty_rkey",
    "malformed_uri",
    "bad_cid",
    "invalid_rkey",
    "handle_authority",
)

# Account behaviours and the error code a correct daemon fails the pair with (None: the pair ends done),
# under the default limits. pair_error() refines the ones that depend on the limits or on parameters:
# doc_pds_url (connect_error while private addresses are allowed), pds_500_once and pds_fail_after_page
# (http_status when the attempts run out), the 429 modes (done when they recover within the allowed
# waits: pds_429_once, or params["times"]) and pds_huge (bad_response when under max_response_bytes).
IDENTITY_BEHAVIOURS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "plc_404": "did_not_found",
        "plc_410": "did_tombstoned",
        "plc_hang": "timeout",
        "doc_no_pds": "no_pds_service",
        "doc_wrong_id": "invalid_did_document",
        "doc_bad_json": "invalid_did_document",
        "doc_pds_url": "blocked_address",
    }
)
PDS_BEHAVIOURS: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "pds_404_first": None,
        "pds_404_mid": "not_found_mid_pagination",
        "pds_500": "http_status",
        "pds_500_once": None,
        "pds_fail_after_page": None,
        "pds_hang": "timeout",
        "pds_trickle": "timeout",
        "pds_disconnect": "connect_error",
        "pds_huge": "response_too_large",
        "pds_429_reset": "rate_limit_exhausted",
        "pds_429_retry_after_secs": "rate_limit_exhausted",
        "pds_429_retry_after_date": "rate_limit_exhausted",
        "pds_429_html": "rate_limit_exhausted",
        "pds_429_bare": "rate_limit_exhausted",
        "pds_429_once": None,
        "pds_too_many_records": "page_too_large",
        "pds_repeat_cursor": "repeated_cursor",
        "pds_body_not_object": "bad_response",
        "pds_invalid_json": "bad_response",
        "pds_missing_records": "bad_response",
        "pds_record_not_object": "bad_response",
        "pds_cursor_not_string": "bad_response",
        "pds_bad_records": None,
        "pds_takendown": "repo_takendown",
        "pds_deactivated": "repo_deactivated",
        "pds_suspended": "repo_suspended",
        "pds_repo_not_found": "repo_not_found",
        "pds_could_not_find": "repo_not_found",
        "pds_redirect": "redirect",
        "pds_endless": "too_many_pages",
    }
)
ACCOUNT_BEHAVIOURS: Final[frozenset[str]] = frozenset(IDENTITY_BEHAVIOURS) | frozenset(PDS_BEHAVIOURS)
# A whole PDS host can take any PDS behaviour, or be down (its port refuses connections).
HOST_BEHAVIOURS: Final[frozenset[str]] = frozenset(PDS_BEHAVIOURS) | {"host_down"}
RELAY_BEHAVIOURS: Final[frozenset[str]] = frozenset(
    {
        "relay_hang",
        "relay_500",
        "relay_bad_body",
        "relay_missing_repos",
        "relay_repeat_cursor",
        "relay_junk_entries",
    }
)
RATE_LIMIT_BEHAVIOURS: Final[frozenset[str]] = frozenset(name for name in PDS_BEHAVIOURS if "_429_" in name)
BEHAVIOUR_PARAMS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "doc_bad_json": ("variant",),  # "not_json" (default) or "not_object"
        "doc_pds_url": ("url",),  # default "http://127.0.0.1:1" (refused if ever connected to)
        "pds_fail_after_page": ("page", "failures"),  # defaults 1 and 2
        "pds_huge": ("mib", "declare_length"),  # defaults 64 and False (chunked, no Content-Length)
        "pds_trickle": ("interval", "bytes"),  # defaults 1.0 s and 3600 bytes
        "pds_redirect": ("location",),  # default: this host's /redirect-target
        **{name: ("times", "reset_in") for name in RATE_LIMIT_BEHAVIOURS},
    }
)
_PARAM_DEFAULTS: Final[Mapping[str, object]] = MappingProxyType(
    {
        "variant": "not_json",
        "url": "http://127.0.0.1:1",
        "page": 1,
        "failures": 2,
        "mib": 64,
        "declare_length": False,
        "interval": 1.0,
        "bytes": 3600,
        "reset_in": 1,
    }
)
_EMPTY: Final[Mapping[str, object]] = MappingProxyType({})

_RFC4648: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_FROM_SORTABLE: Final = bytes.maketrans(TID_ALPHABET.encode(), _RFC4648.encode())
# Two base32 digits per 10-bit value: encoding by table lookups is several times faster than b32encode.
_TID_PAIRS: Final = tuple(TID_ALPHABET[i >> 5] + TID_ALPHABET[i & 31] for i in range(1024))
_CID_PAIRS: Final = tuple((_RFC4648[i >> 5] + _RFC4648[i & 31]).lower() for i in range(1024))
_BASE58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _frozen(mapping: Mapping[str, object] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping)) if mapping else _EMPTY


@dataclass(frozen=True, slots=True)
class Account:
    """One simulated account: its DID, the PDS host index it lives on and its record counts per collection.

    ``behaviour`` names a hostile mode (None: well behaved) and ``params`` tunes it. A did:web account built
    by the builders carries a placeholder DID (``did:web:web<i>.simnet.invalid``) until the network is
    served; ``RunningNetwork.spec`` holds the real one.
    """

    did: str
    pds: int
    records: Mapping[str, int]
    behaviour: str | None = None
    params: Mapping[str, object] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", MappingProxyType(dict(self.records)))
        object.__setattr__(self, "params", _frozen(self.params))

    @property
    def is_web(self) -> bool:
        """Whether this account is a did:web account."""
        return self.did.startswith("did:web:")


@dataclass(frozen=True, slots=True)
class HostOptions:
    """Per-PDS-host overrides: added latency (None: the network's) and a mode applied to every account."""

    latency: float | None = None
    behaviour: str | None = None
    params: Mapping[str, object] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """The whole simulated network.

    ``latency`` is added before every PDS response (``host_options`` may override it per host), and
    ``plc_latency`` before every PLC / did:web response. ``page_size_cap`` clamps listRecords ``limit`` like
    a real PDS (1..100). With ``cursor_on_last_page`` a PDS behaves like the reference implementation and
    returns a cursor after every non-empty page, so every pair ends with one extra, empty page.
    ``relay_behaviour`` maps a collection to a relay hostile mode; ``relay_page_cap`` clamps the relay's
    ``limit`` (default 500 when absent).
    """

    accounts: tuple[Account, ...]
    pds_hosts: int
    collections: tuple[str, ...] = DEFAULT_COLLECTIONS
    latency: float = 0.0
    plc_latency: float = 0.0
    page_size_cap: int = 100
    cursor_on_last_page: bool = False
    host_options: Mapping[int, HostOptions] = field(default_factory=lambda: MappingProxyType({}))
    relay_behaviour: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    relay_page_cap: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "accounts", tuple(self.accounts))
        object.__setattr__(self, "collections", tuple(self.collections))
        object.__setattr__(self, "host_options", MappingProxyType(dict(self.host_options)))
        object.__setattr__(self, "relay_behaviour", MappingProxyType(dict(self.relay_behaviour)))
        problems = _spec_problems(self)
        if problems:
            raise ConfigError(problems)

    def account(self, did: str) -> Account:
        """The account with this DID (``KeyError`` if none)."""
        for account in self.accounts:
            if account.did == did:
                return account
        raise KeyError(did)

    def host(self, index: int) -> HostOptions:
        """The options of PDS host ``index`` (defaults when it has none)."""
        return self.host_options.get(index, HostOptions())

    def host_latency(self, index: int) -> float:
        """Seconds added before every response of PDS host ``index``."""
        latency = self.host(index).latency
        return self.latency if latency is None else latency


@dataclass(frozen=True, slots=True)
class DaemonLimits:
    """The daemon settings the expectation functions depend on (defaults: SPEC section 4).

    ``max_rate_limit_waits`` is the SPEC 6.1 cap on rate-limit waits per job. The expectations assume a job
    retried after a transient error resumes after its last saved page and that progress does not reset its
    attempt count.
    """

    page_size: int = 100
    max_attempts: int = 4
    max_pages_per_collection: int = 1000
    max_response_bytes: int = 8_388_608
    max_rate_limit_waits: int = 20
    allow_private_addresses: bool = True


@dataclass(frozen=True, slots=True)
class Record:
    """One generated record as a PDS lists it."""

    did: str
    collection: str
    index: int
    rkey: str
    cid: str

    @property
    def uri(self) -> str:
        """The canonical AT-URI of the record."""
        return f"at://{self.did}/{self.collection}/{self.rkey}"


# Identifiers ----------------------------------------------------------------------------------------------


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def plc_did(index: int) -> str:
    """The did:plc of account ``index``: 24 base32 characters derived from the index."""
    return "did:plc:" + base64.b32encode(_digest(f"simnet-plc:{index}")).decode().lower()[:24]


def web_placeholder_did(index: int) -> str:
    """The placeholder DID of did:web account ``index`` before its listener's port is known."""
    return f"did:web:web{index}{WEB_PLACEHOLDER_SUFFIX}"


def web_did_for_port(port: int) -> str:
    """The did:web that a listener on 127.0.0.1:``port`` serves (``localhost`` with an encoded port)."""
    return f"did:web:localhost%3A{port}"


def handle_for(did: str) -> str:
    """A deterministic handle for ``did`` (used in ``alsoKnownAs``)."""
    return "h" + hashlib.sha256(did.encode()).hexdigest()[:12] + HANDLE_SUFFIX


def tid_from_int(value: int) -> str:
    """Encode a 63-bit integer as a 13-character TID in the base32-sortable alphabet."""
    pairs = _TID_PAIRS
    return (
        TID_ALPHABET[(value >> 60) & 31]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


def tid_to_int(tid: str) -> int | None:
    """Decode a 13-character TID (None if ``tid`` is not 13 sortable-base32 chars starting in 2-j)."""
    if len(tid) != 13 or not tid.isascii() or tid.strip(TID_ALPHABET) or tid[0] not in TID_ALPHABET[:16]:
        return None
    # Three all-zero base32 digits in front make the 65 TID bits a whole number of bytes.
    raw = base64.b32decode(b"AAA" + tid.encode().translate(_FROM_SORTABLE))
    return int.from_bytes(raw, "big")


@dataclass(frozen=True, slots=True)
class PairKeys:
    """Derives the record keys and CIDs of one (DID, collection) pair cheaply, record by record.

    Record ``n`` has the TID ``(TID_EPOCH_US + n * TID_STEP_US) << 10 | clock`` and the CID whose digest is
    SHA-256 of ``"<did>|<collection>"`` with ``n`` XORed into its last 48 bits: the constant first 30 bytes
    of the CID are base32-encoded once, so only ten characters are computed per record.
    """

    did: str
    collection: str
    clock: int
    cid_head: str
    cid_salt: int

    def rkey(self, index: int) -> str:
        """The record key of record ``index``."""
        return tid_from_int(((TID_EPOCH_US + index * TID_STEP_US) << 10) | self.clock)

    def cid(self, index: int) -> str:
        """The CID string of record ``index``."""
        # The last six CID bytes are one 5-byte base32 group plus one byte padded with two zero bits.
        tail = ((self.cid_salt ^ index) & 0xFFFFFFFFFFFF) << 2
        pairs = _CID_PAIRS
        return (
            self.cid_head
            + pairs[(tail >> 40) & 1023]
            + pairs[(tail >> 30) & 1023]
            + pairs[(tail >> 20) & 1023]
            + pairs[(tail >> 10) & 1023]
            + pairs[tail & 1023]
        )


@functools.lru_cache(maxsize=65536)
def pair_keys(did: str, collection: str) -> PairKeys:
    """The :class:`PairKeys` of a pair (cached)."""
    digest = _digest(f"{did}|{collection}")
    head = "b" + base64.b32encode(CID_PREFIX + digest[:26]).decode().lower()
    clock = int.from_bytes(digest[:2], "big") & 0x3FF
    return PairKeys(did, collection, clock, head, int.from_bytes(digest[26:], "big"))


def record_rkey(did: str, collection: str, index: int) -> str:
    """The record key (a TID) of record ``index`` of the pair."""
    return pair_keys(did, collection).rkey(index)


def record_cid(did: str, collection: str, index: int) -> str:
    """The CIDv1 (dag-cbor, sha2-256, base32 ``bafyrei...``) of record ``index`` of the pair."""
    return pair_keys(did, collection).cid(index)


@functools.lru_cache(maxsize=1 << 17)
def record_created_at(index: int) -> str:
    """The ``createdAt`` of record ``index``: the timestamp its TID encodes, as RFC 3339 UTC."""
    micros = TID_EPOCH_US + index * TID_STEP_US
    seconds, rest = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:03d}Z"


def record_value(did: str, collection: str, index: int) -> dict[str, object]:
    """The record body of record ``index`` of the pair."""
    return {
        "$type": collection,
        "createdAt": record_created_at(index),
        "name": f"simnet record {index}",
        "description": f"Deterministic record {index} of {collection} published by {did}.",
    }


def make_record(did: str, collection: str, index: int) -> Record:
    """Record ``index`` of the pair."""
    keys = pair_keys(did, collection)
    return Record(did, collection, index, keys.rkey(index), keys.cid(index))


def records_before(cursor_tid: int, count: int, clock: int) -> int:
    """How many of a pair's ``count`` records have a TID below ``cursor_tid`` (listRecords paging)."""
    delta = (cursor_tid >> 10) - TID_EPOCH_US
    if delta < 0:
        return 0
    steps, rest = divmod(delta, TID_STEP_US)
    # Record ``steps`` has exactly the cursor's timestamp when ``rest`` is 0; then the clock decides.
    below = steps + 1 if rest or clock < (cursor_tid & 0x3FF) else steps
    return min(below, count)


def multibase_key(did: str) -> str:
    """A deterministic ``publicKeyMultibase`` shaped like a compressed secp256k1 Multikey (``zQ3s...``)."""
    raw = b"\xe7\x01\x02" + _digest(f"simnet-key:{did}")
    number = int.from_bytes(raw, "big")
    digits: list[str] = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_BASE58[digit])
    return "z" + "".join(reversed(digits))


# Parameters -----------------------------------------------------------------------------------------------


def param_int(params: Mapping[str, object], key: str) -> int:
    """An integer parameter of a behaviour, or its documented default."""
    value = params.get(key, _PARAM_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError([f"simnet parameter {key!r} must be an integer, got {value!r}"])
    return value


def param_float(params: Mapping[str, object], key: str) -> float:
    """A number parameter of a behaviour, or its documented default."""
    value = params.get(key, _PARAM_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError([f"simnet parameter {key!r} must be a number, got {value!r}"])
    return float(value)


def param_str(params: Mapping[str, object], key: str, default: str | None = None) -> str:
    """A string parameter of a behaviour, or its documented default."""
    value = params.get(key, _PARAM_DEFAULTS.get(key, default))
    if not isinstance(value, str):
        raise ConfigError([f"simnet parameter {key!r} must be a string, got {value!r}"])
    return value


def param_bool(params: Mapping[str, object], key: str) -> bool:
    """A boolean parameter of a behaviour, or its documented default."""
    value = params.get(key, _PARAM_DEFAULTS.get(key))
    if not isinstance(value, bool):
        raise ConfigError([f"simnet parameter {key!r} must be a boolean, got {value!r}"])
    return value


def rate_limit_times(behaviour: str, params: Mapping[str, object]) -> int | None:
    """How many 429s a rate-limit behaviour answers per pair before it recovers (None: never recovers)."""
    if "times" in params:
        value = params["times"]
        if value is None:
            return None
        return param_int(params, "times")
    return 1 if behaviour == "pds_429_once" else None


def junk_per_page(limit: int) -> int:
    """How many junk records pds_bad_records puts in a page of ``limit`` entries (at most half of it)."""
    return min(len(JUNK_KINDS), limit // 2)


def _check_params(name: str, params: Mapping[str, object], where: str) -> list[str]:
    allowed = (*BEHAVIOUR_PARAMS.get(name, ()), "expected_error")
    problems = [f"{where}: unknown parameter {key!r} for {name}" for key in params if key not in allowed]
    for key in params:
        try:
            if key in ("page", "failures", "bytes", "reset_in"):
                param_int(params, key)
            elif key in ("mib", "interval"):
                param_float(params, key)
            elif key == "declare_length":
                param_bool(params, key)
            elif key == "times":
                rate_limit_times(name, params)
            elif key == "variant" and param_str(params, key) not in ("not_json", "not_object"):
                problems.append(f"{where}: variant must be 'not_json' or 'not_object'")
            elif key in ("url", "location", "expected_error"):
                param_str(params, key, "")
        except ConfigError as error:
            problems.append(f"{where}: {error.message}")
    return problems


def _spec_problems(spec: NetworkSpec) -> list[str]:
    problems: list[str] = []
    if spec.pds_hosts < 1:
        problems.append("pds_hosts must be at least 1")
    if spec.page_size_cap < 1:
        problems.append("page_size_cap must be at least 1")
    if spec.relay_page_cap < 1:
        problems.append("relay_page_cap must be at least 1")
    seen: set[str] = set()
    for account in spec.accounts:
        where = f"account {account.did}"
        if account.did in seen:
            problems.append(f"{where}: duplicate DID")
        seen.add(account.did)
        if not account.did.startswith(("did:plc:", "did:web:")):
            problems.append(f"{where}: only did:plc and did:web are simulated")
        if not 0 <= account.pds < spec.pds_hosts:
            problems.append(f"{where}: PDS host {account.pds} out of range")
        for collection, count in account.records.items():
            if count < 0 or collection not in spec.collections:
                problems.append(f"{where}: bad record count {count} for {collection}")
        if account.behaviour is not None and account.behaviour not in ACCOUNT_BEHAVIOURS:
            problems.append(f"{where}: unknown behaviour {account.behaviour!r}")
        problems += _check_params(account.behaviour or "", account.params, where)
    for index, options in spec.host_options.items():
        where = f"host {index}"
        if not 0 <= index < spec.pds_hosts:
            problems.append(f"{where}: out of range")
        if options.behaviour is not None and options.behaviour not in HOST_BEHAVIOURS:
            problems.append(f"{where}: unknown behaviour {options.behaviour!r}")
        problems += _check_params(options.behaviour or "", options.params, where)
    for collection, mode in spec.relay_behaviour.items():
        if mode not in RELAY_BEHAVIOURS:
            problems.append(f"relay collection {collection}: unknown behaviour {mode!r}")
    return problems


# Builders -------------------------------------------------------------------------------------------------


def build_spec(
    n_accounts: int,
    records_per_collection: int,
    collections: Sequence[str] = DEFAULT_COLLECTIONS,
    hosts: int = 1,
    hostile: Mapping[str, int] | None = None,
    *,
    web_accounts: int = 0,
    latency: float = 0.0,
    plc_latency: float = 0.0,
    relay_behaviour: Mapping[str, str] | None = None,
    cursor_on_last_page: bool = False,
) -> NetworkSpec:
    """A uniform network: ``n_accounts`` well-behaved did:plc accounts, then ``web_accounts`` did:web ones,
    then ``hostile[name]`` accounts per hostile behaviour (in name order, default parameters).

    Every account has ``records_per_collection`` records in every collection; account ``i`` lives on PDS
    host ``i % hosts``.
    """
    accounts: list[Account] = []
    counts = {collection: records_per_collection for collection in collections}
    plan: list[tuple[bool, str | None]] = [(False, None) for _ in range(n_accounts)]
    plan += [(True, None) for _ in range(web_accounts)]
    for name, count in sorted((hostile or {}).items()):
        plan += [(False, name)] * count
    for index, (web, behaviour) in enumerate(plan):
        did = web_placeholder_did(index) if web else plc_did(index)
        accounts.append(Account(did, index % max(hosts, 1), counts, behaviour))
    return NetworkSpec(
        tuple(accounts),
        hosts,
        tuple(collections),
        latency=latency,
        plc_latency=plc_latency,
        relay_behaviour=relay_behaviour or {},
        cursor_on_last_page=cursor_on_last_page,
    )


def demo_spec(collections: Sequence[str] = DEFAULT_COLLECTIONS) -> NetworkSpec:
    """A small, varied network for ``backfilld demo``: 3 hosts, 24 healthy accounts with 0-120 records per
    collection (a few thousand in all, some pairs several pages long, some empty), and one account each of
    plc_404, doc_no_pds, pds_takendown, pds_404_first, pds_500_once, pds_429_once and pds_bad_records
    (the transient ones small enough to recover within the default 4 attempts).
    """
    accounts: list[Account] = []
    for index in range(24):
        did = plc_did(index)
        counts = {c: int.from_bytes(_digest(f"demo|{did}|{c}")[:2], "big") % 121 for c in collections}
        accounts.append(Account(did, index % 3, counts))
    hostile = (
        "plc_404",
        "doc_no_pds",
        "pds_takendown",
        "pds_404_first",
        "pds_500_once",
        "pds_429_once",
        "pds_bad_records",
    )
    for offset, behaviour in enumerate(hostile):
        index = 24 + offset
        counts = {c: 10 + (index * 7 + position * 13) % 60 for position, c in enumerate(collections)}
        accounts.append(Account(plc_did(index), index % 3, counts, behaviour))
    return NetworkSpec(tuple(accounts), 3, tuple(collections))


def with_account(spec: NetworkSpec, account: Account) -> NetworkSpec:
    """``spec`` with ``account`` added, or replacing the account with the same DID."""
    others = tuple(a for a in spec.accounts if a.did != account.did)
    if len(others) == len(spec.accounts):
        return replace(spec, accounts=(*spec.accounts, account))
    return replace(spec, accounts=tuple(account if a.did == account.did else a for a in spec.accounts))


def resolve_web_dids(spec: NetworkSpec, dids: Mapping[str, str]) -> NetworkSpec:
    """``spec`` with placeholder did:web DIDs replaced through ``dids`` (placeholder -> served DID)."""
    accounts = tuple(replace(a, did=dids[a.did]) if a.did in dids else a for a in spec.accounts)
    return replace(spec, accounts=accounts)


# Expectations ---------------------------------------------------------------------------------------------


def effective_behaviour(spec: NetworkSpec, account: Account) -> tuple[str | None, Mapping[str, object]]:
    """The behaviour that decides the account's PDS answers: an identity mode of the account first, then
    its host's mode, then its own."""
    if account.behaviour in IDENTITY_BEHAVIOURS:
        return account.behaviour, account.params
    host = spec.host(account.pds)
    if host.behaviour is not None:
        return host.behaviour, host.params
    return account.behaviour, account.params


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
    count = account.records.get(collection, 0)
    per_page = min(max(limits.page_size, 1), spec.page_size_cap)
    if name == "pds_bad_records":
        per_page -= junk_per_page(per_page)
    pages = pages_needed(count, per_page, spec.cursor_on_last_page)
    if name in ("", "pds_bad_records", "pds_500_once", "pds_fail_after_page"):
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
    if name == "pds_huge" and param_float(params, "mib") * 1_048_576 <= limits.max_response_bytes:
        return "bad_response"  # small enough to read, but never valid JSON
    return PDS_BEHAVIOURS[name]


def _pairs(
    spec: NetworkSpec, dids: Sequence[str] | None, collections: Sequence[str] | None
) -> Iterator[tuple[Account, str]]:
    wanted = None if dids is None else set(dids)
    for account in spec.accounts:
        if wanted is None or account.did in wanted:
            for collection in spec.collections if collections is None else collections:
                yield account, collection


def pair_records(account: Account, collection: str) -> Iterator[Record]:
    """Every real record of the pair, in index order (what a complete backfill of it yields)."""
    for index in range(account.records.get(collection, 0)):
        yield make_record(account.did, collection, index)


def _as_tuple(record: Record) -> tuple[str, str, str, str]:
    return (record.did, record.collection, record.rkey, record.cid)


def expected_records(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DaemonLimits(),
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
) -> set[tuple[str, str, str, str]]:
    """``(did, collection, rkey, cid)`` of every record a correct daemon must have queued after backfilling
    the pairs of ``dids`` x ``collections`` (default: every account and collection of the spec): all records
    of every pair that ends ``done``, none of junk. Pairs that fail may leave the records of the pages that
    came before the failure; :func:`possible_records` is the upper bound."""
    found: set[tuple[str, str, str, str]] = set()
    for account, collection in _pairs(spec, dids, collections):
        behaviour, _ = effective_behaviour(spec, account)
        if behaviour == "pds_404_first" or pair_error(spec, account, collection, limits) is not None:
            continue
        found.update(_as_tuple(record) for record in pair_records(account, collection))
    return found


def possible_records(
    spec: NetworkSpec, *, dids: Sequence[str] | None = None, collections: Sequence[str] | None = None
) -> set[tuple[str, str, str, str]]:
    """Every real record of the selected pairs: nothing outside this set may ever reach the records queue."""
    return {_as_tuple(r) for account, c in _pairs(spec, dids, collections) for r in pair_records(account, c)}


def expected_failed(
    spec: NetworkSpec,
    *,
    limits: DaemonLimits = DaemonLimits(),
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
    """The DIDs the relay lists for ``collection``, in its order (sorted): accounts with records in it."""
    return sorted(a.did for a in spec.accounts if a.records.get(collection, 0) > 0)
