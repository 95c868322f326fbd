"""A simulated AT Protocol network (PLC directory, did:web hosts, relay, PDS hosts) with hostile modes.

Used by the tests, ``backfilld demo`` and the benchmark: build a :class:`NetworkSpec` (``build_spec``,
``demo_spec``), serve it with ``open_network`` / ``serve_network`` (or ``python -m daemon.simnet`` in a
separate process), and compare the daemon's output with ``expected_records`` / ``expected_failed`` (for
the daemon's mode: ``DaemonLimits(mode="verified")``, the default, or ``"list"``). The PDS hosts serve
real signed repos (``com.atproto.sync.getRecord``, ``getBlocks``, ``getRepo``, ``getLatestCommit``,
``getRepoStatus``) besides ``com.atproto.repo.listRecords``; ``RunningNetwork.mutate`` changes an account's
records between runs.
"""

from __future__ import annotations

from daemon.simnet.http11 import OriginStats
from daemon.simnet.model import (
    ACCOUNT_BEHAVIOURS,
    BEHAVIOUR_PARAMS,
    DEFAULT_COLLECTIONS,
    HOST_BEHAVIOURS,
    IDENTITY_BEHAVIOURS,
    LIST_ONLY_BEHAVIOURS,
    PDS_BEHAVIOURS,
    RELAY_BEHAVIOURS,
    VERIFIED_BEHAVIOURS,
    Account,
    DaemonLimits,
    HostOptions,
    Mutation,
    NetworkSpec,
    Record,
    account_rev,
    build_spec,
    demo_spec,
    expected_failed,
    expected_records,
    expected_values,
    make_record,
    pair_error,
    pair_records,
    plc_did,
    possible_records,
    record_cid,
    record_json,
    relay_dids,
    resolve_web_dids,
    signing_key,
    with_account,
    with_mutation,
)
from daemon.simnet.server import RunningNetwork, open_network, serve_network

__all__ = [
    "ACCOUNT_BEHAVIOURS",
    "BEHAVIOUR_PARAMS",
    "DEFAULT_COLLECTIONS",
    "HOST_BEHAVIOURS",
    "IDENTITY_BEHAVIOURS",
    "LIST_ONLY_BEHAVIOURS",
    "PDS_BEHAVIOURS",
    "RELAY_BEHAVIOURS",
    "VERIFIED_BEHAVIOURS",
    "Account",
    "DaemonLimits",
    "HostOptions",
    "Mutation",
    "NetworkSpec",
    "OriginStats",
    "Record",
    "RunningNetwork",
    "account_rev",
    "build_spec",
    "demo_spec",
    "expected_failed",
    "expected_records",
    "expected_values",
    "make_record",
    "open_network",
    "pair_error",
    "pair_records",
    "plc_did",
    "possible_records",
    "record_cid",
    "record_json",
    "relay_dids",
    "resolve_web_dids",
    "serve_network",
    "signing_key",
    "with_account",
    "with_mutation",
]
