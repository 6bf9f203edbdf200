"""Sans-IO reasoning split: `<think>...</think>` in content, and upstream reasoning fields, per format.

Formats (REASONING_FORMAT, or a request's `reasoning_format`): `parsed` puts thinking in
`reasoning_content` (DeepSeek's field), `raw` leaves content as upstream sent it (reasoning
fields are folded into it as `<think>` text), `hidden` drops thinking. ThinkSplitter works on
the text of one choice, fed piece by piece; ChunkSplit applies a format to the
chat.completion.chunk dicts of one stream; split_message to one aggregated message. Tested
with every split position (tests/test_reasoning.py).
"""

from __future__ import annotations

import fnmatch

FORMATS = ("parsed", "raw", "hidden")
OPEN = "<think>"
CLOSE = "</think>"
UPSTREAM_KEYS = ("reasoning_content", "reasoning")  # DeepSeek's field; gpt-oss's field
# Leading whitespace held while waiting for a possible `<think>`; beyond this the answer has no tag.
MAX_LEADING_SPACE = 256

_START, _THINK, _AFTER, _ANSWER = range(4)


def starts_thinking(model: str, patterns: tuple[str, ...]) -> bool:
    """Whether a model's answers begin inside a thinking block (REASONING_MODELS globs, any case)."""
    lowered = model.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (the tag's only `<` is its first char)."""
    start = text.rfind("<", max(0, len(text) - len(tag) + 1))
    if start >= 0 and tag.startswith(text[start:]):
        return len(text) - start
    return 0


class ThinkSplitter:
    """Splits one choice's content, fed piece by piece, into (reasoning, answer) pieces.

    Only what may still become a tag is held back: leading whitespace and a partial
    `<think>` at the start, a partial `</think>` inside the block. Once the answer is
    decided (no tag at the start, or text after `</think>`), pieces pass through untouched.
    """

    __slots__ = ("state", "held", "implicit", "found")

    def __init__(self, implicit: bool = False) -> None:
        self.state = _START
        self.held = ""
        self.implicit = implicit  # the model begins inside the block, with no opening tag
        self.found = False        # a thinking block was entered (by either tag rule)

    @property
    def passthrough(self) -> bool:
        """True once every further piece is answer, unchanged."""
        return self.state == _ANSWER

    @property
    def thinking(self) -> bool:
        """True inside the block with nothing held: a piece without `<` is reasoning, whole."""
        return self.state == _THINK and not self.held

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of one more piece of content."""
        if self.state == _ANSWER:
            return "", text
        if self.held:
            text, self.held = self.held + text, ""
        reasoning = ""
        if self.state == _START:
            body = text.lstrip()
            waiting = len(text) <= MAX_LEADING_SPACE if not body else (
                len(body) < len(OPEN) and OPEN.startswith(body))
            if waiting:  # only whitespace so far, or the start of `<think>`
                self.held = text
                return "", ""
            if body.startswith(OPEN):
                text = body[len(OPEN):]
            elif not self.implicit:
                self.state = _ANSWER
                return "", text
            self.state = _THINK
            self.found = True
        if self.state == _THINK:
            end = text.find(CLOSE)
            if end < 0:
                keep = _partial_tag(text, CLOSE)
                if keep:
                    text, self.held = text[:-keep], text[-keep:]
                return text, ""
            reasoning, text = text[:end], text[end + len(CLOSE):]
            self.state = _AFTER
        text = text.lstrip()  # whitespace right after </think> is dropped
        if text:
            self.state = _ANSWER
        return reasoning, text

    def flush(self) -> tuple[str, str]:
        """(reasoning, answer) held back when the content ends: a partial tag was text after all."""
        held, self.held = self.held, ""
        if self.state == _START:
            if self.implicit and held.strip():
                self.state, self.found = _THINK, True
                return held, ""
            self.state = _ANSWER
            return "", held
        return (held, "") if self.state == _THINK else ("", held)


def split_text(text: str, implicit: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole content string, for a stream: false answer.

    With `implicit` (REASONING_MODELS), an answer with no `</think>` at all and no opening
    tag is content after all: the model did not think aloud. Without it, only an opening tag
    starts reasoning, so most answers return at once (no splitter on each request).
    """
    if not text.lstrip().startswith(OPEN) and (not implicit or CLOSE not in text):
        return None, text
    splitter = ThinkSplitter(implicit)
    reasoning, answer = splitter.feed(text)
    more, rest = splitter.flush()
    return (reasoning + more if splitter.found else None), answer + rest


def _pop_upstream_reasoning(fields: dict) -> str | None:
    """Remove upstream reasoning fields from a delta or message; their joined text, or None."""
    found = None
    for key in UPSTREAM_KEYS:
        if key in fields:
            value = fields.pop(key)
            if isinstance(value, str):
                found = value if found is None else found + value
    return found


def split_message(message: dict, format: str, implicit: bool = False) -> dict:
    """Apply a reasoning format to one whole chat.completion message (in place; returned)."""
    if format == "raw":
        upstream = _pop_upstream_reasoning(message)
        if upstream is not None:
            message["content"] = f"{OPEN}{upstream}{CLOSE}\n\n" + (message.get("content") or "")
        return message
    upstream = _pop_upstream_reasoning(message)
    content = message.get("content")
    reasoning, answer = split_text(content, implicit) if isinstance(content, str) else (None, content)
    if reasoning is not None:
        message["content"] = answer
    if format == "parsed" and (upstream is not None or reasoning is not None):
        message["reasoning_content"] = (upstream or "") + (reasoning or "")
    return message


class _ChoiceSplit:
    """The split state of one choice index of a stream."""

    __slots__ = ("splitter", "folding")

    def __init__(self, implicit: bool) -> None:
        self.splitter = ThinkSplitter(implicit)
        self.folding = False  # raw: a `<think>` made from reasoning fields is open


class ChunkSplit:
    """Applies a reasoning format to the chat.completion.chunk dicts of one stream, in order.

    `apply(chunk)` changes the chunk's deltas in place and says whether it changed;
    `transform(chunk)` returns it. `finish()` gives the choice deltas still held back
    when a stream ends without a finish_reason for them. `plain` is True while a chunk
    of choice 0 without reasoning fields would pass unchanged (the relay's byte path);
    `thinking` is True while choice 0's content without `<` is reasoning whole (the relay
    then moves it to reasoning_content, or empties it, in the bytes).
    """

    __slots__ = ("format", "implicit", "choices", "plain", "thinking", "marker")

    def __init__(self, format: str, implicit: bool = False) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown reasoning format {format!r}")
        self.format = format
        self.implicit = implicit
        self.choices: dict[int, _ChoiceSplit] = {}
        self.plain = format == "raw"
        self.thinking = False
        # Bytes of a chunk whose reasoning fields must change: parsed keeps reasoning_content as is.
        self.marker = b'"reasoning"' if format == "parsed" else b'"reasoning'

    def transform(self, chunk: dict) -> dict:
        """The chunk with the format applied (the same dict, changed in place)."""
        self.apply(chunk)
        return chunk

    def apply(self, chunk: dict) -> bool:
        """Apply the format to every choice of one chunk; True if anything changed."""
        choices = chunk.get("choices")
        if type(choices) is not list:
            return False
        changed = False
        for choice in choices:
            if isinstance(choice, dict):
                index = choice.get("index")
                state = self._state(index if type(index) is int else 0)
                if self.format == "raw":
                    changed |= self._fold(state, choice)
                else:
                    changed |= self._split(state, choice)
        self._update_plain()
        return changed

    def _state(self, index: int) -> _ChoiceSplit:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _ChoiceSplit(self.implicit)
        return state

    def _split(self, state: _ChoiceSplit, choice: dict) -> bool:
        """parsed / hidden: content through the splitter, upstream fields kept or dropped."""
        delta = choice.get("delta")
        finishing = choice.get("finish_reason") is not None
        splitter = state.splitter
        if not isinstance(delta, dict):
            if not (finishing and splitter.held):
                return False
            delta = choice["delta"] = {}
        has_upstream = "reasoning" in delta or (self.format == "hidden" and "reasoning_content" in delta)
        if splitter.passthrough and not has_upstream:
            return False
        upstream = _pop_upstream_reasoning(delta)
        if upstream is not None and splitter.state == _START:
            splitter.implicit = False  # upstream separates reasoning itself: content is the answer
        content = delta.get("content")
        reasoning, answer = splitter.feed(content) if isinstance(content, str) else ("", "")
        if finishing:
            more, rest = splitter.flush()
            reasoning, answer = reasoning + more, answer + rest
        if isinstance(content, str) or answer:
            delta["content"] = answer
        if self.format == "parsed" and (upstream is not None or reasoning):
            delta["reasoning_content"] = (upstream or "") + reasoning
        return upstream is not None or reasoning != "" or delta.get("content") != content

    def _fold(self, state: _ChoiceSplit, choice: dict) -> bool:
        """raw: content untouched; upstream reasoning fields become `<think>` text in it."""
        delta = choice.get("delta")
        finishing = choice.get("finish_reason") is not None
        if not isinstance(delta, dict):
            if not (finishing and state.folding):
                return False
            delta = choice["delta"] = {}
        upstream = _pop_upstream_reasoning(delta)
        if upstream is None and not state.folding:
            return False
        content = delta.get("content")
        text = ""
        if upstream:
            text = upstream if state.folding else OPEN + upstream
            state.folding = True
        if state.folding and (content or finishing or delta.get("tool_calls")):
            text += CLOSE + "\n\n"
            state.folding = False
        delta["content"] = text + (content if isinstance(content, str) else "")
        return True

    def _update_plain(self) -> None:
        if self.format == "raw":
            self.plain = not any(state.folding for state in self.choices.values())
        else:
            self.plain = bool(self.choices) and all(
                state.splitter.passthrough for state in self.choices.values())
            first = self.choices.get(0)
            self.thinking = len(self.choices) == 1 and first is not None and first.splitter.thinking

    def finish(self) -> list[dict]:
        """Choice deltas for what is still held or open at the end of a stream (often none)."""
        tail = []
        for index, state in sorted(self.choices.items()):
            delta: dict = {}
            if self.format == "raw":
                if state.folding:
                    delta["content"] = CLOSE
                    state.folding = False
            else:
                reasoning, answer = state.splitter.flush()
                if answer:
                    delta["content"] = answer
                if reasoning and self.format == "parsed":
                    delta["reasoning_content"] = reasoning
            if delta:
                tail.append({"index": index, "delta": delta, "finish_reason": None, "logprobs": None})
        self._update_plain()
        return tail
