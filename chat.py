"""Chat completion requests: validation of the client's body and the upstream payloads built from it.

Sans-IO: plain bytes and dicts in, dicts out; the routes in upstream.py send what this builds.
ChunkTranslator is the common base of the translators (responses.py, messages.py) that turn
the chat chunks of one answer into another API's events.
"""

from __future__ import annotations

import json
import secrets

from reasoning import FORMATS as REASONING_FORMATS


class RequestError(Exception):
    """A client body the proxy refuses with 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def json_object(raw: bytes) -> dict:
    """A request body that must be one JSON object (every API's bodies are)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError("We could not parse the JSON body of your request: "
                           "expected a JSON object.") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


def required_string(item: dict, key: str, where: str) -> str:
    """A field that must be a string, or a RequestError naming it (`where.key`)."""
    value = item.get(key)
    if not isinstance(value, str):
        raise RequestError(f"Missing or invalid parameter: '{where}.{key}' (a string).", f"{where}.{key}")
    return value


class ChunkTranslator:
    """Reads the chat chunks of one answer (choice 0, as these APIs have one answer) into events.

    Subclasses name their kinds of text and emit through `events` in `_text` and `_tool_call`;
    every method returns the events to send as (name, payload) pairs.
    """

    reasoning_kind = "reasoning"  # what a subclass calls thinking text, and answer text
    answer_kind = "text"

    def __init__(self) -> None:
        self.show_reasoning = True
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.events: list[tuple[str, dict]] = []

    def _take(self) -> list[tuple[str, dict]]:
        events, self.events = self.events, []
        return events

    def add(self, chunk: dict) -> list[tuple[str, dict]]:
        """The events of one chat.completion.chunk."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._add_delta(delta)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return self._take()

    def _add_delta(self, delta: dict) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if self.show_reasoning and isinstance(reasoning, str) and reasoning:
            self._text(self.reasoning_kind, reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text(self.answer_kind, content)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._tool_call(position, call)

    def _text(self, kind: str, text: str) -> None:
        raise NotImplementedError

    def _tool_call(self, position: int, call: dict) -> None:
        raise NotImplementedError


def parse_chat_request(raw: bytes) -> dict:
    """Parse a chat completion body, refusing what upstream would fail on less clearly."""
    body = json_object(raw)
    if "messages" not in body:
        raise RequestError("Missing required parameter: 'messages'.", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of message objects.", "messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    _check_type(body, "model", str, "a string")
    _check_type(body, "stream", bool, "a boolean")
    _check_type(body, "stream_options", dict, "an object")
    _check_reasoning_format(body)
    return body


def _check_reasoning_format(body: dict) -> None:
    """Refuse a `reasoning_format` that is not one of the formats (null counts as absent)."""
    value = body.get("reasoning_format")
    if value is not None and value not in REASONING_FORMATS:
        raise RequestError("Invalid value for 'reasoning_format': expected one of "
                           + ", ".join(REASONING_FORMATS) + ".", "reasoning_format")


def reasoning_format(body: dict, default: str) -> str:
    """The request's reasoning format: its own `reasoning_format` field, else REASONING_FORMAT."""
    return body.get("reasoning_format") or default


def _check_message(i: int, message: object) -> None:
    """Refuse a message item that is not an object with a string role and usable content."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise RequestError(f"Invalid type for '{where}': expected an object.", where)
    if not isinstance(message.get("role"), str):
        what = "Missing required parameter" if "role" not in message else "Invalid type for"
        raise RequestError(f"{what}: '{where}.role' (a string).", f"{where}.role")
    if "content" not in message:
        # Assistant turns that only call tools carry no content.
        if message["role"] != "assistant":
            raise RequestError(f"Missing required parameter: '{where}.content'.", f"{where}.content")
    elif not (message["content"] is None or isinstance(message["content"], (str, list))):
        raise RequestError(f"Invalid type for '{where}.content': expected a string, "
                           "an array of content parts, or null.", f"{where}.content")
    elif isinstance(message["content"], list):
        for j, part in enumerate(message["content"]):
            if not isinstance(part, dict):
                raise RequestError(f"Invalid type for '{where}.content[{j}]': expected an object.",
                                   f"{where}.content[{j}]")
    if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
        raise RequestError(f"Invalid type for '{where}.tool_calls': expected an array.",
                           f"{where}.tool_calls")


def _check_type(body: dict, key: str, kind: type, name: str) -> None:
    """Refuse an optional top-level field of the wrong JSON type (null counts as absent)."""
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise RequestError(f"Invalid type for '{key}': expected {name}.", key)


def wants_stream(body: dict) -> bool:
    """Whether the client asked for an event stream (stream: true)."""
    return body.get("stream") is True


def wants_usage(body: dict) -> bool:
    """Whether a streaming client asked for the usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _upstream_body(body: dict, default_model: str) -> dict:
    """The client's body with streaming and usage forced on; every other parameter unchanged."""
    options = body.get("stream_options")
    inner = {**body, "model": body.get("model") or default_model, "stream": True,
             "stream_options": {**(options if isinstance(options, dict) else {}),
                                "include_usage": True}}
    inner.pop("reasoning_format", None)  # the proxy's own parameter, unknown upstream
    return inner


def samba_payload(body: dict, *, default_model: str, fingerprint: str) -> dict:
    """The playground completion endpoint's envelope around the client's body (UPSTREAM.md)."""
    inner = _upstream_body(body, default_model)
    return {"body": inner, "env_type": env_type(inner["model"]), "fingerprint": fingerprint}


def api_payload(body: dict, *, default_model: str) -> dict:
    """The official OpenAI-compatible API takes the body itself, streaming forced."""
    return _upstream_body(body, default_model)


def env_type(model: str) -> str:
    """The playground's env_type: public clients pick it from the model id."""
    lowered = model.lower()
    if "vision" in lowered:
        return "vision"
    if "audio" in lowered or "whisper" in lowered:
        return "audio"
    return "text"


def new_fingerprint(prefix: str) -> str:
    """A fresh per-request fingerprint: the prefix and 32 random hex digits."""
    return prefix + secrets.token_hex(16)
