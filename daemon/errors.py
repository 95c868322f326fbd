"""The one exception hierarchy of backfilld, and every stable error code (:class:`Code`) in one place.

Every failure that crosses a module boundary is one of these; upstream failures (httpx, JSON decoding, bad
documents, SQLite) are mapped into it at the edge where they happen, so callers never see a foreign
exception::

    BackfillError                     base; ``code`` is a :class:`Code` (a str)
    ├── ConfigError                   config file unreadable or invalid (``problems`` lists every one)
    ├── StartupError                  the daemon cannot start: database_locked (another backfilld runs on
    │                                 it), schema_too_new, database_unusable, admin_listen_failed
    ├── AdminClientError              the CLI could not get an answer it can use from the daemon:
    │                                 admin_unreachable, admin_token_missing, admin_bad_response, or the
    │                                 daemon's own error code (Unauthorized, InvalidRequest, ...)
    ├── DemoError                     ``backfilld demo`` could not run: demo_timeout, demo_workdir
    ├── RequestValidationError        an admin request body or query that is not acceptable (HTTP 400)
    ├── SyntaxValidationError         a DID, NSID, record key, TID, AT-URI or CID that does not parse
    ├── StoreError                    the database failed while running (never fatal: the daemon retries):
    │                                 database_busy (locked past the busy timeout), database_full,
    │                                 database_io, database_error
    ├── JobError                      something that decides a job's outcome (SPEC 6.1)
    │   ├── PermanentJobError         ``failed`` at once, no retries
    │   │   ├── IdentityError         did_not_found, did_tombstoned, invalid_did_document, no_pds_service,
    │   │   │                         invalid_did, unsupported_did
    │   │   ├── AccountUnavailable    repo_not_found, repo_takendown, repo_suspended, repo_deactivated
    │   │   ├── BlockedAddress        blocked_address (non-global peer), insecure_url (http:// not allowed)
    │   │   ├── InvalidSignature      invalid_signature (after a fresh resolution), invalid_key, no_signing_key
    │   │   └── LimitExceeded         too_many_pages: a retry would repeat it exactly; crash_loop: the job
    │   │                             was running at MAX_CRASH_RECOVERIES consecutive process deaths
    │   └── TransientJobError         retried with backoff until ``max_attempts``
    │       ├── UpstreamTimeout       timeout
    │       ├── UpstreamConnectError  connect_error
    │       ├── UpstreamHTTPError     http_status (5xx and other unexpected statuses)
    │       └── ProtocolViolation     bad_response, response_too_large, page_too_large, repeated_cursor,
    │                                 not_found_mid_pagination, redirect; and the verified-mode checks:
    │                                 invalid_car, cid_mismatch, invalid_cbor, invalid_commit, invalid_mst,
    │                                 block_missing, car_too_large (the pure protocol code raises these)
    └── JobSignal                     not a failure: the engine puts the job back without judging it
        ├── RateLimited               HTTP 429: the host pauses; the job waits without spending an attempt
        ├── JobDeferred               its host is paused or saturated: back to pending at no cost
        ├── JobInterrupted            shutdown, or its run was cancelled: pending again, or cancelled
        └── JobLost                   lease_lost: the job is no longer this daemon's (its run was cancelled,
                                      or its lease expired and another daemon took it): nothing more is written

Codes that no exception class carries by default (``rate_limit_exhausted`` after too many 429 waits,
``internal_error`` for a handler that raised something unexpected) are members of :class:`Code` too, so
that ``docs/operations.md`` can list every code a job may end with from this one enumeration.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Every stable error code backfilld reports (job ``error_code``, CLI errors, start-up failures)."""

    # configuration and start-up
    CONFIG_ERROR = "config_error"
    DATABASE_LOCKED = "database_locked"
    SCHEMA_TOO_NEW = "schema_too_new"
    DATABASE_UNUSABLE = "database_unusable"
    ADMIN_LISTEN_FAILED = "admin_listen_failed"
    # the CLI and the demo
    ADMIN_CLIENT_ERROR = "admin_client_error"
    ADMIN_UNREACHABLE = "admin_unreachable"
    ADMIN_TOKEN_MISSING = "admin_token_missing"
    ADMIN_BAD_RESPONSE = "admin_bad_response"
    DEMO_ERROR = "demo_error"
    DEMO_TIMEOUT = "demo_timeout"
    DEMO_WORKDIR = "demo_workdir"
    # admin requests and identifiers
    INVALID_REQUEST = "InvalidRequest"
    INVALID_SYNTAX = "invalid_syntax"
    # identity (permanent)
    DID_NOT_FOUND = "did_not_found"
    DID_TOMBSTONED = "did_tombstoned"
    INVALID_DID_DOCUMENT = "invalid_did_document"
    NO_PDS_SERVICE = "no_pds_service"
    INVALID_DID = "invalid_did"
    UNSUPPORTED_DID = "unsupported_did"
    # the account (permanent)
    REPO_NOT_FOUND = "repo_not_found"
    REPO_TAKENDOWN = "repo_takendown"
    REPO_SUSPENDED = "repo_suspended"
    REPO_DEACTIVATED = "repo_deactivated"
    # addresses (permanent)
    BLOCKED_ADDRESS = "blocked_address"
    INSECURE_URL = "insecure_url"
    # limits a retry would hit again (permanent)
    TOO_MANY_PAGES = "too_many_pages"
    CRASH_LOOP = "crash_loop"
    # transport (transient)
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    HTTP_STATUS = "http_status"
    # verified mode: a CAR, block, commit or MST that fails a check (transient: retried)
    INVALID_CAR = "invalid_car"
    CID_MISMATCH = "cid_mismatch"
    INVALID_CBOR = "invalid_cbor"
    INVALID_COMMIT = "invalid_commit"
    INVALID_MST = "invalid_mst"
    BLOCK_MISSING = "block_missing"
    CAR_TOO_LARGE = "car_too_large"
    INVALID_RECORD = "invalid_record"
    # verified mode, permanent: the account's key cannot prove its commit
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_KEY = "invalid_key"
    NO_SIGNING_KEY = "no_signing_key"
    # protocol violations (transient)
    BAD_RESPONSE = "bad_response"
    RESPONSE_TOO_LARGE = "response_too_large"
    PAGE_TOO_LARGE = "page_too_large"
    REPEATED_CURSOR = "repeated_cursor"
    NOT_FOUND_MID_PAGINATION = "not_found_mid_pagination"
    REDIRECT = "redirect"
    # the database (never a job's outcome: the job is put back)
    DATABASE_BUSY = "database_busy"
    DATABASE_FULL = "database_full"
    DATABASE_IO = "database_io"
    DATABASE_ERROR = "database_error"
    # job signals and engine decisions
    LEASE_LOST = "lease_lost"
    RATE_LIMITED = "rate_limited"
    RATE_LIMIT_EXHAUSTED = "rate_limit_exhausted"
    DEFERRED = "deferred"
    INTERRUPTED = "interrupted"
    INTERNAL_ERROR = "internal_error"
    ERROR = "error"


class BackfillError(Exception):
    """Base of every error backfilld raises on purpose."""

    code: str = Code.ERROR

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(BackfillError):
    """The configuration could not be loaded; ``problems`` names each bad key."""

    code = Code.CONFIG_ERROR

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class StartupError(BackfillError):
    """The daemon cannot start (its database is taken, too new or unusable; its admin address is taken)."""

    code = Code.DATABASE_LOCKED


class AdminClientError(BackfillError):
    """The admin client (the CLI) failed to talk to the daemon, or the daemon refused the request.

    ``code`` is a :class:`Code` for the client's own failures, or the daemon's error name as it sent it.
    """

    code = Code.ADMIN_CLIENT_ERROR


class DemoError(BackfillError):
    """The offline demo could not complete."""

    code = Code.DEMO_ERROR


class RequestValidationError(BackfillError):
    """An admin request is malformed; ``message`` is shown to the client verbatim."""

    code = Code.INVALID_REQUEST


class SyntaxValidationError(BackfillError):
    """An AT Protocol identifier failed syntax validation."""

    code = Code.INVALID_SYNTAX


class StoreError(BackfillError):
    """The database failed (locked, full, I/O error); the call had no effect and may be retried."""

    code = Code.DATABASE_ERROR


class JobError(BackfillError):
    """An error that decides the outcome of a job."""


class PermanentJobError(JobError):
    """Retrying cannot help: the job fails at once."""


class IdentityError(PermanentJobError):
    """The DID cannot be resolved to a usable PDS."""

    code = Code.INVALID_DID_DOCUMENT


class AccountUnavailable(PermanentJobError):
    """The PDS says the repository does not exist or is not available."""

    code = Code.REPO_NOT_FOUND


class BlockedAddress(PermanentJobError):
    """The target URL or the peer address is not allowed (SSRF guard)."""

    code = Code.BLOCKED_ADDRESS


class InvalidSignature(PermanentJobError):
    """The account's signing key does not prove its commit, even after a fresh resolution (SPEC 6.1)."""

    code = Code.INVALID_SIGNATURE


class LimitExceeded(PermanentJobError):
    """A configured limit was reached in a way a retry would repeat exactly (nothing past it is written)."""

    code = Code.TOO_MANY_PAGES


class TransientJobError(JobError):
    """Might succeed later: retried with backoff."""


class UpstreamTimeout(TransientJobError):
    """A page or document did not arrive within its time budget."""

    code = Code.TIMEOUT


class UpstreamConnectError(TransientJobError):
    """The connection could not be made or broke."""

    code = Code.CONNECT_ERROR


class UpstreamHTTPError(TransientJobError):
    """An unexpected HTTP status."""

    code = Code.HTTP_STATUS

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class ProtocolViolation(TransientJobError):
    """The upstream answered something the protocol does not allow."""

    code = Code.BAD_RESPONSE


class JobSignal(BackfillError):
    """Not a failure: tells the engine to put the job back (it never counts as an error of the job)."""


class RateLimited(JobSignal):
    """HTTP 429: ``host`` pauses until ``resume_at`` (unix seconds, already capped)."""

    code = Code.RATE_LIMITED

    def __init__(self, message: str, *, host: str, resume_at: float, received: bool = True) -> None:
        super().__init__(message)
        self.host = host
        self.resume_at = resume_at
        # False when nothing was sent because the host was already paused (another job's 429): such a
        # wait is not the job's own and does not count towards its limit of rate-limit waits.
        self.received = received


class JobDeferred(JobSignal):
    """The job cannot proceed now (its host is paused or saturated); costs no attempt."""

    code = Code.DEFERRED

    def __init__(self, *, not_before: float, host: str | None) -> None:
        super().__init__(f"deferred until {not_before}")
        self.not_before = not_before
        self.host = host


class JobInterrupted(JobSignal):
    """The job stopped between pages because the daemon stops or its run was cancelled."""

    code = Code.INTERRUPTED

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)


class JobLost(JobSignal):
    """A guarded write found the job no longer running under this lease: stop, write nothing more."""

    code = Code.LEASE_LOST
