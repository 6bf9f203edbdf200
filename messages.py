"""Anthropic's Messages API over chat completions: request translation, events, errors.

Sans-IO: a Messages request (bytes) becomes a chat completion body; the chat chunks of the
answer become Anthropic's event sequence and one `message` object; every error on these
routes takes Anthropic's shape. apis.py does the I/O. Tested with plain dicts and bytes
(tests/test_messages.py).
"""

from __future__ import annotations

import json
import secrets

from chat import ChunkTranslator, RequestError, json_object, required_string
from sse import dumps

# Anthropic's error types by HTTP status (docs.claude.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
# Fields that need Anthropic's own platform: refused with 400 naming the field.
UNSUPPORTED_FIELDS = {"mcp_servers": "remote MCP servers are called by Anthropic's platform",
                      "container": "code-execution containers live on Anthropic's platform"}
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
CHARS_PER_TOKEN = 4  # count_tokens is an estimate: no tokenizer of the upstream models is at hand


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status; other 4xx are invalid_request_error."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status: int, message: str) -> dict:
    """Anthropic's error object: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def anthropic_error_body(status: int, message: str) -> bytes:
    return dumps(anthropic_error(status, message))


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# --- request -> chat body -------------------------------------------------------------


def parse_messages_request(raw: bytes) -> dict:
    """Parse and check a Messages body; RequestError names the offending field."""
    body = json_object(raw)
    for field, why in UNSUPPORTED_FIELDS.items():
        if body.get(field):
            raise RequestError(f"{field}: not supported by this proxy ({why}).", field)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of messages.", "messages")
    for key, kinds, name in (("model", str, "a string"), ("stream", bool, "a boolean"),
                             ("max_tokens", int, "an integer"), ("stop_sequences", list, "an array"),
                             ("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
                             ("top_k", int, "an integer"), ("tools", list, "an array"),
                             ("thinking", dict, "an object"), ("tool_choice", dict, "an object"),
                             ("output_config", dict, "an object")):
        value = body.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and kinds != bool):
            raise RequestError(f"{key}: expected {name}.", key)
    for i, tool in enumerate(body.get("tools") or ()):
        _check_tool(i, tool)
    return body


def _check_tool(i: int, tool: object) -> None:
    """Client tools (with input_schema) map onto functions; Anthropic's server tools do not."""
    where = f"tools.{i}"
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise RequestError(f"{where}: expected an object with a 'name'.", where)
    if tool.get("type") not in (None, "custom") or not isinstance(tool.get("input_schema"), dict):
        raise RequestError(f"{where}: tools of type '{tool.get('type')}' are not supported by this "
                           "proxy: only client tools with an 'input_schema'.", f"{where}.type")


def show_thinking(body: dict) -> bool:
    """Thinking blocks only for a request that enabled thinking, as Anthropic answers."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def chat_body(body: dict, model: str) -> dict:
    """The chat completion body for a Messages request."""
    messages: list[dict] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body["messages"]):
        messages.extend(_chat_messages(message, f"messages.{i}"))
    chat: dict = {"model": model, "messages": messages, "stream": True}
    for key in ("max_tokens", "temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("tools"):
        chat["tools"] = [{"type": "function", "function": _function(tool)} for tool in body["tools"]]
    choice = body.get("tool_choice")
    if choice is not None:
        _apply_tool_choice(chat, choice)
    output_format = (body.get("output_config") or {}).get("format")
    if output_format is not None:
        chat["response_format"] = _response_format(output_format)
    return chat


def _response_format(output_format: object) -> dict:
    """Structured outputs (output_config.format, a JSON schema) as chat's response_format."""
    if not (isinstance(output_format, dict) and output_format.get("type") == "json_schema"
            and isinstance(output_format.get("schema"), dict)):
        raise RequestError("output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}.",
                           "output_config.format")
    return {"type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format["schema"], "strict": True}}


def _system_text(system: object) -> str:
    """`system` as one string: a string, or the text of its blocks."""
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list):
        return "\n".join(required_string(block, "text", f"system[{i}]") for i, block in enumerate(system)
                         if isinstance(block, dict) and block.get("type") == "text")
    raise RequestError("system: expected a string or an array of text blocks.", "system")


def _function(tool: dict) -> dict:
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return function


def _apply_tool_choice(chat: dict, choice: dict) -> None:
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise RequestError("tool_choice: expected type 'auto', 'any', 'tool' (with a name) or 'none'.",
                           "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _chat_messages(message: object, where: str) -> list[dict]:
    """One Anthropic message as chat messages: tool results become tool messages, first."""
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise RequestError(f"{where}.role: expected 'user' or 'assistant'.", f"{where}.role")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: expected a string or an array of blocks.", f"{where}.content")
    tools: list[dict] = []
    images: list[dict] = []  # images of tool results: chat tool messages hold text only
    parts: list[dict] = []
    calls: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": required_string(block, "text", at)})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": required_string(block, "id", at), "type": "function",
                          "function": {"name": required_string(block, "name", at),
                                       "arguments": dumps(block.get("input") or {}).decode()}})
        elif kind == "tool_result" and role == "user":
            tools.append({"role": "tool", "tool_call_id": required_string(block, "tool_use_id", at),
                          "content": _tool_result_text(block, at, images)})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier thinking is not sent back: chat models answer without it
        else:
            raise RequestError(f"{at}.type: content blocks of type '{kind}' are not supported by this "
                               f"proxy in {role} messages.", f"{at}.type")
    out = tools
    parts = images + parts
    if role == "assistant":
        if parts or calls:
            text = "".join(part.get("text", "") for part in parts)
            assistant: dict = {"role": "assistant", "content": text or None}
            if calls:
                assistant["tool_calls"] = calls
            out.append(assistant)
    elif parts:
        images = any(part["type"] != "text" for part in parts)
        out.append({"role": "user", "content": parts if images else "".join(p["text"] for p in parts)})
    return out


def _image(block: dict, where: str) -> dict:
    """An image block (base64 or url source) as a chat image_url part."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        at = where + ".source"
        url = f"data:{required_string(source, 'media_type', at)};base64,{required_string(source, 'data', at)}"
    elif kind == "url":
        url = required_string(source, "url", where + ".source")
    else:
        raise RequestError(f"{where}.source: expected a 'base64' or 'url' image source.", f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(block: dict, where: str, images: list[dict]) -> str:
    """A tool_result's content as text; its images go to `images`, for the user turn that follows
    (chat tool messages carry text only)."""
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            at = f"{where}.content.{k}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(required_string(part, "text", at))
            elif kind == "image":
                images.append(_image(part, at))
                texts.append(f"[image {len(images)} follows in the next user message]")
            else:
                raise RequestError(f"{at}.type: blocks of type '{kind}' are not supported in a tool_result "
                                   "by this proxy.", f"{at}.type")
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise RequestError(f"{where}.content: expected a string or an array of blocks.", f"{where}.content")
    return f"Error: {content}" if block.get("is_error") is True else content


def estimate_tokens(body: dict) -> int:
    """count_tokens: an estimate (about four characters a token) over the translated request."""
    chat = chat_body(body, body.get("model") or "")
    size = len(dumps(chat["messages"])) + len(dumps(chat.get("tools") or []))
    return max(1, size // CHARS_PER_TOKEN)


# --- chat chunks -> Anthropic events and the message object ---------------------------


def encode_event(name: str, payload: dict) -> bytes:
    """One Anthropic SSE event: its name in `event:` and in the payload's `type`."""
    return b"event: %b\ndata: %b\n\n" % (name.encode(), dumps(payload))


class MessageStream(ChunkTranslator):
    """Turns chat chunks into Anthropic's events while building the final message.

    Blocks are sequential, as Anthropic's are: one open at a time (thinking, text, tool_use),
    each closed by content_block_stop before the next starts. Methods return the events to
    send as (name, payload) pairs.
    """

    reasoning_kind = "thinking"

    def __init__(self, model: str, thinking: bool) -> None:
        super().__init__()
        self._pieces: list[str] = []  # the open text or thinking block's text so far
        self.show_reasoning = thinking  # thinking blocks only when the request enables thinking
        self.message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": 0, "output_tokens": 0}}
        self.current: dict | None = None      # the open block
        self.kind: str | None = None
        self.calls: dict[int, dict] = {}       # chat tool-call index -> its tool_use block
        self.arguments: dict[int, list[str]] = {}

    def _emit(self, event: str, /, **fields) -> None:
        self.events.append((event, {"type": event, **fields}))

    def start(self) -> list[tuple[str, dict]]:
        """message_start, then a ping, as Anthropic begins every stream."""
        self._emit("message_start", message={**self.message, "content": [],
                                             "usage": dict(self.message["usage"])})
        self._emit("ping")
        return self._take()

    def _open(self, kind: str, block: dict) -> None:
        self._close()
        self.message["content"].append(block)
        self.current, self.kind = block, kind
        self._emit("content_block_start", index=len(self.message["content"]) - 1, content_block=dict(block))

    def _close(self) -> None:
        if self.current is None:
            return
        if self.kind in ("text", "thinking"):
            self.current[self.kind] = "".join(self._pieces)
        self._emit("content_block_stop", index=len(self.message["content"]) - 1)
        self.current = self.kind = None

    def _text(self, kind: str, text: str) -> None:
        if self.kind != kind:
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            self._open(kind, block)
            self._pieces = []
        self._pieces.append(text)  # joined when the block closes: += on a dict value copies it whole
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else \
            {"type": "text_delta", "text": text}
        self._emit("content_block_delta", index=len(self.message["content"]) - 1, delta=delta)

    def _tool_call(self, position: int, delta: dict) -> None:
        """A tool-call fragment: the first opens a tool_use block, the rest stream its input."""
        index = delta.get("index") if type(delta.get("index")) is int else position
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        block = self.calls.get(index)
        if block is None:
            call_id = delta.get("id") if isinstance(delta.get("id"), str) and delta["id"] else new_id("toolu_")
            block = {"type": "tool_use", "id": call_id, "name": function.get("name") or "", "input": {}}
            self.calls[index] = block
            self.arguments[index] = []
            self._open(f"tool:{index}", block)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.arguments[index].append(arguments)
            if self.current is block:  # a call resumed after another began is only aggregated
                self._emit("content_block_delta", index=len(self.message["content"]) - 1,
                           delta={"type": "input_json_delta", "partial_json": arguments})

    def finish(self) -> list[tuple[str, dict]]:
        """Close the open block; message_delta with stop_reason and usage; message_stop."""
        self._close()
        for index, block in self.calls.items():
            block["input"] = _tool_input("".join(self.arguments[index]))
        usage = self.usage or {}
        message = self.message
        message["usage"] = {"input_tokens": _count(usage.get("prompt_tokens")),
                            "output_tokens": _count(usage.get("completion_tokens"))}
        reason = self.finish_reason or ("tool_calls" if self.calls else "stop")
        message["stop_reason"] = STOP_REASONS.get(reason, "end_turn")
        self._emit("message_delta", delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
                   usage=dict(message["usage"]))
        self._emit("message_stop")
        return self._take()

    def fail(self, status: int, message: str) -> list[tuple[str, dict]]:
        """The error event of a stream whose upstream failed after it began."""
        self.events.append(("error", anthropic_error(status, message)))
        return self._take()

    def result(self) -> dict:
        """The message object (stream: false)."""
        return self.message


def _tool_input(arguments: str) -> dict:
    """A call's JSON arguments as tool_use input; text that is not a JSON object is kept whole."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0
