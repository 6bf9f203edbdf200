"""Request ids, the one access-log line per request, and the text or JSON log format.

The access line is a record on the `sambaproxy.access` logger whose message is an AccessEntry:
text formatting renders it as one line, JSON formatting as one object of named fields, and
nothing is formatted when the level is off. Log lines written while a request is handled carry
its request id (a context variable, set once per request).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
import sys
import time

access_log = logging.getLogger("sambaproxy.access")
# The access entry of the request this task handles (each request runs in a task of its own).
current_entry: contextvars.ContextVar["AccessEntry | None"] = contextvars.ContextVar(
    "sambaproxy_access_entry", default=None)

REQUEST_ID_MAX = 128
FIELD_MAX = 200  # longest path or model name written to a log line
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("httpx", "httpcore", "hpack", "h2", "h11")


class RequestIds:
    """Honours a client's X-Request-ID (visible ASCII, at most 128 characters) or makes one.

    Made ids are a per-process random prefix and a counter: unique, cheap, and sortable by arrival.
    """

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count(1)

    def pick(self, given: str | None) -> str:
        if given and len(given) <= REQUEST_ID_MAX and given.isascii() and given.isprintable() \
                and " " not in given:
            return given
        return f"{self.prefix}-{next(self.counter):x}"


def _safe(text: str) -> str:
    """A client-chosen path or model name for a text line: short, printable, no quote or space."""
    if len(text) <= FIELD_MAX and text.isprintable() and '"' not in text and " " not in text:
        return text
    return json.dumps(text[:FIELD_MAX])[1:-1].replace(" ", "%20").replace('\\"', "%22")


class AccessEntry:
    """What the access line says about one request; filled in as the request goes."""

    __slots__ = ("client", "request_id", "method", "path", "version", "started", "status", "sent",
                 "model", "stream", "ttfb", "route", "prompt_tokens", "completion_tokens", "end",
                 "reason", "duration", "upstream")

    def __init__(self, client: str, request_id: str, method: str, path: str, version: str,
                 started: float) -> None:
        self.client = client
        self.request_id = request_id
        self.method = method
        self.path = path
        self.version = version
        self.started = started
        self.status = 0
        self.sent = 0
        self.model: str | None = None
        self.stream: bool | None = None
        self.ttfb: float | None = None
        self.route: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.end = "done"
        self.reason: str | None = None
        self.duration = 0.0
        self.upstream = False  # an upstream answer was asked for: a failure now is upstream's

    def __str__(self) -> str:
        """The text line: combined-log-like head, then key=value fields that are known."""
        parts = [f'{self.client or "-"} {self.request_id} "{self.method} {_safe(self.path)} '
                 f'HTTP/{self.version}" {self.status} bytes={self.sent} dur={self.duration:.3f}s']
        if self.model is not None:
            parts.append(f"model={_safe(self.model)} stream={'true' if self.stream else 'false'}")
        if self.ttfb is not None:
            parts.append(f"ttfb={self.ttfb:.3f}s")
        if self.route is not None:
            parts.append(f"route={self.route}")
        if self.prompt_tokens is not None:
            parts.append(f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens}")
        parts.append(f"end={self.end}")
        if self.reason:
            parts.append(f"reason={json.dumps(self.reason)}")
        return " ".join(parts)

    def note_usage(self, usage: object) -> None:
        """Take the token counts of an upstream usage object, if it has them."""
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(prompt) is int and type(completion) is int:
                self.prompt_tokens, self.completion_tokens = prompt, completion

    def fields(self) -> dict:
        """The JSON fields: every one, null when unknown."""
        return {"client": self.client or None, "request_id": self.request_id, "method": self.method,
                "path": self.path[:FIELD_MAX], "http_version": self.version, "status": self.status,
                "bytes_sent": self.sent, "duration_s": round(self.duration, 6),
                "model": self.model[:FIELD_MAX] if self.model is not None else None,
                "stream": self.stream, "ttfb_s": None if self.ttfb is None else round(self.ttfb, 6),
                "route": self.route, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "end": self.end, "reason": self.reason}


def log_access(level: int, entry: AccessEntry) -> None:
    """Write the access line at `level`; it costs nothing more than a level check when that level is off.

    makeRecord + handle is what Logger.info does, minus the stack walk that finds the caller
    (the access line's caller is always the same), which is a third of the cost on this hot path.
    """
    if access_log.isEnabledFor(level):
        access_log.handle(access_log.makeRecord(access_log.name, level, __file__, 0, entry, (), None))


class TextFormatter(logging.Formatter):
    """The classic line, with ` request_id=...` on lines written while a request is handled."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The default asctime (local time, then ,milliseconds), strftime'd once per second."""
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """TEXT_FORMAT, written out: Formatter.format's %-style pass costs more than the line itself."""
        if record.exc_info or record.exc_text or record.stack_info:
            line = super().format(record)  # the traceback or stack under the line, as the base class does
        else:
            record.message = record.getMessage()
            record.asctime = self.formatTime(record)
            line = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        request_id = getattr(record, "request_id", None)
        if request_id and not isinstance(record.msg, AccessEntry):
            line += f" request_id={request_id}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for every record (for Loki, ELK and the like)."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"time": f"{when}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name}
        if isinstance(record.msg, AccessEntry):
            out.update(record.msg.fields())
        else:
            out["message"] = record.getMessage()
            if (request_id := getattr(record, "request_id", None)) is not None:
                out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being handled, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = current_entry.get()
        record.request_id = entry.request_id if entry is not None else None
        return True


def configure_logging(level: str, fmt: str = "text") -> None:
    """One line per record on stderr; protocol libraries kept quiet (hpack logs header values).

    Like logging.basicConfig, it leaves a root logger that already has handlers (a test runner's) alone.
    """
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    if root.handlers:
        return
    # Neither format shows thread, process or task names: records skip looking them up
    # (the logging HOWTO's "Optimization"): a quarter of the cost of making each record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
