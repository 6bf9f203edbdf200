"""The upstream token's whole life: expiry, one login at a time, background refresh, back-off, the cache file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
import traceback
from typing import Awaitable, Callable

import httpx

from auth import LoginError, login, login_client, redact

# The login flow's logger name, kept so that log lines read as before the split.
log = logging.getLogger("sambaproxy.auth")

MAX_RETRY_AFTER = 86400.0     # a Retry-After longer than a day is not believed
CACHE_FILE_MAX_BYTES = 65536
CACHE_FILE_VERSION = 1
LOGIN_WAIT = 90.0             # seconds a request waits for a login in flight before its 503
LOGIN_OUTCOMES = ("ok", "refused", "rate_limited", "timeout", "unreachable", "failed")


class TokenUnavailable(Exception):
    """No token can be had right now; str(e) is the reason, safe to show (HTTP 503)."""


# ---------------------------------------------------------------------------
# Token helpers


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (RFC 7519 §4.1.4) if the token is a JWT carrying one, else None; no signature check."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return float(exp)


def token_expiry(token: str, now: float, cache_time: float) -> float:
    """A fresh token is trusted for cache_time, or until its JWT `exp` if that comes sooner."""
    exp = jwt_expiry(token)
    return now + cache_time if exp is None else min(now + cache_time, exp)


def account_hash(email: str) -> str:
    """The cache file names its account by hash, so it does not hold the email address."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def _plausible_token(token: object) -> bool:
    """A token must fit in a Cookie header unchanged (RFC 6265 §4.1.1 cookie-octets)."""
    return (isinstance(token, str) and 0 < len(token) <= 16384
            and all(0x21 <= ord(ch) <= 0x7E and ch not in '",;\\' for ch in token))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------------------
# Token state

LoginFunc = Callable[[httpx.AsyncClient, str, str, str], Awaitable[str]]


class TokenManager:
    """The upstream token: valid/expired, one login at a time, background refresh, back-off, persistence.

    Each login runs on a fresh client from `open_client` (default auth.login_client), bounded
    as a whole by `login_timeout` (LOGIN_TIMEOUT).
    """

    def __init__(self, open_client: Callable[[], httpx.AsyncClient] | None = None, *,
                 email: str | None, password: str | None,
                 env_token: str | None, config_url: str, cache_time: float = 604800,
                 refresh_margin: float = 3600, cache_file: str | None = None,
                 clock: Callable[[], float] = time.time, login: LoginFunc = login,
                 backoff_min: float = 2.0, backoff_max: float = 600.0,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random, login_timeout: float = 60.0) -> None:
        self._open_client = open_client or login_client
        self._login_timeout = login_timeout
        self.login_outcomes = dict.fromkeys(LOGIN_OUTCOMES, 0)  # for /metrics
        self._email = email or None
        self._password = password or None
        self.has_credentials = bool(self._email and self._password)
        self._config_url = config_url
        self._cache_time = cache_time
        self._refresh_margin = refresh_margin
        self._cache_file = os.path.expanduser(cache_file) if cache_file else None
        self._clock = clock
        self._login = login
        self._backoff_min = backoff_min
        self._backoff_max = max(backoff_min, backoff_max)
        self._sleep = sleep
        self._rand = rand
        self._token: str | None = None
        self._expires_at = 0.0
        self._obtained_at = 0.0
        self._source: str | None = None
        self._last_refresh: float | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._next_attempt_at: float | None = None
        self._save_warned = False
        self._inflight: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._trust_until_rejected = False
        if env_token:
            now = clock()
            exp = jwt_expiry(env_token)
            self._set_token(env_token, exp if exp is not None else now + cache_time, now, "env")
            self._trust_until_rejected = exp is None and not self.has_credentials

    # -- the request path ---------------------------------------------------

    async def get_token(self) -> str:
        """A valid token with no await, else the result of the one in-flight login."""
        token = self._valid_token()
        if token is not None:
            return token
        return await self._wait_for_login()

    async def token_rejected(self, token: str) -> str:
        """Upstream refused `token`: one re-login for every caller that saw it; a replaced token is just returned."""
        if token == self._token and self._expires_at > self._clock():
            log.info("upstream rejected the %s token; it is no longer used", self._source)
            self._expires_at = self._clock()
            self._trust_until_rejected = False
        return await self.get_token()

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the cache file and start the background task; never waits for a login."""
        if self._task is not None:
            return
        if self._source == "env":
            log.info("using SAMBA_ACCESS_TOKEN (expires in %ds)", self._expires_in())
        else:
            self._load_cache()
        if self._token is None and not self.has_credentials:
            log.warning("no SambaNova credentials and no token: chat completions will answer 503")
        self._task = asyncio.create_task(self._run(), name="sambaproxy-token")

    async def aclose(self) -> None:
        """Stop the background task and any login in flight (the shared client is not ours to close)."""
        tasks = [task for task in (self._task, self._inflight) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._task = None

    # -- status ---------------------------------------------------------------

    def info(self) -> dict:
        """Token state for /info: no secret, only status, times and the last error."""
        now = self._clock()
        backoff = self._backoff_remaining(now)
        refresh_at = self._refresh_at() if self.has_credentials and self._valid_token() else None
        return {
            "token_status": self._status(),
            "token_expires_in": self._expires_in(),
            "token_source": self._source,
            "last_error": self._last_error,
            "next_attempt_in": math.ceil(backoff) if backoff > 0 else None,
            "last_refresh": self._last_refresh,
            "next_refresh_in": max(0, math.ceil(refresh_at - now)) if refresh_at is not None else None,
            "login_in_progress": self._inflight is not None,
            "login_failures": self._failures,
        }

    def debug_info(self) -> dict:
        """Token details for /debug/token; the token itself only as redact() shows it."""
        return {
            "token_exists": self._token is not None,
            "token_prefix": redact(self._token) if self._token else None,
            "token_valid": self._valid_token() is not None,
            "expires_in_seconds": self._expires_in(),
            "expires_at": self._expires_at if self._token else None,
            "source": self._source,
            "token_status": self._status(),
        }

    def expires_in(self) -> int:
        """Seconds the current token stays valid; 0 without one."""
        return self._expires_in()

    def unready_reason(self) -> str | None:
        """Why no completion can be served with this account right now, or None when a token is valid."""
        if self._valid_token() is not None:
            return None
        if self._inflight is not None:
            return "logging in to SambaNova"
        if not self.has_credentials:
            return self._no_credentials_reason()
        wait = self._backoff_remaining(self._clock())
        if self._last_error:
            return self._last_error + (f" (next login attempt in {math.ceil(wait)}s)" if wait > 0 else "")
        return "no token yet: the login has not run"

    def _status(self) -> str:
        if self._inflight is not None:
            return "refreshing"  # a login is under way, whether or not a token is still valid
        if self._valid_token() is not None:
            return "active"
        if self._failures:
            return "error"
        return "expired" if self._token is not None else "not_available"

    def _expires_in(self) -> int:
        if self._valid_token() is None:
            return 0
        return max(0, int(self._expires_at - self._clock()))

    # -- logins ---------------------------------------------------------------

    def _valid_token(self) -> str | None:
        if self._token is None:
            return None
        now = self._clock()
        if now < self._expires_at:
            return self._token
        if self._trust_until_rejected:
            # SPEC: SAMBA_ACCESS_TOKEN is used until upstream rejects it; with nothing to
            # replace it and no JWT exp, its local trust is simply renewed.
            self._expires_at = now + self._cache_time
            return self._token
        return None

    async def _wait_for_login(self) -> str:
        """Join the login in flight or start one, unless there are no credentials or we are backing off."""
        if self._inflight is None:
            if not self.has_credentials:
                raise TokenUnavailable(self._no_credentials_reason())
            wait = self._backoff_remaining(self._clock())
            if wait > 0:
                raise TokenUnavailable(f"{self._last_error} (next login attempt in {math.ceil(wait)}s)")
            self._inflight = asyncio.create_task(self._login_once(), name="sambaproxy-login")
        # asyncio.wait never cancels the login the others wait for (nor swallows this
        # caller's own cancellation, as wait_for can on 3.11); a request waits at most
        # LOGIN_WAIT, then gets a clear 503.
        login = self._inflight
        done, _ = await asyncio.wait((login,), timeout=LOGIN_WAIT)
        if not done:
            raise TokenUnavailable(f"the SambaNova login is still running after {LOGIN_WAIT:g}s; "
                                   "try again shortly")
        token = login.result()
        if token is None:
            raise TokenUnavailable(self._last_error or "login failed")
        return token

    def _no_credentials_reason(self) -> str:
        if self._source == "env":
            return ("SAMBA_ACCESS_TOKEN is expired or was rejected by SambaNova, and no "
                    "SAMBA_EMAIL/SAMBA_PASSWORD are set to log in")
        if self._token is not None:
            return "the cached token is expired or was rejected, and no SAMBA_EMAIL/SAMBA_PASSWORD are set"
        return ("no SambaNova credentials: set SAMBA_EMAIL and SAMBA_PASSWORD "
                "(or SAMBA_ACCESS_TOKEN, or SAMBANOVA_API_KEY)")

    async def _login_once(self) -> str | None:
        """One login attempt; records success or failure and never raises (but for cancellation)."""
        valid = self._valid_token() is not None
        log.info("%s SambaNova token", "refreshing the" if valid else "logging in for a")
        try:
            # The login's client is its own: cancelling it at LOGIN_TIMEOUT harms no other request.
            async with asyncio.timeout(self._login_timeout):
                async with self._open_client() as client:
                    token = await self._login(client, self._config_url, self._email, self._password)
            if not _plausible_token(token):
                raise LoginError("login failed: the access_token is not a usable cookie value")
            now = self._clock()
            expires_at = token_expiry(token, now, self._cache_time)
            if expires_at <= now:
                raise LoginError("login failed: the new token is already expired")
        except LoginError as exc:
            self._record_failure(str(exc), exc.retry_after, exc.outcome)
            return None
        except TimeoutError:
            self._record_failure(f"login timed out: it took longer than LOGIN_TIMEOUT "
                                 f"({self._login_timeout:g}s)", None, "timeout")
            return None
        except Exception as exc:  # a bug or an unexpected library error: back off, keep serving
            # Where it was raised, not its message: messages may quote a URL with the ticket.
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            self._record_failure(f"login failed: {type(exc).__name__} at {where}", None)
            return None
        finally:
            self._inflight = None
            self._wake.set()
        self._set_token(token, expires_at, now, "login")
        self._last_refresh = now
        self._failures, self._next_attempt_at, self._last_error = 0, None, None
        self.login_outcomes["ok"] += 1
        log.info("logged in to SambaNova; token valid for %ds", int(expires_at - now))
        self._save_cache()
        return token

    def _set_token(self, token: str, expires_at: float, obtained_at: float, source: str) -> None:
        self._token, self._expires_at, self._obtained_at, self._source = \
            token, expires_at, obtained_at, source

    def _record_failure(self, reason: str, retry_after: float | None, outcome: str = "failed") -> None:
        """Remember why, and when to try again: exponential back-off with jitter, at least Retry-After."""
        self.login_outcomes[outcome if outcome in self.login_outcomes else "failed"] += 1
        self._failures += 1
        delay = self._backoff_delay(self._failures, retry_after)
        self._next_attempt_at = self._clock() + delay
        self._last_error = reason
        log.warning("SambaNova login failed: %s; next attempt in %ds", reason, math.ceil(delay))

    def _backoff_delay(self, failures: int, retry_after: float | None) -> float:
        """Between backoff_min and backoff_max, doubling per failure, jittered down by up to half."""
        base = min(self._backoff_max, self._backoff_min * 2 ** min(failures - 1, 60))
        delay = max(self._backoff_min, base * (0.5 + 0.5 * self._rand()))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def _backoff_remaining(self, now: float) -> float:
        return 0.0 if self._next_attempt_at is None else max(0.0, self._next_attempt_at - now)

    # -- the background task --------------------------------------------------

    def _refresh_at(self) -> float:
        """refresh_margin before expiry, but not before half the token's life (no login storms on short tokens)."""
        life = self._expires_at - self._obtained_at
        earliest = self._obtained_at + max(self._backoff_min, life / 2)
        return max(self._expires_at - self._refresh_margin, earliest)

    def _next_login_at(self) -> float | None:
        """When the background task should log in next; None when it has nothing to do."""
        if not self.has_credentials or self._inflight is not None:
            return None
        if self._next_attempt_at is not None:
            return self._next_attempt_at
        if self._valid_token() is not None:
            return self._refresh_at()
        return self._clock()

    async def _run(self) -> None:
        """Log in when needed, refresh before expiry, retry after failures; woken by every login's end."""
        while True:
            self._wake.clear()
            when = self._next_login_at()
            if when is None:
                await self._wake.wait()
                continue
            delay = when - self._clock()
            if delay > 0:
                await self._pause(delay)
                continue
            try:
                await self._wait_for_login()
            except TokenUnavailable:
                pass  # recorded by _login_once; the next turn sleeps until the back-off ends

    async def _pause(self, delay: float) -> None:
        """Sleep on the injected sleep, waking early when a login ends."""
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    # -- persistence ----------------------------------------------------------

    def _load_cache(self) -> None:
        """Use a valid cached token of this account; ignore any other file with one warning."""
        path = self._cache_file
        if not path:
            return
        try:
            with open(path, "rb") as f:
                raw = f.read(CACHE_FILE_MAX_BYTES + 1)
        except FileNotFoundError:
            log.debug("no token cache file at %s", path)
            return
        except OSError as exc:
            log.warning("ignoring token cache file %s: cannot read it (%s)", path, type(exc).__name__)
            return
        problem = self._use_cached(raw)
        if problem:
            log.warning("ignoring token cache file %s: %s", path, problem)

    def _use_cached(self, raw: bytes) -> str | None:
        """Adopt the cached token, or say in a few safe words why not."""
        try:
            data = json.loads(raw) if len(raw) <= CACHE_FILE_MAX_BYTES else None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            return "corrupt (not a JSON object)"
        token, expires_at = data.get("token"), _number(data.get("expires_at"))
        saved_at = _number(data.get("saved_at"))
        if not _plausible_token(token) or expires_at is None or not isinstance(data.get("account"), str):
            return "corrupt (missing or malformed fields)"
        if not self._email or data["account"] != account_hash(self._email):
            return "it belongs to another account"
        now = self._clock()
        exp = jwt_expiry(token)
        expires_at = expires_at if exp is None else min(expires_at, exp)
        if expires_at <= now:
            return "the token has expired"
        obtained_at = min(saved_at, now) if saved_at is not None else now
        self._set_token(token, expires_at, obtained_at, "cache_file")
        self._last_refresh = obtained_at
        log.info("using the cached token from %s (expires in %ds)", self._cache_file, int(expires_at - now))
        return None

    def _save_cache(self) -> None:
        """Write the token atomically (temp file in the same directory + os.replace), mode 0600."""
        path = self._cache_file
        if not path or self._source != "login" or not self._email:
            return
        data = {"version": CACHE_FILE_VERSION, "token": self._token, "expires_at": self._expires_at,
                "account": account_hash(self._email), "saved_at": self._last_refresh}
        try:
            write_private_file(path, json.dumps(data).encode())
        except OSError as exc:
            if self._save_warned:
                log.debug("token cache file %s still not writable (%s)", path, type(exc).__name__)
                return
            self._save_warned = True
            log.warning("cannot write token cache file %s (%s: %s); carrying on without it",
                        path, type(exc).__name__, exc.strerror or "error")
            return
        log.debug("token saved to %s", path)


def write_private_file(path: str, content: bytes) -> None:
    """Replace `path` atomically with `content`, readable by its owner only (dir 0700, file 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".token-", suffix=".tmp", dir=directory)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
