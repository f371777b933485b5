"""Where the library's log lines go when a stage script or the ``tlpipe`` command runs.

The library logs through :mod:`logging` and never prints; the entry points call
:func:`show_progress` once, so progress lines reach the terminal (and DVC's log)
as plain text. Stage scripts show information on stdout, as DVC users expect; the
``tlpipe`` command keeps stdout for its data (a CSV, a summary) and logs to stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def show_progress(level: int = logging.INFO, info_stream: TextIO | None = None) -> None:
    """Show tlpipe's log records, message only: WARNING and up on stderr, the rest on ``info_stream``.

    ``info_stream`` defaults to the current stdout; called again (a second stage run in
    one process, a test), it replaces the handlers it added before.
    """
    logger = logging.getLogger("tlpipe")
    for handler in list(logger.handlers):
        if getattr(handler, "_tlpipe", False):
            logger.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout if info_stream is None else info_stream)
    out.addFilter(_BelowWarning())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._tlpipe = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
