"""Real signed repos for the simulated accounts: keys, the MST of every record, the commit, and a cache.

Each account has a deterministic key pair (secp256k1 for even account positions in the spec, P-256 for
odd ones; the secret is derived from the DID), an MST over all its records of every collection (keys
``<collection>/<rkey>``) and a signed v3 commit (``rev`` from :func:`~daemon.simnet.ids.rev_for`, prev
null). A repo is built on first use and kept in a :class:`RepoCache` (least recently used first out,
bounded by bytes), because the benchmark's accounts are far too many to hold at once.

The repo modes build the broken artefact they name (:func:`build_repo`): a commit signed by another key,
a high-S signature, a commit naming another DID, a version-2 commit, a tree that breaks the MST rules
(:mod:`daemon.simnet.brokentrees`), and blocks served with wrong bytes or left out.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from daemon.atproto.car import encode_car
from daemon.atproto.cbor import Link, encode_dag_cbor
from daemon.atproto.cid import Cid, cid_for_block
from daemon.atproto.commit import sign_commit
from daemon.atproto.keys import K256, P256, PrivateKey, PublicKey
from daemon.atproto.mst import build_mst
from daemon.simnet.behaviours import param_str
from daemon.simnet.brokentrees import lenient_path, unordered_tree, wrong_layer_tree
from daemon.simnet.ids import FOREIGN_DID, digest, rev_for
from daemon.simnet.records import pair_keys, record_block
from daemon.simnet.spec import Account, NetworkSpec
from daemon.simnet.views import account_state, effective_behaviour, first_record

MIB: Final = 1_048_576
CURVE_ORDERS: Final = {
    K256: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
DEFAULT_REPO_CACHE_BYTES: Final = 256 * MIB
# Rough per-block cost of a held block beyond its bytes (dict slot, bytes objects, the CID).
_BLOCK_OVERHEAD: Final = 120


def signing_curve(spec: NetworkSpec, account: Account) -> str:
    """The curve of the account's key: secp256k1 at even positions in the spec, P-256 at odd ones."""
    return K256 if spec.position(account.did) % 2 == 0 else P256


class DeterministicKey(PrivateKey):
    """A :class:`~daemon.atproto.keys.PrivateKey` whose signatures are deterministic (RFC 6979), so that the
    same repo always has the same commit CID, even when it is rebuilt after leaving the cache."""

    __slots__ = ()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte compact low-S signature of ``data``, the same every time."""
        if _DETERMINISTIC is None:  # pragma: no cover - cryptography < 44 signs with a random nonce
            return super().sign(data)
        r, s = decode_dss_signature(self._key.sign(data, _DETERMINISTIC))
        order = CURVE_ORDERS[self.curve]
        s = order - s if s > order >> 1 else s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


try:
    _DETERMINISTIC: ec.ECDSA | None = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
except TypeError:  # pragma: no cover - cryptography < 44
    _DETERMINISTIC = None
_CURVES: Final[dict[str, ec.EllipticCurve]] = {K256: ec.SECP256K1(), P256: ec.SECP256R1()}


@functools.lru_cache(maxsize=8192)
def account_key(did: str, curve: str, variant: str = "") -> PrivateKey:
    """The deterministic private key of ``did`` on ``curve``; ``variant`` names other keys of the same
    account (``"old"``: the key before a rotation, ``"other"``: a key the account never published)."""
    order = CURVE_ORDERS[curve]
    secret = int.from_bytes(digest(f"simnet-key|{variant}|{curve}|{did}"), "big") % (order - 1) + 1
    return DeterministicKey(curve, ec.derive_private_key(secret, _CURVES[curve]))


def account_public_key(spec: NetworkSpec, account: Account, *, old: bool = False) -> PublicKey:
    """The key the account's DID document names now (``old``: before a ``key_rotated`` rotation)."""
    return account_key(account.did, signing_curve(spec, account), "old" if old else "").public_key


def make_commit(
    *, did: str, data: Cid, rev: str, key: PrivateKey, version: int = 3, high_s: bool = False
) -> tuple[Cid, bytes]:
    """A signed commit ``(CID, block)``; ``version`` other than 3 or ``high_s`` (the signature's s replaced
    by n - s: still a valid ECDSA signature, but not the low-S one atproto requires) make broken ones."""
    if version == 3 and not high_s:
        return sign_commit(did=did, data=data, rev=rev, key=key)
    unsigned = {"did": did, "version": version, "data": Link(data), "rev": rev, "prev": None}
    sig = key.sign(encode_dag_cbor(unsigned))
    if high_s:
        s = CURVE_ORDERS[key.curve] - int.from_bytes(sig[32:], "big")
        sig = sig[:32] + s.to_bytes(32, "big")
    block = encode_dag_cbor(unsigned | {"sig": sig})
    return cid_for_block(block), block


@dataclass(slots=True)
class Repo:
    """One account's repo at one commit, and how its PDS serves it.

    ``blocks`` holds every block (commit, MST nodes, records) by CID. ``bad_bytes`` are served instead of
    the real bytes of some blocks (``block_bad_bytes``), ``omitted`` blocks are left out of every CAR
    (``block_omitted``). ``size`` approximates the memory it holds.
    """

    did: str
    rev: str
    commit: Cid
    root: Cid
    blocks: dict[Cid, bytes]
    bad_bytes: dict[Cid, bytes] = field(default_factory=dict)
    omitted: frozenset[Cid] = frozenset()
    size: int = 0
    build_seconds: float = 0.0

    def served(self, cid: Cid) -> bytes | None:
        """The bytes the PDS sends for ``cid`` (None: it has no such block, or leaves it out)."""
        if cid in self.omitted:
            return None
        return self.bad_bytes.get(cid) or self.blocks.get(cid)

    def path(self, key: str) -> tuple[list[Cid], Cid | None]:
        """The MST nodes from the root to where ``key`` is or would be, and the record's CID if it is."""
        return lenient_path(self.root, self.blocks, key.encode())

    def record_proof(self, key: str) -> list[tuple[Cid, bytes]]:
        """The blocks of a getRecord answer: the commit, the nodes on the path, the record if present."""
        nodes, record = self.path(key)
        wanted = [self.commit, *nodes] + ([] if record is None else [record])
        return [(cid, data) for cid in wanted if (data := self.served(cid)) is not None]

    def car(self, cids: list[Cid] | None = None) -> bytes:
        """A CAR of the blocks ``cids`` (zero roots, as getBlocks), or of the whole repo (None: root = the
        commit, blocks sorted by CID, so in no walk order)."""
        if cids is not None:
            return encode_car([], ((cid, data) for cid in cids if (data := self.served(cid)) is not None))
        return b"".join(self.car_chunks())

    def car_chunks(self, chunk_size: int = 65536) -> Iterator[bytes]:
        """The whole-repo CAR (as :meth:`car` with None) in pieces of about ``chunk_size`` bytes."""
        yield encode_car([self.commit], [])
        pending: list[bytes] = []
        size = 0
        for cid in sorted(self.blocks):
            data = self.served(cid)
            if data is None:
                continue
            pending.append(encode_car([], [(cid, data)])[_EMPTY_CAR_HEADER:])
            size += len(pending[-1])
            if size >= chunk_size:
                yield b"".join(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending)


_EMPTY_CAR_HEADER: Final = len(encode_car([], []))


def _spoil(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def build_repo(spec: NetworkSpec, account: Account) -> Repo:
    """Build the account's repo at its current commit, broken as its effective behaviour says."""
    started = time.perf_counter()
    did = account.did
    behaviour, params = effective_behaviour(spec, account)
    blocks: dict[Cid, bytes] = {}
    entries: list[tuple[bytes, Cid]] = []
    record_cids: dict[tuple[str, int], Cid] = {}
    # Keys sort by "<collection>/": no collection's "<nsid>/" is a prefix of another's.
    for collection in sorted(spec.collections, key=lambda c: c + "/"):
        state = account_state(account, collection)
        keys = pair_keys(did, collection)
        prefix = collection + "/"
        for index in state.indices:
            block = record_block(did, collection, index, state.version(index))
            cid = cid_for_block(block)
            blocks[cid] = block
            record_cids[(collection, index)] = cid
            entries.append(((prefix + keys.rkey(index)).encode(), cid))
    if behaviour == "mst_unordered":
        root, nodes = unordered_tree(entries, spec.collections[0])
    elif behaviour == "mst_wrong_layer":
        root, nodes = wrong_layer_tree(entries, spec.collections[0])
    else:
        root, nodes = build_mst(entries)
    blocks.update(nodes)
    rev = rev_for(did, account.generation)
    curve = signing_curve(spec, account)
    key = account_key(did, curve, "other" if behaviour == "commit_other_key" else "")
    commit, commit_block = make_commit(
        did=FOREIGN_DID if behaviour == "commit_other_did" else did,
        data=root,
        rev=rev,
        key=key,
        version=2 if behaviour == "commit_v2" else 3,
        high_s=behaviour == "commit_high_s",
    )
    blocks[commit] = commit_block
    repo = Repo(did, rev, commit, root, blocks)
    if behaviour in ("block_bad_bytes", "block_omitted"):
        target: Cid | None = {"root": root, "commit": commit}.get(param_str(params, "block"))
        if target is None:
            first = first_record(spec, account)
            target = None if first is None else record_cids[first[:2]]
        if target is not None and behaviour == "block_bad_bytes":
            repo.bad_bytes[target] = _spoil(blocks[target])
        elif target is not None:
            repo.omitted = frozenset({target})
    repo.size = sum(len(data) + _BLOCK_OVERHEAD for data in blocks.values())
    repo.build_seconds = time.perf_counter() - started
    return repo


class RepoCache:
    """The repos of the accounts served lately, least recently used evicted first beyond ``max_bytes``.

    Keyed by DID and commit generation, so a mutated account is rebuilt at its new commit. ``built`` and
    ``build_seconds`` count the builds (the benchmark's cost of real repos).
    """

    def __init__(self, max_bytes: int = DEFAULT_REPO_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.built = 0
        self.records_built = 0
        self.build_seconds = 0.0
        self._repos: OrderedDict[tuple[str, int], Repo] = OrderedDict()

    def get(self, spec: NetworkSpec, account: Account) -> Repo:
        """The account's repo at its current commit (built now if not cached)."""
        key = (account.did, account.generation)
        repo = self._repos.get(key)
        if repo is not None:
            self._repos.move_to_end(key)
            return repo
        repo = build_repo(spec, account)
        self.built += 1
        self.records_built += sum(len(account_state(account, c)) for c in spec.collections)
        self.build_seconds += repo.build_seconds
        self._repos[key] = repo
        self.size += repo.size
        while self.size > self.max_bytes and len(self._repos) > 1:
            _, evicted = self._repos.popitem(last=False)
            self.size -= evicted.size
        return repo

    def clear(self) -> None:
        """Forget every cached repo."""
        self._repos.clear()
        self.size = 0

    def snapshot(self) -> dict[str, object]:
        """The build counters as a JSON-able mapping."""
        per_record = self.build_seconds / self.records_built if self.records_built else 0.0
        return {
            "repos_built": self.built,
            "records_built": self.records_built,
            "build_seconds": round(self.build_seconds, 6),
            "build_us_per_record": round(per_record * 1e6, 3),
            "cached_repos": len(self._repos),
            "cached_bytes": self.size,
        }
