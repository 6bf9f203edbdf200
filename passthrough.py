"""The official API's other endpoints, forwarded with SAMBANOVA_API_KEY.

`POST /v1/embeddings`, `/v1/completions` (stream or not), `/v1/audio/transcriptions` and
`/v1/audio/translations` go to SAMBANOVA_API_URL as the client sent them, through
Upstream's retries before the first byte and errors.py's mapping. Only the model name
changes (MODEL_ALIASES, case), and JSON answers name the model the client asked for.
Multipart uploads go byte for byte: when the `model` field must change, only its value
is replaced, the rest of the body (the audio file) is neither parsed nor re-encoded.
"""

from __future__ import annotations

import json
import re

import httpx

from chat import wants_usage
from errors import ProxyError, answer_failure, answer_too_large, key_route_missing
from sse import StreamRelay, dumps, error_frame
from departure import open_for_client

ANSWER_LIMIT = 64 * 1024 * 1024  # bytes of one non-streamed answer held before it is sent on
_PART_HEAD_LIMIT = 4096          # bytes of one multipart part's headers looked at
_FIELD_NAME = re.compile(rb'(?:^|;)\s*name="?([^";]*)"?\s*(?:;|$)')


class KeyEndpoints:
    """Handlers of the endpoints only the official API serves; 404 without SAMBANOVA_API_KEY."""

    def __init__(self, upstream, route, *, resolve_model, relay_stream, spawn,
                 headers: list[tuple[str, str]], answer_limit: int = ANSWER_LIMIT) -> None:
        self.upstream = upstream
        self.route = route                  # upstream.ApiKeyRoute, or None without a key
        self.resolve_model = resolve_model  # client name -> upstream id (may raise 404)
        self.relay_stream = relay_stream    # App._relay_stream: events out, keep-alive, errors
        self.spawn = spawn
        self.headers = headers              # extra headers of every answer (CORS)
        self.answer_limit = answer_limit

    def routes(self) -> dict:
        """Path -> {method: handler}, for App.routes."""
        paths = {"/embeddings": self.embeddings, "/completions": self.completions,
                 "/audio/transcriptions": self.transcriptions,
                 "/audio/translations": self.translations}
        return {prefix + path: {"POST": handler} for path, handler in paths.items()
                for prefix in ("/v1", "")}

    async def embeddings(self, request, responder) -> None:
        await self._forward_json(request, responder, "/embeddings")

    async def completions(self, request, responder) -> None:
        await self._forward_json(request, responder, "/completions")

    async def transcriptions(self, request, responder) -> None:
        await self._forward_form(request, responder, "/audio/transcriptions")

    async def translations(self, request, responder) -> None:
        await self._forward_form(request, responder, "/audio/translations")

    def _key_route(self, request):
        if self.route is None:
            raise key_route_missing(request.path)
        return self.route

    async def _forward_json(self, request, responder, path: str) -> None:
        """A JSON body: the model resolved, the answer relayed (legacy completions may stream)."""
        route = self._key_route(request)
        body = _json_object(request.body)
        content, asked = request.body, body.get("model")
        if asked is not None:
            model = self.resolve_model(asked)
            if model != asked:
                content = dumps({**body, "model": model})
        response = await self._open(route, path, content, "application/json", responder)
        try:
            if responder.gone:
                return
            if path == "/completions" and body.get("stream") is True:
                # As for chat: the usage chunk only for clients that asked for it.
                relay = StreamRelay(wants_usage(body), model=asked, object="text_completion", id_prefix="")
                await self.relay_stream(response, responder, relay)
            else:
                await self._answer(response, responder, asked)
        finally:
            await response.aclose()

    async def _forward_form(self, request, responder, path: str) -> None:
        """A multipart upload, forwarded byte for byte but for the `model` field's value."""
        route = self._key_route(request)
        content_type = request.headers.get("content-type", "")
        boundary = form_boundary(content_type)
        if boundary is None:
            raise ProxyError(400, "Expected a multipart/form-data body (with a boundary), as "
                             "the OpenAI SDK sends for audio files.", "invalid_request_error",
                             "invalid_request", param="file")
        content, asked = request.body, None
        span = form_value_span(content, boundary, b"model")
        if span is not None:
            asked = content[span[0]:span[1]].decode("utf-8", "replace")
            model = self.resolve_model(asked)
            if model != asked:
                content = content[:span[0]] + model.encode() + content[span[1]:]
        response = await self._open(route, path, content, content_type, responder)
        try:
            if responder.gone:
                return
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                await self._pipe(response, responder)
            else:
                await self._answer(response, responder, asked)
        finally:
            await response.aclose()

    async def _open(self, route, path: str, content: bytes, content_type: str, responder):
        """Open upstream's 200 answer (retries and errors as for chat); stopped if the client goes."""
        url = route.base_url + path

        def build(token: str) -> tuple[str, dict, bytes]:
            return url, {"authorization": token, "content-type": content_type,
                         "accept": "application/json, text/event-stream"}, content

        response, _ = await open_for_client(
            responder.on_gone, self.spawn, lambda departure: self.upstream.open_on(route, build, departure))
        return response

    async def _answer(self, response: httpx.Response, responder, asked: str | None) -> None:
        """A whole answer, read within the limit; a JSON one names the model the client asked for."""
        raw = await self._read(response)
        if responder.gone:
            return
        content_type = response.headers.get("content-type", "application/json")
        if "json" in content_type:
            raw = openai_shaped(raw, asked)
        await responder.send(200, [("content-type", content_type), *self.headers], raw)

    async def _read(self, response: httpx.Response) -> bytes:
        parts, size = [], 0
        try:
            async for piece in response.aiter_bytes():
                size += len(piece)
                if size > self.answer_limit:
                    raise answer_too_large(self.answer_limit)
                parts.append(piece)
        except httpx.HTTPError as exc:
            raise answer_failure(exc) from None
        return b"".join(parts)

    async def _pipe(self, response: httpx.Response, responder) -> None:
        """An event stream whose events the proxy does not know: bytes on as they come."""
        await responder.start(200, [("content-type", response.headers["content-type"]),
                                    ("cache-control", "no-cache"), ("x-accel-buffering", "no"),
                                    *self.headers])
        try:
            async for piece in response.aiter_bytes():
                await responder.write(piece)
                if responder.gone:
                    return
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            await responder.write(error_frame(answer_failure(exc).error()))
        await responder.end()


def _json_object(raw: bytes) -> dict:
    """A JSON object body, or 400 naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise ProxyError(400, "The request body must be a JSON object.", "invalid_request_error",
                         "invalid_request")
    for key, kind, name in (("model", str, "a string"), ("stream", bool, "a boolean")):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise ProxyError(400, f"Invalid type for '{key}': expected {name}.",
                             "invalid_request_error", "invalid_request", param=key)
    return body


def openai_shaped(raw: bytes, asked: str | None) -> bytes:
    """A JSON answer with an int `created` and the model the client asked for; unchanged bytes if fine."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if not isinstance(answer, dict):
        return raw
    changed = False
    if asked is not None and isinstance(answer.get("model"), str) and answer["model"] != asked:
        answer["model"] = asked
        changed = True
    if type(answer.get("created")) is float:
        answer["created"] = int(answer["created"])
        changed = True
    return dumps(answer) if changed else raw


def form_boundary(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data content type (RFC 7578), or None."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip().strip('"')
            return value.encode("latin-1") if value else None
    return None


def form_value_span(body: bytes, boundary: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the value of the plain (not file) field `name` lies in a multipart body, or None.

    Only part headers are read; each part's content is skipped with one search for the
    next delimiter (RFC 2046 §5.1.1: CRLF, two dashes and the boundary).
    """
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    while at >= 0:
        head = at + len(delimiter)
        if body[head:head + 2] == b"--":
            return None  # the close delimiter: no such field
        head_end = body.find(b"\r\n\r\n", head, head + _PART_HEAD_LIMIT)
        if head_end < 0:
            return None
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            return None
        if _names_field(body[head:head_end], name):
            return start, end
        at = end + 2
    return None


def _names_field(headers: bytes, name: bytes) -> bool:
    """Whether part headers describe the plain form field `name` (no filename: not a file)."""
    for line in headers.split(b"\r\n"):
        field, _, value = line.partition(b":")
        if field.strip().lower() == b"content-disposition":
            value = value.strip()
            if not value.lower().startswith(b"form-data") or b"filename" in value.lower():
                return False
            match = _FIELD_NAME.search(value[len(b"form-data"):])
            return match is not None and match.group(1) == name
    return False
