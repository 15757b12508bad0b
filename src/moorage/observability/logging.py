"""One logging setup for every moorage process (`moorage serve`, its workers, `moorage stream run`,
the other CLI commands): console lines or one JSON object a line (``observability.log_format``),
the request id of the request being handled on every line logged while handling it, and no
library noise at start-up (transformers' and huggingface_hub's progress bars, e.g. "Loading
weights", and their advisories).

The request id lives in `request_id` (a context variable): the HTTP middleware sets it for each
request (`moorage.server.edge`), error bodies carry it, spans record it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal, TextIO

request_id: ContextVar[str | None] = ContextVar("moorage_request_id", default=None)

CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"  # what ConsoleFormatter writes

_MARK = "_moorage_handler"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _logger_name(record: logging.LogRecord) -> str:
    # uvicorn logs its server messages (start, stop, errors) as "uvicorn.error": they are not errors
    return "uvicorn" if record.name == "uvicorn.error" else record.name


class ConsoleFormatter(logging.Formatter):
    """``LEVEL logger: message``, then `` [request_id=...]`` on the lines of a request."""

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = f"{record.levelname} {_logger_name(record)}: {record.message}"
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, request_id when set,
    the traceback as one string field (``exc_info``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": _logger_name(record),
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(
    level: str = "WARNING",
    log_format: Literal["console", "json"] = "console",
    moorage_level: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Log to `stream` (stderr) at `level` (moorage's own loggers at `moorage_level` if given) in `log_format`.
    Called again (the CLI first, then `serve` once its settings are known), it replaces its own
    handler and nothing else."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own logging config (a server started with it earlier in the process) gives its
    # server loggers handlers and levels of their own and stops them propagating: their lines would
    # bypass this handler. They log at moorage's level. (uvicorn.access is uvicorn's to switch.)
    for name in ("uvicorn", "uvicorn.error"):
        server_log = logging.getLogger(name)
        server_log.handlers.clear()
        server_log.setLevel(moorage_level or logging.NOTSET)
        server_log.propagate, server_log.disabled = True, False
    if moorage_level is not None:
        logging.getLogger("moorage").setLevel(moorage_level)
    quiet_libraries()


def quiet_libraries(every_tqdm_bar: bool = False) -> None:
    """No progress bars or advisories from the model libraries. `every_tqdm_bar`: also the bars
    libraries draw with tqdm directly, past their own switches (transformers' GGUF conversion,
    which `moorage demo` runs): tqdm reads ``TQDM_DISABLE`` when imported, so only a command that
    draws no tqdm bar a user wants (training does) asks for it.

    The switches are the libraries' own: huggingface_hub reads ``HF_HUB_DISABLE_PROGRESS_BARS`` when
    it is imported, and transformers takes its progress-bar default and verbosity from it and from
    ``TRANSFORMERS_VERBOSITY``, so setting them before the (lazy) import is enough; a value the
    user set is kept. A library imported already is switched through its API."""
    for name, value in (
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        *([("TQDM_DISABLE", "1")] if every_tqdm_bar else []),
    ):
        os.environ.setdefault(name, value)
    quiet_bars = os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()
        if quiet_bars:
            hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and quiet_bars:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
