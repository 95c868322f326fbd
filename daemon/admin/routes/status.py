"""``GET /_admin/status``: version, uptime, workers, jobs by state, queue depth, hosts, lease holders.

``daemons`` lists the daemons that hold leases on running jobs (SPEC 10: on PostgreSQL the whole
cluster's; on SQLite at most this one), ``{"owner", "jobs_running", "this"}`` by owner, ``this`` marking
the daemon that answers (whose ``owner`` is also given at the top level). ``hosts`` is this daemon's own.
"""

from __future__ import annotations

import time

from quart import Response, jsonify
from quart_trio import QuartTrio

from daemon import __version__
from daemon.admin.host import AdminHost


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the status route."""
    store, run_db = host.db.store, host.db.run

    @app.get("/_admin/status")
    async def status() -> Response:
        me = host.engine.owner
        holders = await run_db(store.daemons_holding_leases)
        return jsonify(
            {
                "version": __version__,
                "uptime": round(time.monotonic() - host.started_monotonic, 3),
                "workers": {"busy": host.engine.busy, "total": host.config.daemon.workers},
                "jobs": await run_db(store.job_counts),
                "records_queue": {
                    "depth": await run_db(store.queue_depth),
                    "max": host.config.daemon.max_records_queue,
                },
                "hosts": host.host_status(),
                "owner": me,
                "daemons": [
                    {"owner": owner, "jobs_running": jobs, "this": owner == me} for owner, jobs in holders
                ],
                "stopping": host.engine.stopping,
            }
        )
