"""The records queue: ``GET /_admin/records`` and ``POST /_admin/records/ack``."""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from daemon.admin.host import AdminHost
from daemon.admin.requests import parse_ack_request, parse_page_query
from daemon.admin.responses import json_text, request_body


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the records queue routes."""
    store, run_db = host.db.store, host.db.run

    @app.get("/_admin/records")
    async def records() -> Response:
        after, limit = parse_page_query(request.args)
        rendered, cursor = await run_db(store.list_records_json, after=after, limit=limit)
        return json_text(f'{{"records":{rendered},"cursor":{"null" if cursor is None else cursor}}}')

    @app.post("/_admin/records/ack")
    async def records_ack() -> Response:
        through = parse_ack_request(await request_body())
        acked = await run_db(store.ack_records, through)
        host.engine.notify()
        return jsonify({"acked": acked})
