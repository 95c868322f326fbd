"""What the simulated network is: accounts, hosts and the relay (:class:`NetworkSpec`), and its builders.

A spec is immutable and validated when built (:class:`~daemon.errors.ConfigError` lists every problem).
Mutations (:class:`~daemon.simnet.records.Mutation`) live on the accounts, so a spec always describes the
network's current state; :func:`with_mutation` returns the spec after one more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from daemon.errors import ConfigError
from daemon.simnet.behaviours import (
    ACCOUNT_BEHAVIOURS,
    HOST_BEHAVIOURS,
    RELAY_BEHAVIOURS,
    check_params,
    param_int,
)
from daemon.simnet.ids import digest, plc_did, web_placeholder_did
from daemon.simnet.records import Mutation, pair_state

DEFAULT_COLLECTIONS: Final = (
    "com.emdashcms.experimental.package.profile",
    "com.emdashcms.experimental.package.release",
    "com.emdashcms.experimental.publisher.profile",
    "com.emdashcms.experimental.publisher.verification",
)
# getRepo's own rate-limit bucket on the reference PDS (requests, window seconds).
REFERENCE_REPO_RATE_LIMIT: Final = (6000, 300)
_EMPTY: Final[Mapping[str, object]] = MappingProxyType({})


def _frozen(mapping: Mapping[str, object] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping)) if mapping else _EMPTY


@dataclass(frozen=True, slots=True)
class Account:
    """One simulated account: its DID, the PDS host index it lives on and its record counts per collection.

    ``behaviour`` names a hostile mode (None: well behaved) and ``params`` tunes it. ``mutations`` are the
    changes made to its records since (each one a new commit). A did:web account built by the builders
    carries a placeholder DID (``did:web:web<i>.simnet.invalid``) until the network is served;
    ``RunningNetwork.spec`` holds the real one.
    """

    did: str
    pds: int
    records: Mapping[str, int]
    behaviour: str | None = None
    params: Mapping[str, object] = field(default_factory=lambda: _EMPTY)
    mutations: tuple[Mutation, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", MappingProxyType(dict(self.records)))
        object.__setattr__(self, "params", _frozen(self.params))
        object.__setattr__(self, "mutations", tuple(self.mutations))

    @property
    def is_web(self) -> bool:
        """Whether this account is a did:web account."""
        return self.did.startswith("did:web:")

    @property
    def generation(self) -> int:
        """How many commits the account has made since its initial one (one per mutation)."""
        return len(self.mutations)


@dataclass(frozen=True, slots=True)
class HostOptions:
    """Per-PDS-host options: added latency (None: the network's), a mode applied to every account, whether
    ``com.atproto.sync.getBlocks`` exists (without it: 501 MethodNotImplemented), and rate limits.

    ``rate_limit`` is ``(requests, window seconds)`` per client IP in fixed windows for every XRPC method
    but getRepo, which counts in its own bucket ``repo_rate_limit`` (default, when ``rate_limit`` is set:
    the reference PDS's 6000 per 300 s). None: no limit (and no ``RateLimit-*`` headers).
    """

    latency: float | None = None
    behaviour: str | None = None
    params: Mapping[str, object] = field(default_factory=lambda: _EMPTY)
    get_blocks: bool = True
    rate_limit: tuple[int, int] | None = None
    repo_rate_limit: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))

    @property
    def repo_bucket(self) -> tuple[int, int] | None:
        """getRepo's rate limit, if any."""
        if self.repo_rate_limit is not None:
            return self.repo_rate_limit
        return REFERENCE_REPO_RATE_LIMIT if self.rate_limit is not None else None


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
    _positions: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accounts", tuple(self.accounts))
        object.__setattr__(self, "collections", tuple(self.collections))
        object.__setattr__(self, "host_options", MappingProxyType(dict(self.host_options)))
        object.__setattr__(self, "relay_behaviour", MappingProxyType(dict(self.relay_behaviour)))
        object.__setattr__(self, "_positions", {a.did: i for i, a in enumerate(self.accounts)})
        problems = _spec_problems(self)
        if problems:
            raise ConfigError(problems)

    def account(self, did: str) -> Account:
        """The account with this DID (``KeyError`` if none)."""
        return self.accounts[self._positions[did]]

    def position(self, did: str) -> int:
        """The index of the account ``did`` in ``accounts`` (``KeyError`` if none)."""
        return self._positions[did]

    def host(self, index: int) -> HostOptions:
        """The options of PDS host ``index`` (defaults when it has none)."""
        return self.host_options.get(index, HostOptions())

    def host_latency(self, index: int) -> float:
        """Seconds added before every response of PDS host ``index``."""
        latency = self.host(index).latency
        return self.latency if latency is None else latency

    def old_pds(self, account: Account) -> int:
        """The host a ``pds_moved`` account lived on before (its ``old_pds`` parameter, default the next)."""
        if "old_pds" in account.params:
            return param_int(account.params, "old_pds")
        return (account.pds + 1) % self.pds_hosts


@dataclass(frozen=True, slots=True)
class DaemonLimits:
    """The daemon settings the expectation functions depend on (defaults: SPEC section 4).

    ``mode`` is ``sync.mode``: ``"verified"`` (SPEC 6.2) or ``"list"`` (6.3). ``max_rate_limit_waits`` is
    the SPEC 6.1 cap on rate-limit waits per job. The expectations assume a job retried after a transient
    error resumes after its last saved page and that progress does not reset its attempt count.
    """

    page_size: int = 100
    max_attempts: int = 4
    max_pages_per_collection: int = 1000
    max_response_bytes: int = 8_388_608
    max_rate_limit_waits: int = 20
    allow_private_addresses: bool = True
    mode: str = "verified"
    max_car_bytes: int = 67_108_864

    def __post_init__(self) -> None:
        if self.mode not in ("verified", "list"):
            raise ConfigError([f"DaemonLimits.mode must be 'verified' or 'list', got {self.mode!r}"])


def _account_problems(spec: NetworkSpec, account: Account) -> list[str]:
    where = f"account {account.did}"
    problems: list[str] = []
    if not account.did.startswith(("did:plc:", "did:web:")):
        problems.append(f"{where}: only did:plc and did:web are simulated")
    if not 0 <= account.pds < spec.pds_hosts:
        problems.append(f"{where}: PDS host {account.pds} out of range")
    for collection, count in account.records.items():
        if count < 0 or collection not in spec.collections:
            problems.append(f"{where}: bad record count {count} for {collection}")
    if account.behaviour is not None and account.behaviour not in ACCOUNT_BEHAVIOURS:
        problems.append(f"{where}: unknown behaviour {account.behaviour!r}")
    problems += check_params(account.behaviour or "", account.params, where)
    if account.behaviour == "pds_moved" and not problems:
        old = spec.old_pds(account)
        if spec.pds_hosts < 2 or old == account.pds or not 0 <= old < spec.pds_hosts:
            problems.append(f"{where}: pds_moved needs another host to have moved from (got {old})")
    for mutation in account.mutations:
        if mutation.collection not in spec.collections or mutation.create < 0:
            problems.append(f"{where}: bad mutation {mutation}")
    if account.mutations and not problems:
        for collection in {m.collection for m in account.mutations}:
            try:
                pair_state(account.records.get(collection, 0), account.mutations, collection)
            except ValueError as error:
                problems.append(f"{where}: {error}")
    return problems


def _limit_problems(name: str, value: tuple[int, int] | None, where: str) -> list[str]:
    if value is None:
        return []
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        return [f"{where}: {name} must be (requests >= 1, window seconds >= 1), got {value!r}"]
    return []


def _spec_problems(spec: NetworkSpec) -> list[str]:
    problems: list[str] = []
    if spec.pds_hosts < 1:
        problems.append("pds_hosts must be at least 1")
    if spec.page_size_cap < 1:
        problems.append("page_size_cap must be at least 1")
    if spec.relay_page_cap < 1:
        problems.append("relay_page_cap must be at least 1")
    if len(spec._positions) != len(spec.accounts):
        seen: set[str] = set()
        for account in spec.accounts:
            if account.did in seen:
                problems.append(f"account {account.did}: duplicate DID")
            seen.add(account.did)
    for account in spec.accounts:
        problems += _account_problems(spec, account)
    for index, options in spec.host_options.items():
        where = f"host {index}"
        if not 0 <= index < spec.pds_hosts:
            problems.append(f"{where}: out of range")
        if options.behaviour is not None and options.behaviour not in HOST_BEHAVIOURS:
            problems.append(f"{where}: unknown behaviour {options.behaviour!r}")
        problems += check_params(options.behaviour or "", options.params, where)
        problems += _limit_problems("rate_limit", options.rate_limit, where)
        problems += _limit_problems("repo_rate_limit", options.repo_rate_limit, where)
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
    host_options: HostOptions | None = None,
) -> NetworkSpec:
    """A uniform network: ``n_accounts`` well-behaved did:plc accounts, then ``web_accounts`` did:web ones,
    then ``hostile[name]`` accounts per hostile behaviour (in name order, default parameters).

    Every account has ``records_per_collection`` records in every collection; account ``i`` lives on PDS
    host ``i % hosts``. ``host_options``, when given, applies to every host.
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
    options = {} if host_options is None else dict.fromkeys(range(hosts), host_options)
    return NetworkSpec(
        tuple(accounts),
        hosts,
        tuple(collections),
        latency=latency,
        plc_latency=plc_latency,
        relay_behaviour=relay_behaviour or {},
        cursor_on_last_page=cursor_on_last_page,
        host_options=options,
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
        counts = {c: int.from_bytes(digest(f"demo|{did}|{c}")[:2], "big") % 121 for c in collections}
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
    if account.did not in spec._positions:
        return replace(spec, accounts=(*spec.accounts, account))
    return replace(spec, accounts=tuple(account if a.did == account.did else a for a in spec.accounts))


def with_mutation(spec: NetworkSpec, did: str, mutation: Mutation) -> NetworkSpec:
    """``spec`` after ``mutation`` of the account ``did`` (a new commit); ConfigError if it is invalid."""
    account = spec.account(did)
    return with_account(spec, replace(account, mutations=(*account.mutations, mutation)))


def resolve_web_dids(spec: NetworkSpec, dids: Mapping[str, str]) -> NetworkSpec:
    """``spec`` with placeholder did:web DIDs replaced through ``dids`` (placeholder -> served DID)."""
    accounts = tuple(replace(a, did=dids[a.did]) if a.did in dids else a for a in spec.accounts)
    return replace(spec, accounts=accounts)
