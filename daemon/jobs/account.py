"""When a PDS says an account is not there (SPEC 6.1): which account error it names, and why.

A listRecords or sync request answered 400 with ``RepoNotFound``/``RepoTakendown``/``RepoSuspended``/
``RepoDeactivated``, or ``InvalidRequest`` "Could not find repo" (what the reference PDS says for
deactivated, taken-down and deleted accounts alike), means the account is unavailable. Before the job
concludes anything the DID is resolved afresh (the account may have moved to another PDS); if it has not
moved, ``com.atproto.sync.getRepoStatus`` names the precise reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.atproto.diddoc import DidIdentity
from daemon.errors import AccountUnavailable, Code, ProtocolViolation, UpstreamHTTPError
from daemon.jobs.resolver import Resolver
from daemon.net.fetch import Fetcher, Response, origin_key

GET_REPO_STATUS = "/xrpc/com.atproto.sync.getRepoStatus"

# PDS error names that say the account is gone or unavailable.
ACCOUNT_ERRORS: Mapping[str, Code] = {
    "RepoNotFound": Code.REPO_NOT_FOUND,
    "RepoTakendown": Code.REPO_TAKENDOWN,
    "RepoSuspended": Code.REPO_SUSPENDED,
    "RepoDeactivated": Code.REPO_DEACTIVATED,
}
# getRepoStatus ``status`` values of an inactive account.
STATUS_CODES: Mapping[str, Code] = {
    "takendown": Code.REPO_TAKENDOWN,
    "suspended": Code.REPO_SUSPENDED,
    "deactivated": Code.REPO_DEACTIVATED,
    "deleted": Code.REPO_NOT_FOUND,
}


def account_error(response: Response) -> tuple[AccountUnavailable, bool] | None:
    """The account error a 400 response names, if it names one, and whether it names the precise reason
    (the reference PDS's "Could not find repo" does not: only getRepoStatus knows)."""
    if response.status != 400:
        return None
    try:
        body = response.json()
    except ProtocolViolation:
        return None
    if not isinstance(body, dict):
        return None
    name, message = body.get("error"), body.get("message")
    text = message if isinstance(message, str) else ""
    if isinstance(name, str) and name in ACCOUNT_ERRORS:
        return AccountUnavailable(f"PDS says {name}: {text[:200]}", code=ACCOUNT_ERRORS[name]), True
    if name == "InvalidRequest" and "could not find repo" in text.lower():
        return AccountUnavailable(f"PDS says InvalidRequest: {text[:200]}", code=Code.REPO_NOT_FOUND), False
    return None


async def repo_status(
    fetcher: Fetcher, pds: str, did: str, *, timeout: float, fallback: AccountUnavailable
) -> AccountUnavailable:
    """Ask the PDS's ``getRepoStatus`` why ``did`` is unavailable.

    A PDS without the method (404/501) leaves ``fallback`` as the answer; a 5xx, a timeout or an account
    it calls active raises a transient error, so the job is retried rather than failed on a guess.
    """
    response = await fetcher.get_json(
        pds + GET_REPO_STATUS, params={"did": did}, timeout=timeout, host_class="pds", max_bytes=65_536
    )
    named = account_error(response)
    if named is not None:
        return AccountUnavailable(f"getRepoStatus: {named[0].message}", code=named[0].code)
    if response.status in (404, 501) or (response.status == 400 and not_implemented(response)):
        return fallback
    if not 200 <= response.status < 300:
        raise UpstreamHTTPError(f"getRepoStatus answered HTTP {response.status}", status=response.status)
    body = response.json()
    if not isinstance(body, dict):
        raise ProtocolViolation("getRepoStatus body is not an object")
    status = body.get("status")
    if body.get("active") is False:
        code = STATUS_CODES.get(status) if isinstance(status, str) else None
        reason = status if isinstance(status, str) else "inactive"
        return AccountUnavailable(f"the account is {reason[:50]} (getRepoStatus)", code=code or fallback.code)
    raise ProtocolViolation(
        "the PDS lists no repo for the account, yet getRepoStatus calls it active", code=Code.BAD_RESPONSE
    )


def not_implemented(response: Response) -> bool:
    """Whether a 400 says the PDS does not implement the method (old or minimal PDSes)."""
    try:
        body = response.json()
    except ProtocolViolation:
        return False
    return isinstance(body, dict) and body.get("error") in ("MethodNotImplemented", "XRPCNotSupported")


class AccountMoved(Exception):
    """The fresh DID document names another PDS: continue there."""

    def __init__(self, identity: DidIdentity) -> None:
        super().__init__(identity.pds)
        self.identity = identity


async def unavailable_account(
    fetcher: Fetcher,
    resolver: Resolver,
    did: str,
    pds: str,
    response: Response,
    *,
    timeout: float,
) -> None:
    """If ``response`` says the account is not there, resolve the DID afresh and raise what is true.

    Raises :class:`AccountMoved` when the account now lives on another PDS, else the
    :class:`AccountUnavailable` that the PDS (or its getRepoStatus) names. Returns when the response is no
    account error at all.
    """
    answer = account_error(response)
    if answer is None:
        return
    error, named = answer
    identity = await resolver.resolve(did, fresh=True)
    if origin_key(identity.pds) != origin_key(pds):
        raise AccountMoved(identity)
    if named:
        raise error
    raise await repo_status(fetcher, pds, did, timeout=timeout, fallback=error)
