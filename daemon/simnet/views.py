"""Derived views of a spec: which behaviour decides an account's answers, its current records, and what
listRecords shows of a pair (which may differ from the signed repo in the ``list_*`` modes)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from daemon.simnet.behaviours import IDENTITY_BEHAVIOURS, param_int
from daemon.simnet.ids import tid_to_int
from daemon.simnet.records import PairKeys, PairState, pair_keys, pair_state, records_before
from daemon.simnet.spec import Account, NetworkSpec

_NOT_ALTERED: Final = 0


def effective_behaviour(spec: NetworkSpec, account: Account) -> tuple[str | None, Mapping[str, object]]:
    """The behaviour that decides the account's answers: an identity mode of the account first, then its
    host's mode, then its own."""
    if account.behaviour in IDENTITY_BEHAVIOURS:
        return account.behaviour, account.params
    host = spec.host(account.pds)
    if host.behaviour is not None:
        return host.behaviour, host.params
    return account.behaviour, account.params


def account_state(account: Account, collection: str) -> PairState:
    """The current (signed) records of the pair: its initial records with the account's mutations applied."""
    return pair_state(account.records.get(collection, 0), account.mutations, collection)


def first_record(spec: NetworkSpec, account: Account) -> tuple[str, int, int] | None:
    """``(collection, index, version)`` of the first record (in key order) of the account's first collection
    in spec order that has records: the block the ``block=record`` variants break (None: no records)."""
    for collection in spec.collections:
        state = account_state(account, collection)
        if state.indices:
            index = state.indices[0]
            return collection, index, state.version(index)
    return None


@dataclass(frozen=True, slots=True)
class Listing:
    """What listRecords shows of a pair, in record-key order (ascending; the PDS pages from the end).

    Either the regular ``count`` records ``0..count-1`` (located by arithmetic, nothing stored) or an
    explicit sorted list of ``(rkey, index, version)`` (after mutations, or with ``list_unsigned``
    records). ``altered_every`` > 0 marks the records whose value listRecords alters (``list_altered``).
    """

    keys: PairKeys
    count: int
    items: Sequence[tuple[str, int, int]] | None
    altered_every: int = _NOT_ALTERED

    def __len__(self) -> int:
        return self.count if self.items is None else len(self.items)

    def below(self, cursor: str) -> int | None:
        """How many entries have a record key below ``cursor`` (None: the cursor is not a TID)."""
        value = tid_to_int(cursor)
        if value is None:
            return None
        if self.items is None:
            return records_before(value, self.count, self.keys.clock)
        return bisect.bisect_left(self.items, cursor, key=_rkey_of)

    def entry(self, position: int) -> tuple[str, int, int]:
        """``(rkey, index, version)`` of the entry at ``position``."""
        if self.items is None:
            return self.keys.rkey(position), position, 0
        return self.items[position]

    def altered(self, index: int) -> bool:
        """Whether listRecords shows record ``index`` with a value that does not match its CID."""
        return self.altered_every > 0 and index >= 0 and index % self.altered_every == 0


def _rkey_of(item: tuple[str, int, int]) -> str:
    return item[0]


def pair_listing(
    account: Account, collection: str, behaviour: str | None, params: Mapping[str, object]
) -> Listing:
    """What listRecords shows of the pair under the account's effective ``behaviour``."""
    keys = pair_keys(account.did, collection)
    state = account_state(account, collection)
    unsigned = param_int(params, "count") if behaviour == "list_unsigned" else 0
    every = param_int(params, "every") if behaviour == "list_altered" else _NOT_ALTERED
    if isinstance(state.indices, range) and state.indices.start == 0 and not unsigned:
        return Listing(keys, len(state.indices), None, every)
    items = [(keys.rkey(i), i, state.version(i)) for i in state.indices]
    items += [(keys.rkey(-1 - j), -1 - j, 0) for j in range(unsigned)]
    items.sort()
    return Listing(keys, len(items), tuple(items), every)
