"""Unauthenticated: ``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

from quart import Response, jsonify
from quart_trio import QuartTrio

from daemon.admin.host import AdminHost
from daemon.metrics import CONTENT_TYPE


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the health and metrics routes."""
    store, run_db = host.db.store, host.db.run

    @app.get("/healthz")
    async def healthz() -> Response:
        healthy = host.engine.running and not host.engine.stopping
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
        text = host.metrics.render(jobs, depth, host.hosts_paused_count())
        return Response(text, status=200, content_type=CONTENT_TYPE)
