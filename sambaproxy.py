"""sambaproxy: an OpenAI-compatible gateway to SambaNova Cloud.

It logs in with the user's account by itself, keeps the token fresh, and turns
OpenAI chat requests into SambaNova's and back, streaming or not. `App.handle`
serves every request of both HTTP versions; `App.chat_completions` reads top to
bottom as the whole proxy algorithm.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import ssl
import sys
import time
import urllib.parse

import httpx

from accesslog import NOISY_LOGGERS, AccessEntry, RequestIds, current_entry  # noqa: F401 (NOISY_LOGGERS: for tests)
from accesslog import configure_logging as _configure_logging
from apis import ApiRoutes, error_answer_body, presented_key
from auth import login_client
from config import Config, ConfigError, load_config
from cors import CorsPolicy, CorsResponder, preflight_fields
from ops import QUIET_ROUTES, Operations
from resources import outbound_ssl_context, read_resource
from sd_notify import notify
from server import ClientGone, Rejection, Request, Responder, Server
from chat import RequestError, parse_chat_request, reasoning_format, wants_stream, wants_usage
from errors import ProxyError, answer_failure, error_body, incomplete_failure, stream_error_failure
from aggregate import CompletionAggregator
from sse import KEEPALIVE, SSEDecoder, StreamRelay, UpstreamStreamError, dumps, error_frame
from passthrough import KeyEndpoints
from reasoning import ChunkSplit, starts_thinking
from tokens import TokenManager
from departure import finish_upstream, open_for_client
from upstream import AccountRoute, ApiKeyRoute, ModelCatalog, Upstream, make_client

__version__ = "0.1.0"

log = logging.getLogger("sambaproxy")

JSON_HEADERS = [("content-type", "application/json")]
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"),
               ("cache-control", "no-cache"), ("x-accel-buffering", "no")]


class KeepAlive:
    """Sends `: keep-alive` (or another `frame`) when upstream has been silent for `interval` seconds."""

    def __init__(self, responder: Responder, interval: float, frame: bytes = KEEPALIVE) -> None:
        self.responder = responder
        self.interval = interval
        self.frame = frame
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.handle = self.loop.call_later(interval, self._check) if interval > 0 else None

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        idle = self.loop.time() - self.last
        if idle >= self.interval:
            self.responder.write_if_idle(self.frame)
            self.last, idle = self.loop.time(), 0.0
        self.handle = self.loop.call_later(self.interval - idle, self._check)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Counters:
    """Request counters shown on /info (the QUIET_ROUTES are not counted)."""

    __slots__ = ("total", "active", "errors", "streams")

    def __init__(self) -> None:
        self.total = self.active = self.errors = self.streams = 0


class App:
    """The gateway: routes, handlers, one shared outbound client, the token state."""

    def __init__(self, config: Config, *, retry_delays: tuple[float, ...] = (0.5, 2.0),
                 retry_after_cap: float = 10.0) -> None:
        self.config = config
        self.started_at = time.time()
        self.counters = Counters()
        self.keys = tuple(key.encode() for key in config.local_api_key)
        # One TLS context (CA bundle loaded once) for the completion client and every login's own.
        tls = outbound_ssl_context(os.environ)
        self.client = make_client(config, tls)
        self.tokens = TokenManager(
            lambda: login_client(verify=tls), email=config.samba_email, password=config.samba_password,
            env_token=config.samba_access_token, config_url=config.samba_config_url,
            cache_time=config.token_cache_time, refresh_margin=config.token_refresh_margin,
            cache_file=config.token_cache_file, login_timeout=config.login_timeout)
        self.account_route = None
        routes: list = []
        if config.has_credentials or config.samba_access_token:
            self.account_route = AccountRoute(config.samba_completion_url, self.tokens,
                                              config.default_model, config.fingerprint_prefix)
            routes.append(self.account_route)
        self.key_route = None
        if config.sambanova_api_key:
            self.key_route = ApiKeyRoute(config.sambanova_api_url, config.sambanova_api_key,
                                         config.default_model)
            routes.append(self.key_route)
        self.upstream = Upstream(self.client, routes, retry_delays=retry_delays,
                                 retry_after_cap=retry_after_cap)
        self.catalog = self._make_catalog()
        self.status_page = read_resource("status.html")
        self.routes = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/chat/completions": {"POST": self.chat_completions},
            "/v1/models": {"GET": self.list_models},
            "/models": {"GET": self.list_models},
            "/info": {"GET": self.info},
            "/": {"GET": self.page},
        }
        if config.debug_endpoints:
            self.routes["/debug/token"] = {"GET": self.debug_token}
        self.apis = ApiRoutes(self, KeepAlive, JSON_HEADERS, SSE_HEADERS)
        self.routes.update(self.apis.routes)
        self.prefix_routes = (("/v1/models/", {"GET": self.get_model}), ("/models/", {"GET": self.get_model}),
                              ("/v1/responses/", self.apis.stored_routes))
        self.key_endpoints = KeyEndpoints(self.upstream, self.key_route, resolve_model=self.resolve_model,
                                          relay_stream=self._relay_stream, spawn=self.spawn,
                                          headers=[])  # CORS fields: CorsResponder
        self.routes.update(self.key_endpoints.routes())
        self.ops = Operations(self, __version__)
        self.routes.update(self.ops.routes())
        self.upstream.note = self.ops.note_attempt  # every upstream attempt, whoever opens it
        self.open_routes = frozenset(("/info", "/", *self.ops.open_routes(config.metrics_public)))
        self.cors = CorsPolicy(config.cors_origins, bool(self.keys))
        self.server = Server(self.handle, max_body_bytes=config.max_body_bytes,
                             ssl_context=_ssl_context(config), error_body=error_body, admit=self.admit,
                             on_refusal=self.on_refusal,
                             max_connections=config.max_connections,
                             max_concurrent_requests=config.max_concurrent_requests, uncapped=QUIET_ROUTES,
                             max_buffered_bytes=config.max_buffered_bytes,
                             header_timeout=config.header_timeout)
        self._background: set[asyncio.Task] = set()
        self.request_ids = RequestIds()

    def _make_catalog(self) -> ModelCatalog:
        if self.key_route and not self.account_route:
            return ModelCatalog(self.client, self.config.sambanova_api_url + "/models",
                                {"authorization": self.key_route.authorization},
                                aliases=self.config.model_aliases)
        return ModelCatalog(self.client, self.config.samba_models_url, {},
                            aliases=self.config.model_aliases)

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        """Listen at once; the login runs in the background."""
        await self.server.start(self.config.host, self.config.port)
        if self.account_route:
            await self.tokens.start()
        if not self.keys:
            log.warning("LOCAL_API_KEY is not set: any client can use this proxy")
        if not self.upstream.routes:
            log.warning("no SambaNova credentials: chat completions will answer 503")
        log.info("browsers may call from: %s (CORS_ORIGINS)", self.cors.describe())
        scheme = "https" if self.config.tls_cert_file else "http"
        log.info("sambaproxy %s listening on %s://%s:%d", __version__, scheme,
                 self.config.host, self.port)

    async def aclose(self, grace: float = 5.0) -> None:
        await self.server.shutdown(grace)
        if self._background:  # e.g. a model list refresh: let it end before its client closes
            await asyncio.wait(self._background, timeout=grace)
        await self.tokens.aclose()
        await self.client.aclose()

    def admit(self, request: Request) -> Rejection | None:
        """Judge a request by its head alone, before any body byte is read: origin, route, method, key.

        A foreign Origin is refused before anything else (403); preflights go to the handler.
        Called by the server for every request, so it stays a few dict lookups and one compare.
        """
        origin = request.headers.get("origin")
        if origin is not None and not self.cors.allows(origin):
            return self._rejection(request, ProxyError(
                403, "this Origin is not allowed to use the proxy from a browser: see CORS_ORIGINS",
                "invalid_request_error", "origin_not_allowed"))
        if request.method == "OPTIONS":
            return None
        methods = self._methods(request.path)
        if methods is None:
            return self._rejection(request, _not_found(request.path))
        if ("GET" if request.method == "HEAD" else request.method) not in methods:
            # RFC 9110 §15.5.6: a 405 lists the methods the resource supports.
            return self._rejection(request, ProxyError(
                405, f"{request.method} is not allowed on {request.path}", "invalid_request_error",
                "method_not_allowed"), [("allow", _allow(methods))])
        if self.keys and request.path not in self.open_routes and not self._key_matches(request):
            return self._rejection(request, _bad_key())
        return None

    def _methods(self, path: str) -> dict | None:
        """The handlers of a path by method, or None for an unknown path."""
        methods = self.routes.get(path)
        if methods is None:
            for prefix, handlers in self.prefix_routes:
                if path.startswith(prefix):
                    return handlers
        return methods

    def _key_matches(self, request: Request) -> bool:
        """Check the client key in constant time against every configured key."""
        given = presented_key(request)
        given_bytes = (given or "").encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given_bytes, key)
        return matched and given is not None

    def _rejection(self, request: Request, exc: ProxyError,
                   extra: list[tuple[str, str]] | None = None) -> Rejection:
        """An OpenAI-shaped answer from the head alone (Anthropic-shaped on the Messages routes)."""
        body = b"" if request.method == "HEAD" else _error_answer(request.path, exc)
        return self._refused(request, Rejection(exc.status, _error_headers(exc) + (extra or []), body),
                             exc.message)

    def on_refusal(self, request: Request | None, rejection: Rejection) -> Rejection:
        """Complete an answer the server made itself (a limit, a malformed request) like the app's own."""
        return self._refused(request, rejection, None)

    def _refused(self, request: Request | None, rejection: Rejection, reason: str | None) -> Rejection:
        """What every refused request gets: X-Request-ID, CORS fields for an allowed origin, its
        access line and counts. `request` is None when not even a head could be read."""
        if request is None:
            entry = AccessEntry("", self.request_ids.pick(None), "-", "-", "-", time.perf_counter())
        else:
            entry = self._entry(request)
            origin = request.headers.get("origin")
            if origin is not None and self.cors.allows(origin):
                rejection.headers.extend(self.cors.answer_fields(origin))
        rejection.headers.append(("x-request-id", entry.request_id))
        counted = request is not None and request.path not in QUIET_ROUTES
        self.counters.total += counted
        self.counters.errors += counted
        entry.end, entry.reason = "rejected", reason
        self.ops.rejected(entry, rejection.status, len(rejection.body), counted)
        return rejection

    def _entry(self, request: Request) -> AccessEntry:
        """The access-log entry of a request, with the client's X-Request-ID or a new one."""
        return AccessEntry(request.client, self.request_ids.pick(request.headers.get("x-request-id")),
                           request.method, request.path, request.http_version, time.perf_counter())

    async def handle(self, request: Request, responder: Responder) -> None:
        """Serve one admitted request and turn every failure into one OpenAI-shaped answer; log and count it."""
        entry = self._entry(request)
        responder.request_id = entry.request_id
        current_entry.set(entry)
        counted = request.path not in QUIET_ROUTES
        counters = self.counters
        if counted:
            counters.total += 1
            counters.active += 1
        answer = responder
        origin = request.headers.get("origin")
        if origin is not None:  # admit() let only allowed origins through
            answer = CorsResponder(responder, self.cors.answer_fields(origin))
        try:
            await self._dispatch(request, answer)
        except ProxyError as exc:
            counters.errors += counted
            entry.reason = exc.message
            if entry.upstream:
                entry.end = "upstream_error"
            await self._send_error(answer, exc, request.path)
        except ClientGone:
            entry.end = "client_gone"
            raise
        except Exception as exc:
            counters.errors += counted
            entry.end, entry.reason = "error", f"handler failed: {type(exc).__name__}"
            raise
        finally:
            if counted:
                counters.active -= 1
            self.ops.finish(entry, responder, counted)

    async def _dispatch(self, request: Request, responder: Responder) -> None:
        if request.method == "OPTIONS":
            return await self._preflight(request, responder)
        method = "GET" if request.method == "HEAD" else request.method
        handler = (self._methods(request.path) or {}).get(method)
        if handler is None:  # admit() answers these; only a server built without it gets here
            raise _not_found(request.path)
        await handler(request, responder)

    async def _send_error(self, responder: Responder, exc: ProxyError, path: str) -> None:
        if responder.started:
            log.warning("error after the response started: %s", exc.message)
            return
        await responder.send(exc.status, _error_headers(exc), _error_answer(path, exc))

    async def _preflight(self, request: Request, responder: Responder) -> None:
        """OPTIONS: the allowed methods (RFC 9110 §9.3.7); for a browser, the CORS preflight fields."""
        methods = self._methods(request.path)
        if methods is None:
            methods = {m: None for handlers in (*self.routes.values(), *(h for _, h in self.prefix_routes))
                       for m in handlers}
        allow = _allow(methods)
        headers = [("allow", allow)]
        if "origin" in request.headers:
            headers += preflight_fields(allow, request.headers.get("access-control-request-headers", ""))
        await responder.send(204, headers, b"")

    async def chat_completions(self, request: Request, responder: Responder) -> None:
        """Validate, resolve the model, open upstream (with retries), then relay events or aggregate them."""
        try:
            body = parse_chat_request(request.body)
        except RequestError as exc:
            raise ProxyError(400, exc.message, "invalid_request_error", "invalid_request",
                             param=exc.param) from None
        asked = body.get("model") or self.config.default_model
        model = self.resolve_model(asked)
        entry = current_entry.get()
        if entry is not None:  # the upstream id: case variants and aliases are one model in metrics
            entry.model, entry.stream, entry.upstream = model, wants_stream(body), True
        response, departure = await open_for_client(
            responder.on_gone, self.spawn, lambda departure: self.upstream.open({**body, "model": model}, departure))
        try:
            if departure.gone:
                return
            split_format = reasoning_format(body, self.config.reasoning_format)
            implicit = starts_thinking(model, self.config.reasoning_models)
            if wants_stream(body):
                relay = StreamRelay(wants_usage(body), model=asked, split=ChunkSplit(split_format, implicit))
                await self._relay_stream(response, responder, relay)
            else:
                aggregator = CompletionAggregator(asked, reasoning=split_format, implicit=implicit)
                await self._relay_whole(response, responder, aggregator)
        finally:
            await response.aclose()

    def resolve_model(self, name: str) -> str:
        """The upstream id for a client's model name; a stale model list is refreshed in the background."""
        if self.catalog.needs_refresh():
            self.spawn(self.catalog.models())
        return self.catalog.resolve(name)

    async def _relay_stream(self, response: httpx.Response, responder: Responder,
                            relay: StreamRelay) -> None:
        """Forward each upstream event as it arrives; end with [DONE] or one error event."""
        entry = current_entry.get() or AccessEntry("", "", "", "", "", time.perf_counter())
        self.counters.streams += 1
        try:
            await self._relay_events(response, responder, relay, entry)
        finally:
            self.counters.streams -= 1
            entry.note_usage(relay.usage)

    async def _relay_events(self, response: httpx.Response, responder: Responder, relay: StreamRelay,
                            entry: AccessEntry) -> None:
        decoder = SSEDecoder()
        await responder.start(200, SSE_HEADERS)
        keepalive = KeepAlive(responder, self.config.sse_keepalive)
        frames: list[bytes] = []
        ttfb = None
        chunks = response.aiter_bytes()
        try:
            async for raw in chunks:
                keepalive.touch()
                for event, data in decoder.feed(raw):
                    if (frame := relay.relay(event, data)) is not None:
                        frames.append(frame)
                if frames:
                    await responder.write(frames[0] if len(frames) == 1 else b"".join(frames))
                    frames.clear()
                    if ttfb is None:
                        entry.ttfb = ttfb = time.perf_counter() - entry.started
                if responder.gone:
                    return
                if relay.complete:  # whatever upstream does next cannot change the answer
                    break
            if relay.whole():
                tail = relay.finish()
            else:
                tail = self._stream_failed(entry, incomplete_failure().error())
        except UpstreamStreamError as exc:
            # the events before the error still count
            tail = b"".join(frames) + self._stream_failed(entry, exc.error)
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            tail = relay.finish() if relay.whole() else self._stream_failed(entry, _stream_failure(exc))
        finally:
            keepalive.stop()
        await responder.write(tail)
        await responder.end()
        if relay.complete:
            await finish_upstream(response, chunks, self.spawn)

    @staticmethod
    def _stream_failed(entry: AccessEntry, error: dict) -> bytes:
        """The last event of a stream that upstream failed after the 200; the access line says why."""
        entry.end, entry.reason = "upstream_error", str(error.get("message"))
        return error_frame(error)

    async def _relay_whole(self, response: httpx.Response, responder: Responder,
                           aggregator: CompletionAggregator) -> None:
        """Aggregate the upstream events into one chat.completion object."""
        entry = current_entry.get() or AccessEntry("", "", "", "", "", time.perf_counter())
        decoder = SSEDecoder()
        chunks = response.aiter_bytes()
        try:
            async for raw in chunks:
                if entry.ttfb is None:
                    entry.ttfb = time.perf_counter() - entry.started
                for event in decoder.feed(raw):
                    aggregator.add(*event)
                if responder.gone:
                    return
                if aggregator.complete:
                    break
        except UpstreamStreamError as exc:
            raise stream_error_failure(exc.error) from None
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            if not aggregator.whole():
                raise answer_failure(exc) from None
        if not aggregator.whole():
            raise incomplete_failure()
        result = aggregator.result()
        entry.note_usage(result.get("usage"))
        await responder.send(200, JSON_HEADERS, dumps(result))
        if aggregator.complete:
            await finish_upstream(response, chunks, self.spawn)

    async def list_models(self, request: Request, responder: Responder) -> None:
        models = await self.catalog.models()
        await responder.send(200, JSON_HEADERS, dumps({"object": "list", "data": models}))

    async def get_model(self, request: Request, responder: Responder) -> None:
        model_id = urllib.parse.unquote(request.path.split("/models/", 1)[1])
        models = await self.catalog.models()
        lowered = model_id.lower()
        model = (next((m for m in models if m["id"] == model_id), None)
                 or next((m for m in models if m["id"].lower() == lowered), None))
        if model is not None:
            return await responder.send(200, JSON_HEADERS, dumps(model))
        raise ProxyError(404, f"The model '{model_id}' does not exist", "invalid_request_error",
                         "model_not_found", param="model")

    async def info(self, request: Request, responder: Responder) -> None:
        await responder.send(200, JSON_HEADERS + [("cache-control", "no-store")], dumps(self.info_dict()))

    def info_dict(self) -> dict:
        """Service state for /info and the status page; never a secret."""
        counters = self.counters
        routes = {"account": self.account_route, "api_key": self.key_route}
        info = {
            "status": "running",
            "version": __version__,
            "uptime_seconds": int(time.time() - self.started_at),
            "api_key_configured": bool(self.keys),
            "samba_credentials_configured": self.config.has_credentials,
            **self.tokens.info(),
            "routes": {name: {"configured": r is not None, "healthy": bool(r and r.healthy)}
                       for name, r in routes.items()},
            "requests": {"total": counters.total, "active": counters.active,
                         "errors": counters.errors, "upstream_retries": self.upstream.retries,
                         "streams": counters.streams},
            "warnings": self._warnings(),
        }
        reason = self.ops.unready_reason()
        info["ready"], info["ready_reason"] = reason is None, reason
        info["actions"] = self.ops.actions(info)
        return info

    def _warnings(self) -> list[str]:
        warnings = []
        if not self.keys:
            warnings.append("LOCAL_API_KEY is not set: any client can use this proxy")
        if not self.upstream.routes:
            warnings.append("no SambaNova credentials: chat completions answer 503")
        return warnings

    async def page(self, request: Request, responder: Responder) -> None:
        headers = [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-cache")]
        await responder.send(200, headers, self.status_page)

    async def debug_token(self, request: Request, responder: Responder) -> None:
        await responder.send(200, JSON_HEADERS, dumps(self.tokens.debug_info()))

    def spawn(self, coro) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _not_found(path: str) -> ProxyError:
    return ProxyError(404, f"no route for {path}", "invalid_request_error", "not_found")


def _bad_key() -> ProxyError:
    return ProxyError(401, "missing or invalid API key: send Authorization: Bearer <LOCAL_API_KEY>",
                      "invalid_request_error", "invalid_api_key")


def _allow(methods) -> str:
    """The Allow field of a resource: its methods, HEAD wherever GET is, and OPTIONS."""
    names = set(methods) | {"OPTIONS"}
    if "GET" in names:
        names.add("HEAD")
    return ", ".join(sorted(names))


def _error_answer(path: str, exc: ProxyError) -> bytes:
    """An error body in the shape of the API the path belongs to (Anthropic's on Messages routes)."""
    return error_answer_body(path, exc) or error_body(exc.status, exc.message, exc.type, exc.code, exc.param)


def _error_headers(exc: ProxyError) -> list[tuple[str, str]]:
    """The fields of an error answer: JSON, and the challenge or Retry-After it calls for."""
    headers = list(JSON_HEADERS)
    if exc.status == 401:
        headers.append(("www-authenticate", "Bearer"))
    if exc.retry_after:
        headers.append(("retry-after", exc.retry_after))
    return headers


def _stream_failure(exc: httpx.HTTPError) -> dict:
    """The error of a stream whose upstream failed after the 200 was sent."""
    failure = answer_failure(exc)
    if failure.status != 504:
        log.warning("upstream stream failed: %s", type(exc).__name__)
    return failure.error()


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    return config.ssl_context()


def configure_logging(level: str, fmt: str = "text") -> None:
    """LOG_LEVEL and LOG_FORMAT for every logger (accesslog.configure_logging)."""
    _configure_logging(level, fmt)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before "listening": a SIGTERM right after it stops cleanly
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    notify("READY=1", os.environ)  # systemd Type=notify: started once it listens
    await stop.wait()
    log.info("shutting down")
    notify("STOPPING=1", os.environ)
    await app.aclose()


def main(argv: list[str] | None = None) -> int:
    """Start-up problems end in one line on stderr naming the setting or file, and exit code 2."""
    warnings: list[str] = []
    try:
        config = load_config(argv, dict(os.environ), __version__, warnings)
    except ConfigError as exc:
        sys.stderr.write(f"sambaproxy: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format)
    for warning in warnings:
        logging.getLogger("sambaproxy.config").warning("%s", warning)
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        sys.stderr.write(f"sambaproxy: {exc}\n")
        return 2
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        sys.stderr.write(f"sambaproxy: cannot listen on HOST={config.host} PORT={config.port}: {reason}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
