"""Logging for every process: structlog, JSON lines by default, console on a TTY or
when asked; stdlib logging (aiohttp, asyncio, nats) goes through the same renderer.
Secrets and payloads never reach a line: fields with sensitive names are replaced and
known secret shapes (``whsec_...``, bearer tokens, URL passwords) are masked inside any
string value."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

# Logging ------------------------------------------------------------------------

REDACTED = "[redacted]"
# Field names whose values never reach a log line ...
REDACTED_KEYS = frozenset(
    {"secret", "secrets", "password", "token", "key", "payload", "data", "body", "authorization"}
)
# ... nor do those of fields whose names contain one of these.
SENSITIVE_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "authorization",
    "cookie",
    "credential",
    "payload",
    "private_key",
)
# Secret shapes masked wherever they appear in a string value.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), "whsec_" + REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
)
_MAX_DEPTH = 6
_NOT_SCRUBBED = frozenset({"timestamp", "level", "logger"})


def is_sensitive(key: str) -> bool:
    k = key.lower()
    return k in REDACTED_KEYS or any(part in k for part in SENSITIVE_PARTS)


def scrub_text(text: str) -> str:
    """``text`` with secret-looking substrings masked."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with sensitive keys replaced and secret shapes masked."""
    if isinstance(value, str):
        return scrub_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_sensitive(k) else redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        # Raw bytes are payload-shaped: say how many, never what.
        return f"<{len(value)} bytes>"
    return value


def _redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for k in list(event_dict):
        if k in _NOT_SCRUBBED:
            continue
        if is_sensitive(k):
            event_dict[k] = REDACTED
        else:
            event_dict[k] = redact(event_dict[k])
    return event_dict


def _add_logger_name(logger: Any, _: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")  # a stdlib record, via ProcessorFormatter
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is at that moment.

    Binding the stream at configure time breaks when it is later replaced and
    closed (a test's capture, a daemon redirecting stderr): every log call would
    raise. A line that cannot be written is dropped, never raised into the caller.
    """

    _lock = threading.Lock()

    def __init__(self, name: str = "") -> None:
        self.name = name

    def msg(self, message: str) -> None:
        with self._lock, contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _logger_factory(*args: Any) -> _StderrLogger:
    return _StderrLogger(str(args[0]) if args else "")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stdlib handler on the current ``sys.stderr`` (see ``_StderrLogger``)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        if getattr(self.stream, "closed", False):
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError, OSError):
            super().handleError(record)


_HANDLER_MARK = "_mesh_handler"


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """``json`` or ``console``: ``auto`` means console on a terminal, JSON otherwise."""
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        stream = stream or sys.stderr
        return "console" if stream.isatty() else "json"
    if fmt not in ("json", "console"):
        return "json"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog (and stdlib logging underneath) for this process; safe to repeat."""
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    if not isinstance(lvl, int):
        lvl = logging.INFO
    fmt = resolve_format(fmt)
    renderer: Any = (
        # Plain tracebacks: rich ones print local variables, which may hold payloads.
        structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        if fmt == "console"
        else structlog.processors.JSONRenderer(default=str)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
            # Tracebacks as plain text (no locals: they may hold payloads), then scrubbed.
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )
    # Library logs (stdlib logging) come out in the same format, through the same redaction.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    # nats.py logs connection noise at ERROR on every reconnect attempt; ours says it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # One line per HTTP request is noise next to the metrics; errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # asyncio warns about every TLS peer that hangs up during a refused handshake.
    logging.getLogger("asyncio").setLevel(logging.ERROR)


def delivery_logger(log: Any, event_id: str, target: str, attempt: int) -> Any:
    """``log`` with the fields every delivery line carries bound."""
    return log.bind(event_id=event_id, target=target, attempt=attempt)
