"""OpenAI's Responses API over chat completions: request translation, the event stream, the store.

Sans-IO: a Responses request (bytes) becomes a chat completion body; the chat chunks of the
answer become the Responses event sequence and one `response` object; a bounded LRU store
keeps finished responses for `previous_response_id` and GET. apis.py does the I/O.
Tested with plain dicts and bytes (tests/test_responses.py).
"""

from __future__ import annotations

import collections
import json
import secrets
import time

from chat import ChunkTranslator, RequestError, json_object, required_string
from sse import dumps

# Fields of the Responses API this gateway cannot honour over chat completions: refused
# with 400 naming the field rather than silently ignored (the answer would differ).
UNSUPPORTED_FIELDS = {
    "background": "background mode needs a job queue this proxy does not keep",
    "conversation": "the Conversations API is not served; chain turns with previous_response_id",
    "prompt": "stored prompt templates live on OpenAI's platform",
}
TOOL_CHOICES = ("none", "auto", "required")
INPUT_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")
STORE_MAX_BYTES = 64 * 1024 * 1024  # a 1 GB host: the store's JSON never exceeds this in total


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: a prefix and 48 random hex digits."""
    return prefix + secrets.token_hex(24)


# --- request -> chat body -------------------------------------------------------------


def parse_responses_request(raw: bytes) -> dict:
    """Parse and check a Responses create body; RequestError names the offending field."""
    body = json_object(raw)
    for field, why in UNSUPPORTED_FIELDS.items():
        if body.get(field) not in (None, False):
            raise RequestError(f"'{field}' is not supported by this proxy: {why}.", field)
    if "input" not in body:
        raise RequestError("Missing required parameter: 'input'.", "input")
    for key, kinds, name in (("model", str, "a string"), ("stream", bool, "a boolean"),
                             ("store", bool, "a boolean"), ("instructions", str, "a string"),
                             ("previous_response_id", str, "a string"),
                             ("max_output_tokens", int, "an integer"),
                             ("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
                             ("parallel_tool_calls", bool, "a boolean"), ("metadata", dict, "an object"),
                             ("tools", list, "an array"), ("text", dict, "an object")):
        value = body.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and kinds != bool):
            raise RequestError(f"Invalid type for '{key}': expected {name}.", key)
    for i, tool in enumerate(body.get("tools") or ()):
        _check_tool(i, tool)
    _check_tool_choice(body.get("tool_choice"))
    return body


def _check_tool(i: int, tool: object) -> None:
    """Only function tools map onto chat completions; built-in tools are OpenAI-hosted."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise RequestError(f"Invalid type for '{where}': expected an object.", where)
    kind = tool.get("type")
    if kind != "function":
        raise RequestError(f"Tools of type '{kind}' are not supported by this proxy: only "
                           "'function' tools map onto chat completions.", f"{where}.type")
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise RequestError(f"Missing required parameter: '{where}.name'.", f"{where}.name")


def _check_tool_choice(choice: object) -> None:
    if choice is None or choice in TOOL_CHOICES:
        return
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return
    raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"name\": ...}: other tool choices are not "
                       "supported by this proxy.", "tool_choice")


def input_messages(body: dict) -> list[dict]:
    """The chat messages of `input` (a string or a list of items), without the instructions."""
    value = body["input"]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError("Invalid type for 'input': expected a string or an array of items.", "input")
    messages: list[dict] = []
    images: list[dict] = []  # images of function outputs, sent after the run of tool messages
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"Invalid type for '{where}': expected an object.", where)
        kind = item.get("type", "message")
        if images and kind != "function_call_output":
            messages.append({"role": "user", "content": images})
            images = []
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_function_call(messages, item, where)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": required_string(item, "call_id", where),
                             "content": _output_text(item.get("output"), where, images)})
        elif kind == "reasoning":
            continue  # earlier thinking is not sent back: chat models answer without it
        else:
            raise RequestError(f"Input items of type '{kind}' are not supported by this proxy.",
                               f"{where}.type")
    if images:
        messages.append({"role": "user", "content": images})
    return messages


def _message(item: dict, where: str) -> dict:
    """An input message: user/assistant/system/developer (developer becomes system)."""
    role = item.get("role")
    role = INPUT_ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise RequestError(f"Invalid value for '{where}.role': expected 'user', 'assistant', "
                           "'system' or 'developer'.", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise RequestError(f"Invalid type for '{where}.content': expected a string or an array.",
                           f"{where}.content")
    parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    if role != "user" or all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def _part(part: object, where: str) -> dict:
    """A content part as a chat part: text, or an image by URL (data: URLs included)."""
    if not isinstance(part, dict):
        raise RequestError(f"Invalid type for '{where}': expected an object.", where)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": required_string(part, "text", where)}
    if kind == "refusal":
        return {"type": "text", "text": required_string(part, "refusal", where)}
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise RequestError(f"'{where}' needs an 'image_url' (file_id images are not supported "
                               "by this proxy).", f"{where}.image_url")
        image = {"url": part["image_url"]}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise RequestError(f"Content parts of type '{kind}' are not supported by this proxy.", f"{where}.type")


def _add_function_call(messages: list[dict], item: dict, where: str) -> None:
    """A function_call item joins the assistant turn before it, as chat's tool_calls do."""
    arguments = item.get("arguments", "")
    call = {"id": required_string(item, "call_id", where), "type": "function",
            "function": {"name": required_string(item, "name", where),
                         "arguments": arguments if isinstance(arguments, str) else dumps(arguments).decode()}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and not isinstance(last.get("content"), list):
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _output_text(output: object, where: str, images: list[dict]) -> str:
    """A function_call_output's output as text; its images go to `images`, for a user
    message after the tool messages (chat tool messages carry text only)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            chat_part = _part(part, f"{where}.output[{j}]")
            if chat_part["type"] == "text":
                texts.append(chat_part["text"])
            else:
                images.append(chat_part)
                texts.append(f"[image {len(images)} follows in the next user message]")
        return "".join(texts)
    raise RequestError(f"Invalid type for '{where}.output': expected a string or an array.",
                       f"{where}.output")


def chat_body(body: dict, history: list[dict], turn: list[dict], model: str) -> dict:
    """The chat completion body for a Responses request; `history` holds the earlier turns."""
    messages = list(history)
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        # Instructions are never carried over from a previous response (OpenAI's rule).
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    messages.extend(turn)
    chat: dict = {"model": model, "messages": messages, "stream": True}
    for key in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_chat_tool(tool) for tool in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    return chat


def _chat_tool(tool: dict) -> dict:
    function = {"name": tool["name"]}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _response_format(text: dict | None) -> dict | None:
    """text.format as chat's response_format: json_schema and json_object; text needs none."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError("'text.format.type' must be 'text', 'json_object' or 'json_schema'.",
                       "text.format.type")


# --- chat chunks -> Responses events and the response object --------------------------


def response_object(body: dict, model: str, response_id: str, created_at: int) -> dict:
    """The response object's echo of the request, status in_progress, no output yet."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {}, "model": model, "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
        "temperature": body.get("temperature"), "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_p": body.get("top_p"), "truncation": "disabled", "usage": None, "user": None,
    }


def encode_event(name: str, payload: dict) -> bytes:
    """One Responses SSE event: its name in `event:` and the same in the payload's `type`."""
    return b"event: %b\ndata: %b\n\n" % (name.encode(), dumps(payload))


class ResponseStream(ChunkTranslator):
    """Turns chat chunks into Responses events while building the final response object.

    Items open in the order the model produces them (reasoning, message text, function calls);
    every event carries `sequence_number`, and each item's `output_index` is its place in
    `output`. Methods return the events to send as (name, payload) pairs.
    """

    answer_kind = "message"

    def __init__(self, body: dict, model: str) -> None:
        super().__init__()
        self._pieces: list[str] = []  # the open text item's text so far
        self.response = response_object(body, model, new_id("resp_"), int(time.time()))
        self.sequence = 0
        self.current: dict | None = None        # the open reasoning or message item
        self.calls: dict[int, dict] = {}         # chat tool-call index -> its function_call item
        self.open_calls: list[dict] = []

    def _emit(self, event: str, /, **fields) -> None:
        self.events.append((event, {"type": event, "sequence_number": self.sequence, **fields}))
        self.sequence += 1

    def start(self) -> list[tuple[str, dict]]:
        """response.created and response.in_progress."""
        self._emit("response.created", response=_snapshot(self.response))
        self._emit("response.in_progress", response=_snapshot(self.response))
        return self._take()

    def _text(self, kind: str, text: str) -> None:
        """Append reasoning or answer text to the open item of that kind, opening one if needed."""
        item = self.current
        if item is None or item["type"] != kind:
            self._close_current()
            item = self._open_text_item(kind)
        self._pieces.append(text)  # joined when the item closes: += on a dict value copies it whole
        place = {"item_id": item["id"], "output_index": item["_index"], "content_index": 0}
        if kind == "message":
            self._emit("response.output_text.delta", **place, delta=text, logprobs=[])
        else:
            self._emit("response.reasoning_text.delta", **place, delta=text)

    def _open_text_item(self, kind: str) -> dict:
        if kind == "message":
            item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": []}
            part = {"type": "reasoning_text", "text": ""}
        self._add_item(item)
        self._emit("response.content_part.added", item_id=item["id"], output_index=item["_index"],
                   content_index=0, part=dict(part))
        item["content"].append(part)
        self.current = item
        self._pieces = []
        return item

    def _add_item(self, item: dict) -> None:
        output = self.response["output"]
        item["_index"] = len(output)
        output.append(item)
        self._emit("response.output_item.added", output_index=item["_index"], item=_public(item))

    def _close_current(self) -> None:
        item, self.current = self.current, None
        if item is None:
            return
        part = item["content"][0]
        part["text"] = "".join(self._pieces)
        place = {"item_id": item["id"], "output_index": item["_index"], "content_index": 0}
        if item["type"] == "message":
            self._emit("response.output_text.done", **place, text=part["text"], logprobs=[])
        else:
            self._emit("response.reasoning_text.done", **place, text=part["text"])
        self._emit("response.content_part.done", **place, part=dict(part))
        self._finish_item(item)

    def _finish_item(self, item: dict) -> None:
        item["status"] = "completed"
        self._emit("response.output_item.done", output_index=item["_index"], item=_public(item))

    def _tool_call(self, position: int, delta: dict) -> None:
        """A tool-call fragment: the first opens a function_call item, the rest add arguments."""
        index = delta.get("index") if type(delta.get("index")) is int else position
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        item = self.calls.get(index)
        if item is None:
            self._close_current()
            call_id = delta.get("id") if isinstance(delta.get("id"), str) and delta["id"] else new_id("call_")
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "call_id": call_id, "name": function.get("name") or "", "arguments": ""}
            self.calls[index] = item
            self.open_calls.append(item)
            self._add_item(item)
        elif isinstance(function.get("name"), str) and function["name"] not in ("", item["name"]):
            item["name"] += function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            self._emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=item["_index"], delta=arguments)

    def finish(self) -> list[tuple[str, dict]]:
        """Close every open item; response.completed (or .incomplete when max_output_tokens hit)."""
        self._close_current()
        for item in self.open_calls:
            self._emit("response.function_call_arguments.done", item_id=item["id"],
                       output_index=item["_index"], name=item["name"], arguments=item["arguments"])
            self._finish_item(item)
        self.open_calls = []
        response = self.response
        response["usage"] = responses_usage(self.usage)
        if self.finish_reason == "length":
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
            self._emit("response.incomplete", response=_snapshot(response))
        else:
            response["status"] = "completed"
            response["completed_at"] = int(time.time())
            self._emit("response.completed", response=_snapshot(response))
        return self._take()

    def fail(self, status: int, message: str) -> list[tuple[str, dict]]:
        """response.failed for an upstream failure after the stream began."""
        response = self.response
        response["status"] = "failed"
        response["error"] = {"code": "rate_limit_exceeded" if status == 429 else "server_error",
                             "message": message}
        self._emit("response.failed", response=_snapshot(response))
        return self._take()

    def result(self) -> dict:
        """The response object as clients see it (GET and stream: false)."""
        return _snapshot(self.response)


def _public(item: dict) -> dict:
    """An item as clients see it: without private keys, its content parts copied."""
    public = {key: value for key, value in item.items() if key[0] != "_"}
    if "content" in public:
        public["content"] = [dict(part) for part in public["content"]]
    return public


def _snapshot(response: dict) -> dict:
    return {**response, "output": [_public(item) for item in response["output"]]}


def responses_usage(usage: dict | None) -> dict:
    """Chat usage in the Responses shape (input/output tokens and their details)."""
    usage = usage or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    input_tokens = _count(usage.get("prompt_tokens"))
    output_tokens = _count(usage.get("completion_tokens"))
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": _count(prompt_details.get("cached_tokens")),
                                     "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": _count(completion_details.get("reasoning_tokens"))},
            "total_tokens": _count(usage.get("total_tokens")) or input_tokens + output_tokens}


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0


def output_messages(response: dict) -> list[dict]:
    """A response's output as chat messages, so the next turn can continue from it."""
    text = "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part.get("type") == "output_text")
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in response["output"] if item["type"] == "function_call"]
    if not text and not calls:
        return []
    message: dict = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


# --- the store ------------------------------------------------------------------------


class ResponseStore:
    """Finished responses kept in memory for previous_response_id, GET and DELETE.

    Least recently used first out, bounded by count (RESPONSES_STORE_SIZE) and by total
    bytes (STORE_MAX_BYTES), since each entry holds a whole conversation. Entries are kept
    as compact JSON: their size is exact and nothing a client sent is shared. Lost on restart.
    """

    def __init__(self, max_entries: int, max_bytes: int = STORE_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, tuple[bytes, bytes]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict]) -> bool:
        """Keep a response and the chat messages of its whole conversation; False if too big."""
        if self.max_entries <= 0:
            return False
        entry = (dumps(response), dumps(conversation))
        size = len(entry[0]) + len(entry[1])
        if size > self.max_bytes:
            return False
        self.delete(response["id"])
        while self._entries and (len(self._entries) >= self.max_entries
                                 or self.bytes + size > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old[0]) + len(old[1])
        self._entries[response["id"]] = entry
        self.bytes += size
        return True

    def response(self, response_id: str) -> bytes | None:
        """The stored response object as JSON bytes, or None."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        self._entries.move_to_end(response_id)
        return entry[0]

    def conversation(self, response_id: str) -> list[dict] | None:
        """The chat messages up to and including a stored response, or None."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        self._entries.move_to_end(response_id)
        return json.loads(entry[1])

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.bytes -= len(entry[0]) + len(entry[1])
        return True
