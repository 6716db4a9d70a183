"""Diagnostic logging: the service's own lines and gunicorn's, as JSON on stderr.

Event lines go to stdout through ``analytics.eventlog``; everything else goes
here. Both are JSON, and ``kind`` tells them apart when a platform merges the
two streams.
"""

import logging
import sys
from typing import Any

import structlog
from gunicorn import glogging

DIAGNOSTIC = {"kind": "diagnostic"}


def _add_kind(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Mark the line as the service's own, not an analytics event."""
    event_dict.update(DIAGNOSTIC)
    return event_dict


# Steps every diagnostic line takes, from structlog or from the stdlib.
_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _add_kind,
]


def _renderer() -> Any:
    """JSON for log pipelines; colours for a person at a terminal."""
    if sys.stderr.isatty():
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer()


def configure_logging() -> None:
    """Configure structlog for diagnostic lines; call once, before the app is built."""
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, _renderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # One write() per line, newline included: print() writes the newline apart, and with
        # PYTHONUNBUFFERED (common on platforms) two workers' lines could then run together.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
    )


def gunicorn_logconfig() -> dict[str, Any]:
    """A ``logconfig_dict`` that renders gunicorn's and the stdlib's records like ours."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    logger = {"level": "INFO", "handlers": ["stderr"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": [*_SHARED, structlog.stdlib.add_logger_name],
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _renderer(),
                ],
            }
        },
        "handlers": {"stderr": handler},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        # logconfig_dict replaces whole blocks, so both of gunicorn's loggers are redefined.
        "loggers": {"gunicorn.error": logger, "gunicorn.access": logger},
    }


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, with the access log on only when asked for (``--access-logfile``).

    gunicorn turns its access log on whenever ``logconfig_dict`` is set, and we
    set that only to make its lines JSON. An access line costs about a sixth of
    a one-event request (py-spy, bench/), and nginx or the platform's router
    already logs every request. ``access_log_enabled`` is the public switch its
    workers read before building an access line.
    """

    @property
    def access_log_enabled(self) -> bool:
        return self.cfg.accesslog is not None
