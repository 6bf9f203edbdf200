"""Sans-IO Server-Sent Events and OpenAI chat-completion transforms for sambaproxy.

No sockets, no event loop: the decoder turns bytes into events, the relay turns events
into client frames (aggregate.py folds them into one completion; chat.py validates
requests and builds upstream payloads). Tested with byte strings
(tests/test_sse_decoder.py, tests/test_sse_relay.py).
"""
from __future__ import annotations

import json
import re
import secrets
import time

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

_BOM = b"\xef\xbb\xbf"
_DONE_DATA = b"[DONE]"
_MAX_ERROR_TEXT = 1000
# One encoder made once: json.dumps(**options) would build a new one per call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: object) -> bytes:
    """Compact UTF-8 JSON, used only when a chunk had to change."""
    return _encode_json(obj).encode()


def _key_value(key: bytes, value: object) -> bytes:
    """The compact bytes of one JSON member, as the relay looks for it in upstream chunks."""
    return key + _encode_json(value).encode()


def encode(data: bytes) -> bytes:
    """Frame data as one SSE event; each line gets its own `data:` field so line ends survive."""
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"data: " + b"\ndata: ".join(lines) + b"\n\n"
    return b"data: %b\n\n" % data


# --- decoder -----------------------------------------------------------------------


class SSEDecoder:
    """Incremental event-stream parser per WHATWG HTML 9.2.6, fed raw bytes in any split."""

    __slots__ = ("_partial", "_skip_lf", "_started", "_event", "_data")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # pieces of an incomplete line (no line end in them)
        self._skip_lf = False    # the last chunk ended in CR: a leading LF is the same line end
        self._started = False    # the BOM check at stream start is done
        self._event = b""        # the event type buffer
        self._data: list[bytes] = []  # the data buffer, one item per data line

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Consume a chunk and return the events it completed as (type, data)."""
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not self._started:
            # "A single U+FEFF BYTE ORDER MARK character, if any, at the start of the
            # stream must be ignored"; it may itself arrive split across chunks.
            chunk = b"".join(self._partial) + chunk
            self._partial.clear()
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._partial.append(chunk)
                return []
            self._started = True
            if chunk[:3] == _BOM:
                chunk = chunk[3:]
        last = chunk[-1:]
        if last == b"\n" or last == b"\r":
            self._skip_lf = last == b"\r"
            rest = b""
        else:
            cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
            if not cut:  # no line end yet: keep the piece, without re-copying earlier ones
                if chunk:
                    self._partial.append(chunk)
                return []
            chunk, rest = chunk[:cut], chunk[cut:]
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial.clear()
        if rest:
            self._partial.append(rest)
        # bytes.splitlines splits on exactly LF, CRLF and CR: the spec's three line ends.
        return self._lines(chunk.splitlines())

    def _lines(self, lines: list[bytes]) -> list[tuple[str, bytes]]:
        """Apply the spec's field rules to complete lines, dispatching at blank lines."""
        events = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    event = self._event.decode("utf-8", "replace") if self._event else "message"
                    events.append((event, b"\n".join(data)))
                    data.clear()
                self._event = b""
            elif line.startswith(b"data: "):
                data.append(line[6:])
            elif line.startswith(b"data:"):
                data.append(line[5:])
            elif line[:1] != b":":  # a leading colon is a comment
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"event":
                    self._event = value
                elif name == b"data":  # "data" without a colon: an empty data line
                    data.append(value)
                # "id" and "retry" only matter to a reconnecting client, not to a relay.
        return events


# --- errors ------------------------------------------------------------------------


class UpstreamStreamError(Exception):
    """Upstream reported an error inside a stream it had answered with 200."""

    def __init__(self, error: dict) -> None:
        super().__init__(error["message"])
        self.error = error


def openai_error(message: str, type: str = "upstream_error",
                 param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's inner error object, so every error the proxy emits has one shape."""
    return {"message": message, "type": type, "param": param, "code": code}


def error_frame(error: dict) -> bytes:
    """The final `data: {"error": ...}` event of a stream that failed after it began."""
    return encode(dumps({"error": error}))


def _text(value: object) -> str:
    """Any JSON value as a message string."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _error_from(value: object, outer: dict | None = None) -> dict:
    """Shape whatever upstream called an error (an object or a bare string) as OpenAI's."""
    if isinstance(value, dict):
        message = (value.get("message") or value.get("error_description")
                   or value.get("detail") or value.get("error") or value)
        etype, param, code = value.get("type"), value.get("param"), value.get("code")
        return openai_error(_text(message),
                            etype if isinstance(etype, str) and etype else "upstream_error",
                            param if isinstance(param, str) else None,
                            None if code is None else str(code))
    if isinstance(value, str):
        # {"error": "access_denied", "error_description": "..."}: the string is a code.
        detail = outer and (outer.get("message") or outer.get("error_description"))
        if isinstance(detail, str) and detail:
            return openai_error(detail, code=value)
        return openai_error(value or "upstream stream error")
    return openai_error(_text(value))


def _error_from_event(data: bytes) -> dict:
    """The error carried by an SSE `event: error`, whatever its data holds."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        # A plain-text error (or an HTML error page): keep a readable, bounded excerpt.
        text = data[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        return openai_error(text or "upstream stream error")
    if isinstance(value, dict) and value.get("error") is not None:
        return _error_from(value["error"], value)
    return _error_from(value)


def _load_chunk(event: str, data: bytes) -> dict | None:
    """Parse one upstream event as a JSON object; raise for error events, None for noise."""
    if event == "error":
        raise UpstreamStreamError(_error_from_event(data))
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if type(chunk) is not dict:
        return None
    if chunk.get("error") is not None:
        raise UpstreamStreamError(_error_from(chunk["error"], chunk))
    return chunk


_CREATED_KEY = b'"created":'
_CONTENT_KEY = b'"content":"'
_THINKING_KEYS = b'"content":"","reasoning_content":"'
_CHOICES_KEY = b'"choices":['
_CREATED_VALUE = re.compile(rb"(-?\d+)(\.\d*)?(?=[,}])")


def _plain_chunk_frame(data: bytes) -> bytes | None:
    """The client frame of an ordinary chunk, judged from its bytes alone; None when unsure.

    JSON escapes every quote inside a string, so `"error"`, `"usage"` and
    `"created":` can only appear in these bytes as keys. A chunk with a list of
    choices, no error and no usage object (`"usage":null` is fine) needs at most its float `created` cut to an
    int, which is done in place; anything else takes the full parse.
    """
    if data[:1] != b"{" or data[-1:] != b"}" or b'"choices":[' not in data or b'"error"' in data:
        return None
    usages = data.count(b'"usage"')
    if usages and usages != data.count(b'"usage":null'):
        return None  # a real usage object: the usage rules need the full parse
    key = data.find(_CREATED_KEY)
    if key < 0:
        return None  # the full parse gives it one
    start = key + len(_CREATED_KEY)
    value = _CREATED_VALUE.match(data, start)
    if value is None or data.find(_CREATED_KEY, start) >= 0:
        return None
    if value.group(2) is not None:
        data = data[:start] + value.group(1) + data[value.end():]
    return encode(data)


def _swap(data: bytes, old: bytes, new: bytes | None) -> bytes | None:
    """`data` with its first `old` replaced by `new` (None: kept); None when `old` is absent."""
    if new is None:
        return data if old in data else None
    fixed = data.replace(old, new, 1)  # one pass; a changed length tells it was found
    if len(new) != len(old):
        return fixed if len(fixed) != len(data) else None
    return fixed if old in data else None


def _thinking_chunk(data: bytes, format: str) -> bytes | None:
    """A chunk inside <think> as bytes: content moved to reasoning_content (parsed) or emptied (hidden).

    Only when no `<` appears, not even escaped, so no tag can begin in this content.
    """
    if b"<" in data or b"\\u003" in data or b'"reasoning' in data or data.count(_CONTENT_KEY) != 1:
        return None
    if format == "parsed":
        return data.replace(_CONTENT_KEY, _THINKING_KEYS, 1)
    start = data.find(_CONTENT_KEY) + len(_CONTENT_KEY)
    end = data.find(b'"', start)
    if end < 0 or data.find(b"\\", start, end) >= 0:
        return None  # an escape inside: the string's end is not the next quote
    return data[:start] + data[end:]


class ChunkReader:
    """Upstream events as chunk dicts: what relay, aggregation and other APIs' translators share.

    It handles [DONE], events that are not JSON, error events and the end of an answer.

    An answer is `complete` once [DONE] or a usage object has arrived (upstream is always
    asked for usage, and sends it last): nothing upstream does afterwards can change it.
    """

    __slots__ = ("done", "skipped", "complete")

    def __init__(self) -> None:
        self.done = False   # upstream sent [DONE]
        self.skipped = 0    # events dropped as not JSON objects (the caller may log this)
        self.complete = False  # [DONE] or the usage chunk arrived: the answer is whole

    def chunk(self, event: str, data: bytes) -> dict | None:
        """The chunk of one event, or None for [DONE] and for events the client must not see;
        raises UpstreamStreamError for an error event."""
        if data == _DONE_DATA or self.done:
            self.done = self.complete = True
            return None
        if event != "message" and event != "error":
            self.skipped += 1  # another event type (a ping, say) is no chunk of the answer
            return None
        chunk = _load_chunk(event, data)
        if chunk is None:
            if data.strip() == _DONE_DATA:  # "[DONE]" with stray spaces, off the fast path
                self.done = self.complete = True
            else:
                self.skipped += 1
        elif isinstance(usage := chunk.get("usage"), dict) and (
                not chunk.get("choices") or usage.get("is_last_response") is not False):
            self.complete = True  # the usage chunk comes last, unless it says it is not the last
        return chunk


def _ends_a_choice(data: bytes | None) -> bool:
    """Whether an event's chunk carries a finish_reason (parsed only when upstream stopped early)."""
    try:
        chunk = json.loads(data)
    except (TypeError, ValueError, RecursionError):
        return False
    choices = chunk.get("choices") if type(chunk) is dict else None
    return type(choices) is list and any(type(c) is dict and c.get("finish_reason") is not None
                                         for c in choices)


# --- stream: true ------------------------------------------------------------------


class StreamRelay(ChunkReader):
    """Turns upstream chunk events into client frames, re-encoding only chunks that must change.

    Every chunk leaves in OpenAI's shape: an `id` starting with `id_prefix`, an int
    `created`, the `model` the client asked for (when given) and `object`; a ChunkSplit
    (reasoning.py) applies the reasoning format. The first chunk is parsed; once its id
    and model are known, ordinary chunks are checked and fixed as bytes (_fast_frame).
    """

    __slots__ = ("include_usage", "usage", "model", "split", "object", "id_prefix", "last", "_id", "_created",
                 "_upstream_model", "_id_bytes", "_id_to", "_model_bytes", "_model_to", "_object_bytes",
                 "_head", "_head_frame")

    def __init__(self, include_usage: bool, *, model: str | None = None, split=None,
                 object: str = "chat.completion.chunk", id_prefix: str = "chatcmpl-") -> None:
        self.include_usage = include_usage
        self.usage: dict | None = None  # the last usage object upstream sent (for the access log)
        self.model = model    # the name the client asked for; None keeps upstream's
        self.split = split    # a reasoning.ChunkSplit, or None
        self.object = object
        self.id_prefix = id_prefix
        super().__init__()
        self.last: bytes | None = None  # the last event's data, judged only if upstream stops early
        self._id: str | None = None             # the id chunks leave with
        self._created: int | None = None
        self._upstream_model: str | None = None
        self._id_bytes: bytes | None = None     # `"id":"<upstream id>"`, once learned
        self._id_to: bytes | None = None        # its replacement, None when it needs none
        self._model_bytes: bytes | None = None
        self._model_to: bytes | None = None
        self._object_bytes = _key_value(b'"object":', object)
        self._head: bytes | None = None  # a chunk's bytes before `"choices":[`, as upstream repeats them
        self._head_frame = b""  # `data: ` and those bytes as _fast_frame fixes them

    def relay(self, event: str, data: bytes) -> bytes | None:
        """The frame to send for one upstream event, or None when the client must not see it."""
        self.last = data
        if event == "message" and not self.done and self._model_bytes is not None:
            frame = self._fast_frame(data)
            if frame is not None:
                return frame
        chunk = self.chunk(event, data)
        if chunk is None:
            return None
        changed = False
        choices = chunk.get("choices")
        if type(choices) is not list:
            # OpenAI clients index chunk.choices unconditionally.
            chunk["choices"] = choices = []
            changed = True
        if type(usage := chunk.get("usage")) is dict:
            self.usage = usage
        if not self.include_usage and usage is not None:
            if not choices:
                return None  # the usage-only chunk is for clients that asked for it
            del chunk["usage"]
            changed = True
        changed |= self._shape(chunk)
        if self.split is not None:
            changed |= self.split.apply(chunk)
        return encode(dumps(chunk)) if changed else encode(data)

    def _fast_frame(self, data: bytes) -> bytes | None:
        """The frame of an ordinary chunk, judged and fixed as bytes; None when unsure."""
        head = self._head
        if head is not None and data.startswith(head) and self._plain_after(data, len(head)):
            return self._head_frame + data[len(head):] + b"\n\n"
        upstream = data
        split = self.split
        if split is not None:
            if split.marker in data:
                return None
            if split.format != "raw" and data.count(b'"index":') != data.count(b'"index":0'):
                return None  # a choice other than the first: its split state may differ
            if not split.plain:
                data = _thinking_chunk(data, split.format) if split.thinking else None
                if data is None:
                    return None
        data = _swap(data, self._id_bytes, self._id_to)
        if data is None:
            return None
        data = _swap(data, self._model_bytes, self._model_to)
        if data is None or self._object_bytes not in data:
            return None
        frame = _plain_chunk_frame(data)
        if frame is not None and head is None:
            self._learn_head(upstream, frame)
        return frame

    def _learn_head(self, data: bytes, frame: bytes) -> None:
        """Keep the bytes before `"choices":[` of a chunk and of its frame, when every fix was made in them.

        Upstream repeats them in every chunk of a stream (id, object, created, model), so later
        chunks that start with them only need the checks of their choices (_plain_after).
        """
        cut = data.find(_CHOICES_KEY)
        head, rest = data[:cut], data[cut:]
        if cut <= 0 or b"\n" in data or b"\r" in data or not frame.endswith(rest + b"\n\n"):
            return
        if not (self._id_bytes in head and self._model_bytes in head and self._object_bytes in head
                and _CREATED_KEY in head):
            return
        if b'"usage"' in head or b'"error"' in head or b'"index":' in head or (
                self.split is not None and self.split.marker in head):
            return
        self._head, self._head_frame = head, frame[:len(frame) - len(rest) - 2]

    def _plain_after(self, data: bytes, start: int) -> bool:
        """Whether a chunk starting with the known head needs no change past it (_fast_frame's checks)."""
        split = self.split
        if split is not None:
            if not split.plain or data.find(split.marker, start) >= 0:
                return False
            if split.format != "raw" and data.count(b'"index":', start) != data.count(b'"index":0', start):
                return False
        if not data.startswith(_CHOICES_KEY, start) or data[-1:] != b"}" or b"\n" in data or b"\r" in data:
            return False
        if data.find(b'"error"', start) >= 0 or data.find(_CREATED_KEY, start) >= 0:
            return False
        usages = data.count(b'"usage"', start)
        return not usages or usages == data.count(b'"usage":null', start)

    def _shape(self, chunk: dict) -> bool:
        """Give a parsed chunk OpenAI's id, created, model and object; True if any changed."""
        changed = False
        upstream_id = chunk.get("id")
        if type(upstream_id) is not str or not upstream_id:
            chunk["id"] = self._id or (self.id_prefix or "cmpl-") + secrets.token_hex(12)
            changed = True
        elif not upstream_id.startswith(self.id_prefix):
            chunk["id"] = self.id_prefix + upstream_id
            changed = True
        self._id = chunk["id"]
        created = chunk.get("created")
        if type(created) is float:
            # SambaNova sends a float; OpenAI's schema (and strict clients) want an int.
            chunk["created"] = int(created)
            changed = True
        elif type(created) is not int:
            chunk["created"] = self._created or int(time.time())
            changed = True
        self._created = chunk["created"]
        upstream_model = chunk.get("model")
        if self.model is not None and upstream_model != self.model:
            chunk["model"] = self.model
            changed = True
        if chunk.get("object") != self.object:
            chunk["object"] = self.object
            changed = True
        self._learn(upstream_id, upstream_model)
        return changed

    def _learn(self, upstream_id: object, upstream_model: object) -> None:
        """Remember the bytes of the upstream id and model, so later chunks can skip the parse."""
        if type(upstream_id) is not str or not upstream_id or (
                self.model is not None and type(upstream_model) is not str):
            self._model_bytes = None  # nothing to recognise: every chunk takes the full parse
            return
        self._upstream_model = upstream_model if type(upstream_model) is str else None
        self._id_bytes = _key_value(b'"id":', upstream_id)
        self._id_to = None if upstream_id == self._id else _key_value(b'"id":', self._id)
        if self.model is None:
            self._model_bytes, self._model_to = b"", None
        else:
            self._model_bytes = _key_value(b'"model":', upstream_model)
            self._model_to = None if upstream_model == self.model else _key_value(b'"model":', self.model)

    def finish(self) -> bytes:
        """The terminal frames of every stream: text still held back by the split, then [DONE]."""
        tail = self.split.finish() if self.split is not None else None
        if not tail:
            return DONE
        chunk = {"id": self._id or self.id_prefix + secrets.token_hex(12), "object": self.object,
                 "created": self._created or int(time.time()),
                 "model": self.model or self._upstream_model or "", "choices": tail}
        return encode(dumps(chunk)) + DONE

    def whole(self) -> bool:
        """Whether the client has its whole answer should upstream stop now: the answer is
        complete, or it asked for no usage and the last chunk had its finish_reason."""
        return self.complete or (not self.include_usage and _ends_a_choice(self.last))
