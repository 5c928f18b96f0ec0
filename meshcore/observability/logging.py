"""structlog configured for JSON lines on stdout, one object per event."""

from __future__ import annotations

import logging

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        # No file named: each logger writes to sys.stdout as it is when the logger is made, so
        # a stdout replaced later (a test's capture, a redirected child) is followed.
        logger_factory=structlog.WriteLoggerFactory(),
        cache_logger_on_first_use=False,
    )
