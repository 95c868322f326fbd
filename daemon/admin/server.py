"""The admin HTTP server: hypercorn on trio, started with ``nursery.start`` so that ready means listening."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio


def hypercorn_config(listen: str) -> HypercornConfig:
    """A hypercorn config for ``listen`` (``HOST:PORT`` or ``unix:PATH``), logging through stdlib logging.

    Its error log is the ``hypercorn.error`` logger, which the root handler renders through structlog
    (:mod:`daemon.process.logsetup`) at WARNING and above: its "Running on ..." would repeat "backfilld ready".
    """
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 5.0
    config.include_server_header = False
    return config


async def serve_admin(
    app: QuartTrio,
    listen: str,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until ``shutdown_trigger`` returns; reports the bound addresses."""
    if listen.startswith("unix:"):
        path = Path(listen.removeprefix("unix:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a killed daemon would make bind fail; the instance lock says nobody uses it.
        if path.is_socket():
            path.unlink()
    config = hypercorn_config(listen)
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
    if listen.startswith("unix:"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.removeprefix("unix:"))
