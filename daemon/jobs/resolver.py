"""DID resolution with the durable DID cache (SPEC 6 step 1; the seed's ``known_publishers``).

A cached resolution younger than ``did_cache_ttl`` is used as it is; an older one is refreshed, keeping
``first_seen_at``; ``fresh=True`` bypasses the cache (an account the PDS says is not there may have moved,
a commit whose signature fails may have a rotated key). Outcomes follow SPEC 6.1: an unknown (404) or
tombstoned (410) DID and a bad document are permanent; a timeout, connection error or 5xx from the
directory is transient. A document whose PDS is the relay's or the PLC directory's own origin is refused
(``blocked_address``): it would spend the trusted origin's budget on the attacker's behalf.

``last_seen_at`` is written at most once per :data:`TOUCH_INTERVAL` per DID: a write per job was the
most frequent store call of a backfill, and the operator's question ("is this publisher still seen?") is
answered as well to the minute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.atproto.diddoc import DidIdentity, did_document_url, parse_did_document
from daemon.errors import BlockedAddress, Code, IdentityError, JobError, ProtocolViolation, UpstreamHTTPError
from daemon.net.fetch import Fetcher, origin_key
from daemon.store.database import Database

TOUCH_INTERVAL = 60.0
# DID documents are a few KiB; anything near this is hostile.
MAX_DOCUMENT_BYTES = 262_144


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    plc_directory: str
    relay: str
    ttl: float
    timeout: float
    allow_private_addresses: bool


@dataclass(slots=True)
class _Lookup:
    """One DID lookup in flight, which later callers for the same DID wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    identity: DidIdentity | None = None
    error: JobError | None = None


class Resolver:
    """Resolves DIDs to their PDS and signing key, through the cache."""

    def __init__(
        self, db: Database, fetcher: Fetcher, settings: ResolverSettings, *, wall_clock: Callable[[], float]
    ) -> None:
        self._db = db
        self._fetcher = fetcher
        self._settings = settings
        self._now = wall_clock
        self._lookups: dict[str, _Lookup] = {}
        self._trusted_origins = {origin_key(settings.plc_directory), origin_key(settings.relay)}

    async def resolve(self, did: str, *, fresh: bool = False) -> DidIdentity:
        """The account's PDS and signing key; raises IdentityError/BlockedAddress/transient errors.

        Concurrent resolutions of one DID (its collections' jobs start together) share one lookup, so the
        PLC directory or did:web host is asked once.
        """
        store = self._db.store
        if not fresh:
            cached = await self._db.run(store.get_publisher, did)
            now = self._now()
            if cached is not None and now - cached.resolved_at < self._settings.ttl:
                if now - cached.last_seen_at >= TOUCH_INTERVAL:
                    await self._db.post(store.touch_publisher, did, now)
                return DidIdentity(did, cached.pds, cached.signing_key, cached.signing_key_id)
        while (lookup := self._lookups.get(did)) is not None:
            await lookup.done.wait()
            if lookup.identity is not None:
                return lookup.identity
            if lookup.error is not None:
                raise lookup.error
            # the leader was cancelled before it had an answer: try again, perhaps as the leader
        lookup = self._lookups[did] = _Lookup()
        try:
            identity = await self._fetch(did)
            # the cache is not waited for: the job goes on with the identity it has, and a later lookup
            # of the DID queues behind this write, so it finds it
            await self._db.post(
                store.put_publisher,
                did=did,
                pds=identity.pds,
                signing_key=identity.signing_key,
                signing_key_id=identity.signing_key_id,
                now=self._now(),
            )
            lookup.identity = identity
            return identity
        except JobError as exc:
            lookup.error = exc
            raise
        finally:
            del self._lookups[did]
            lookup.done.set()

    async def _fetch(self, did: str) -> DidIdentity:
        settings = self._settings
        url = did_document_url(
            did, plc_directory=settings.plc_directory, allow_private=settings.allow_private_addresses
        )
        host_class = "plc" if did.startswith("did:plc:") else "didweb"
        response = await self._fetcher.get_json(
            url, params=None, timeout=settings.timeout, host_class=host_class, max_bytes=MAX_DOCUMENT_BYTES
        )
        if response.status == 404:
            raise IdentityError(f"{did} is not known to {url} (404)", code=Code.DID_NOT_FOUND)
        if response.status == 410:
            raise IdentityError(f"{did} is tombstoned (410 from {url})", code=Code.DID_TOMBSTONED)
        if not 200 <= response.status < 300:
            raise UpstreamHTTPError(
                f"DID document request {url} answered {response.status}", status=response.status
            )
        try:
            document = response.json()
        except ProtocolViolation:
            raise IdentityError(
                f"DID document for {did} is not valid JSON", code=Code.INVALID_DID_DOCUMENT
            ) from None
        identity = parse_did_document(did, document, allow_http=settings.allow_private_addresses)
        if origin_key(identity.pds) in self._trusted_origins:
            raise BlockedAddress(
                f"the DID document of {did} names the relay's or PLC directory's own origin as its PDS",
                code=Code.BLOCKED_ADDRESS,
            )
        return identity
