"""Unauthenticated: ``GET /healthz`` and ``GET /metrics``.

``/healthz`` is 200 ``{"ok": true}`` when the workers run and the database answers, else 503
``{"ok": false}``. "Answers" means: no store call failed since the last one that succeeded
(``db.failing``), and a ping answers within a second. The ping never keeps ``/healthz`` waiting longer,
however long the database's calls wait (an operator's write lock, a hung disk): see
:mod:`daemon.process.health`. While ``db.failing`` is set the answer is 503 even if the ping succeeds;
that ping's success clears ``db.failing``, so the next ``/healthz`` says 200 once the database is back,
even when nothing else calls it.
"""

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
        failing = host.db.failing is not None
        answers = await host.database_answers()
        healthy = host.engine.running and not host.engine.stopping and answers and not failing
        response = jsonify({"ok": healthy})
        response.status_code = 200 if healthy else 503
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        jobs = await run_db(store.job_counts_by_kind)
        depth = await run_db(store.queue_depth)
        text = host.metrics.render(jobs, depth, host.hosts_paused_count())
        return Response(text, status=200, content_type=CONTENT_TYPE)
