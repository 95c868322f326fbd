"""DID documents: what the PLC directory and the did:web hosts answer, with the identity hostile modes.

Two account behaviours give an account a history, told by the first request for its DID and every later
one: ``pds_moved`` (the first document names the host it moved from) and ``key_rotated`` (the first names
the key it had before). :meth:`PlcHandler.reset` / :meth:`DidWebHandler.reset` forget who asked.
"""

from __future__ import annotations

from urllib.parse import unquote

from daemon.simnet.actions import HANG, NOT_FOUND, Action, Reply, Request, json_reply
from daemon.simnet.behaviours import param_str
from daemon.simnet.ids import FOREIGN_DID, handle_for
from daemon.simnet.repos import account_public_key
from daemon.simnet.spec import Account, NetworkSpec

WELL_KNOWN_DID = "/.well-known/did.json"


def did_document(did: str, pds_url: str, multikey: str) -> dict[str, object]:
    """The DID document of a healthy account on ``pds_url`` whose signing key is ``multikey``.

    Half the accounts (by DID hash) name their PDS service ``#atproto_pds`` and the others
    ``<did>#atproto_pds``, both forms the spec accepts; did:plc documents name the key ``<did>#atproto`` as
    plc.directory does, did:web ones the relative ``#atproto``.
    """
    full_service_id = int(handle_for(did)[1:13], 16) & 1
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{handle_for(did)}"],
        "verificationMethod": [
            {
                "id": "#atproto" if did.startswith("did:web:") else f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": multikey,
            }
        ],
        "service": [
            {
                "id": f"{did}#atproto_pds" if full_service_id else "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds_url,
            }
        ],
    }


def document_action(account: Account, pds_url: str, multikey: str) -> Action:
    """What the PLC directory (or the account's did:web host) answers for the account's document."""
    did = account.did
    behaviour, params = account.behaviour, account.params
    if behaviour == "plc_404":
        return json_reply(404, {"message": f"DID not registered: {did}"})
    if behaviour == "plc_410":
        return json_reply(410, {"message": f"DID not available: {did}"})
    if behaviour == "plc_hang":
        return HANG
    if behaviour == "doc_bad_json":
        if param_str(params, "variant") == "not_object":
            return json_reply(200, [did])
        return Reply(200, b'{"id": "' + did.encode() + b'", "service": [')
    document = did_document(did, pds_url, multikey)
    if behaviour == "doc_no_pds":
        document["service"] = [
            {"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": pds_url},
        ]
    elif behaviour == "doc_wrong_id":
        document["id"] = FOREIGN_DID
    elif behaviour == "doc_pds_url":
        document["service"] = [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": param_str(params, "url"),
            }
        ]
    return json_reply(200, document)


class Documents:
    """The documents of a set of accounts, each rendered once, with the first-request history modes."""

    def __init__(self, spec: NetworkSpec, pds_urls: tuple[str, ...], accounts: list[Account]) -> None:
        self._spec = spec
        self._pds_urls = pds_urls
        self._accounts = {a.did: a for a in accounts}
        self._cache: dict[tuple[str, bool], Action] = {}
        self._asked: set[str] = set()

    def set_spec(self, spec: NetworkSpec, accounts: list[Account]) -> None:
        """Serve the (mutated) ``spec``; documents do not change with records, so the cache stays."""
        self._spec = spec
        self._accounts = {a.did: a for a in accounts}

    def reset(self) -> None:
        """Forget which DIDs were asked for (the history modes start over)."""
        self._asked.clear()

    def answer(self, did: str) -> Action | None:
        """The document action for ``did`` (None: not one of these accounts)."""
        account = self._accounts.get(did)
        if account is None:
            return None
        first = did not in self._asked
        self._asked.add(did)
        history = first and account.behaviour in ("pds_moved", "key_rotated")
        action = self._cache.get((did, history))
        if action is None:
            host = account.pds
            if history and account.behaviour == "pds_moved":
                host = self._spec.old_pds(account)
            old_key = history and account.behaviour == "key_rotated"
            multikey = account_public_key(self._spec, account, old=old_key).multikey()
            action = document_action(account, self._pds_urls[host], multikey)
            self._cache[(did, history)] = action
        return action


class PlcHandler:
    """The PLC directory: ``GET /{did}`` for every did:plc account."""

    def __init__(self, spec: NetworkSpec, pds_urls: tuple[str, ...]) -> None:
        self._documents = Documents(spec, pds_urls, self._plc_accounts(spec))

    @staticmethod
    def _plc_accounts(spec: NetworkSpec) -> list[Account]:
        return [a for a in spec.accounts if a.did.startswith("did:plc:")]

    def set_spec(self, spec: NetworkSpec) -> None:
        """Serve the (mutated) ``spec``."""
        self._documents.set_spec(spec, self._plc_accounts(spec))

    def reset(self) -> None:
        """Forget which DIDs were asked for."""
        self._documents.reset()

    def handle(self, request: Request) -> Action:
        """The account's document, or 404 for an unknown DID."""
        path = request.path
        did = unquote(path[1:]) if "%" in path else path[1:]
        action = self._documents.answer(did)
        if action is None:
            return json_reply(404, {"message": f"DID not registered: {did}"})
        return action


class DidWebHandler:
    """The host of one did:web account: ``GET /.well-known/did.json``."""

    def __init__(self, spec: NetworkSpec, account: Account, pds_urls: tuple[str, ...]) -> None:
        self._did = account.did
        self._documents = Documents(spec, pds_urls, [account])

    def set_spec(self, spec: NetworkSpec) -> None:
        """Serve the (mutated) ``spec``."""
        self._documents.set_spec(spec, [spec.account(self._did)])

    def reset(self) -> None:
        """Forget whether the document was asked for."""
        self._documents.reset()

    def handle(self, request: Request) -> Action:
        """The account's document, 404 anywhere else."""
        if request.path != WELL_KNOWN_DID:
            return NOT_FOUND
        action = self._documents.answer(self._did)
        return NOT_FOUND if action is None else action
