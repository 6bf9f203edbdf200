"""reasoning.py: the `<think>` splitter at every split position, and the three formats on chunks."""

from __future__ import annotations

import copy
import json

import pytest

import sse
from fake_samba import Reply, sse_frame, stream_events
from reasoning import CLOSE, ChunkSplit, ThinkSplitter, split_message, split_text, starts_thinking
from test_sse_decoder import decode_all

# (content as upstream sends it, implicit, streamed (reasoning, answer), whole (reasoning, answer))
CASES = [
    ("<think>Let me think.</think>\n\nThe answer.", False,
     ("Let me think.", "The answer."), ("Let me think.", "The answer.")),
    (" \n<think>a<b</thi</think>  ans < wer", False, ("a<b</thi", "ans < wer"), ("a<b</thi", "ans < wer")),
    ("Hello <think>there</think>", False, (None, "Hello <think>there</think>"),
     (None, "Hello <think>there</think>")),
    ("<thinking>is not a tag", False, (None, "<thinking>is not a tag"), (None, "<thinking>is not a tag")),
    ("  <thi", False, (None, "  <thi"), (None, "  <thi")),
    ("<think>cut short", False, ("cut short", ""), ("cut short", "")),
    ("<think></think>", False, ("", ""), ("", "")),
    ("Weighing it.</think>\n Yes.", True, ("Weighing it.", "Yes."), ("Weighing it.", "Yes.")),
    ("Weighing it.</think>\n Yes.", False, (None, "Weighing it.</think>\n Yes."),
     (None, "Weighing it.</think>\n Yes.")),
    ("<think>Both tags.</think>Yes.", True, ("Both tags.", "Yes."), ("Both tags.", "Yes.")),
    ("No tag at all.", True, ("No tag at all.", ""), (None, "No tag at all.")),
    ("</think>Empty thought.", True, ("", "Empty thought."), ("", "Empty thought.")),
]
IDS = ["both tags", "spaces and partial tags", "tag not at start", "not a tag", "partial tag at end",
       "unclosed", "empty", "implicit", "close only, not implicit", "implicit with both tags",
       "implicit without close", "implicit empty thought"]


def run(splitter: ThinkSplitter, pieces: list[str]) -> tuple[str | None, str]:
    """Feed pieces, checking what is held back, and flush; the joined (reasoning or None, answer)."""
    reasoning = answer = ""
    for piece in pieces:
        r, a = splitter.feed(piece)
        reasoning, answer = reasoning + r, answer + a
        assert len(splitter.held.lstrip()) < len(CLOSE), "held back more than a partial tag"
    r, a = splitter.flush()
    return (reasoning + r if splitter.found else None), answer + a


@pytest.mark.parametrize("text, implicit, streamed, whole", CASES, ids=IDS)
def test_split_at_every_offset(text, implicit, streamed, whole):
    assert run(ThinkSplitter(implicit), [text]) == streamed
    for i in range(len(text) + 1):
        assert run(ThinkSplitter(implicit), [text[:i], text[i:]]) == streamed, i


@pytest.mark.parametrize("text, implicit, streamed, whole", CASES, ids=IDS)
def test_three_way_split_at_every_pair_of_offsets(text, implicit, streamed, whole):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run(ThinkSplitter(implicit), [text[:i], text[i:j], text[j:]]) == streamed, (i, j)


@pytest.mark.parametrize("text, implicit, streamed, whole", CASES, ids=IDS)
def test_one_character_at_a_time(text, implicit, streamed, whole):
    assert run(ThinkSplitter(implicit), list(text)) == streamed


@pytest.mark.parametrize("text, implicit, streamed, whole", CASES, ids=IDS)
def test_whole_text(text, implicit, streamed, whole):
    assert split_text(text, implicit) == whole


def test_answer_without_tag_is_never_held_back():
    splitter = ThinkSplitter()
    assert splitter.feed("Hel") == ("", "Hel") and splitter.passthrough
    assert splitter.feed("lo <think>") == ("", "lo <think>")


def test_thinking_is_released_piece_by_piece():
    splitter = ThinkSplitter()
    assert splitter.feed("<think>one ") == ("one ", "")
    assert splitter.feed("two </th") == ("two ", "")
    assert splitter.feed("ink>\n") == ("", "")
    assert splitter.feed("\nthree") == ("", "three") and splitter.passthrough


def test_long_leading_whitespace_stops_waiting_for_a_tag():
    splitter = ThinkSplitter()
    assert splitter.feed(" " * 300) == ("", " " * 300) and splitter.passthrough


@pytest.mark.parametrize("model, patterns, expected", [
    ("DeepSeek-R1", ("DeepSeek-R1*",), True),
    ("deepseek-r1-0528", ("DeepSeek-R1*",), True),
    ("DeepSeek-V3-0324", ("DeepSeek-R1*",), False),
    ("QwQ-32B", ("deepseek-r1*", "qwq-*"), True),
    ("DeepSeek-R1", (), False),
])
def test_starts_thinking(model, patterns, expected):
    assert starts_thinking(model, patterns) is expected


# --- chunks: the three formats -------------------------------------------------------


def chunks_of(pieces: list[str], key: str = "content") -> list[dict]:
    """A stream's chunks, one piece of text each (the last one finishes), then a usage chunk."""
    out = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", key: piece} if i == 0 else {key: piece},
                         "finish_reason": "stop" if i == len(pieces) - 1 else None, "logprobs": None}]}
           for i, piece in enumerate(pieces)]
    return out + [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}}]


def through(split: ChunkSplit, chunks: list[dict]) -> tuple[str, str, list[dict]]:
    """Joined reasoning_content and content of the transformed chunks, and the chunks."""
    out = [split.transform(copy.deepcopy(c)) for c in chunks]
    out += [{"choices": split.finish()}]
    deltas = [c["delta"] for o in out for c in o["choices"]]
    assert all("reasoning" not in d for d in deltas)
    return ("".join(d.get("reasoning_content") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas), out)


FORMAT_CASES = [(text, implicit, streamed) for text, implicit, streamed, _ in CASES]


@pytest.mark.parametrize("text, implicit, streamed", FORMAT_CASES, ids=IDS)
@pytest.mark.parametrize("format", ["parsed", "raw", "hidden"])
def test_formats_on_chunks_at_every_offset(format, text, implicit, streamed):
    reasoning, answer = streamed
    expected = {"parsed": (reasoning or "", answer), "raw": ("", text), "hidden": ("", answer)}[format]
    for i in range(len(text) + 1):
        for finish_on_last in (True, False):
            chunks = chunks_of([text[:i], text[i:]])
            if not finish_on_last:
                chunks[1]["choices"][0]["finish_reason"] = None
            joined = through(ChunkSplit(format, implicit), chunks)
            assert joined[:2] == expected, (i, finish_on_last)
            assert joined[2][-2]["usage"]["completion_tokens"] == 9


def test_plain_answer_chunks_are_left_alone():
    split = ChunkSplit("parsed")
    chunks = chunks_of(["Hello", " world"])
    for c in chunks:
        before = copy.deepcopy(c)
        assert split.apply(c) is False and c == before
    assert split.plain and split.finish() == []


def test_plain_only_once_the_answer_is_decided():
    split = ChunkSplit("parsed")
    assert not split.plain
    split.apply(chunks_of(["<think>x"])[0])
    assert not split.plain
    split.apply(chunks_of(["</think>y"])[0])
    assert split.plain


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("format, expected", [
    ("parsed", ("Hmm. Ok.", "Answer")),
    ("raw", ("", "<think>Hmm. Ok.</think>\n\nAnswer")),
    ("hidden", ("", "Answer")),
])
def test_upstream_reasoning_fields(key, format, expected):
    chunks = chunks_of(["Hmm.", " Ok."], key)[:2]
    chunks[1]["choices"][0]["finish_reason"] = None
    chunks += chunks_of(["Answer"])
    assert through(ChunkSplit(format), chunks)[:2] == expected


def test_raw_closes_an_open_fold_at_the_end():
    chunks = chunks_of(["Only thinking"], "reasoning")
    chunks[0]["choices"][0]["finish_reason"] = None
    assert through(ChunkSplit("raw"), chunks)[:2] == ("", "<think>Only thinking</think>")


def test_choices_are_split_apart():
    split = ChunkSplit("parsed")
    chunk = {"choices": [{"index": 0, "delta": {"content": "<think>a</think>b"}},
                         {"index": 1, "delta": {"content": "plain"}}]}
    split.apply(chunk)
    assert [c["delta"] for c in chunk["choices"]] == [{"content": "b", "reasoning_content": "a"},
                                                      {"content": "plain"}]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        ChunkSplit("verbose")


# --- whole messages ------------------------------------------------------------------


@pytest.mark.parametrize("format, implicit, message, expected", [
    ("parsed", False, {"role": "assistant", "content": "<think>t</think>\na"},
     {"role": "assistant", "content": "a", "reasoning_content": "t"}),
    ("hidden", False, {"role": "assistant", "content": "<think>t</think>\na"},
     {"role": "assistant", "content": "a"}),
    ("raw", False, {"role": "assistant", "content": "<think>t</think>\na"},
     {"role": "assistant", "content": "<think>t</think>\na"}),
    ("parsed", True, {"role": "assistant", "content": "no close"},
     {"role": "assistant", "content": "no close"}),
    ("parsed", False, {"role": "assistant", "content": "a", "reasoning": "r"},
     {"role": "assistant", "content": "a", "reasoning_content": "r"}),
    ("raw", False, {"role": "assistant", "content": "a", "reasoning_content": "r"},
     {"role": "assistant", "content": "<think>r</think>\n\na"}),
    ("hidden", False, {"role": "assistant", "content": "a", "reasoning": "r"},
     {"role": "assistant", "content": "a"}),
    ("parsed", False, {"role": "assistant", "content": None, "tool_calls": []},
     {"role": "assistant", "content": None, "tool_calls": []}),
])
def test_split_message(format, implicit, message, expected):
    assert split_message(message, format, implicit) == expected


# --- the relay's byte paths give what the full parse gives ------------------------------

THINKING_TEXTS = [
    "<think>Some plain thinking words here</think>\n\nThe answer is short.",
    '<think>x < 5, caf\u00e9, "quoted" and back\\slash, </th ink></think> Done: a < b.',
    "Implicit thinking only, then</think>the answer.",
]


def upstream_events(text: str) -> list[bytes]:
    """The data of each event of a fake SambaNova stream answering `text`."""
    return [sse_frame(e)[6:-2] for e in stream_events(Reply(text=text), "DeepSeek-R1", [])]


def relayed(events: list[bytes], format: str, implicit: bool) -> list[dict]:
    """The client objects a relay makes of upstream events."""
    relay = sse.StreamRelay(True, model="r1", split=ChunkSplit(format, implicit))
    frames = [relay.relay("message", data) for data in events]
    frames.append(relay.finish())
    return [json.loads(data) for _, data in decode_all(b"".join(f for f in frames if f))[:-1]]


@pytest.mark.parametrize("text", THINKING_TEXTS)
@pytest.mark.parametrize("format", ["parsed", "raw", "hidden"])
def test_relay_byte_paths_match_the_full_parse(monkeypatch, format, text):
    events = upstream_events(text)
    fast = relayed(events, format, "Implicit" in text)
    monkeypatch.setattr(sse, "_plain_chunk_frame", lambda data: None)
    monkeypatch.setattr(sse, "_thinking_chunk", lambda data, format: None)
    assert fast == relayed(events, format, "Implicit" in text)


@pytest.mark.parametrize("format", ["parsed", "hidden", "raw"])
def test_relay_parses_only_the_first_and_last_chunks_of_a_thinking_stream(monkeypatch, format):
    loads = []
    monkeypatch.setattr(sse.json, "loads", lambda raw: loads.append(raw) or json.JSONDecoder().decode(raw.decode()))
    events = upstream_events(THINKING_TEXTS[0])
    objects = relayed(events, format, False)
    parsed = [raw for raw in loads if raw in events]  # (the test decodes the client frames too)
    # The role chunk, the chunks holding a tag or the first answer word, and usage.
    assert len(parsed) <= 6 < len(objects)


def test_relay_sends_text_still_held_at_done_before_it():
    types = pytest.importorskip("openai.types.chat")
    relay = sse.StreamRelay(False, model="r1", split=ChunkSplit("parsed"))
    first = (b'{"id":"u1","object":"chat.completion.chunk","created":1.5,"model":"m",'
             b'"choices":[{"index":0,"delta":{"content":" <thi"},"finish_reason":null}]}')
    assert json.loads(decode_all(relay.relay("message", first))[0][1])["choices"][0]["delta"]["content"] == ""
    events = decode_all(relay.finish())
    assert events[-1] == ("message", b"[DONE]")
    [(_, data)] = events[:-1]
    tail = types.ChatCompletionChunk.model_validate(json.loads(data), strict=True)
    assert tail.choices[0].delta.content == " <thi" and tail.id == "chatcmpl-u1" and tail.model == "r1"


def test_upstream_reasoning_beside_content_inside_think_is_joined_not_doubled():
    relay = sse.StreamRelay(False, model="r1", split=ChunkSplit("parsed"))
    base = b'{"id":"u1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":%s}]}'
    relay.relay("message", base % b'{"content":"<think>a"}')
    frame = relay.relay("message", base % b'{"reasoning_content":"b","content":"c"}')
    [(_, data)] = decode_all(frame)
    assert json.loads(data)["choices"][0]["delta"] == {"content": "", "reasoning_content": "bc"}
    assert data.count(b"reasoning_content") == 1


def test_a_reasoning_model_whose_upstream_separates_reasoning_keeps_its_answer_as_content():
    """REASONING_MODELS says "begins inside <think>", but upstream already sent reasoning_content:
    the content is the answer, streamed as in a whole answer."""
    split = ChunkSplit("parsed", implicit=True)
    first = split.transform({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]})
    second = split.transform({"choices": [{"index": 0, "delta": {"content": "The answer."}}]})
    assert first["choices"][0]["delta"]["reasoning_content"] == "hmm"
    assert second["choices"][0]["delta"]["content"] == "The answer."
    assert "reasoning_content" not in second["choices"][0]["delta"]
