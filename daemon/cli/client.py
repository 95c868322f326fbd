"""The admin HTTP client the ``backfilld`` command line uses (SPEC 5), synchronous httpx.

The CLI is not a trio program: it makes a handful of requests and exits, so a plain blocking client is
the simplest robust choice. The daemon's address and token come from the same ``config.toml`` the daemon
reads (``admin.listen``; ``$BACKFILLD_ADMIN_TOKEN``, else the contents of ``admin.token_file``). The client
never creates the token file: only the daemon does, at its first start.

Every failure is a :class:`~daemon.errors.AdminClientError` whose ``message`` is one line an operator can act
on, and whose ``code`` is ``admin_unreachable``, ``admin_token_missing``, ``admin_bad_response`` or the
``error`` code the daemon answered with (``Unauthorized``, ``AdminNotConfigured``, ``InvalidRequest``,
``RunNotFound``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon import __version__
from daemon.config import TOKEN_ENV, Config
from daemon.errors import AdminClientError, Code

DEFAULT_TIMEOUT = 10.0
# Any host name works over a unix socket; this one shows up in the daemon's request logs.
UNIX_BASE_URL = "http://backfilld"


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    """Where the admin API listens: a base URL, plus the socket path for ``unix:PATH`` listeners."""

    base_url: str
    uds: str | None
    display: str


@dataclass(frozen=True, slots=True)
class AdminToken:
    """The bearer token (None: send none; the daemon says if it wants one) and where it came from."""

    value: str | None
    source: str


def admin_endpoint(listen: str) -> AdminEndpoint:
    """The endpoint a client connects to for ``admin.listen``.

    ``unix:PATH`` is a unix socket; ``HOST:PORT`` is TCP, where a wildcard host (``0.0.0.0``, ``::``) means
    the same machine's loopback address.
    """
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        return AdminEndpoint(UNIX_BASE_URL, path, listen)
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    if bare in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif bare == "::":
        host = "[::1]"
    elif ":" in bare:
        host = f"[{bare}]"
    return AdminEndpoint(f"http://{host}:{port}", None, f"{host}:{port}")


def endpoint_from_url(url: str) -> AdminEndpoint:
    """The endpoint for an ``http://HOST:PORT`` URL (what the daemon reports once it listens)."""
    if url.startswith("unix:"):
        return admin_endpoint(url)
    return AdminEndpoint(url.rstrip("/"), None, url.removeprefix("http://").rstrip("/"))


def read_admin_token(token_file: Path | None, environ: Mapping[str, str] | None = None) -> AdminToken:
    """The token to present: ``$BACKFILLD_ADMIN_TOKEN``, else the token file's contents.

    A configured token file that does not exist or cannot be read is an error (``admin_token_missing``)
    rather than a request sure to be refused; ``token_file = ""`` means the daemon has admin disabled,
    so no token is sent and the daemon's 503 explains it.
    """
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return AdminToken(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    if token_file is None:
        return AdminToken(None, "admin.token_file (disabled)")
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise AdminClientError(
            f"no admin token: ${TOKEN_ENV} is not set and {token_file} does not exist "
            "(the daemon creates it at its first start)",
            code=Code.ADMIN_TOKEN_MISSING,
        ) from None
    except PermissionError:
        raise AdminClientError(
            f"cannot read the admin token file {token_file} (permission denied); run as a user who may "
            f"read it (root, under systemd's DynamicUser) or set ${TOKEN_ENV}",
            code=Code.ADMIN_TOKEN_MISSING,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminClientError(
            f"cannot read the admin token file {token_file} ({exc})", code=Code.ADMIN_TOKEN_MISSING
        ) from None
    return AdminToken(text or None, str(token_file))


class AdminClient:
    """A blocking client of one daemon's admin API. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        endpoint: AdminEndpoint,
        token: AdminToken,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._token = token
        if transport is None and endpoint.uds is not None:
            transport = httpx.HTTPTransport(uds=endpoint.uds)
        headers = {"User-Agent": f"backfilld-cli/{__version__}"}
        if token.value is not None:
            headers["Authorization"] = f"Bearer {token.value}"
        self._http = httpx.Client(
            base_url=endpoint.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    @classmethod
    def from_config(cls, config: Config, *, environ: Mapping[str, str] | None = None) -> AdminClient:
        """A client for the daemon that ``config`` describes."""
        return cls(admin_endpoint(config.admin.listen), read_admin_token(config.admin.token_file, environ))

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- the endpoints --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /_admin/status``."""
        return self._call("GET", "/_admin/status")

    def backfill(
        self, *, dids: Sequence[str] = (), collections: Sequence[str] = (), full: bool = False
    ) -> dict[str, Any]:
        """``POST /_admin/backfill``: explicit mode with ``dids``, else discover; maybe fewer collections;
        ``full`` writes a create for every record found, whatever was delivered before."""
        body: dict[str, Any] = {}
        if dids:
            body["dids"] = list(dids)
        if collections:
            body["collections"] = list(collections)
        if full:
            body["full"] = True
        return self._call("POST", "/_admin/backfill", body=body)

    def run(self, run_id: int) -> dict[str, Any]:
        """``GET /_admin/runs/<id>``."""
        return self._call("GET", f"/_admin/runs/{run_id}")

    def jobs(
        self, *, state: str | None = None, run_id: int | None = None, after: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        """One page of ``GET /_admin/jobs`` (``{"jobs": [...], "cursor": ...}``)."""
        params: dict[str, str | int] = {"after": after, "limit": limit}
        if state is not None:
            params["state"] = state
        if run_id is not None:
            params["run_id"] = run_id
        return self._call("GET", "/_admin/jobs", params=params)

    def retry(
        self, *, ids: Sequence[int] = (), state: str | None = None, run_id: int | None = None
    ) -> dict[str, Any]:
        """``POST /_admin/jobs/retry`` with job ``ids``, or every job in ``state`` (of run ``run_id``)."""
        body: dict[str, Any]
        if ids:
            body = {"ids": list(ids)}
        else:
            body = {"state": state or "failed"}
            if run_id is not None:
                body["run_id"] = run_id
        return self._call("POST", "/_admin/jobs/retry", body=body)

    def records(self, *, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of ``GET /_admin/records`` (``{"records": [...], "cursor": ...}``)."""
        return self._call("GET", "/_admin/records", params={"after": after, "limit": limit})

    def ack(self, through: int) -> dict[str, Any]:
        """``POST /_admin/records/ack``: delete records with id <= ``through``."""
        return self._call("POST", "/_admin/records/ack", body={"through": through})

    # -- plumbing -------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        where = self.endpoint.display
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.TimeoutException:
            raise AdminClientError(
                f"the admin API at {where} did not answer within {self._http.timeout.read}s",
                code=Code.ADMIN_UNREACHABLE,
            ) from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise AdminClientError(
                f"cannot reach the admin API at {where} ({reason}); is backfilld running?",
                code=Code.ADMIN_UNREACHABLE,
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not 200 <= response.status_code < 300:
            raise self._error(response.status_code, data)
        if not isinstance(data, dict):
            raise AdminClientError(
                f"the admin API at {where} answered {path} with something that is not a JSON object",
                code=Code.ADMIN_BAD_RESPONSE,
            )
        return data

    def _error(self, status: int, data: object) -> AdminClientError:
        where = self.endpoint.display
        code = message = None
        if isinstance(data, dict):
            code, message = data.get("error"), data.get("message")
        code = code if isinstance(code, str) else f"HTTP{status}"
        message = " ".join(message.split()) if isinstance(message, str) else "no error message"
        if status == 401:
            return AdminClientError(
                f"the daemon at {where} rejected the admin token (401 Unauthorized); "
                f"the token was taken from {self._token.source}",
                code=code,
            )
        if status == 503 and code == "AdminNotConfigured":
            return AdminClientError(
                f"the daemon at {where} has its admin API disabled (503 AdminNotConfigured): "
                f"give it an admin.token_file or ${TOKEN_ENV} and restart it",
                code=code,
            )
        if status == 400:
            return AdminClientError(f"the daemon refused the request: {message}", code=code)
        return AdminClientError(f"the admin API at {where} answered {status} {code}: {message}", code=code)
