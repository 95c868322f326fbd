"""The named hostile behaviours of the simulated network, their parameters and their expected error codes.

Account behaviours come in three tables: :data:`IDENTITY_BEHAVIOURS` (the PLC directory or did:web host
misbehaves), :data:`PDS_BEHAVIOURS` (the PDS misbehaves; the codes are list mode's under the default limits)
and :data:`VERIFIED_BEHAVIOURS` (the signed repo is broken, or listRecords and the repo disagree; the codes
are verified mode's). A whole PDS host may take most of them (:data:`HOST_BEHAVIOURS`). Which PDS modes
concern listRecords only, and which break every endpoint of the host, is :data:`LIST_ONLY_BEHAVIOURS`.
:data:`BEHAVIOUR_PARAMS` lists the parameters each behaviour reads; any behaviour also takes
``expected_error`` (a code that overrides the prediction of the expectation functions).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from daemon.errors import ConfigError

# Account behaviours and the error code a correct daemon fails the pair with (None: the pair ends done),
# under the default limits. pair_error() refines the ones that depend on the limits or on parameters:
# doc_pds_url (connect_error while private addresses are allowed), pds_500_once and pds_fail_after_page
# (http_status when the attempts run out), the 429 modes (done when they recover within the allowed
# waits: pds_429_once, or params["times"]), pds_huge (under max_response_bytes: by its ``shape``, see
# HUGE_SHAPES) and car_huge (by its ``endpoint`` and ``block_bytes``: a getRepo of tiny blocks is more than
# the memory budget can hold).
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
        # The reference PDS's account states: listRecords says "Could not find repo" for all three (so list
        # mode asks getRepoStatus), the sync endpoints name the state.
        "pds_gone_deactivated": "repo_deactivated",
        "pds_gone_takendown": "repo_takendown",
        "pds_gone_deleted": "repo_not_found",
        # The PLC directory names the old host on the first request, the account's host afterwards.
        "pds_moved": None,
    }
)
VERIFIED_BEHAVIOURS: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "commit_other_key": "invalid_signature",
        "commit_high_s": "invalid_signature",
        "key_rotated": None,
        "commit_other_did": "invalid_commit",
        "commit_v2": "invalid_commit",
        "block_bad_bytes": "cid_mismatch",
        "block_omitted": "block_missing",
        "mst_unordered": "invalid_mst",
        "mst_wrong_layer": "invalid_mst",
        "car_huge": "car_too_large",
        "list_unsigned": None,
        "list_altered": None,
    }
)
# PDS modes that only listRecords shows: the sync endpoints of such an account answer normally, so a
# verified-mode job ends done with every record. Every other PDS mode breaks every endpoint of the account.
LIST_ONLY_BEHAVIOURS: Final[frozenset[str]] = frozenset(
    {
        "pds_404_first",
        "pds_404_mid",
        "pds_500_once",
        "pds_fail_after_page",
        "pds_huge",
        "pds_too_many_records",
        "pds_repeat_cursor",
        "pds_body_not_object",
        "pds_invalid_json",
        "pds_missing_records",
        "pds_record_not_object",
        "pds_cursor_not_string",
        "pds_bad_records",
        "pds_endless",
    }
)
# Account behaviours that involve the PLC directory's history of the account (not a host's doing).
HISTORY_BEHAVIOURS: Final[frozenset[str]] = frozenset({"pds_moved", "key_rotated"})
ACCOUNT_BEHAVIOURS: Final[frozenset[str]] = (
    frozenset(IDENTITY_BEHAVIOURS) | frozenset(PDS_BEHAVIOURS) | frozenset(VERIFIED_BEHAVIOURS)
)
# A whole PDS host can take any PDS or repo behaviour but the history ones, or be down (refuse connections).
HOST_BEHAVIOURS: Final[frozenset[str]] = (
    (frozenset(PDS_BEHAVIOURS) | frozenset(VERIFIED_BEHAVIOURS)) - HISTORY_BEHAVIOURS
) | {"host_down"}
RELAY_BEHAVIOURS: Final[frozenset[str]] = frozenset(
    {
        "relay_hang",
        "relay_500",
        "relay_bad_body",
        "relay_missing_repos",
        "relay_repeat_cursor",
        "relay_junk_entries",
        "relay_huge",
    }
)
# What each relay mode does to a discover job under the default limits (None: discovery succeeds); see
# expectations.discovery_error. relay_huge: one page just under max_response_bytes of ``{"did":{}}`` junk
# entries, more than a generic JSON decode of it may cost in memory.
RELAY_ERRORS: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "relay_hang": "timeout",
        "relay_500": "http_status",
        "relay_bad_body": "bad_response",
        "relay_missing_repos": "bad_response",
        "relay_repeat_cursor": "repeated_cursor",
        "relay_junk_entries": None,
        "relay_huge": "response_too_large",
    }
)
# relay_huge's one entry and the page's size (just under the default max_response_bytes).
RELAY_HUGE_ENTRY: Final = b'{"did":{}}'
RELAY_HUGE_BYTES: Final = 8_388_608 - 1024
RATE_LIMIT_BEHAVIOURS: Final[frozenset[str]] = frozenset(name for name in PDS_BEHAVIOURS if "_429_" in name)
# Account-unavailable modes that name the state in listRecords itself: XRPC error name and message.
UNAVAILABLE: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "pds_takendown": ("RepoTakendown", "Repo has been takendown: {}"),
        "pds_deactivated": ("RepoDeactivated", "Repo has been deactivated: {}"),
        "pds_suspended": ("RepoSuspended", "Repo has been suspended: {}"),
        "pds_repo_not_found": ("RepoNotFound", "Could not find repo for DID: {}"),
        "pds_could_not_find": ("InvalidRequest", "Could not find repo: {}"),
    }
)
# The account state (getRepoStatus ``status``; None: the account does not exist there) of every mode that
# makes an account unavailable.
ACCOUNT_STATES: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "pds_takendown": "takendown",
        "pds_deactivated": "deactivated",
        "pds_suspended": "suspended",
        "pds_repo_not_found": None,
        "pds_could_not_find": None,
        "pds_gone_deactivated": "deactivated",
        "pds_gone_takendown": "takendown",
        "pds_gone_deleted": None,
    }
)
BLOCK_CHOICES: Final = ("root", "commit", "record")
# pds_huge's body shapes and the code a correct daemon fails the pair with when the body is under
# max_response_bytes (see expectations._huge_error for the limits): "junk" (default) never closes its array;
# "empty_records" is ``{"records":[{},{},...]}``; "minimal_records" ``{"uri":"a","cid":"b"}`` entries, far
# more than a page may hold; "huge_value" one well-formed record whose value is ``[{},{},...]``, more than
# its decode may cost in memory (a small one is decoded, and skipped as cid_mismatch).
HUGE_SHAPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "junk": "bad_response",
        "empty_records": "bad_response",
        "minimal_records": "page_too_large",
        "huge_value": "response_too_large",
    }
)
MINIMAL_RECORD: Final = b'{"uri":"a","cid":"b"}'
EMPTY_OBJECT: Final = b"{}"
# car_huge's endpoints: which answer carries the filler. "getRepo" (default; getBlocks is then not
# implemented, so every repo is fetched whole), or "getBlocks" / "getRecord": their CARs carry the blocks
# asked for, then the filler (extra blocks a correct daemon drops).
CAR_ENDPOINTS: Final = ("getRepo", "getBlocks", "getRecord")
# What holding one block costs a daemon beyond its bytes, at the least (CPython: the bytes objects of its
# CID and data, a dict slot; ~250 bytes measured): a getRepo of tiny dag-cbor blocks is refused
# (response_too_large) when its blocks at this cost are more than the memory budget (raw blocks, blobs, are
# never needed by a walk and are dropped as they arrive).
HELD_BLOCK_COST: Final = 200
BEHAVIOUR_PARAMS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "doc_bad_json": ("variant",),  # "not_json" (default) or "not_object"
        "doc_pds_url": ("url",),  # default "http://127.0.0.1:1" (refused if ever connected to)
        "pds_fail_after_page": ("page", "failures"),  # defaults 1 and 2
        # defaults 64, False (chunked, no Content-Length) and "junk" (one of HUGE_SHAPES)
        "pds_huge": ("mib", "declare_length", "shape"),
        "pds_trickle": ("interval", "bytes"),  # defaults 1.0 s and 3600 bytes
        "pds_redirect": ("location",),  # default: this host's /redirect-target
        "pds_moved": ("old_pds",),  # default: the next host, (pds + 1) % pds_hosts (needs 2 hosts)
        # Which block: the MST "root" node (default; every walk needs it), the "commit", or the first
        # "record" of the account's first collection (in spec order) that has records (only that pair).
        "block_bad_bytes": ("block",),
        "block_omitted": ("block",),
        # defaults 96, False, 0, "raw" and "getRepo": the CAR is ``size_mib`` in all, the real blocks then
        # filler blocks, raw 1 MiB sections when ``block_bytes`` is 0, else of ``block_bytes`` each (at least
        # 8, each distinct, starting like an MST node block) with CIDs of ``block_codec`` ("raw" or
        # "dag-cbor"), in the answers of ``endpoint`` (one of CAR_ENDPOINTS); with ``filler_first`` (default
        # False; getRecord and getBlocks) the filler comes before the real blocks, right after the header
        "car_huge": ("size_mib", "declare_length", "block_bytes", "block_codec", "endpoint", "filler_first"),
        "list_unsigned": ("count",),  # records per collection that only listRecords shows; default 2
        "list_altered": ("every",),  # records whose index is a multiple of it get another value; default 3
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
        "filler_first": False,
        "interval": 1.0,
        "bytes": 3600,
        "reset_in": 1,
        "block": "root",
        "size_mib": 96,
        "block_bytes": 0,
        "block_codec": "raw",
        "endpoint": "getRepo",
        "shape": "junk",
        "count": 2,
        "every": 3,
    }
)
_INT_PARAMS: Final = frozenset(
    {"page", "failures", "bytes", "reset_in", "old_pds", "count", "every", "block_bytes"}
)
_NUMBER_PARAMS: Final = frozenset({"mib", "interval", "size_mib"})
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
    """How many 429s a rate-limit behaviour answers per pair (list mode; per account on the sync
    endpoints) before it recovers (None: never recovers)."""
    if "times" in params:
        value = params["times"]
        if value is None:
            return None
        return param_int(params, "times")
    return 1 if behaviour == "pds_429_once" else None


def junk_per_page(limit: int) -> int:
    """How many junk records pds_bad_records puts in a page of ``limit`` entries (at most half of it)."""
    return min(len(JUNK_KINDS), limit // 2)


def check_params(name: str, params: Mapping[str, object], where: str) -> list[str]:
    """The problems with the parameters ``params`` of behaviour ``name`` (``where`` prefixes each)."""
    allowed = (*BEHAVIOUR_PARAMS.get(name, ()), "expected_error")
    problems = [f"{where}: unknown parameter {key!r} for {name}" for key in params if key not in allowed]
    for key in params:
        try:
            if key in _INT_PARAMS:
                if param_int(params, key) < (0 if key == "old_pds" else 1) and key in ("every", "old_pds"):
                    problems.append(f"{where}: {key} out of range")
                value = param_int(params, key)
                if key == "block_bytes" and value != 0 and not 8 <= value <= 1_048_576:
                    problems.append(f"{where}: block_bytes must be 0 or 8..1048576")
            elif key in _NUMBER_PARAMS:
                param_float(params, key)
            elif key in ("declare_length", "filler_first"):
                param_bool(params, key)
            elif key == "times":
                rate_limit_times(name, params)
            elif key == "variant" and param_str(params, key) not in ("not_json", "not_object"):
                problems.append(f"{where}: variant must be 'not_json' or 'not_object'")
            elif key == "block" and param_str(params, key) not in BLOCK_CHOICES:
                problems.append(f"{where}: block must be one of {', '.join(BLOCK_CHOICES)}")
            elif key == "shape" and param_str(params, key) not in HUGE_SHAPES:
                problems.append(f"{where}: shape must be one of {', '.join(HUGE_SHAPES)}")
            elif key == "block_codec" and param_str(params, key) not in ("raw", "dag-cbor"):
                problems.append(f"{where}: block_codec must be 'raw' or 'dag-cbor'")
            elif key == "endpoint" and param_str(params, key) not in CAR_ENDPOINTS:
                problems.append(f"{where}: endpoint must be one of {', '.join(CAR_ENDPOINTS)}")
            elif key in ("url", "location", "expected_error"):
                param_str(params, key, "")
        except ConfigError as error:
            problems.append(f"{where}: {error.message}")
    return problems
