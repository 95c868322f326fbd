"""structlog set-up: JSON lines under systemd or when asked, a console renderer on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def choose_format(requested: str, *, stream: TextIO, environ: Mapping[str, str]) -> str:
    """``auto`` means JSON under systemd (its journal stream) or when not on a terminal, else console."""
    if requested != "auto":
        return requested
    if environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"):
        return "json"
    return "console" if stream.isatty() else "json"


def configure_logging(log_format: str, level: str, *, stream: TextIO | None = None) -> str:
    """Configure structlog (and stdlib logging, for hypercorn) once per process; returns the format used."""
    out = stream or sys.stderr
    chosen = choose_format(log_format, stream=out, environ=os.environ)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if chosen == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(LEVELS[level], logging.WARNING), stream=out, format="%(name)s: %(message)s")
    return chosen
