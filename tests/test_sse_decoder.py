"""sse.py's SSE decoder and encode(), spoken in bytes: the WHATWG examples, line ends, splits."""

from __future__ import annotations

import pytest

from sse import DONE, SSEDecoder, encode


def decode_all(*chunks: bytes) -> list[tuple[str, bytes]]:
    """Feed chunks to one decoder and collect every event (test_sse_relay.py uses it too)."""
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


# --- encode ------------------------------------------------------------------------


@pytest.mark.parametrize("data, frame", [
    (b'{"a":1}', b'data: {"a":1}\n\n'),
    (b"[DONE]", DONE),
    (b"one\ntwo", b"data: one\ndata: two\n\n"),
    (b"one\r\ntwo\rthree", b"data: one\ndata: two\ndata: three\n\n"),
    (b"one\n", b"data: one\ndata: \n\n"),
])
def test_encode(data, frame):
    assert encode(data) == frame
    assert decode_all(frame) == [("message", data.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))]


# --- decoder: the WHATWG spec's examples (HTML 9.2.6) ------------------------------


def test_spec_stock_example():
    stream = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert decode_all(stream) == [("message", b"YHOO\n+2\n10")]


def test_spec_comment_and_data_example():
    stream = (b": test stream\n\ndata: first event\nid: 1\n\n"
              b"data:second event\nid\n\ndata:  third event\n\n")
    assert decode_all(stream) == [("message", b"first event"), ("message", b"second event"),
                                  ("message", b" third event")]


def test_spec_data_and_data_colon_example():
    # The last block is discarded: it is not followed by a blank line.
    stream = b"data\n\ndata\ndata\n\ndata:"
    assert decode_all(stream) == [("message", b""), ("message", b"\n")]


def test_spec_leading_space_example():
    assert decode_all(b"data:test\n\ndata: test\n\n") == [("message", b"test")] * 2


def test_spec_event_type_example():
    stream = (b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\n"
              b"event: add\ndata: 113411\n\n")
    assert decode_all(stream) == [("add", b"73857293"), ("remove", b"2153"), ("add", b"113411")]


# --- decoder: line ends, splits and the rest of the rules ---------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_ends(eol):
    stream = eol.join([b"event: x", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert decode_all(stream) == [("x", b"a\nb"), ("message", b"c")]


MIXED = (b"\xef\xbb\xbf: ping\r\n\r\n"
         b"data: {\"a\": 1}\r\n\r\n"
         b"event: error\ndata: line one\ndata:line two\n\n"
         b"id: 7\rretry: 10\rdata: cr\r\r"
         b"data: tail\r\n\n")
MIXED_EVENTS = [("message", b'{"a": 1}'), ("error", b"line one\nline two"),
                ("message", b"cr"), ("message", b"tail")]


def test_mixed_stream_in_one_chunk():
    assert decode_all(MIXED) == MIXED_EVENTS


def test_split_at_every_byte_offset():
    for i in range(len(MIXED) + 1):
        assert decode_all(MIXED[:i], MIXED[i:]) == MIXED_EVENTS, i


def test_three_way_split_at_every_pair_of_offsets():
    for i in range(len(MIXED) + 1):
        for j in range(i, len(MIXED) + 1):
            assert decode_all(MIXED[:i], MIXED[i:j], MIXED[j:]) == MIXED_EVENTS, (i, j)


def test_one_byte_at_a_time():
    assert decode_all(*[MIXED[i:i + 1] for i in range(len(MIXED))]) == MIXED_EVENTS


def test_cr_at_chunk_end_then_lf_is_one_line_end():
    # Counting CR and LF as two line ends would dispatch "a" on its own.
    assert decode_all(b"data: a\r", b"\ndata: b\r\n\r\n") == [("message", b"a\nb")]


def test_empty_chunk_between_cr_and_lf_keeps_them_one_line_end():
    assert decode_all(b"data: a\r", b"", b"\ndata: b\n\n") == [("message", b"a\nb")]


@pytest.mark.parametrize("stream", [
    b"event: x\n\n", b"id: 3\n\n", b"retry: 10\n\n", b": only a comment\n\n", b"\n\n\n",
], ids=["event", "id", "retry", "comment", "blank"])
def test_event_without_data_is_not_dispatched(stream):
    assert decode_all(stream) == []


def test_event_type_resets_after_each_blank_line():
    assert decode_all(b"event: x\n\ndata: y\n\n") == [("message", b"y")]
    assert decode_all(b"event: x\ndata: 1\n\ndata: 2\n\n") == [("x", b"1"), ("message", b"2")]


@pytest.mark.parametrize("line, expected", [
    (b"data: a:b", b"a:b"),           # only the first colon separates
    (b"data:  two", b" two"),         # only one leading space is removed
    (b"data:", b""),
    (b"data", b""),                   # no colon: the whole line is the field name
])
def test_data_field_values(line, expected):
    assert decode_all(line + b"\n\n") == [("message", expected)]


def test_unknown_fields_and_comments_ignored():
    assert decode_all(b"foo: bar\n:comment\ndatum: x\ndata: y\n\n") == [("message", b"y")]


def test_bom_stripped_only_at_stream_start():
    assert decode_all(b"\xef\xbb\xbfdata: a\n\n") == [("message", b"a")]
    # A second BOM makes the field name "\ufeffdata", which is no known field.
    assert decode_all(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == [("message", b"b")]
    assert decode_all(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [("message", b"a")]


def test_bom_split_across_chunks():
    stream = b"\xef\xbb\xbfdata: a\n\n"
    for i in range(5):
        assert decode_all(stream[:i], stream[i:]) == [("message", b"a")], i
    assert decode_all(b"\xef", b"\xbb", b"\xbf", b"data: a\n\n") == [("message", b"a")]


def test_unterminated_event_is_not_dispatched():
    assert decode_all(b"data: a\n") == []
    assert decode_all(b"data: a") == []


def test_many_events_in_one_chunk():
    stream = b"".join(encode(b"%d" % i) for i in range(100))
    assert decode_all(stream) == [("message", b"%d" % i) for i in range(100)]


# --- decoder: each feed() returns the events its chunk completed, no later --------------


@pytest.mark.parametrize("chunks, returned", [
    ([b"data: a\r\r"], [[("message", b"a")]]),
    ([b"data: a\n\n"], [[("message", b"a")]]),
    ([b"data: a\r\n\r"], [[("message", b"a")]]),  # the blank line's CR ends it; an LF may follow
    ([b"data: a\r\rdata: b\r", b"\r"], [[("message", b"a")], [("message", b"b")]]),
    ([b"data: a\r", b"\r", b"\n", b"data: b\n", b"\n"], [[], [("message", b"a")], [], [], [("message", b"b")]]),
    ([b"data: a\n\ndata: b", b"\r\n\r\n"], [[("message", b"a")], [("message", b"b")]]),
], ids=["CR", "LF", "CRLF-then-CR", "CR-split", "CR-then-LF-alone", "CRLF-split"])
def test_each_feed_returns_the_events_its_chunk_completed(chunks, returned):
    decoder = SSEDecoder()
    assert [decoder.feed(chunk) for chunk in chunks] == returned


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_one_byte_at_a_time_each_event_comes_with_the_byte_that_ends_it(eol):
    first = b"data: a" + eol
    stream = first + eol + b"data: b" + eol + eol
    decoder = SSEDecoder()
    results = [decoder.feed(stream[i:i + 1]) for i in range(len(stream))]
    second = len(first + eol + b"data: b" + eol)  # the offset of the second blank line
    assert {i: r for i, r in enumerate(results) if r} == {
        len(first): [("message", b"a")], second: [("message", b"b")]}
