"""A simulated AT Protocol network (PLC directory, did:web hosts, relay, PDS hosts) with hostile modes.

Used by the tests, ``backfilld demo`` and the benchmark: build a :class:`NetworkSpec` (``build_spec``,
``demo_spec``), serve it with ``open_network`` / ``serve_network`` (or ``python -m daemon.simnet`` in a
separate process), and compare the daemon's output with ``expected_records`` / ``expected_failed``.
"""

from __future__ import annotations

from daemon.simnet.http11 import OriginStats
from daemon.simnet.model import (
    ACCOUNT_BEHAVIOURS,
    DEFAULT_COLLECTIONS,
    HOST_BEHAVIOURS,
    IDENTITY_BEHAVIOURS,
    PDS_BEHAVIOURS,
    RELAY_BEHAVIOURS,
    Account,
    DaemonLimits,
    HostOptions,
    NetworkSpec,
    Record,
    build_spec,
    demo_spec,
    expected_failed,
    expected_records,
    make_record,
    pair_error,
    plc_did,
    possible_records,
    relay_dids,
    resolve_web_dids,
    with_account,
)
from daemon.simnet.server import RunningNetwork, open_network, serve_network

__all__ = [
    "ACCOUNT_BEHAVIOURS",
    "DEFAULT_COLLECTIONS",
    "HOST_BEHAVIOURS",
    "IDENTITY_BEHAVIOURS",
    "PDS_BEHAVIOURS",
    "RELAY_BEHAVIOURS",
    "Account",
    "DaemonLimits",
    "HostOptions",
    "NetworkSpec",
    "OriginStats",
    "Record",
    "RunningNetwork",
    "build_spec",
    "demo_spec",
    "expected_failed",
    "expected_records",
    "make_record",
    "open_network",
    "pair_error",
    "plc_did",
    "possible_records",
    "relay_dids",
    "resolve_web_dids",
    "serve_network",
    "with_account",
]
