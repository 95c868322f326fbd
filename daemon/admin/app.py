"""The admin HTTP API (SPEC 5) as a quart-trio app.

Request checks run in this order, each answering in the SPEC's JSON error shape:

1. wrong method on a known route: 405 with ``Allow`` (before auth, as SPEC 5 asks);
2. ``/_admin/*`` only: no token configured: 503; missing or wrong bearer token: 401 with
   ``WWW-Authenticate: Bearer`` (scheme case-insensitive, token compared in constant time); so an
   unauthenticated client cannot tell which admin paths exist;
3. unknown path: 404;
4. a body over 1 MiB: 413 (by ``Content-Length`` before reading, and by Quart's body limit for
   chunked uploads);
5. the endpoint's own validation: 400 with the message from :mod:`daemon.admin.requests`.

Bodies are parsed by pure functions; this module only moves bytes, calls the store through the
serialised database hop, and shapes JSON.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from daemon import __version__
from daemon.admin.requests import (
    parse_ack_request,
    parse_backfill_request,
    parse_jobs_query,
    parse_page_query,
    parse_publishers_query,
    parse_retry_request,
)
from daemon.errors import RequestValidationError
from daemon.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from daemon.process.daemon import Daemon

MAX_BODY_BYTES = 1024 * 1024


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The SPEC's error shape ``{"error": <Code>, "message": <text>}``."""
    response = jsonify({"error": code, "message": message})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def bearer_token_matches(header: str | None, token: str) -> bool:
    """True when ``header`` is ``Bearer <token>`` (scheme in any case), compared in constant time."""
    if not header:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def create_app(daemon: Daemon) -> QuartTrio:
    """Build the admin app around a running :class:`daemon.runtime.Daemon`."""
    app = QuartTrio("backfilld.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    store = daemon.db.store
    run_db = daemon.db.run

    @app.before_request
    async def guard() -> Response | None:
        routing = request.routing_exception
        if isinstance(routing, MethodNotAllowed):
            allowed = ", ".join(sorted(routing.valid_methods or ()))
            return error_response(405, "MethodNotAllowed", "method not allowed", {"Allow": allowed})
        if request.path.startswith("/_admin/"):
            token = daemon.admin_token
            if token is None:
                return error_response(503, "AdminNotConfigured", "admin endpoints not configured")
            if not bearer_token_matches(request.headers.get("Authorization"), token):
                return error_response(401, "Unauthorized", "unauthorized", {"WWW-Authenticate": "Bearer"})
        if isinstance(routing, NotFound):
            return error_response(404, "NotFound", "not found")
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return _too_large()
        return None

    def _too_large() -> Response:
        return error_response(413, "PayloadTooLarge", f"request body must be at most {MAX_BODY_BYTES} bytes")

    @app.errorhandler(RequestValidationError)
    async def invalid(exc: RequestValidationError) -> Response:
        return error_response(400, "InvalidRequest", exc.message)

    @app.errorhandler(RequestEntityTooLarge)
    async def too_large(exc: RequestEntityTooLarge) -> Response:
        return _too_large()

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "Error").replace(" ", "")
        return error_response(code, name, (exc.name or "error").lower())

    @app.errorhandler(Exception)
    async def crashed(exc: Exception) -> Response:
        app.logger.exception("admin request failed")
        return error_response(500, "InternalServerError", "internal server error")

    async def body() -> bytes:
        data = await request.get_data(cache=False, as_text=False)
        return data if isinstance(data, bytes) else data.encode()

    @app.get("/healthz")
    async def healthz() -> Response:
        healthy = daemon.engine.running and not daemon.engine.stopping
        try:
            healthy = healthy and await run_db(store.ping)
        except Exception:
            healthy = False
        response = jsonify({"ok": healthy})
        response.status_code = 200 if healthy else 503
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        jobs = await run_db(store.job_counts_by_kind)
        depth = await run_db(store.queue_depth)
        text = daemon.metrics.render(jobs, depth, daemon.hosts_paused_count())
        return Response(text, status=200, content_type=CONTENT_TYPE)

    @app.get("/_admin/status")
    async def status() -> Response:
        return jsonify(
            {
                "version": __version__,
                "uptime": round(time.monotonic() - daemon.started_monotonic, 3),
                "workers": {"busy": daemon.engine.busy, "total": daemon.config.daemon.workers},
                "jobs": await run_db(store.job_counts),
                "records_queue": {
                    "depth": await run_db(store.queue_depth),
                    "max": daemon.config.daemon.max_records_queue,
                },
                "hosts": daemon.host_status(),
                "stopping": daemon.engine.stopping,
            }
        )

    @app.post("/_admin/backfill")
    async def backfill() -> Response:
        req = parse_backfill_request(
            await body(),
            configured_collections=daemon.config.atproto.collections,
            max_backfill_dids=daemon.config.limits.max_backfill_dids,
        )
        run_id, result = await run_db(
            store.create_run,
            mode=req.mode,
            collections=req.collections,
            dids=req.dids,
            now=daemon.wall_clock(),
        )
        daemon.engine.notify()
        response = jsonify(
            {
                "run_id": run_id,
                "mode": req.mode,
                "collections": list(req.collections),
                "dids": len(req.dids) if req.mode == "explicit" else None,
                "jobs_enqueued": result.enqueued,
                "jobs_already_queued": result.already_queued,
            }
        )
        response.status_code = 202
        return response

    @app.get("/_admin/runs")
    async def runs() -> Response:
        after, limit = parse_page_query(request.args)
        found = await run_db(store.list_runs, after=after, limit=limit)
        return jsonify(
            {"runs": [r.public() for r in found], "cursor": found[-1].id if len(found) == limit else None}
        )

    @app.get("/_admin/runs/<int:run_id>")
    async def run_detail(run_id: int) -> Response:
        found = await run_db(store.get_run, run_id)
        if found is None:
            return error_response(404, "RunNotFound", f"no run with id {run_id}")
        return jsonify(found.public())

    @app.post("/_admin/runs/<int:run_id>/cancel")
    async def run_cancel(run_id: int) -> Response:
        changed = await run_db(store.cancel_run, run_id, daemon.wall_clock())
        if changed is None:
            return error_response(404, "RunNotFound", f"no run with id {run_id}")
        interrupted = daemon.engine.cancel_run(run_id) if changed else 0
        found = await run_db(store.get_run, run_id)
        assert found is not None
        return jsonify({**found.public(), "interrupted_jobs": interrupted})

    @app.get("/_admin/jobs")
    async def jobs() -> Response:
        query = parse_jobs_query(request.args)
        found = await run_db(
            store.list_jobs, state=query.state, run_id=query.run_id, after=query.after, limit=query.limit
        )
        return jsonify(
            {
                "jobs": [j.public() for j in found],
                "cursor": found[-1].id if len(found) == query.limit else None,
            }
        )

    @app.post("/_admin/jobs/retry")
    async def jobs_retry() -> Response:
        req = parse_retry_request(await body())
        requeued = await run_db(
            store.retry_jobs, now=daemon.wall_clock(), ids=req.ids, state=req.state, run_id=req.run_id
        )
        daemon.engine.notify()
        return jsonify({"requeued": requeued})

    @app.get("/_admin/records")
    async def records() -> Response:
        after, limit = parse_page_query(request.args)
        records, cursor = await run_db(store.list_records_json, after=after, limit=limit)
        body = f'{{"records":{records},"cursor":{"null" if cursor is None else cursor}}}'
        return Response(body, status=200, content_type="application/json")

    @app.post("/_admin/records/ack")
    async def records_ack() -> Response:
        through = parse_ack_request(await body())
        acked = await run_db(store.ack_records, through)
        daemon.engine.notify()
        return jsonify({"acked": acked})

    @app.get("/_admin/publishers")
    async def publishers() -> Response:
        after, limit = parse_publishers_query(request.args)
        found = await run_db(store.list_publishers, after=after, limit=limit)
        return jsonify(
            {
                "publishers": [p.public() for p in found],
                "cursor": found[-1].did if len(found) == limit else None,
            }
        )

    return app
