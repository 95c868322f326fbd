"""daemon.atproto.diddoc: DID -> document URL, and DID document -> PDS and signing key (SPEC 6 step 1)."""

from __future__ import annotations

import pytest

from daemon.atproto.diddoc import DidIdentity, did_document_url, parse_did_document
from daemon.errors import BlockedAddress, IdentityError

DID = "did:plc:7iza6de2dwap2sbkpav7c6c6"
PLC = "https://plc.directory"
KEY = "zQ3shZc2QzApp2oymGvQbzP8eKheVshBHbU4ZYjeXqwSKEn6N"


def document(
    did: str = DID,
    *,
    endpoint: object = "https://pds.example.com",
    service_id: str = "#atproto_pds",
    service_type: object = "AtprotoPersonalDataServer",
    key_id: str = "#atproto",
    key: object = KEY,
) -> dict[str, object]:
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": ["at://alice.example.com"],
        "verificationMethod": [
            {"id": key_id, "type": "Multikey", "controller": did, "publicKeyMultibase": key},
        ],
        "service": [{"id": service_id, "type": service_type, "serviceEndpoint": endpoint}],
    }


def parse(doc: object, *, allow_http: bool = False, did: str = DID) -> DidIdentity:
    return parse_did_document(did, doc, allow_http=allow_http)


# -- did_document_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "directory", ["https://plc.directory", "https://plc.directory/", "http://127.0.0.1:2582/"]
)
def test_plc_url(directory: str) -> None:
    assert (
        did_document_url(DID, plc_directory=directory, allow_private=False)
        == f"{directory.rstrip('/')}/{DID}"
    )


@pytest.mark.parametrize(
    ("did", "url"),
    [
        ("did:web:example.com", "https://example.com/.well-known/did.json"),
        ("did:web:Sub.Example.COM", "https://sub.example.com/.well-known/did.json"),
        ("did:web:pds.test", "https://pds.test/.well-known/did.json"),
        ("did:web:localhost", "https://localhost/.well-known/did.json"),
    ],
)
def test_web_url(did: str, url: str) -> None:
    assert did_document_url(did, plc_directory=PLC, allow_private=False) == url


@pytest.mark.parametrize("did", ["did:web:localhost%3A1234", "did:web:localhost%3a1234"])
def test_web_localhost_port_needs_allow_private(did: str) -> None:
    assert did_document_url(did, plc_directory=PLC, allow_private=True) == (
        "http://localhost:1234/.well-known/did.json"
    )
    with pytest.raises(BlockedAddress) as info:
        did_document_url(did, plc_directory=PLC, allow_private=False)
    assert info.value.code == "insecure_url"


@pytest.mark.parametrize(
    ("did", "code"),
    [
        ("did:key:zQ3shZc2QzApp2oymGvQbzP8eKheVshBHbU4ZYjeXqwSKEn6N", "unsupported_did"),
        ("did:ethr:0xb9c5714089478a327f09197987f16f9e5d936e8a", "unsupported_did"),
        ("did:web:example.com:user:alice", "unsupported_did"),
        ("did:web:example.com%3A8443", "unsupported_did"),
        ("did:web:laptop.local", "unsupported_did"),
        ("did:web:thing.arpa", "unsupported_did"),
        ("did:web:alice.example", "unsupported_did"),
        ("did:web:foo.localhost", "unsupported_did"),
        ("did:web:x.onion", "unsupported_did"),
        ("not a did", "invalid_did"),
        ("did:plc:", "invalid_did"),
        ("DID:plc:7iza6de2dwap2sbkpav7c6c6", "invalid_did"),
        ("did:plc:7iza6de2dwap2sbkpav7c6c", "invalid_did"),
        ("did:plc:7iza6de2dwap2sbkpav7c6c6a", "invalid_did"),
        ("did:plc:7IZA6DE2DWAP2SBKPAV7C6C6", "invalid_did"),
        ("did:plc:7iza6de2dwap2sbkpav7c6c1", "invalid_did"),
        ("did:plc:..%2F..%2Fadmin", "invalid_did"),
        ("did:web:127.0.0.1", "invalid_did"),
        ("did:web:example", "invalid_did"),
        ("did:web:-bad-.com", "invalid_did"),
        ("did:web:exa_mple.com", "invalid_did"),
        ("did:web:example.com%2Fpath", "invalid_did"),
        ("did:web:%3A80", "invalid_did"),
        ("did:web:localhost%3A0", "invalid_did"),
        ("did:web:localhost%3A65536", "invalid_did"),
        ("did:web:localhost%3A", "invalid_did"),
        ("did:web:localhost%3Aabc", "invalid_did"),
    ],
)
def test_document_url_rejects(did: str, code: str) -> None:
    with pytest.raises(IdentityError) as info:
        did_document_url(did, plc_directory=PLC, allow_private=True)
    assert info.value.code == code


# -- parse_did_document ------------------------------------------------------------------------------------


def test_valid_document() -> None:
    assert parse(document()) == DidIdentity(DID, "https://pds.example.com", KEY, "#atproto")


def test_full_ids_are_accepted() -> None:
    doc = document(service_id=f"{DID}#atproto_pds", key_id=f"{DID}#atproto")
    assert parse(doc) == DidIdentity(DID, "https://pds.example.com", KEY, f"{DID}#atproto")


@pytest.mark.parametrize(
    ("endpoint", "pds"),
    [
        ("https://pds.example.com/", "https://pds.example.com"),
        ("https://pds.example.com///", "https://pds.example.com"),
        ("HTTPS://PDS.Example.com", "https://pds.example.com"),
        ("https://pds.example.com:8443", "https://pds.example.com:8443"),
        ("https://pds.example.com/base/", "https://pds.example.com/base"),
        ("https://203.0.113.9", "https://203.0.113.9"),
        ("https://[2001:db8::1]:443/", "https://[2001:db8::1]:443"),
        ("https://localhost", "https://localhost"),
    ],
)
def test_endpoint_is_normalised(endpoint: str, pds: str) -> None:
    assert parse(document(endpoint=endpoint)).pds == pds


@pytest.mark.parametrize(
    "endpoint",
    [
        None,
        5,
        ["https://pds.example.com"],
        {"uri": "https://pds.example.com"},
        "",
        "pds.example.com",
        "//pds.example.com",
        "ftp://pds.example.com",
        "wss://pds.example.com",
        "file:///etc/passwd",
        "https://",
        "https:///path",
        "https://user:pw@pds.example.com",
        "https://@pds.example.com",
        "https://pds.example.com?x=1",
        "https://pds.example.com/?",
        "https://pds.example.com#frag",
        "https://pds.example.com/#",
        "https://pds.example.com:",
        "https://pds.example.com:0",
        "https://pds.example.com:65536",
        "https://pds.example.com:port",
        "https://pds example.com",
        "https://pds.example.com/a b",
        "https://pds.example.com\n",
        "\thttps://pds.example.com",
        "https://pds\t.example.com",
        "https://pdś.example.com",
        "https://pds..example.com",
        "https://-pds.example.com",
        "https://[::1",
        "https://[zz::1]",
        "https://" + "a" * 3000 + ".com",
    ],
)
def test_unacceptable_endpoint_is_no_pds_service(endpoint: object) -> None:
    with pytest.raises(IdentityError) as info:
        parse(document(endpoint=endpoint), allow_http=True)
    assert info.value.code == "no_pds_service"


def test_http_endpoint_needs_allow_http() -> None:
    doc = document(endpoint="http://127.0.0.1:2583/")
    assert parse(doc, allow_http=True).pds == "http://127.0.0.1:2583"
    with pytest.raises(BlockedAddress) as info:
        parse(doc, allow_http=False)
    assert info.value.code == "insecure_url"


@pytest.mark.parametrize("doc", [None, [], "doc", 1, True])
def test_document_must_be_an_object(doc: object) -> None:
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "invalid_did_document"


@pytest.mark.parametrize("doc_id", [None, "", "did:plc:ewvi7nxzyoun6zhxrhs64oiz", DID.upper(), DID + " ", 5])
def test_id_must_equal_the_did(doc_id: object) -> None:
    doc = document()
    doc["id"] = doc_id
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "invalid_did_document"


def test_missing_id_is_invalid() -> None:
    doc = document()
    del doc["id"]
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "invalid_did_document"


@pytest.mark.parametrize("services", [{}, "x", 1, {"id": "#atproto_pds"}])
def test_service_not_an_array_is_invalid_document(services: object) -> None:
    doc = document()
    doc["service"] = services
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "invalid_did_document"


@pytest.mark.parametrize(
    "services",
    [
        [],
        [None, "x", 1],
        [{"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": "https://l.example.com"}],
        [{"id": "#other", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://p.example.com"}],
        [{"id": "did:plc:ewvi7nxzyoun6zhxrhs64oiz#atproto_pds", "type": "AtprotoPersonalDataServer",
          "serviceEndpoint": "https://p.example.com"}],
        [{"id": "atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://p.example.com"}],
        [{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": "https://p.example.com"}],
        [{"id": "#atproto_pds", "serviceEndpoint": "https://p.example.com"}],
    ],
)  # fmt: skip
def test_no_usable_pds_service(services: list[object]) -> None:
    doc = document()
    doc["service"] = services
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "no_pds_service"


def test_missing_service_is_no_pds_service() -> None:
    doc = document()
    del doc["service"]
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "no_pds_service"


def test_first_atproto_pds_service_decides() -> None:
    doc = document()
    doc["service"] = [
        {"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": "https://l.example.com"},
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://one.example"},
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://two.example"},
    ]
    assert parse(doc).pds == "https://one.example"
    doc["service"] = [
        {"id": "#atproto_pds", "type": "Wrong", "serviceEndpoint": "https://one.example"},
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://two.example"},
    ]
    with pytest.raises(IdentityError) as info:
        parse(doc)
    assert info.value.code == "no_pds_service"


@pytest.mark.parametrize(
    "key",
    [None, 5, "", "z", "Q3shZc2Qz", "zQ3sh0OIl", "z" + "a" * 300, {"k": KEY}, [KEY]],
)
def test_missing_or_malformed_signing_key_is_none(key: object) -> None:
    identity = parse(document(key=key))
    assert identity.signing_key is None
    assert identity.signing_key_id is None
    assert identity.pds == "https://pds.example.com"


@pytest.mark.parametrize(
    "methods", [None, {}, "x", [], [None, 1], [{"id": "#other", "publicKeyMultibase": KEY}]]
)
def test_verification_method_absent_or_unmatched(methods: object) -> None:
    doc = document()
    doc["verificationMethod"] = methods
    assert parse(doc).signing_key is None


def test_verification_method_missing_entirely() -> None:
    doc = document()
    del doc["verificationMethod"]
    assert parse(doc) == DidIdentity(DID, "https://pds.example.com", None, None)


def test_did_web_document() -> None:
    did = "did:web:example.com"
    assert parse(document(did), did=did).pds == "https://pds.example.com"
