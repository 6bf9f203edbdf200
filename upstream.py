"""The upstream side: the routes to SambaNova, retries before the first byte, the model list.

A route turns an OpenAI request into one upstream HTTP request: the account
route posts to the playground's completion endpoint with the `access_token`
cookie, the key route to the official API with `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import random
import ssl
import time

import httpx

from auth import USER_AGENT, parse_retry_after
from config import Config
from departure import Attempt, Departure
from chat import api_payload, new_fingerprint, samba_payload
from errors import ProxyError, model_not_found, request_failure, status_failure
from http_common import ClientGone
from sse import dumps
from tokens import TokenManager, TokenUnavailable

log = logging.getLogger("sambaproxy.upstream")

BROWSER_HEADERS = {
    "accept": "text/event-stream",
    "content-type": "application/json",
    "origin": "https://cloud.sambanova.ai",
    "referer": "https://cloud.sambanova.ai/",
    "user-agent": USER_AGENT,
}
ERROR_BODY_LIMIT = 65536
KNOWN_MODELS = (
    "DeepSeek-R1",
    "DeepSeek-V3-0324",
    "Meta-Llama-3.3-70B-Instruct",
    "Meta-Llama-3.1-8B-Instruct",
    "Llama-4-Maverick-17B-128E-Instruct",
)


class _NoCookies(httpx.Cookies):
    """An always empty jar: every request passes its cookies explicitly."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Keep nothing (and skip httpx's urllib-based parsing on every response)."""


class OutboundClient(httpx.AsyncClient):
    """httpx's client without a shared cookie jar, so no cookie leaks from one route to another."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, value) -> None:
        """Ignored: the jar stays empty."""


def make_client(config: Config, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The one outbound client: HTTP/2, bounded pool, no cookie jar; `verify` may share a TLS context."""
    return OutboundClient(
        http2=True,
        verify=verify,
        limits=httpx.Limits(max_connections=config.upstream_max_connections,
                            max_keepalive_connections=config.upstream_max_connections),
        # Waiting for a free pooled connection is bounded like connecting: a full
        # pool answers 503 after UPSTREAM_CONNECT_TIMEOUT instead of queueing for minutes.
        timeout=httpx.Timeout(connect=config.upstream_connect_timeout,
                              read=config.upstream_read_timeout, write=config.upstream_read_timeout,
                              pool=config.upstream_connect_timeout),
    )


class AccountRoute:
    """The playground endpoint, authenticated by the account's access_token cookie."""

    name = "account"

    def __init__(self, url: str, tokens: TokenManager, default_model: str, prefix: str) -> None:
        self.url = url
        self.tokens = tokens
        self.default_model = default_model
        self.prefix = prefix
        self.healthy = True

    async def credential(self) -> str:
        try:
            return await self.tokens.get_token()
        except TokenUnavailable as exc:
            raise ProxyError(503, f"no SambaNova token available: {exc}", "service_unavailable",
                             "token_unavailable", fallback=True) from None

    def request_parts(self, body: dict, token: str) -> tuple[dict, bytes]:
        headers = dict(BROWSER_HEADERS, cookie=f"access_token={token}")
        payload = samba_payload(body, default_model=self.default_model,
                                fingerprint=new_fingerprint(self.prefix))
        return headers, dumps(payload)

    async def rejected(self, token: str) -> None:
        try:
            await self.tokens.token_rejected(token)
        except TokenUnavailable as exc:
            raise ProxyError(503, f"SambaNova rejected the token and no new one could be had: {exc}",
                             "service_unavailable", "token_unavailable", fallback=True) from None


class ApiKeyRoute:
    """The official OpenAI-compatible API, authenticated by SAMBANOVA_API_KEY."""

    name = "api_key"

    def __init__(self, base_url: str, api_key: str, default_model: str) -> None:
        self.base_url = base_url
        self.url = base_url + "/chat/completions"
        self.authorization = f"Bearer {api_key}"
        self.default_model = default_model
        self.healthy = True

    async def credential(self) -> str:
        return self.authorization

    def request_parts(self, body: dict, token: str) -> tuple[dict, bytes]:
        headers = {"accept": "text/event-stream", "content-type": "application/json",
                   "authorization": token}
        return headers, dumps(api_payload(body, default_model=self.default_model))

    async def rejected(self, token: str) -> None:
        raise ProxyError(502, "SambaNova rejected SAMBANOVA_API_KEY", "upstream_error",
                         "upstream_auth_failed")


def _no_note(route: str, outcome: str) -> None:
    """The default attempt listener: nobody listens."""


class Upstream:
    """Opens upstream answers: route choice, one re-login on 401/403, retries before the first byte."""

    def __init__(self, client: httpx.AsyncClient, routes: list, *,
                 retry_delays: tuple[float, ...] = (0.5, 2.0), retry_after_cap: float = 10.0) -> None:
        self.client = client
        self.routes = routes
        self.retry_delays = retry_delays
        self.retry_after_cap = retry_after_cap
        self.retries = 0
        self.note = _no_note  # note(route_name, outcome) hears of every attempt (see attempt_outcome)
        self._stops: set[asyncio.Task] = set()  # HTTP/2 resets of abandoned attempts

    async def open(self, body: dict, departure: Departure) -> httpx.Response:
        """Return a 200 streaming response, or raise the ProxyError the client should see.

        Raises ClientGone, before any upstream request or between attempts, once the client has left.
        """
        if not self.routes:
            raise ProxyError(503, "no SambaNova credentials configured: set SAMBA_EMAIL and "
                             "SAMBA_PASSWORD, SAMBA_ACCESS_TOKEN or SAMBANOVA_API_KEY",
                             "service_unavailable", "no_credentials")
        for route in self.routes:
            try:
                response = await self._open_route(route, _chat_request(route, body), departure)
            except ProxyError as exc:
                route.healthy = exc.status not in (502, 503, 504, 429)
                if not exc.fallback or route is self.routes[-1]:
                    raise
                log.info("route %s unavailable (%s); trying the next route", route.name, exc.message)
                continue
            route.healthy = True
            return response
        raise AssertionError("unreachable")

    async def open_on(self, route, build, departure: Departure) -> httpx.Response:
        """Open one route's answer to a request made by `build(token) -> (url, headers, content)`.

        The official API's other endpoints use it: the same retries, error mapping and
        departure checks as chat completions, with no fallback to another route.
        """
        return await self._open_route(route, build, departure)

    async def _open_route(self, route, build, departure: Departure) -> httpx.Response:
        note = self.note
        attempt = 0
        auth_retried = False
        while True:
            if departure.gone:
                raise ClientGone()
            token = await route.credential()
            try:
                response = await self._send_once(route, build, token, departure)
                note(route.name, "ok")
                return response
            except _Rejected:
                note(route.name, "rejected" if auth_retried else "relogin")
                if auth_retried:
                    raise ProxyError(502, "SambaNova rejected the credentials again after a "
                                     "fresh login", "upstream_error", "upstream_auth_failed") from None
                auth_retried = True
                await route.rejected(token)
                continue
            except ProxyError as error:
                if departure.gone:
                    raise ClientGone() from None
                if error.fallback and route is not self.routes[-1]:
                    note(route.name, attempt_outcome(error))
                    raise
                if not error.retryable or attempt >= len(self.retry_delays):
                    note(route.name, attempt_outcome(error))
                    raise
                note(route.name, "retried")
                delay = self._retry_delay(attempt, error.retry_after)
                log.info("upstream failed (%s); retry %d in %.1fs", error.code, attempt + 1, delay)
            attempt += 1
            self.retries += 1
            await departure.pause(delay)

    async def _send_once(self, route, build, token: str, departure: Departure) -> httpx.Response:
        if departure.gone:  # a login or a retry delay may have taken a while
            raise ClientGone()
        url, headers, content = build(token)
        attempt = Attempt(self.client, departure, self._stops)
        request = self.client.build_request("POST", url, headers=headers, content=content,
                                            extensions={"trace": attempt.trace})
        attempt.extensions = request.extensions  # the dict httpcore gets (httpx adds the timeouts)
        departure.stop_with(attempt.stop)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise request_failure(exc) from None
        finally:
            attempt.opening = False
            departure.stop_with(None)
        if response.status_code == 200:
            return response
        detail = await _read_error(response)
        if response.status_code in (401, 403):
            raise _Rejected()
        if response.status_code < 400:  # a 204 or a redirect is no answer a client could use
            raise ProxyError(502, f"SambaNova answered HTTP {response.status_code} instead of an answer",
                             "upstream_error", "bad_gateway")
        raise status_failure(response.status_code, detail, response.headers.get("retry-after"),
                            route.name == "account")

    def _retry_delay(self, attempt: int, retry_after: str | None) -> float:
        seconds = parse_retry_after(retry_after)
        if seconds is not None:
            return min(seconds, self.retry_after_cap)
        base = self.retry_delays[attempt]
        return base * (0.5 + random.random())


def attempt_outcome(error: ProxyError) -> str:
    """How a last upstream attempt failed, for the attempts metric."""
    if error.status == 429:
        return "rate_limited"
    if error.status == 504:
        return "timeout"
    if error.code == "upstream_unreachable":
        return "unreachable"
    return "server_error" if error.status >= 500 else "client_error"


def _chat_request(route, body: dict):
    """The request builder of a chat completion on one route."""
    def build(token: str) -> tuple[str, dict, bytes]:
        return (route.url, *route.request_parts(body, token))
    return build


class _Rejected(Exception):
    """Upstream refused the credential (401/403)."""


async def _read_error(response: httpx.Response) -> dict:
    """Read a bounded error body and pull out message, type and code."""
    raw = b""
    try:
        async for piece in response.aiter_bytes():
            raw += piece
            if len(raw) > ERROR_BODY_LIMIT:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    return _error_fields(raw[:ERROR_BODY_LIMIT])


def _error_fields(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return {"message": text[:500] or None}
    if not isinstance(data, dict):
        return {"message": str(data)[:500]}
    error = data.get("error", data)
    if isinstance(error, dict):
        message = error.get("message") or error.get("error_description") or error.get("detail")
        return {"message": message and str(message)[:500], "type": error.get("type"),
                "code": error.get("code")}
    return {"message": str(data.get("error_description") or error)[:500], "code": str(error)}


class ModelCatalog:
    """The upstream model list, cached; the last good list (or a built-in one) serves outages.

    It also resolves the model names clients send: MODEL_ALIASES first, then the known
    ids in any case; a name unknown to a fresh list from upstream is refused at once.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, headers: dict, *,
                 aliases: tuple[tuple[str, str], ...] = (), ttl: float = 300.0,
                 clock=time.monotonic) -> None:
        self.client = client
        self.url = url
        self.headers = headers
        self.ttl = ttl
        self.clock = clock
        self.created = int(time.time())
        self.aliases = aliases
        self._alias_targets = {alias.lower(): target for alias, target in aliases}
        self._models: list[dict] | None = None
        self._listing = self._with_aliases(self._builtin())  # what /v1/models shows
        self._ids = {model_id.lower(): model_id for model_id in KNOWN_MODELS}  # lower case -> id
        self._fetched_at = float("-inf")
        self._fresh_at = float("-inf")  # when a list last came from upstream
        self._lock = asyncio.Lock()

    async def models(self) -> list[dict]:
        """The model list with the aliases, refreshed when older than the TTL."""
        if self.clock() - self._fetched_at < self.ttl and self._models is not None:
            return self._listing
        async with self._lock:
            if self.clock() - self._fetched_at >= self.ttl or self._models is None:
                await self._refresh()
        return self._listing

    def needs_refresh(self) -> bool:
        """Whether the list is due for a (background) refresh and none is running."""
        return self.clock() - self._fetched_at >= self.ttl and not self._lock.locked()

    def resolve(self, name: str) -> str:
        """The upstream id for a client's model name (from the list in hand, never fetched here).

        An alias gives its target; a known id matches in any case; an unknown name goes
        upstream as it is, unless the list is fresh from upstream: then 404 model_not_found.
        """
        target = self._alias_targets.get(name.lower())
        if target is not None:
            return self._ids.get(target.lower(), target)
        known = self._ids.get(name.lower())
        if known is not None:
            return known
        if self.clock() - self._fresh_at < self.ttl:
            names = {**self._ids, **{alias.lower(): alias for alias, _ in self.aliases}}
            # A client's name may be long: compare its start only, so the cost stays small.
            closest = difflib.get_close_matches(name[:100].lower(), names, n=3, cutoff=0.0)
            raise model_not_found(name, [names[match] for match in closest])
        return name

    async def _refresh(self) -> None:
        try:
            response = await self.client.get(self.url, headers=self.headers)
            response.raise_for_status()
            entries = response.json()["data"]
            models = [self._normalise(e) for e in entries if isinstance(e, dict) and e.get("id")]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("model list unavailable (%s); serving the %s list", type(exc).__name__,
                        "last good" if self._models is not None else "built-in")
            self._fetched_at = self.clock() - self.ttl + min(self.ttl, 30.0)
            return
        self._models = models
        self._listing = self._with_aliases(models)
        self._ids = {m["id"].lower(): m["id"] for m in models}
        self._fetched_at = self._fresh_at = self.clock()

    def _normalise(self, entry: dict) -> dict:
        model = dict(entry)
        model["id"] = str(model["id"])
        model.setdefault("object", "model")
        model.setdefault("owned_by", "sambanova")
        if not isinstance(model.get("created"), int):
            model["created"] = self.created
        return model

    def _with_aliases(self, models: list[dict]) -> list[dict]:
        """The list followed by one entry per alias: its target's, under the alias's name."""
        by_id = {m["id"].lower(): m for m in models}
        entries = [{**by_id.get(target.lower(), self._normalise({"id": target})), "id": alias,
                    "root": by_id.get(target.lower(), {}).get("id", target)}
                   for alias, target in self.aliases]
        return models + entries

    def _builtin(self) -> list[dict]:
        return [self._normalise({"id": model_id}) for model_id in KNOWN_MODELS]
