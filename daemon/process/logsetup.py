"""Logging set-up: structlog, JSON lines under systemd or when asked, a console renderer on a terminal.

Everything the process logs goes through one stdlib handler on the root logger whose formatter is
structlog's :class:`~structlog.stdlib.ProcessorFormatter`: backfilld's own structlog events and the stdlib
records of its libraries (hypercorn, quart, trio, ``warnings`` via :func:`logging.captureWarnings`) alike,
so that with ``log_format = "json"`` every line the process writes is one JSON object. Tracebacks are
rendered into the event (``"exception"``), never printed on their own. One handler means one lock and one
``write`` per record, so lines from different threads never interleave.

With ``process_errors`` (what ``backfilld run`` asks for) an exception nobody caught, in the main thread
or another one, and Python's "exception ignored" reports are logged the same way instead of being printed
as a bare traceback.

Levels: backfilld's loggers (``backfilld.*``) log at ``log_level``; other libraries' records below WARNING
are dropped whatever ``log_level`` says (hypercorn's "Running on ..." would only repeat "backfilld ready").
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_handler: logging.Handler | None = None


def choose_format(requested: str, *, stream: TextIO, environ: Mapping[str, str]) -> str:
    """``auto`` means JSON under systemd (its journal stream) or when not on a terminal, else console."""
    if requested != "auto":
        return requested
    if environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"):
        return "json"
    return "console" if stream.isatty() else "json"


def configure_logging(
    log_format: str, level: str, *, stream: TextIO | None = None, process_errors: bool = False
) -> str:
    """Route structlog and stdlib logging through one structlog-rendering handler; returns the format used.

    May be called again (the previous handler is replaced). ``process_errors`` also installs the hooks
    that log uncaught exceptions (see the module docstring).
    """
    global _handler
    out = stream or sys.stderr
    chosen = choose_format(log_format, stream=out, environ=os.environ)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if chosen == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(max(LEVELS[level], logging.WARNING))
    # structlog has filtered already; the stdlib loggers behind it must let its events through.
    logging.getLogger("backfilld").setLevel(LEVELS[level])
    logging.captureWarnings(True)
    if process_errors:
        _log_process_errors()
    return chosen


def _log_process_errors() -> None:
    log = structlog.get_logger("backfilld")

    def excepthook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        log.critical("uncaught exception", exc_info=(kind, value, traceback))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else None
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.error("uncaught exception in a thread", thread=name, exc_info=exc_info)

    def unraisablehook(unraisable: sys.UnraisableHookArgs) -> None:
        exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        log.warning(
            "exception ignored",
            message=unraisable.err_msg or "Exception ignored in",
            object=repr(unraisable.object),
            exc_info=exc_info,
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
