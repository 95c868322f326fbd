"""The admin HTTP API (SPEC 5) as a quart-trio app: the request checks every route shares, then the routes.

Request checks run in this order, each answering in the SPEC's JSON error shape:

1. wrong method on a known route: 405 with ``Allow`` (before auth, as SPEC 5 asks);
2. ``/_admin/*`` only: no token configured: 503; missing or wrong bearer token: 401 with
   ``WWW-Authenticate: Bearer`` (scheme case-insensitive, token compared in constant time); so an
   unauthenticated client cannot tell which admin paths exist;
3. unknown path: 404;
4. a body over 1 MiB: 413 (by ``Content-Length`` before reading, and by Quart's body limit for
   chunked uploads);
5. the endpoint's own validation: 400 with the message from :mod:`daemon.admin.requests`.

A route whose store call fails (the database locked past its busy timeout, full, an I/O error) answers
``503 {"error": "DatabaseUnavailable", "message": <what failed>}``: the request may be retried, and the
daemon goes on. Anything else unexpected is a 500 with the traceback in the log.

Bodies are parsed by pure functions; the routes (:mod:`daemon.admin.routes`, one module per resource) only
move bytes, call the store through the serialised database hop, and shape JSON.
"""

from __future__ import annotations

import structlog
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from daemon.admin.host import AdminHost
from daemon.admin.responses import MAX_BODY_BYTES, bearer_token_matches, error_response, too_large
from daemon.admin.routes import health, jobs, publishers, records, runs, status
from daemon.errors import RequestValidationError, StoreError

log = structlog.get_logger("backfilld.admin")


def create_app(host: AdminHost) -> QuartTrio:
    """Build the admin app around a running daemon."""
    app = QuartTrio("backfilld.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

    @app.before_request
    async def guard() -> Response | None:
        routing = request.routing_exception
        if isinstance(routing, MethodNotAllowed):
            allowed = ", ".join(sorted(routing.valid_methods or ()))
            return error_response(405, "MethodNotAllowed", "method not allowed", {"Allow": allowed})
        if request.path.startswith("/_admin/"):
            token = host.admin_token
            if token is None:
                return error_response(503, "AdminNotConfigured", "admin endpoints not configured")
            if not bearer_token_matches(request.headers.get("Authorization"), token):
                return error_response(401, "Unauthorized", "unauthorized", {"WWW-Authenticate": "Bearer"})
        if isinstance(routing, NotFound):
            return error_response(404, "NotFound", "not found")
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return too_large()
        return None

    @app.errorhandler(RequestValidationError)
    async def invalid(exc: RequestValidationError) -> Response:
        return error_response(400, "InvalidRequest", exc.message)

    @app.errorhandler(RequestEntityTooLarge)
    async def entity_too_large(exc: RequestEntityTooLarge) -> Response:
        return too_large()

    @app.errorhandler(StoreError)
    async def database_unavailable(exc: StoreError) -> Response:
        log.warning(
            "admin request failed: database failing",
            method=request.method,
            path=request.path,
            error_code=exc.code,
            error=exc.message,
        )
        return error_response(503, "DatabaseUnavailable", exc.message)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "Error").replace(" ", "")
        return error_response(code, name, (exc.name or "error").lower())

    @app.errorhandler(Exception)
    async def crashed(exc: Exception) -> Response:
        # through stdlib logging (quart's app logger), rendered by structlog like every other record
        app.logger.exception("admin request crashed: %s %s", request.method, request.path)
        return error_response(500, "InternalServerError", "internal server error")

    for routes in (health, status, runs, jobs, records, publishers):
        routes.register(app, host)
    return app
