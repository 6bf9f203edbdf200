"""SambaNova login: the Auth0 cross-origin flow of UPSTREAM.md, from the config endpoint to the access_token cookie.

A login runs on a short-lived client of its own (login_client): its own cookie jar, its own
timeouts, httpx following the callback's redirects. Cancelling it (LOGIN_TIMEOUT) can only
break that private client, never the shared completion client's connections.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import math
import re
import secrets
import ssl
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger("sambaproxy.auth")

BROWSER_ORIGIN = "https://cloud.sambanova.ai"
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
              "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36")
REALM = "Username-Password-Authentication"
GRANT_TYPE = "http://auth0.com/oauth/grant-type/password-realm"
# auth0.js names itself in `auth0Client` (base64url JSON); the login page sends the same.
AUTH0_CLIENT = base64.urlsafe_b64encode(
    json.dumps({"name": "auth0.js", "version": "9.28.0"}).encode()).decode().rstrip("=")
MAX_REDIRECTS = 10            # bound on the callback's redirect chain
LOGIN_STEP_TIMEOUT = 30.0     # seconds one login step (one request and its redirects) may take in all
# RFC 9110 §15.4: the redirect statuses that carry a Location.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class LoginError(Exception):
    """A failed login; str(e) is safe to show and never holds the password, ticket, code or token.

    `outcome` sorts it for the logins metric: refused, rate_limited, timeout, unreachable or failed.
    """

    def __init__(self, message: str, retry_after: float | None = None, outcome: str = "failed") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.outcome = outcome


def login_client(transport: httpx.AsyncBaseTransport | None = None,
                 verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """A client for one login: own cookie jar and timeouts, at most MAX_REDIRECTS redirects.

    Pass the completion client's TLS context as `verify`: a context of its own costs about
    1 MB (the CA bundle) per login. ALPN offers h2 like the completion client, because httpcore
    sets the ALPN list on the shared context before each handshake.
    """
    return httpx.AsyncClient(timeout=httpx.Timeout(LOGIN_STEP_TIMEOUT), max_redirects=MAX_REDIRECTS,
                             transport=transport, verify=verify, http2=True)


def redact(secret: str | None) -> str:
    """Show at most the first 8 characters (a quarter of short secrets) so a log or page never holds one."""
    if not secret:
        return ""
    return secret[:min(8, len(secret) // 4)] + "..."


# ---------------------------------------------------------------------------
# The login flow


@dataclass(frozen=True)
class _LoginConfig:
    client_id: str
    issuer: str
    redirect_url: str


async def login(client: httpx.AsyncClient, config_url: str, email: str, password: str) -> str:
    """Run the 4-step Auth0 cross-origin login of UPSTREAM.md and return the access_token cookie."""
    config = await _read_config(client, config_url)
    issuer = issuer_url(config.issuer)
    ticket = await _authenticate(client, issuer, config.client_id, email, password)
    nonce, state = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    callback = await _authorize(client, issuer, config, ticket, nonce, state, (email, password))
    token = await _follow_callback(client, callback, nonce)
    log.debug("login flow finished with a token")
    return token


def issuer_url(issuer: str) -> str:
    """Real `issuerBaseUrl` is a bare host (-> https://host); a local fake gives a full URL whose path is kept."""
    issuer = issuer.strip().rstrip("/")
    return issuer if "://" in issuer else "https://" + issuer


async def _read_config(client: httpx.AsyncClient, config_url: str) -> _LoginConfig:
    """Step 1: the playground's config names the Auth0 client, issuer and callback."""
    response = await _fetch(client, "GET", config_url, headers=_browser_headers())
    if response.status_code != 200:
        raise LoginError(f"config endpoint answered {response.status_code}")
    data = _json_object(response)
    fields = [data.get(name) for name in ("clientId", "issuerBaseUrl", "redirectURL")]
    if not all(isinstance(value, str) and value for value in fields):
        raise LoginError("config endpoint answer lacks clientId, issuerBaseUrl or redirectURL")
    return _LoginConfig(*fields)


async def _authenticate(client: httpx.AsyncClient, issuer: str, client_id: str,
                        email: str, password: str) -> str:
    """Step 2: trade the credentials for a one-time login ticket."""
    body = {"client_id": client_id, "username": email, "password": password,
            "realm": REALM, "credential_type": GRANT_TYPE}
    response = await _fetch(client, "POST", f"{issuer}/co/authenticate", json=body,
                            headers=_browser_headers(**{"auth0-client": AUTH0_CLIENT}))
    status = response.status_code
    if status == 429:
        code = _error_code(_json_object(response, strict=False).get("error"), "too_many_attempts")
        raise LoginError(f"login rate limited ({code})",
                         retry_after=parse_retry_after(response.headers.get("retry-after")),
                         outcome="rate_limited")
    if status in (400, 401, 403):
        data = _json_object(response, strict=False)
        reason = _upstream_text(data.get("error_description") or data.get("error"), (email, password))
        raise LoginError(f"login refused: {reason or f'co/authenticate answered {status}'}", outcome="refused")
    if status != 200:
        raise LoginError(f"login endpoint answered {status}")
    ticket = _json_object(response).get("login_ticket")
    if not isinstance(ticket, str) or not ticket:
        raise LoginError("login failed: co/authenticate gave no login_ticket")
    return ticket


async def _authorize(client: httpx.AsyncClient, issuer: str, config: _LoginConfig, ticket: str,
                     nonce: str, state: str, hidden: tuple[str, str]) -> httpx.URL:
    """Step 3: trade the ticket for a code, reading the redirect instead of following it."""
    params = {"client_id": config.client_id, "response_type": "code",
              "redirect_uri": config.redirect_url, "scope": "openid profile email",
              "nonce": nonce, "state": state, "login_ticket": ticket, "realm": REALM,
              "auth0Client": AUTH0_CLIENT}
    response = await _fetch(client, "GET", f"{issuer}/authorize", params=params,
                            headers=_browser_headers())
    location = response.headers.get("location")
    if response.status_code not in REDIRECT_STATUSES or not location:
        raise LoginError(f"login failed: authorize answered {response.status_code} without a redirect")
    callback = _join(response.url, location)
    query = callback.params
    if "error" in query:
        reason = _upstream_text(query.get("error_description") or query.get("error"), hidden)
        raise LoginError(f"login refused: {reason}", outcome="refused")
    if query.get("state") != state:
        raise LoginError("login failed: state mismatch in the authorize redirect")
    if not query.get("code"):
        raise LoginError("login failed: no code in the authorize redirect")
    return callback


async def _follow_callback(client: httpx.AsyncClient, url: httpx.URL, nonce: str) -> str:
    """Step 4: follow the callback's redirects, reading access_token from every answer's Set-Cookie.

    Every hop is read, not the jar: a fake on an IP address sets the cookie without a domain,
    and some cookie jars drop such cookies.
    """
    client.cookies.set("nonce", nonce, domain=url.host)
    headers = _browser_headers(accept="text/html,application/xhtml+xml,*/*;q=0.8")
    try:
        response = await _fetch(client, "GET", url, headers=headers, follow_redirects=True)
    except _TooManyRedirects:
        raise LoginError("login failed: too many redirects after the callback") from None
    token = None
    for hop in (*response.history, response):
        value = set_cookies(hop).get("access_token")
        if value is not None:
            token = value or None  # a later hop may delete it again
    if not token:
        raise LoginError("login failed: no access_token cookie after the callback "
                         f"(last answer {response.status_code})")
    return token


class _TooManyRedirects(Exception):
    """The callback's redirect chain passed MAX_REDIRECTS."""


async def _fetch(client: httpx.AsyncClient, method: str, url: str | httpx.URL, *,
                 follow_redirects: bool = False, **kwargs) -> httpx.Response:
    """Send one login request (and its redirects) within LOGIN_STEP_TIMEOUT, mapping failures to LoginError."""
    try:
        request = client.build_request(method, url, **kwargs)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise LoginError(f"invalid login URL {_safe_url(url)}") from None
    where = _safe_url(request.url)
    log.debug("login: %s %s", method, where)
    try:
        # The client is this login's own, so cancelling a step mid-request harms no other request.
        async with asyncio.timeout(LOGIN_STEP_TIMEOUT):
            response = await client.send(request, follow_redirects=follow_redirects)
    except httpx.TooManyRedirects:
        raise _TooManyRedirects() from None
    except (httpx.TimeoutException, TimeoutError):
        log.debug("login: %s timed out", where)
        raise LoginError(f"login step {where} took longer than {LOGIN_STEP_TIMEOUT:g}s",
                         outcome="timeout") from None
    except httpx.RequestError as exc:
        log.debug("login: %s failed: %s", where, type(exc).__name__)
        raise LoginError(f"could not reach {_origin(request.url)}: {type(exc).__name__}",
                         outcome="unreachable") from None
    log.debug("login: %s answered %d", where, response.status_code)
    return response


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Name -> value of each Set-Cookie (RFC 6265 §4.1); a deletion (empty value, Max-Age<=0) maps to ""."""
    cookies = {}
    for header in response.headers.get_list("set-cookie"):
        pair, _, attributes = header.partition(";")
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        for attribute in attributes.split(";"):
            key, _, arg = attribute.partition("=")
            if key.strip().lower() == "max-age" and arg.strip().lstrip("-").isdigit() \
                    and int(arg.strip()) <= 0:
                value = ""
        cookies[name.strip()] = value
    return cookies


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _browser_headers(**extra: str) -> dict[str, str]:
    """Headers of the playground page in a browser; Auth0 checks the origin of cross-origin logins."""
    headers = {"user-agent": USER_AGENT, "accept": "application/json, text/plain, */*",
               "accept-language": "en-US,en;q=0.9", "origin": BROWSER_ORIGIN,
               "referer": BROWSER_ORIGIN + "/"}
    headers.update(extra)
    return headers


def _json_object(response: httpx.Response, *, strict: bool = True) -> dict:
    """The JSON object of an answer; strict answers that are not one are a LoginError."""
    try:
        data = json.loads(response.content)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    if strict:
        raise LoginError(f"login failed: {_safe_url(response.url)} did not answer a JSON object")
    return {}


def _error_code(value: object, default: str) -> str:
    """An Auth0 error code if it looks like one (letters and underscores), else the default."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.replace("_", "").isalnum():
        return value
    return default


def _upstream_text(value: object, hidden: tuple[str, ...]) -> str:
    """Upstream's words made safe to show: printable, short, and with our own secrets blanked."""
    text = value if isinstance(value, str) else ""
    for secret in hidden:
        if secret:
            text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
    return "".join(ch if ch.isprintable() else " " for ch in text)[:200].strip()


def _join(base: httpx.URL, location: str) -> httpx.URL:
    """Resolve a Location against the request URL (RFC 9110 §10.2.2)."""
    try:
        return base.join(location)
    except httpx.InvalidURL:
        raise LoginError("login failed: unreadable redirect location") from None


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _safe_url(url: str | httpx.URL) -> str:
    """A URL without its query (which carries the ticket or code) or user info, for logs and errors."""
    try:
        url = httpx.URL(url)
        return _origin(url) + url.path
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(unreadable URL)"
