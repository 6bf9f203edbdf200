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

from config import Config, ConfigError, load_config
from server import Request, Responder, Server
from chat import RequestError, parse_chat_request, wants_stream, wants_usage
from errors import ProxyError, answer_failure, error_body, incomplete_failure, stream_error_failure
from sse import (KEEPALIVE, CompletionAggregator, SSEDecoder, StreamRelay, UpstreamStreamError,
                 dumps, error_frame)
from tokens import TokenManager
from upstream import AccountRoute, ApiKeyRoute, ModelCatalog, Upstream, make_client, stop_upstream

__version__ = "0.1.0"

log = logging.getLogger("sambaproxy")

CORS_ORIGIN = ("access-control-allow-origin", "*")
JSON_HEADERS = [("content-type", "application/json"), CORS_ORIGIN]
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"),
               ("cache-control", "no-cache"), ("x-accel-buffering", "no"), CORS_ORIGIN]
PREFLIGHT_ALLOW = "authorization, content-type"
NOISY_LOGGERS = ("httpx", "httpcore", "hpack", "h2", "h11")


class KeepAlive:
    """Sends `: keep-alive` when upstream has been silent for `interval` seconds."""

    def __init__(self, responder: Responder, interval: float) -> None:
        self.responder = responder
        self.interval = interval
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.handle = self.loop.call_later(interval, self._check) if interval > 0 else None

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        idle = self.loop.time() - self.last
        if idle >= self.interval:
            self.responder.write_if_idle(KEEPALIVE)
            self.last, idle = self.loop.time(), 0.0
        self.handle = self.loop.call_later(self.interval - idle, self._check)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class Counters:
    """Request counters shown on /info."""

    __slots__ = ("total", "active", "errors")

    def __init__(self) -> None:
        self.total = self.active = self.errors = 0


class App:
    """The gateway: routes, handlers, one shared outbound client, the token state."""

    def __init__(self, config: Config, *, retry_delays: tuple[float, ...] = (0.5, 2.0),
                 retry_after_cap: float = 10.0) -> None:
        self.config = config
        self.started_at = time.time()
        self.counters = Counters()
        self.keys = tuple(key.encode() for key in config.local_api_key)
        self.client = make_client(config)
        self.tokens = TokenManager(
            self.client, email=config.samba_email, password=config.samba_password,
            env_token=config.samba_access_token, config_url=config.samba_config_url,
            cache_time=config.token_cache_time, refresh_margin=config.token_refresh_margin,
            cache_file=config.token_cache_file)
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
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "status.html"), "rb") as f:
            self.status_page = f.read()
        self.routes = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/chat/completions": {"POST": self.chat_completions},
            "/v1/models": {"GET": self.list_models},
            "/models": {"GET": self.list_models},
            "/info": {"GET": self.info},
            "/": {"GET": self.page},
            "/debug/token": {"GET": self.debug_token},
        }
        self.open_routes = frozenset(("/info", "/"))
        self.server = Server(self.handle, max_body_bytes=config.max_body_bytes,
                             ssl_context=_ssl_context(config), error_body=error_body,
                             max_connections=config.max_connections,
                             max_concurrent_requests=config.max_concurrent_requests,
                             max_buffered_bytes=config.max_buffered_bytes,
                             header_timeout=config.header_timeout)
        self._background: set[asyncio.Task] = set()

    def _make_catalog(self) -> ModelCatalog:
        if self.key_route and not self.account_route:
            return ModelCatalog(self.client, self.config.sambanova_api_url + "/models",
                                {"authorization": self.key_route.authorization})
        return ModelCatalog(self.client, self.config.samba_models_url, {})

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
        scheme = "https" if self.config.tls_cert_file else "http"
        log.info("sambaproxy %s listening on %s://%s:%d", __version__, scheme,
                 self.config.host, self.port)

    async def aclose(self, grace: float = 5.0) -> None:
        await self.server.shutdown(grace)
        await self.tokens.aclose()
        await self.client.aclose()

    async def handle(self, request: Request, responder: Responder) -> None:
        """Route one request and turn every failure into one OpenAI-shaped answer."""
        counters = self.counters
        counters.total += 1
        counters.active += 1
        try:
            await self._dispatch(request, responder)
        except ProxyError as exc:
            counters.errors += 1
            await self._send_error(responder, exc)
        finally:
            counters.active -= 1

    async def _dispatch(self, request: Request, responder: Responder) -> None:
        methods = self.routes.get(request.path)
        if methods is None and request.path.startswith(("/v1/models/", "/models/")):
            methods = {"GET": self.get_model}
        if request.method == "OPTIONS":
            return await self._preflight(request, responder)
        if methods is None:
            raise ProxyError(404, f"no route for {request.path}", "invalid_request_error", "not_found")
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            raise ProxyError(405, f"{request.method} is not allowed on {request.path}",
                             "invalid_request_error", "method_not_allowed")
        if request.path not in self.open_routes:
            self._authenticate(request)
        await handler(request, responder)

    def _authenticate(self, request: Request) -> None:
        """Check the client key in constant time against every configured key."""
        if not self.keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given_bytes, key)
        if not matched or scheme.lower() != "bearer":
            raise ProxyError(401, "missing or invalid API key: send Authorization: Bearer <LOCAL_API_KEY>",
                             "invalid_request_error", "invalid_api_key")

    async def _send_error(self, responder: Responder, exc: ProxyError) -> None:
        if responder.started:
            log.warning("error after the response started: %s", exc.message)
            return
        headers = list(JSON_HEADERS)
        if exc.status == 401:
            headers.append(("www-authenticate", "Bearer"))
        if exc.retry_after:
            headers.append(("retry-after", exc.retry_after))
        body = error_body(exc.status, exc.message, exc.type, exc.code, exc.param)
        await responder.send(exc.status, headers, body)

    async def _preflight(self, request: Request, responder: Responder) -> None:
        asked = request.headers.get("access-control-request-headers", "")
        allowed = asked if asked and all(c.isalnum() or c in "-_, " for c in asked) else PREFLIGHT_ALLOW
        headers = [CORS_ORIGIN, ("access-control-allow-methods", "GET, POST, OPTIONS"),
                   ("access-control-allow-headers", allowed), ("access-control-max-age", "86400")]
        await responder.send(204, headers, b"")

    async def chat_completions(self, request: Request, responder: Responder) -> None:
        """Validate, open upstream (with retries), then relay events or aggregate them."""
        try:
            body = parse_chat_request(request.body)
        except RequestError as exc:
            raise ProxyError(400, exc.message, "invalid_request_error", "invalid_request",
                             param=exc.param) from None
        response = await self.upstream.open(body, lambda: responder.gone)
        # A departed client stops its upstream answer at once; the reading task
        # (this one) is never cancelled, as a task cancelled mid-write over TLS
        # breaks a shared HTTP/2 connection for every request on it.
        responder.on_gone(lambda: self.spawn(stop_upstream(response)))
        try:
            if responder.gone:
                return
            if wants_stream(body):
                await self._relay_stream(response, responder, wants_usage(body))
            else:
                await self._relay_whole(response, responder, body.get("model") or self.config.default_model)
        finally:
            await response.aclose()

    async def _relay_stream(self, response: httpx.Response, responder: Responder,
                            include_usage: bool) -> None:
        """Forward each upstream event as it arrives; end with [DONE] or one error event."""
        relay = StreamRelay(include_usage)
        decoder = SSEDecoder()
        await responder.start(200, SSE_HEADERS)
        keepalive = KeepAlive(responder, self.config.sse_keepalive)
        frames: list[bytes] = []
        try:
            async for raw in response.aiter_bytes():
                keepalive.touch()
                for event, data in decoder.feed(raw):
                    if (frame := relay.relay(event, data)) is not None:
                        frames.append(frame)
                if frames:
                    await responder.write(frames[0] if len(frames) == 1 else b"".join(frames))
                    frames.clear()
                if responder.gone:
                    return
            tail = relay.finish() if relay.done else error_frame(incomplete_failure().error())
        except UpstreamStreamError as exc:
            tail = b"".join(frames) + error_frame(exc.error)  # the events before the error still count
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            tail = _stream_failure(exc)
        finally:
            keepalive.stop()
        await responder.write(tail)
        await responder.end()

    async def _relay_whole(self, response: httpx.Response, responder: Responder, model: str) -> None:
        """Aggregate the upstream events into one chat.completion object."""
        aggregator = CompletionAggregator(model)
        decoder = SSEDecoder()
        try:
            async for raw in response.aiter_bytes():
                for event in decoder.feed(raw):
                    aggregator.add(*event)
                if responder.gone:
                    return
        except UpstreamStreamError as exc:
            raise stream_error_failure(exc.error) from None
        except httpx.HTTPError as exc:
            if responder.gone:
                return
            raise answer_failure(exc) from None
        if not aggregator.done:
            raise incomplete_failure()
        await responder.send(200, JSON_HEADERS, dumps(aggregator.result()))

    async def list_models(self, request: Request, responder: Responder) -> None:
        models = await self.catalog.models()
        await responder.send(200, JSON_HEADERS, dumps({"object": "list", "data": models}))

    async def get_model(self, request: Request, responder: Responder) -> None:
        model_id = urllib.parse.unquote(request.path.split("/models/", 1)[1])
        for model in await self.catalog.models():
            if model["id"] == model_id:
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
                         "errors": counters.errors, "upstream_retries": self.upstream.retries},
            "warnings": self._warnings(),
        }
        return info

    def _warnings(self) -> list[str]:
        warnings = []
        if not self.keys:
            warnings.append("LOCAL_API_KEY is not set: any client can use this proxy")
        if not self.upstream.routes:
            warnings.append("no SambaNova credentials: chat completions answer 503")
        return warnings

    async def page(self, request: Request, responder: Responder) -> None:
        headers = [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-cache"), CORS_ORIGIN]
        await responder.send(200, headers, self.status_page)

    async def debug_token(self, request: Request, responder: Responder) -> None:
        if not self.config.debug_endpoints:
            raise ProxyError(404, f"no route for {request.path}", "invalid_request_error", "not_found")
        await responder.send(200, JSON_HEADERS, dumps(self.tokens.debug_info()))

    def spawn(self, coro) -> None:
        """Run a fire-and-forget coroutine, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _stream_failure(exc: httpx.HTTPError) -> bytes:
    """The last event of a stream whose upstream failed after the 200 was sent."""
    failure = answer_failure(exc)
    if failure.status != 504:
        log.warning("upstream stream failed: %s", type(exc).__name__)
    return error_frame(failure.error())


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def configure_logging(level: str) -> None:
    """One line per record on stderr; protocol libraries kept quiet (hpack logs header values)."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    app = App(config)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await app.aclose()


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv, dict(os.environ), __version__)
    except ConfigError as exc:
        sys.stderr.write(f"sambaproxy: {exc}\n")
        return 2
    configure_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        sys.stderr.write(f"sambaproxy: cannot listen on {config.host}:{config.port}: {exc.strerror}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
