"""daemon.atproto.keys against the vendored crypto interop vectors (tests/interop/crypto), plus every refusal.

The secp256k1 cases run on both verifiers (coincurve and cryptography), so that they cannot drift apart.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import libipld
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto import keys
from daemon.atproto.keys import (
    K256,
    LEGACY_K256,
    LEGACY_P256,
    MULTIKEY,
    P256,
    PrivateKey,
    PublicKey,
    parse_did_key,
    parse_multikey,
    parse_verification_method,
    public_key_from_bytes,
)
from daemon.errors import ProtocolViolation

CRYPTO = Path(__file__).resolve().parent / "interop" / "crypto"
ORDERS = {K256: keys._ORDERS[K256], P256: keys._ORDERS[P256]}


def _load(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CRYPTO / name).read_text(encoding="utf-8"))
    assert cases, name
    return cases


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _with_backend(key: PublicKey, use_coincurve: bool) -> PublicKey:
    point = ec.EllipticCurvePublicKey.from_encoded_point(keys._CURVES[key.curve], key.compressed)
    return PublicKey(
        key.curve, key.compressed, keys._make_verifier(key.curve, point, key.compressed, use_coincurve)
    )


BACKENDS = [pytest.param(False, id="cryptography")]
if keys.HAVE_COINCURVE:
    BACKENDS.append(pytest.param(True, id="coincurve"))


@pytest.mark.parametrize("use_coincurve", BACKENDS)
@pytest.mark.parametrize("case", _load("signature-fixtures.json"), ids=lambda case: case["comment"])
def test_signature_fixtures(case: dict[str, Any], use_coincurve: bool) -> None:
    from_did = parse_did_key(case["publicKeyDid"])
    legacy = parse_verification_method(case["didDocSuite"], case["publicKeyMultibase"])
    assert from_did == legacy
    assert from_did.curve == {"ES256K": K256, "ES256": P256}[case["algorithm"]]
    assert from_did.did_key() == case["publicKeyDid"]
    key = _with_backend(from_did, use_coincurve)
    message, signature = _b64(case["messageBase64"]), _b64(case["signatureBase64"])
    assert key.verify(message, signature) is case["validSignature"]


def test_fixtures_cover_both_curves_and_the_invalid_forms() -> None:
    cases = _load("signature-fixtures.json")
    tags = {tag for case in cases for tag in case["tags"]}
    assert {"high-s", "der-encoded"} <= tags
    assert {case["algorithm"] for case in cases} == {"ES256", "ES256K"}


@pytest.mark.parametrize("case", _load("w3c_didkey_K256.json"), ids=lambda case: case["publicDidKey"])
def test_w3c_did_key_k256(case: dict[str, Any]) -> None:
    private = PrivateKey.from_bytes(K256, bytes.fromhex(case["privateKeyBytesHex"]))
    assert private.public_key.did_key() == case["publicDidKey"]
    assert parse_did_key(case["publicDidKey"]) == private.public_key


@pytest.mark.parametrize("case", _load("w3c_didkey_P256.json"), ids=lambda case: case["publicDidKey"])
def test_w3c_did_key_p256(case: dict[str, Any]) -> None:
    _, secret = libipld.decode_multibase("z" + case["privateKeyBytesBase58"])
    private = PrivateKey.from_bytes(P256, secret)
    assert private.public_key.did_key() == case["publicDidKey"]
    assert parse_did_key(case["publicDidKey"]) == private.public_key


@pytest.mark.parametrize("curve", [K256, P256])
def test_legacy_forms_compressed_uncompressed_and_other_bases(curve: str) -> None:
    key = PrivateKey.generate(curve)
    public = key.public_key
    point = ec.EllipticCurvePublicKey.from_encoded_point(keys._CURVES[curve], public.compressed)
    uncompressed = point.public_numbers().x.to_bytes(32, "big") + point.public_numbers().y.to_bytes(32, "big")
    method = LEGACY_K256 if curve == K256 else LEGACY_P256
    for encoded in (
        libipld.encode_multibase("z", b"\x04" + uncompressed),
        libipld.encode_multibase("z", public.compressed),
        "f" + public.compressed.hex(),
    ):
        assert parse_verification_method(method, encoded) == public
    assert parse_verification_method(MULTIKEY, public.multikey()) == public
    assert parse_multikey(public.multikey()) == public


@pytest.mark.parametrize("curve", [K256, P256])
@pytest.mark.parametrize("use_coincurve", BACKENDS)
def test_sign_verify_and_every_bad_signature(curve: str, use_coincurve: bool) -> None:
    key = PrivateKey.generate(curve)
    public = _with_backend(key.public_key, use_coincurve)
    order = ORDERS[curve]
    for index in range(20):
        message = b"message %d" % index
        signature = key.sign(message)
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        assert s <= order >> 1
        assert public.verify(message, signature)
        assert not public.verify(message + b"!", signature)
        high_s = signature[:32] + (order - s).to_bytes(32, "big")
        assert not public.verify(message, high_s)  # valid mathematically, refused as malleable
        assert not public.verify(message, encode_dss_signature(r, s))  # DER
    signature = key.sign(b"m")
    other = PrivateKey.generate(curve).public_key
    assert not _with_backend(other, use_coincurve).verify(b"m", signature)
    for bad in (
        signature[:63],
        signature + b"\x00",
        b"",
        bytes(64),
        bytes(32) + signature[32:],
        signature[:32] + bytes(32),
        order.to_bytes(32, "big") + signature[32:],
        b"\xff" * 64,
    ):
        assert not public.verify(b"m", bad)


def test_a_key_on_one_curve_does_not_verify_the_other() -> None:
    k256, p256 = PrivateKey.generate(K256), PrivateKey.generate(P256)
    assert not k256.public_key.verify(b"m", p256.sign(b"m"))
    assert not p256.public_key.verify(b"m", k256.sign(b"m"))
    assert public_key_from_bytes(K256, k256.public_key.compressed) == k256.public_key


_ED25519_MULTIKEY = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"


@pytest.mark.parametrize(
    ("method_type", "value"),
    [
        (MULTIKEY, _ED25519_MULTIKEY),
        (MULTIKEY, libipld.encode_multibase("z", b"\xe7\x01" + bytes(33))),  # not on the curve
        (
            MULTIKEY,
            libipld.encode_multibase("z", b"\xe7\x01" + PrivateKey.generate().public_key.compressed[:-1]),
        ),
        (MULTIKEY, libipld.encode_multibase("z", b"\x80\x24\x04" + bytes(64))),  # uncompressed multikey
        (MULTIKEY, "z"),
        (MULTIKEY, "z0OIl"),
        (MULTIKEY, "f" + (b"\xe7\x01" + PrivateKey.generate().public_key.compressed).hex()),
        (MULTIKEY, "z" + "2" * 300),
        (MULTIKEY, ""),
        (LEGACY_K256, "x123"),
        (
            LEGACY_K256,
            libipld.encode_multibase("z", b"\xe7\x01" + PrivateKey.generate().public_key.compressed),
        ),
        (LEGACY_P256, libipld.encode_multibase("z", bytes(33))),
        ("Ed25519VerificationKey2020", _ED25519_MULTIKEY),
        ("JsonWebKey2020", "z"),
    ],
)
def test_unusable_keys_are_invalid_key(method_type: str, value: str) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        parse_verification_method(method_type, value)
    assert excinfo.value.code == "invalid_key"


@pytest.mark.parametrize("did", ["did:plc:abc", "did:key:", "did:key:" + _ED25519_MULTIKEY, "zQ3sh"])
def test_bad_did_keys(did: str) -> None:
    with pytest.raises(ProtocolViolation):
        parse_did_key(did)


@settings(deadline=None, max_examples=100)
@given(st.binary(min_size=0, max_size=80), st.binary(max_size=40))
def test_random_signatures_never_raise(signature: bytes, message: bytes) -> None:
    key = parse_did_key(_load("signature-fixtures.json")[1]["publicKeyDid"])
    assert key.verify(message, signature) is False
