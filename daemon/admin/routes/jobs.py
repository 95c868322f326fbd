"""``GET /_admin/jobs`` and ``POST /_admin/jobs/retry``."""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from daemon.admin.host import AdminHost
from daemon.admin.requests import parse_jobs_query, parse_retry_request
from daemon.admin.responses import request_body


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the job routes."""
    store, run_db = host.db.store, host.db.run

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
        req = parse_retry_request(await request_body())
        requeued = await run_db(
            store.retry_jobs, now=host.wall_clock(), ids=req.ids, state=req.state, run_id=req.run_id
        )
        host.engine.notify()
        return jsonify({"requeued": requeued})
