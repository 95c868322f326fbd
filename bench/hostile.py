"""The simulated network with hostile accounts whose behaviours take parameters (for scenario e).

``python -m bench.hostile --behaviour NAME=COUNT[,KEY=VALUE...] ... <python -m daemon.simnet options>``
serves what ``python -m daemon.simnet`` would, plus ``COUNT`` did:plc accounts of behaviour ``NAME`` with
the parameters given (:data:`daemon.simnet.behaviours.BEHAVIOUR_PARAMS`), each with ``--records`` records
in every collection, spread over the hosts like the others. The simulated network's own ``--hostile
MODE=COUNT`` takes no parameters, and the memory scenario needs bodies just under the daemon's size caps
(``pds_huge`` with ``mib=7.9``, ``car_huge`` with ``size_mib=63``), so this builds the spec with the
simulated network's own builders and serves it with its own ``run``. Nothing here changes what the network
does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import trio

from daemon.errors import ConfigError
from daemon.simnet import __main__ as simnet_cli
from daemon.simnet.ids import plc_did
from daemon.simnet.spec import Account

Behaviour = tuple[str, int, dict[str, object]]


def _value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_behaviour(text: str) -> Behaviour:
    """``NAME=COUNT[,KEY=VALUE...]`` as (name, count, params)."""
    head, *rest = text.split(",")
    name, sep, count = head.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT[,KEY=VALUE...], got {text!r}")
    params: dict[str, object] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r} in {text!r}")
        params[key] = _value(value)
    return name, int(count), params


def format_behaviour(name: str, count: int, params: dict[str, object]) -> str:
    """The ``--behaviour`` argument for (name, count, params)."""
    items = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in params.items()
    ]
    return ",".join([f"{name}={count}", *items])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--behaviour", type=parse_behaviour, action="append", default=[])
    ours, rest = parser.parse_known_args(argv)
    args = simnet_cli.parse_args(rest)
    try:
        spec = simnet_cli.spec_from_args(args)
        accounts = list(spec.accounts)
        counts = dict.fromkeys(spec.collections, args.records)
        for name, count, params in ours.behaviour:
            for _ in range(count):
                index = len(accounts)
                accounts.append(Account(plc_did(index), index % spec.pds_hosts, counts, name, params))
        spec = dataclasses.replace(spec, accounts=tuple(accounts))
    except ConfigError as error:
        print(f"bench.hostile: {error.message}", file=sys.stderr)
        return 2
    trio.run(simnet_cli.run, args, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
