"""The control endpoint of a served network (what a test or the benchmark drives a separate process with).

- ``GET /stats[?timestamps=1]``: every origin's counters by URL; ``GET /repos``: the repo build counters;
- ``GET /reset``: zero the counters, forget the state of the stateful hostile modes;
- ``GET /spec``: the spec served now (mutations included) as JSON (:func:`spec_from_json` reads it back);
- ``GET /expected``: what a correct daemon ends up with now: ``{"records": [[did, collection, rkey, cid],
  ...], "failed": [[did, collection, code], ...]}`` (sorted), for the :class:`DaemonLimits` fields given as
  query parameters (``mode=list``, ``page_size=50``, ...), restricted by repeated ``did=`` / ``collection=``;
  with ``values=1`` also ``"values": [[did, collection, rkey, value], ...]``;
- ``POST /mutate`` with a JSON body ``{"did", "collection", "update": [...], "delete": [...], "create": n,
  "empty": bool, "recreate": [...]}``: apply one mutation (a new commit); answers ``{"did", "generation",
  "rev"}``, or 400 for an invalid one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

from daemon.errors import ConfigError
from daemon.simnet.actions import NOT_FOUND, Action, Request, error_reply, json_reply, parse_query_lists
from daemon.simnet.expectations import account_rev, expected_failed, expected_records, expected_values
from daemon.simnet.http11 import OriginStats
from daemon.simnet.records import Mutation
from daemon.simnet.repos import RepoCache
from daemon.simnet.spec import Account, DaemonLimits, HostOptions, NetworkSpec

_LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(DaemonLimits)}


class ControlledNetwork(Protocol):
    """What the control endpoint needs of a running network."""

    spec: NetworkSpec
    stats: dict[str, OriginStats]
    repos: RepoCache

    def reset(self) -> None:
        """Zero the counters and forget the hostile modes' state."""

    def mutate(self, did: str, mutation: Mutation) -> Account:
        """Apply ``mutation`` to ``did``; returns the account after it."""
        ...


def spec_to_json(spec: NetworkSpec) -> dict[str, Any]:
    """``spec`` as a JSON-able mapping."""
    return {
        "accounts": [
            {
                "did": a.did,
                "pds": a.pds,
                "records": dict(a.records),
                "behaviour": a.behaviour,
                "params": dict(a.params),
                "mutations": [m.as_json() for m in a.mutations],
            }
            for a in spec.accounts
        ],
        "pds_hosts": spec.pds_hosts,
        "collections": list(spec.collections),
        "latency": spec.latency,
        "plc_latency": spec.plc_latency,
        "page_size_cap": spec.page_size_cap,
        "cursor_on_last_page": spec.cursor_on_last_page,
        "host_options": {
            str(index): {
                "latency": o.latency,
                "behaviour": o.behaviour,
                "params": dict(o.params),
                "get_blocks": o.get_blocks,
                "rate_limit": None if o.rate_limit is None else list(o.rate_limit),
                "repo_rate_limit": None if o.repo_rate_limit is None else list(o.repo_rate_limit),
            }
            for index, o in spec.host_options.items()
        },
        "relay_behaviour": dict(spec.relay_behaviour),
        "relay_page_cap": spec.relay_page_cap,
    }


def mutation_from_json(value: Mapping[str, Any]) -> Mutation:
    """A :class:`Mutation` from its JSON form (``collection`` required, the rest optional)."""
    return Mutation(
        str(value["collection"]),
        update=tuple(value.get("update", ())),
        delete=tuple(value.get("delete", ())),
        create=int(value.get("create", 0)),
        empty=bool(value.get("empty", False)),
        recreate=tuple(value.get("recreate", ())),
    )


def _pair(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def spec_from_json(value: Mapping[str, Any]) -> NetworkSpec:
    """The :class:`NetworkSpec` that :func:`spec_to_json` wrote."""
    accounts = tuple(
        Account(
            a["did"],
            a["pds"],
            a["records"],
            a["behaviour"],
            a["params"],
            tuple(mutation_from_json(m) for m in a["mutations"]),
        )
        for a in value["accounts"]
    )
    options = {
        int(index): HostOptions(
            o["latency"],
            o["behaviour"],
            o["params"],
            o["get_blocks"],
            _pair(o["rate_limit"]),
            _pair(o["repo_rate_limit"]),
        )
        for index, o in value["host_options"].items()
    }
    return NetworkSpec(
        accounts,
        value["pds_hosts"],
        tuple(value["collections"]),
        latency=value["latency"],
        plc_latency=value["plc_latency"],
        page_size_cap=value["page_size_cap"],
        cursor_on_last_page=value["cursor_on_last_page"],
        host_options=options,
        relay_behaviour=value["relay_behaviour"],
        relay_page_cap=value["relay_page_cap"],
    )


def limits_from_query(args: Mapping[str, list[str]]) -> DaemonLimits:
    """The :class:`DaemonLimits` named by query parameters (the others at their defaults)."""
    fields: dict[str, object] = {}
    for name, kind in _LIMIT_FIELDS.items():
        if name in args:
            text = args[name][0]
            if kind in ("bool", bool):
                fields[name] = text.lower() in ("1", "true", "yes")
            elif kind in ("str", str):
                fields[name] = text
            else:
                fields[name] = int(text)
    return DaemonLimits(**fields)  # type: ignore[arg-type]


class ControlHandler:
    """The control endpoint's requests (see the module docstring)."""

    def __init__(self) -> None:
        self.network: ControlledNetwork | None = None

    def handle(self, request: Request) -> Action:
        """The answer to one control request."""
        network = self.network
        if network is None:
            return NOT_FOUND
        path = request.path
        args = parse_query_lists(request.query)
        if path == "/stats":
            timestamps = args.get("timestamps", [""])[0] == "1"
            return json_reply(
                200, {url: s.snapshot(timestamps=timestamps) for url, s in network.stats.items()}
            )
        if path == "/repos":
            return json_reply(200, network.repos.snapshot())
        if path == "/reset":
            network.reset()
            return json_reply(200, {"reset": True})
        if path == "/spec":
            return json_reply(200, spec_to_json(network.spec))
        if path == "/expected":
            try:
                return json_reply(200, expected_json(network.spec, args))
            except (ValueError, ConfigError) as error:
                return error_reply(400, "InvalidRequest", str(error))
        if path == "/mutate":
            return self._mutate(network, request)
        return NOT_FOUND

    @staticmethod
    def _mutate(network: ControlledNetwork, request: Request) -> Action:
        if request.method != "POST":
            return error_reply(405, "MethodNotAllowed", "POST a JSON body to /mutate")
        try:
            body = json.loads(request.body)
            mutation = mutation_from_json(body)
            account = network.mutate(str(body["did"]), mutation)
        except (ValueError, TypeError, KeyError, ConfigError) as error:
            message = error.message if isinstance(error, ConfigError) else repr(error)
            return error_reply(400, "InvalidRequest", message)
        rev = account_rev(network.spec, account.did)
        return json_reply(200, {"did": account.did, "generation": account.generation, "rev": rev})


def expected_json(spec: NetworkSpec, args: Mapping[str, list[str]]) -> dict[str, object]:
    """The ``GET /expected`` answer for ``spec``."""
    limits = limits_from_query(args)
    dids = args.get("did")
    collections = args.get("collection")
    records = expected_records(spec, limits=limits, dids=dids, collections=collections)
    failed = expected_failed(spec, limits=limits, dids=dids, collections=collections)
    result: dict[str, object] = {
        "records": sorted(list(r) for r in records),
        "failed": sorted([did, collection, code] for (did, collection), code in failed.items()),
    }
    if args.get("values", [""])[0] == "1":
        values = expected_values(spec, limits=limits, dids=dids, collections=collections)
        rows: list[list[object]] = [[*key, value] for key, (_, value) in values.items()]
        result["values"] = sorted(rows, key=lambda row: (row[0], row[1], row[2]))
    return result
