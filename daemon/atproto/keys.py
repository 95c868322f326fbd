"""Account signing keys: parsing them from DID documents, verifying and making signatures (SPEC 6.2).

atproto signs with ECDSA over SHA-256 on secp256k1 ("K-256", JWT ``ES256K``) or NIST P-256 (``ES256``).
A key is parsed once into a :class:`PublicKey` (the point is validated then), because one account's commit
is verified with it, and the same key object is reused after a cache hit.

Accepted key forms, as the reference implementation (``@atproto/crypto``, ``@atproto/identity``) reads them:

- ``Multikey`` ``publicKeyMultibase``, and the ``did:key:`` form: ``z`` + base58btc of a multicodec prefix
  (``0xe7 0x01`` secp256k1-pub, ``0x80 0x24`` p256-pub) and the 33-byte compressed point;
- the legacy ``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` methods: the curve
  comes from the type, the multibase (any of the bases the reference decodes: ``z``, ``f``, ``F``, ``b``,
  ``B``, ``m``, ``u``, ``U``) holds the bare point, no multicodec prefix, compressed (33 bytes) or
  uncompressed (65 bytes).

Signatures are the 64-byte compact ``r || s`` form only (DER is refused), and must be low-S on both curves:
a high-S signature is invalid even though it verifies mathematically (the reference refuses it too, so that
signatures are not malleable).

secp256k1 verification uses ``coincurve`` (libsecp256k1, about ten times faster) when it is installed and
``cryptography`` otherwise; P-256 always uses ``cryptography``. Error code: ``invalid_key``
(ProtocolViolation) for a key that cannot be used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import libipld
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from daemon.errors import ProtocolViolation

try:  # an optional accelerator; cryptography does the same job ten times slower
    import coincurve

    HAVE_COINCURVE = True
except ImportError:  # pragma: no cover - exercised only where coincurve is absent
    HAVE_COINCURVE = False

K256 = "secp256k1"
P256 = "p256"
MULTIKEY = "Multikey"
LEGACY_K256 = "EcdsaSecp256k1VerificationKey2019"
LEGACY_P256 = "EcdsaSecp256r1VerificationKey2019"
DID_KEY_PREFIX = "did:key:"
MAX_KEY_STRING_LENGTH = 256
SIGNATURE_LENGTH = 64

_CURVES: dict[str, ec.EllipticCurve] = {K256: ec.SECP256K1(), P256: ec.SECP256R1()}
_ORDERS = {
    K256: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
_MULTICODEC = {K256: b"\xe7\x01", P256: b"\x80\x24"}
_LEGACY_TYPES = {LEGACY_K256: K256, LEGACY_P256: P256}
_LEGACY_BASES = frozenset("zfFbBmuU")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# verify(data, r, s) -> bool, with r and s already range- and low-S-checked.
_Verifier = Callable[[bytes, int, int], bool]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A validated public key: ``curve`` (:data:`K256` or :data:`P256`) and its 33-byte compressed point."""

    curve: str
    compressed: bytes
    _verify: _Verifier = field(repr=False, compare=False)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (64-byte compact, low-S) signs ``data`` (hashed here with SHA-256)."""
        if len(signature) != SIGNATURE_LENGTH:
            return False
        order = _ORDERS[self.curve]
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < order and 0 < s <= order >> 1):
            return False
        return self._verify(data, r, s)

    def multikey(self) -> str:
        """The ``Multikey`` ``publicKeyMultibase`` form of this key."""
        return libipld.encode_multibase("z", _MULTICODEC[self.curve] + self.compressed)

    def did_key(self) -> str:
        """The ``did:key:`` form of this key."""
        return DID_KEY_PREFIX + self.multikey()


class PrivateKey:
    """A signing key (for the simulated network and tests): signs with SHA-256, low-S, compact form."""

    __slots__ = ("_key", "curve", "public_key")

    def __init__(self, curve: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.curve = curve
        self._key = key
        self.public_key = public_key_from_bytes(curve, _compressed_point(key.public_key()))

    @classmethod
    def generate(cls, curve: str = K256) -> PrivateKey:
        """A new random key on ``curve``."""
        return cls(curve, ec.generate_private_key(_curve(curve)))

    @classmethod
    def from_bytes(cls, curve: str, secret: bytes) -> PrivateKey:
        """The key whose 32-byte big-endian secret scalar is ``secret``."""
        return cls(curve, ec.derive_private_key(int.from_bytes(secret, "big"), _curve(curve)))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte compact low-S signature of ``data``."""
        r, s = decode_dss_signature(self._key.sign(data, _ECDSA_SHA256))
        order = _ORDERS[self.curve]
        if s > order >> 1:  # normalise: (r, n - s) is the other valid signature, and the low one
            s = order - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def parse_multikey(multikey: str) -> PublicKey:
    """Parse a ``Multikey`` ``publicKeyMultibase`` (``z`` + base58btc of multicodec prefix and point)."""
    raw = _decode_multibase(multikey, bases="z")
    for curve, prefix in _MULTICODEC.items():
        if raw.startswith(prefix):
            point = raw[len(prefix) :]
            if len(point) != 33:
                raise _invalid(f"a multikey holds a 33-byte compressed point, not {len(point)} bytes")
            return public_key_from_bytes(curve, point)
    raise _invalid("multikey is neither a secp256k1 nor a P-256 public key")


def parse_did_key(did: str) -> PublicKey:
    """Parse a ``did:key:z...`` of a secp256k1 or P-256 key."""
    if not did.startswith(DID_KEY_PREFIX):
        raise _invalid(f"not a did:key: {did[:80]!r}")
    return parse_multikey(did[len(DID_KEY_PREFIX) :])


def parse_verification_method(method_type: str, public_key_multibase: str) -> PublicKey:
    """The key of a DID document's ``#atproto`` verification method, given its ``type`` and multibase."""
    if method_type == MULTIKEY:
        return parse_multikey(public_key_multibase)
    curve = _LEGACY_TYPES.get(method_type)
    if curve is None:
        raise _invalid(f"unsupported verification method type {method_type[:80]!r}")
    return public_key_from_bytes(curve, _decode_multibase(public_key_multibase, bases=_LEGACY_BASES))


def public_key_from_bytes(curve: str, point: bytes) -> PublicKey:
    """A key from its SEC1 point (33-byte compressed or 65-byte uncompressed); checks it is on the curve."""
    if len(point) not in (33, 65):
        raise _invalid(f"a public key point is 33 or 65 bytes, not {len(point)}")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(_curve(curve), point)
    except ValueError as exc:
        raise _invalid(f"not a valid {curve} public key: {exc}") from exc
    compressed = _compressed_point(key)
    return PublicKey(curve, compressed, _make_verifier(curve, key, compressed, HAVE_COINCURVE))


def _make_verifier(
    curve: str, key: ec.EllipticCurvePublicKey, compressed: bytes, use_coincurve: bool
) -> _Verifier:
    if curve == K256 and use_coincurve:
        fast = coincurve.PublicKey(compressed)

        def verify_coincurve(data: bytes, r: int, s: int) -> bool:
            return fast.verify(encode_dss_signature(r, s), hashlib.sha256(data).digest(), hasher=None)

        return verify_coincurve

    def verify_cryptography(data: bytes, r: int, s: int) -> bool:
        try:
            key.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True

    return verify_cryptography


def _decode_multibase(value: str, *, bases: str | frozenset[str]) -> bytes:
    if not value or value[0] not in bases or len(value) > MAX_KEY_STRING_LENGTH:
        raise _invalid(f"not a supported multibase key string: {value[:80]!r}")
    try:
        _, raw = libipld.decode_multibase(value)
    except ValueError as exc:
        raise _invalid(f"not a valid multibase string: {value[:80]!r}") from exc
    return raw


def _compressed_point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _curve(curve: str) -> ec.EllipticCurve:
    try:
        return _CURVES[curve]
    except KeyError:
        raise ValueError(f"unknown curve {curve!r}") from None


def _invalid(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="invalid_key")
