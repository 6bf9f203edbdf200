"""stream: false: the upstream events of one answer folded into the one chat.completion object.

Sans-IO, like sse.py whose ChunkReader it builds on (tests/test_sse_relay.py).
"""

from __future__ import annotations

import secrets
import time

from reasoning import split_message
from sse import ChunkReader

_REASONING_KEYS = ("reasoning_content", "reasoning")  # gpt-oss sends "reasoning"


class _ChoiceState:
    """What one choice index has accumulated across deltas."""

    __slots__ = ("role", "content", "reasoning", "tool_calls", "finish_reason", "logprobs")

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.reasoning: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.logprobs: list | None = None

    def add(self, choice: dict) -> None:
        """Merge one streamed choice delta."""
        delta = choice.get("delta") or choice.get("message")
        if not isinstance(delta, dict):
            delta = {}
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.content.append(delta["content"])
        for key in _REASONING_KEYS:  # gpt-oss: "reasoning"; others: "reasoning_content"
            if isinstance(delta.get(key), str):
                self.reasoning.setdefault(key, []).append(delta[key])
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._add_tool_call(position, call)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(logprobs["content"])  # in place: a long answer stays linear

    def _add_tool_call(self, position: int, delta: dict) -> None:
        """Merge a tool-call fragment into the call with the same index."""
        index = delta.get("index")
        if type(index) is not int:
            index = position
        call = self.tool_calls.get(index)
        if call is None:
            call = self.tool_calls[index] = {"id": None, "type": "function", "name": "", "args": []}
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function")
        if isinstance(function, dict):
            name = function.get("name")
            # Names usually come once; some servers repeat the whole name in every delta.
            if isinstance(name, str) and name and name != call["name"]:
                call["name"] += name
            if isinstance(function.get("arguments"), str):
                call["args"].append(function["arguments"])

    def result(self, index: int) -> dict:
        """The choice as a chat.completion choice object."""
        calls = [{"id": c["id"] or "call_" + secrets.token_hex(12), "type": c["type"],
                  "function": {"name": c["name"], "arguments": "".join(c["args"])}}
                 for _, c in sorted(self.tool_calls.items())]
        message: dict = {"role": self.role or "assistant",
                         "content": "".join(self.content) if self.content or not calls else None}
        for key, parts in self.reasoning.items():
            message[key] = "".join(parts)
        if calls:
            message["tool_calls"] = calls
        finish = self.finish_reason or ("tool_calls" if calls else "stop")
        logprobs = None if self.logprobs is None else {"content": self.logprobs}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}


class CompletionAggregator(ChunkReader):
    """Folds an upstream chunk stream into the one chat.completion a stream:false client gets."""

    def __init__(self, model: str = "", *, reasoning: str | None = None, implicit: bool = False) -> None:
        super().__init__()
        self._asked_model = model     # the name the client asked for; upstream's if empty
        self._reasoning = reasoning   # a reasoning format (reasoning.py), or None to leave messages alone
        self._implicit = implicit     # the model begins inside a thinking block (REASONING_MODELS)
        self._model: str | None = None
        self._id: str | None = None
        self._created: int | None = None
        self._fingerprint: str | None = None
        self._usage: dict | None = None
        self._choices: dict[int, _ChoiceState] = {}

    def add(self, event: str, data: bytes) -> None:
        """Merge one upstream event; raises UpstreamStreamError for an error event."""
        chunk = self.chunk(event, data)
        if chunk is None:
            return
        self._add_meta(chunk)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    index = choice.get("index")
                    index = index if type(index) is int else 0
                    state = self._choices.get(index) or self._choices.setdefault(index, _ChoiceState())
                    state.add(choice)

    def whole(self) -> bool:
        """Whether the answer is whole should upstream stop now: complete, or every choice
        has its finish_reason (usage then counts as zero, as when upstream sends none)."""
        return self.complete or bool(self._choices) and all(
            state.finish_reason is not None for state in self._choices.values())

    def _add_meta(self, chunk: dict) -> None:
        """Keep the completion-level fields: the first id/model/created, the last usage."""
        if self._id is None and isinstance(chunk.get("id"), str):
            self._id = chunk["id"]
        if self._model is None and isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        created = chunk.get("created")
        if self._created is None and isinstance(created, (int, float)) and not isinstance(created, bool):
            self._created = int(created)
        if isinstance(chunk.get("system_fingerprint"), str):
            self._fingerprint = chunk["system_fingerprint"]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]

    def result(self) -> dict:
        """The aggregated chat.completion object; usage is zeros if upstream sent none."""
        choices = sorted(self._choices.items()) or [(0, _ChoiceState())]
        upstream_id = self._id or secrets.token_hex(12)
        completion: dict = {
            "id": upstream_id if upstream_id.startswith("chatcmpl-") else "chatcmpl-" + upstream_id,
            "object": "chat.completion",
            "created": self._created if self._created is not None else int(time.time()),
            "model": self._asked_model or self._model or "",
        }
        if self._fingerprint is not None:
            completion["system_fingerprint"] = self._fingerprint
        completion["choices"] = [state.result(index) for index, state in choices]
        if self._reasoning is not None:
            for choice in completion["choices"]:
                split_message(choice["message"], self._reasoning, self._implicit)
        completion["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                               **(self._usage or {})}
        return completion
