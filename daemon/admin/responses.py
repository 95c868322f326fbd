"""Response helpers shared by the admin routes: the SPEC 5 error shape, bearer-token checks, JSON."""

from __future__ import annotations

import hmac

from quart import Response, jsonify, request

MAX_BODY_BYTES = 1024 * 1024


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The SPEC's error shape ``{"error": <Code>, "message": <text>}``."""
    response = jsonify({"error": code, "message": message})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def too_large() -> Response:
    """413 for a request body over :data:`MAX_BODY_BYTES`."""
    return error_response(413, "PayloadTooLarge", f"request body must be at most {MAX_BODY_BYTES} bytes")


def bearer_token_matches(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (scheme in any case), compared in constant time."""
    if not header:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def json_text(body: str, status: int = 200) -> Response:
    """A response whose JSON body was rendered already (by SQLite, for the records queue)."""
    return Response(body, status=status, content_type="application/json")


async def request_body() -> bytes:
    """The current request's body (Quart's limit already refused anything over :data:`MAX_BODY_BYTES`)."""
    data = await request.get_data(cache=False, as_text=False)
    return data if isinstance(data, bytes) else data.encode()
