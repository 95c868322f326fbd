"""``POST /_admin/backfill`` and the runs it creates: list, detail, cancel."""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from daemon.admin.host import AdminHost
from daemon.admin.requests import is_row_id, parse_backfill_request, parse_page_query
from daemon.admin.responses import error_response, request_body


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the backfill and run routes."""
    store, run_db = host.db.store, host.db.run

    @app.post("/_admin/backfill")
    async def backfill() -> Response:
        req = parse_backfill_request(
            await request_body(),
            configured_collections=host.config.atproto.collections,
            max_backfill_dids=host.config.limits.max_backfill_dids,
        )
        run_id, result = await run_db(
            store.create_run,
            mode=req.mode,
            collections=req.collections,
            dids=req.dids,
            now=host.wall_clock(),
            full=req.full,
            ordered=host.config.sync.ordered_collections,
        )
        host.engine.notify()
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
        # an id past SQLite's integer range names no run (and would not fit a query parameter)
        found = await run_db(store.get_run, run_id) if is_row_id(run_id) else None
        if found is None:
            return error_response(404, "RunNotFound", f"no run with id {run_id}")
        return jsonify(found.public())

    @app.post("/_admin/runs/<int:run_id>/cancel")
    async def run_cancel(run_id: int) -> Response:
        if not is_row_id(run_id):
            return error_response(404, "RunNotFound", f"no run with id {run_id}")
        changed = await run_db(store.cancel_run, run_id, host.wall_clock())
        if changed is None:
            return error_response(404, "RunNotFound", f"no run with id {run_id}")
        interrupted = host.engine.cancel_run(run_id) if changed else 0
        found = await run_db(store.get_run, run_id)
        assert found is not None
        return jsonify({**found.public(), "interrupted_jobs": interrupted})
