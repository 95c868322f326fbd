"""``GET /_admin/publishers``: the durable DID cache (the seed's ``known_publishers``)."""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from daemon.admin.host import AdminHost
from daemon.admin.requests import parse_publishers_query


def register(app: QuartTrio, host: AdminHost) -> None:
    """Add the publishers route."""
    store, run_db = host.db.store, host.db.run

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
