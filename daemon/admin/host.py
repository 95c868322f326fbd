"""What the admin API needs from the running daemon: a narrow interface, so the app never imports it."""

from __future__ import annotations

from typing import Any, Protocol

from daemon.config import Config
from daemon.engine.runner import Engine
from daemon.metrics import Metrics
from daemon.store.database import Database


class AdminHost(Protocol):
    """The daemon as the admin routes see it (:class:`daemon.process.daemon.Daemon` satisfies it)."""

    config: Config
    db: Database
    engine: Engine
    metrics: Metrics
    admin_token: str | None
    started_monotonic: float

    def wall_clock(self) -> float:
        """Unix time (injected; tests drive it)."""
        ...

    def host_status(self) -> list[dict[str, Any]]:
        """Per-host in-flight requests and pause state, for ``/_admin/status``."""
        ...

    def hosts_paused_count(self) -> int:
        """How many hosts are paused now (a 429)."""
        ...

    async def database_answers(self) -> bool:
        """True when the database answered a ping within a second, however long its calls wait."""
        ...
