"""DID resolution, the pure half (SPEC 6 step 1): where a DID document lives, and what it says.

:func:`did_document_url` maps a DID to the URL of its document, :func:`parse_did_document` turns a decoded
document into the account's PDS endpoint and signing key. Fetching, caching and the address checks on the
connection itself live elsewhere.

Error codes raised here:

- ``invalid_did`` (IdentityError): the DID fails DID syntax; a ``did:plc`` identifier that is not 24 base32
  characters; a ``did:web`` host that is not a hostname, or a port out of range.
- ``unsupported_did`` (IdentityError): a method other than ``plc``/``web``; a path-based ``did:web``; a
  ``did:web`` port on a host other than ``localhost``; a ``did:web`` under a TLD atproto reserves (``.local``,
  ``.arpa``, ``.example``, ... see ``RESERVED_TLDS``).
- ``insecure_url`` (BlockedAddress): ``did:web:localhost%3A<port>`` (served over http) without
  ``allow_private``; an ``http://`` PDS endpoint without ``allow_http``.
- ``invalid_did_document`` (IdentityError): the document is not an object, its ``id`` is not the DID, or its
  ``service`` is present but not an array.
- ``no_pds_service`` (IdentityError): no ``#atproto_pds`` service, or one with another type or without an
  acceptable http(s) endpoint.

The PDS service is the *first* entry of ``service`` whose ``id`` is ``#atproto_pds`` or ``<did>#atproto_pds``
(as the reference implementation picks it); that entry alone decides. Its ``serviceEndpoint`` must be an
absolute ``http``/``https`` URL of printable ASCII with a host (a DNS name, IPv4 or bracketed IPv6 address),
an optional port, an optional path, and no userinfo, query or fragment. It is normalised by lower-casing the
scheme and host and stripping trailing slashes. The signing key is the first ``verificationMethod`` entry
whose ``id`` is ``#atproto`` or ``<did>#atproto``: a ``Multikey`` (compressed secp256k1 or P-256) or a legacy
``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` key, normalised to its Multikey
string; a missing, unsupported or malformed one is ``None``, which is not an error here (list mode needs no
key; verified mode fails the account with ``no_signing_key``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from daemon.atproto.keys import parse_verification_method
from daemon.atproto.syntax import is_valid_did, is_valid_handle
from daemon.errors import BlockedAddress, Code, IdentityError, ProtocolViolation

PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"
MAX_ENDPOINT_LENGTH = 2048
MAX_SIGNING_KEY_LENGTH = 256

# Reserved TLDs on which atproto does not accept handles, nor therefore did:web hosts.
RESERVED_TLDS = frozenset({"alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion"})

_PLC_RE = re.compile(r"did:plc:[a-z2-7]{24}")
_WEB_PORT_RE = re.compile(r"(?P<host>[^%]+)%3[aA](?P<port>[0-9]{1,5})")
_URL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<path>[^?#]*)")
_PRINTABLE_ASCII_RE = re.compile(r"[!-~]+")
_NETLOC_RE = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


@dataclass(frozen=True, slots=True)
class DidIdentity:
    """What a DID document says about an account: its PDS and (if any) its atproto signing key."""

    did: str
    pds: str
    signing_key: str | None
    signing_key_id: str | None


def did_document_url(did: str, *, plc_directory: str, allow_private: bool) -> str:
    """The URL of ``did``'s DID document.

    ``did:plc`` resolves through the (trusted, configured) PLC directory; ``did:web`` through
    ``https://<host>/.well-known/did.json``, or ``http://localhost:<port>/...`` for
    ``did:web:localhost%3A<port>`` when ``allow_private``. Raises IdentityError (``invalid_did``,
    ``unsupported_did``) or BlockedAddress (``insecure_url``), see the module docstring.
    """
    if not is_valid_did(did):
        raise IdentityError(f"not a valid DID: {did[:120]!r}", code=Code.INVALID_DID)
    if did.startswith("did:plc:"):
        if _PLC_RE.fullmatch(did) is None:
            raise IdentityError(f"not a valid did:plc identifier: {did[:120]!r}", code=Code.INVALID_DID)
        return f"{plc_directory.rstrip('/')}/{did}"
    if did.startswith("did:web:"):
        return _did_web_url(did, allow_private=allow_private)
    method = did.split(":", 2)[1]
    raise IdentityError(
        f"unsupported DID method {method[:40]!r}: only plc and web are", code=Code.UNSUPPORTED_DID
    )


def parse_did_document(did: str, doc: object, *, allow_http: bool) -> DidIdentity:
    """Extract the PDS endpoint and signing key from ``did``'s decoded DID document.

    Raises IdentityError (``invalid_did_document``, ``no_pds_service``) or, for an ``http://`` endpoint when
    not ``allow_http``, BlockedAddress (``insecure_url``).
    """
    if not isinstance(doc, dict):
        raise IdentityError(f"DID document of {did} is not a JSON object")
    if doc.get("id") != did:
        raise IdentityError(f"DID document id does not match {did}")
    pds = _pds_endpoint(did, doc, allow_http=allow_http)
    signing_key, signing_key_id = _signing_key(did, doc)
    return DidIdentity(did, pds, signing_key, signing_key_id)


def _did_web_url(did: str, *, allow_private: bool) -> str:
    identifier = did[len("did:web:") :]
    if ":" in identifier:
        raise IdentityError(
            f"path-based did:web is not supported by atproto: {did[:120]!r}", code=Code.UNSUPPORTED_DID
        )
    port_match = _WEB_PORT_RE.fullmatch(identifier)
    host = port_match["host"] if port_match else identifier
    if port_match is None and "%" in identifier:
        raise IdentityError(f"did:web host is not a hostname: {did[:120]!r}", code=Code.INVALID_DID)
    if host.lower() == "localhost":
        if port_match is None:
            return "https://localhost/.well-known/did.json"
        port = int(port_match["port"])
        if not 0 < port < 65536:
            raise IdentityError(f"did:web port out of range: {did[:120]!r}", code=Code.INVALID_DID)
        if not allow_private:
            raise BlockedAddress(
                f"{did} is served over http://localhost, allowed only with allow_private_addresses",
                code=Code.INSECURE_URL,
            )
        return f"http://localhost:{port}/.well-known/did.json"
    if not is_valid_handle(host):
        raise IdentityError(f"did:web host is not a hostname: {did[:120]!r}", code=Code.INVALID_DID)
    if port_match is not None:
        raise IdentityError(
            f"did:web with a port is supported only for localhost: {did[:120]!r}", code=Code.UNSUPPORTED_DID
        )
    tld = host.rsplit(".", 1)[1].lower()
    if tld in RESERVED_TLDS:
        raise IdentityError(
            f"did:web under reserved TLD .{tld} is not supported: {did}", code=Code.UNSUPPORTED_DID
        )
    return f"https://{host.lower()}/.well-known/did.json"


def _pds_endpoint(did: str, doc: dict[object, object], *, allow_http: bool) -> str:
    services = doc.get("service")
    if services is None:
        raise IdentityError(f"DID document of {did} has no services", code=Code.NO_PDS_SERVICE)
    if not isinstance(services, list):
        raise IdentityError(f"DID document of {did} has a `service` that is not an array")
    wanted = ("#atproto_pds", f"{did}#atproto_pds")
    service = next((s for s in services if isinstance(s, dict) and s.get("id") in wanted), None)
    if service is None:
        raise IdentityError(f"DID document of {did} has no #atproto_pds service", code=Code.NO_PDS_SERVICE)
    if service.get("type") != PDS_SERVICE_TYPE:
        raise IdentityError(
            f"#atproto_pds service of {did} is not of type {PDS_SERVICE_TYPE}", code=Code.NO_PDS_SERVICE
        )
    endpoint = service.get("serviceEndpoint")
    normalised = _normalise_endpoint(endpoint) if isinstance(endpoint, str) else None
    if normalised is None:
        raise IdentityError(
            f"#atproto_pds service of {did} has no acceptable http(s) serviceEndpoint",
            code=Code.NO_PDS_SERVICE,
        )
    if normalised.startswith("http://") and not allow_http:
        raise BlockedAddress(
            f"PDS of {did} is at {normalised}: http:// is allowed only with allow_private_addresses",
            code=Code.INSECURE_URL,
        )
    return normalised


def _normalise_endpoint(endpoint: str) -> str | None:
    """The endpoint with scheme and host lower-cased and trailing slashes removed, or None if unacceptable."""
    if len(endpoint) > MAX_ENDPOINT_LENGTH or _PRINTABLE_ASCII_RE.fullmatch(endpoint) is None:
        return None
    url = _URL_RE.fullmatch(endpoint)
    if url is None:
        return None
    scheme = url["scheme"].lower()
    if scheme not in ("http", "https"):
        return None
    netloc = _NETLOC_RE.fullmatch(url["netloc"])
    if netloc is None:
        return None
    host = netloc["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    port = netloc["port"]
    if port is not None and not 0 < int(port) < 65536:
        return None
    return f"{scheme}://{url['netloc'].lower()}{url['path']}".rstrip("/")


def _signing_key(did: str, doc: dict[object, object]) -> tuple[str | None, str | None]:
    """The ``#atproto`` key as a canonical Multikey string (legacy forms normalised), and its id.

    A missing, unsupported or malformed key is (None, None): list mode needs no key, and verified mode
    fails such an account with ``no_signing_key``.
    """
    methods = doc.get("verificationMethod")
    if not isinstance(methods, list):
        return None, None
    wanted = ("#atproto", f"{did}#atproto")
    for method in methods:
        if not isinstance(method, dict):
            continue
        key_id = method.get("id")
        if not isinstance(key_id, str) or key_id not in wanted:
            continue
        key = method.get("publicKeyMultibase")
        kind = method.get("type")
        if not isinstance(key, str) or not isinstance(kind, str) or len(key) > MAX_SIGNING_KEY_LENGTH:
            return None, None
        try:
            return parse_verification_method(kind, key).multikey(), key_id
        except ProtocolViolation:
            return None, None
    return None, None
