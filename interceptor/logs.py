"""The daemon's and proxy's operator log: the standard `logging` module to stderr (journald
under systemd), as text or as one JSON object per line (`--log-format json`, python-json-logger).

Events that matter to an operator (start, ready, policy loaded or rejected with every problem,
enrolments, lockdown, tamper, recorder failures, approvals) are logged where they are recorded
(recorder.store.LOGGED_EVENTS); each line carries the event name, its session and its data."""

from __future__ import annotations

import json
import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

ENV = "INTERLOCK_LOG_FORMAT"  # how the daemon tells its proxy which format it chose
FORMATS = ("text", "json")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        data = getattr(record, "data", None)
        return f"{line} {json.dumps(data, sort_keys=True, default=str)}" if data else line


def setup(fmt: str, process: str) -> None:
    """Log INFO and above of `interlock.*` to stderr in `fmt` ("text" or "json"), naming `process`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    os.environ[ENV] = fmt
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                           static_fields={"process": process}))
    else:
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {process}: %(message)s"))
    log = logging.getLogger("interlock")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
