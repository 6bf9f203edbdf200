"""The HTTP side of the Responses and Messages APIs, on the chat completion path.

`chat_chunks` is the one place these routes meet upstream: it opens the answer through
`app.upstream` (same login, routes, retries, fallback and error mapping as chat
completions) and yields parsed chat.completion.chunk dicts. The sans-IO translators in
responses.py and messages.py turn those chunks into their APIs' events and objects.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from typing import AsyncIterator, Awaitable, Callable

import httpx

from chat import RequestError
from errors import ProxyError, answer_failure, incomplete_failure, stream_error_failure
from http_common import Request, Responder
from messages import (PING, MessageStream, anthropic_error_body, estimate_tokens, parse_messages_request,
                      show_thinking)
from messages import chat_body as messages_chat_body
from messages import encode_event as messages_event
from responses import (ResponseStore, ResponseStream, input_messages, output_messages,
                       parse_responses_request)
from responses import chat_body as responses_chat_body
from responses import encode_event as responses_event
from sse import KEEPALIVE, ChunkReader, SSEDecoder, UpstreamStreamError, dumps
from reasoning import ChunkSplit, starts_thinking
from accesslog import current_entry
from departure import finish_upstream, open_for_client

log = logging.getLogger("sambaproxy.apis")

MESSAGES_PATH = "/v1/messages"
RESPONSES_PREFIX = "/v1/responses/"


class MidStreamFailure(Exception):
    """Upstream failed after chunks had been yielded: the answer had begun."""

    def __init__(self, failure: ProxyError) -> None:
        super().__init__(failure.message)
        self.failure = failure


async def chat_chunks(app, body: dict, responder: Responder, stream: bool,
                      opened: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[dict]:
    """Open upstream for a validated chat body and yield its chat.completion.chunk dicts.

    Raises ProxyError before the first chunk (nothing sent yet: a plain HTTP error fits) and
    MidStreamFailure after it. `opened` runs once upstream has answered 200. Ends quietly
    when the client has gone; its upstream answer is closed, its reader never cancelled.
    Consume it with contextlib.aclosing so an early exit closes the upstream answer at once.
    """
    # As for chat completions: the model name resolved (aliases, case), the reasoning split
    # (REASONING_FORMAT) applied to every chunk, so thinking arrives as reasoning_content.
    model = app.resolve_model(body.get("model") or app.config.default_model)
    if (entry := current_entry.get()) is not None:  # the upstream id, as for chat completions
        entry.model, entry.stream, entry.upstream = model, stream, True
    split = ChunkSplit(app.config.reasoning_format, starts_thinking(model, app.config.reasoning_models))
    response, departure = await open_for_client(
        responder.on_gone, app.spawn, lambda departure: app.upstream.open({**body, "model": model}, departure))
    reader = ChunkReader()
    chunks = response.aiter_bytes()
    decoder = SSEDecoder()
    entry = current_entry.get()
    began = finish_later = False
    try:
        if departure.gone:
            return
        if opened is not None:
            await opened()
        try:
            async for raw in chunks:
                for event, data in decoder.feed(raw):
                    chunk = reader.chunk(event, data)
                    if chunk is not None:
                        began = True
                        if entry is not None and "usage" in chunk:
                            entry.note_usage(chunk["usage"])
                        yield split.transform(chunk)
                if responder.gone:
                    return
                if reader.complete:
                    break
            if reader.complete:  # [DONE] or the usage chunk: whatever upstream does next cannot change it
                if tail := split.finish():
                    yield {"choices": tail}  # text held back as a possible tag, after all
                finish_later = True  # while the caller writes its last events
                return
            failure = incomplete_failure()
        except UpstreamStreamError as exc:
            failure = stream_error_failure(exc.error)
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            failure = answer_failure(exc)
        if began:
            raise MidStreamFailure(failure)
        raise failure
    finally:
        if finish_later:
            app.spawn(finish_upstream(response, chunks, app.spawn))
        else:
            await response.aclose()


def wants_anthropic_errors(path: str) -> bool:
    """Whether errors on this path take Anthropic's shape (the Messages routes)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def presented_key(request: Request) -> str | None:
    """The client key a request presents: `Authorization: Bearer`, or on the Messages routes
    also `x-api-key` (what Anthropic clients send); None when it presents none."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip()
    if wants_anthropic_errors(request.path):
        return request.headers.get("x-api-key")
    return None


def error_answer_body(path: str, exc: ProxyError) -> bytes | None:
    """The Anthropic error body for an error on a Messages route; None elsewhere."""
    if wants_anthropic_errors(path):
        return anthropic_error_body(exc.status, exc.message)
    return None


def _bad_request(exc: RequestError) -> ProxyError:
    return ProxyError(400, exc.message, "invalid_request_error", "invalid_request", param=exc.param)


class ApiRoutes:
    """Handlers of /v1/responses and /v1/messages; the response store lives here."""

    def __init__(self, app, keepalive, json_headers: list, sse_headers: list) -> None:
        self.app = app
        self.keepalive = keepalive          # sambaproxy.KeepAlive, passed in to avoid an import cycle
        self.json_headers = json_headers
        self.sse_headers = sse_headers
        self.store = ResponseStore(app.config.responses_store_size)
        self.routes = {
            "/v1/responses": {"POST": self.create_response},
            MESSAGES_PATH: {"POST": self.create_message},
            MESSAGES_PATH + "/count_tokens": {"POST": self.count_tokens},
        }
        self.stored_routes = {"GET": self.get_response, "DELETE": self.delete_response}

    # --- Responses ------------------------------------------------------------------

    async def create_response(self, request: Request, responder: Responder) -> None:
        try:
            body = parse_responses_request(request.body)
            turn = input_messages(body)
        except RequestError as exc:
            raise _bad_request(exc) from None
        history: list[dict] = []
        previous = body.get("previous_response_id")
        if previous:
            history = self.store.conversation(previous)
            if history is None:
                raise ProxyError(404, f"Previous response with id '{previous}' not found.",
                                 "invalid_request_error", "previous_response_not_found",
                                 param="previous_response_id")
        model = body.get("model") or self.app.config.default_model
        try:
            chat = responses_chat_body(body, history, turn, model)
        except RequestError as exc:
            raise _bad_request(exc) from None
        translator = ResponseStream(body, model)
        if body.get("stream") is True:
            complete = await self._stream(chat, responder, translator, responses_event, KEEPALIVE)
        else:
            complete = await self._collect(chat, responder, translator)
            if complete:
                await responder.send(200, self.json_headers, dumps(translator.result()))
        if complete and body.get("store", True) is not False:
            result = translator.result()
            self.store.put(result, history + turn + output_messages(result))

    def _stored_id(self, request: Request) -> str:
        return urllib.parse.unquote(request.path[len(RESPONSES_PREFIX):])

    async def get_response(self, request: Request, responder: Responder) -> None:
        response_id = self._stored_id(request)
        data = self.store.response(response_id)
        if data is None:
            raise _response_not_found(response_id)
        await responder.send(200, self.json_headers, data)

    async def delete_response(self, request: Request, responder: Responder) -> None:
        response_id = self._stored_id(request)
        if not self.store.delete(response_id):
            raise _response_not_found(response_id)
        await responder.send(200, self.json_headers,
                             dumps({"id": response_id, "object": "response.deleted", "deleted": True}))

    # --- Messages -------------------------------------------------------------------

    async def create_message(self, request: Request, responder: Responder) -> None:
        try:
            body = parse_messages_request(request.body)
            model = body.get("model") or self.app.config.default_model
            chat = messages_chat_body(body, model)
        except RequestError as exc:
            raise _bad_request(exc) from None
        translator = MessageStream(model, show_thinking(body))
        if body.get("stream") is True:
            await self._stream(chat, responder, translator, messages_event, PING)
        elif await self._collect(chat, responder, translator):
            await responder.send(200, self.json_headers, dumps(translator.result()))

    async def count_tokens(self, request: Request, responder: Responder) -> None:
        """An estimate, not the model's tokenizer: nothing is sent upstream."""
        try:
            tokens = estimate_tokens(parse_messages_request(request.body))
        except RequestError as exc:
            raise _bad_request(exc) from None
        await responder.send(200, self.json_headers, dumps({"input_tokens": tokens}))

    # --- both: chunks through a translator --------------------------------------------

    async def _collect(self, chat: dict, responder: Responder, translator) -> bool:
        """Feed the whole answer to the translator; True when it completed (client still here)."""
        try:
            async with contextlib.aclosing(chat_chunks(self.app, chat, responder, False)) as chunks:
                async for chunk in chunks:
                    translator.add(chunk)
        except MidStreamFailure as exc:
            raise exc.failure from None  # nothing sent yet: the client gets the plain error
        if responder.gone:
            return False
        translator.finish()
        return True

    async def _stream(self, chat: dict, responder: Responder, translator, encode, ping: bytes) -> bool:
        """Send the translator's events as chunks arrive; True when the answer completed.

        The 200 and the opening events go out once upstream has answered 200; a failure
        after that ends the stream with the API's own failure event.
        """
        keepalive = None

        async def opened() -> None:
            nonlocal keepalive
            await responder.start(200, self.sse_headers)
            keepalive = self.keepalive(responder, self.app.config.sse_keepalive, ping)
            await responder.write(_frames(translator.start(), encode))

        try:
            async with contextlib.aclosing(chat_chunks(self.app, chat, responder, True, opened)) as chunks:
                async for chunk in chunks:
                    if events := translator.add(chunk):
                        await responder.write(_frames(events, encode))
                        keepalive.touch()
            if responder.gone:
                return False
            tail, complete = translator.finish(), True
        except (MidStreamFailure, ProxyError) as exc:
            failure = exc.failure if isinstance(exc, MidStreamFailure) else exc
            if not responder.started:
                raise failure from None
            if responder.gone:
                return False
            log.warning("upstream failed mid-answer: %s", failure.code)
            tail, complete = translator.fail(failure.status, failure.message), False
        finally:
            if keepalive is not None:
                keepalive.stop()
        await responder.write(_frames(tail, encode))
        await responder.end()
        return complete


def _frames(events: list[tuple[str, dict]], encode) -> bytes:
    return b"".join(encode(name, payload) for name, payload in events)


def _response_not_found(response_id: str) -> ProxyError:
    return ProxyError(404, f"Response with id '{response_id}' not found (responses are kept in "
                      "memory, RESPONSES_STORE_SIZE at most, and lost on restart).",
                      "invalid_request_error", "not_found", param="response_id")
