"""The one exception hierarchy of backfilld.

Every failure that crosses a module boundary is one of these; upstream failures (httpx, JSON decoding, bad
documents) are mapped into it at the edge where they happen, so callers never see a foreign exception::

    BackfillError                     base; ``code`` is a short stable identifier
    ├── ConfigError                   config file unreadable or invalid (``problems`` lists every one)
    ├── DatabaseLockedError           another backfilld already runs on this database (also schema_too_new)
    ├── AdminClientError              the CLI could not get an answer it can use from the daemon:
    │                                 admin_unreachable, admin_token_missing, admin_bad_response, or the
    │                                 daemon's own error code (Unauthorized, InvalidRequest, ...)
    ├── DemoError                     ``backfilld demo`` could not run: demo_timeout, demo_workdir
    ├── RequestValidationError        an admin request body or query that is not acceptable (HTTP 400)
    ├── SyntaxValidationError         a DID, NSID, record key, TID, AT-URI or CID that does not parse
    └── JobError                      something that decides a job's outcome (SPEC 6.1)
        ├── PermanentJobError         ``failed`` at once, no retries
        │   ├── IdentityError         did_not_found, did_tombstoned, invalid_did_document, no_pds_service,
        │   │                         invalid_did, unsupported_did
        │   ├── AccountUnavailable    repo_not_found, repo_takendown, repo_suspended, repo_deactivated
        │   └── BlockedAddress        blocked_address (non-global peer), insecure_url (http:// not allowed)
        ├── TransientJobError         retried with backoff until ``max_attempts``
        │   ├── UpstreamTimeout       timeout
        │   ├── UpstreamConnectError  connect_error
        │   ├── UpstreamHTTPError     http_status (5xx and other unexpected statuses)
        │   └── ProtocolViolation     bad_response, response_too_large, page_too_large, repeated_cursor,
        │                             too_many_pages, not_found_mid_pagination, redirect
        └── RateLimited               HTTP 429: the host pauses; the job waits without spending an attempt

``RATE_LIMIT_EXHAUSTED`` is the code a job fails with after too many rate-limit waits, and
``INTERNAL_ERROR`` the code of a job whose handler raised something unexpected (a bug, retried like a
transient error so that nothing is lost).
"""

from __future__ import annotations

# Error codes that are not the code of a raised exception class instance.
RATE_LIMIT_EXHAUSTED = "rate_limit_exhausted"
INTERNAL_ERROR = "internal_error"


class BackfillError(Exception):
    """Base of every error backfilld raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(BackfillError):
    """The configuration could not be loaded; ``problems`` names each bad key."""

    code = "config_error"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class DatabaseLockedError(BackfillError):
    """Another daemon holds the database's lock file."""

    code = "database_locked"


class AdminClientError(BackfillError):
    """The admin client (the CLI) failed to talk to the daemon, or the daemon refused the request."""

    code = "admin_client_error"


class DemoError(BackfillError):
    """The offline demo could not complete."""

    code = "demo_error"


class RequestValidationError(BackfillError):
    """An admin request is malformed; ``message`` is shown to the client verbatim."""

    code = "InvalidRequest"


class SyntaxValidationError(BackfillError):
    """An AT Protocol identifier failed syntax validation."""

    code = "invalid_syntax"


class JobError(BackfillError):
    """An error that decides the outcome of a job."""


class PermanentJobError(JobError):
    """Retrying cannot help: the job fails at once."""


class IdentityError(PermanentJobError):
    """The DID cannot be resolved to a usable PDS."""

    code = "invalid_did_document"


class AccountUnavailable(PermanentJobError):
    """The PDS says the repository does not exist or is not available."""

    code = "repo_not_found"


class BlockedAddress(PermanentJobError):
    """The target URL or the peer address is not allowed (SSRF guard)."""

    code = "blocked_address"


class TransientJobError(JobError):
    """Might succeed later: retried with backoff."""


class UpstreamTimeout(TransientJobError):
    """A page or document did not arrive within its time budget."""

    code = "timeout"


class UpstreamConnectError(TransientJobError):
    """The connection could not be made or broke."""

    code = "connect_error"


class UpstreamHTTPError(TransientJobError):
    """An unexpected HTTP status."""

    code = "http_status"

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class ProtocolViolation(TransientJobError):
    """The upstream answered something the protocol does not allow."""

    code = "bad_response"


class RateLimited(JobError):
    """HTTP 429: ``host`` pauses until ``resume_at`` (unix seconds, already capped)."""

    code = "rate_limited"

    def __init__(self, message: str, *, host: str, resume_at: float, received: bool = True) -> None:
        super().__init__(message)
        self.host = host
        self.resume_at = resume_at
        # False when nothing was sent because the host was already paused (another job's 429): such a
        # wait is not the job's own and does not count towards its limit of rate-limit waits.
        self.received = received
