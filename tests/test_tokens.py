"""tokens.py: the token's life on a clock the tests drive, its cache file, and against the fake SambaNova."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import stat
import sys
from collections import deque

import pytest

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

import tokens  # noqa: E402
from auth import LoginError, redact  # noqa: E402
# The login tests' account, canned SambaNova and fixtures: the login half of these tests.
from test_auth import (CONFIG_URL, EMAIL, PASSWORD, SECRETS, T0, TOKEN,  # noqa: E402,F401
                       CannedSamba, _answer, client, run_login, samba)
from tokens import TokenManager, TokenUnavailable, jwt_expiry  # noqa: E402


def make_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


# ---------------------------------------------------------------------------
# Token helpers


def test_jwt_expiry():
    assert jwt_expiry(make_jwt({"exp": 1_700_000_123, "sub": "u"})) == 1_700_000_123.0
    assert jwt_expiry(make_jwt({"exp": 17.5})) == 17.5
    assert jwt_expiry(make_jwt({"sub": "u"})) is None
    assert jwt_expiry(make_jwt({"exp": "1700000000"})) is None
    assert jwt_expiry(make_jwt({"exp": True})) is None
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry("a." + base64.urlsafe_b64encode(b"[1, 2]").decode() + ".c") is None


def test_token_expiry_is_the_earlier_of_cache_time_and_exp():
    assert tokens.token_expiry(make_jwt({"exp": T0 + 50}), T0, 100) == T0 + 50
    assert tokens.token_expiry(make_jwt({"exp": T0 + 500}), T0, 100) == T0 + 100
    assert tokens.token_expiry("opaque-token", T0, 100) == T0 + 100


# ---------------------------------------------------------------------------
# TokenManager, on a fake clock and a fake login


class FakeTime:
    """A clock and a sleep the test drives: sleepers wake only when advance() passes their deadline."""

    def __init__(self, now: float = T0):
        self.now = now
        self.delays: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future]] = []
        self._changed = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def sleep(self, delay: float) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        self.delays.append(delay)
        self._changed.set()
        return future

    def sleeping(self) -> int:
        return sum(not future.done() for _, future in self._sleepers)

    async def until_sleeping(self) -> float:
        """Wait (bounded) until something sleeps on this clock; return the last delay asked for."""
        async def wait():
            while not self.sleeping():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), 1.0)
        return self.delays[-1]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self._sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]


class FakeLogin:
    """Stands in for login(): counts calls, answers scripted tokens or errors, can be held at a gate."""

    def __init__(self, *results):
        self.results = deque(results)
        self.calls = 0
        self.issued: list[str] = []
        self.gate: asyncio.Event | None = None
        self._called = asyncio.Event()

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, client, config_url, email, password):
        assert (config_url, email, password) == (CONFIG_URL, EMAIL, PASSWORD)
        self.calls += 1
        self._called.set()
        if self.gate is not None:
            await self.gate.wait()
        result = self.results.popleft() if self.results else f"{TOKEN}-{self.calls}"
        if isinstance(result, BaseException):
            raise result
        self.issued.append(result)
        return result

    async def wait_calls(self, n: int) -> None:
        async def wait():
            while self.calls < n:
                self._called.clear()
                await self._called.wait()
        await asyncio.wait_for(wait(), 1.0)


@pytest.fixture
def clock():
    return FakeTime()


@pytest.fixture
async def make(clock):
    made: list[TokenManager] = []

    def make(fake_login=None, **kwargs) -> TokenManager:
        kwargs = {"email": EMAIL, "password": PASSWORD, "env_token": None, "config_url": CONFIG_URL,
                  "cache_time": 100.0, "refresh_margin": 10.0, "clock": clock, "sleep": clock.sleep,
                  "rand": lambda: 1.0, "backoff_min": 2.0, "backoff_max": 20.0,
                  "login": fake_login or FakeLogin(), **kwargs}
        manager = TokenManager(**kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.aclose()


def no_await(coroutine):
    """Run a coroutine that must finish without suspending; return its result."""
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    return done.value.value


async def test_start_does_not_wait_for_the_login(make):
    fake = FakeLogin()
    fake.hold()
    manager = make(fake)
    await asyncio.wait_for(manager.start(), 0.5)
    await fake.wait_calls(1)
    info = manager.info()
    assert info["token_status"] == "refreshing" and info["login_in_progress"]
    assert info["token_expires_in"] == 0
    fake.release()
    assert await asyncio.wait_for(manager.get_token(), 1.0) == fake.issued[0]
    assert manager.info()["token_status"] == "active"
    assert manager.info()["token_source"] == "login"
    assert fake.calls == 1


async def test_valid_token_is_returned_without_an_await(make, clock):
    manager = make()
    token = await manager.get_token()
    assert no_await(manager.get_token()) == token
    assert no_await(manager.token_rejected("an-old-token")) == token


async def test_thirty_concurrent_get_token_cause_one_login(make):
    fake = FakeLogin()
    fake.hold()
    manager = make(fake)
    waiters = [asyncio.create_task(manager.get_token()) for _ in range(30)]
    await fake.wait_calls(1)
    fake.release()
    tokens = await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    assert tokens == [fake.issued[0]] * 30
    assert fake.calls == 1


async def test_thirty_concurrent_rejections_of_one_token_cause_one_login(make):
    fake = FakeLogin()
    manager = make(fake)
    old = await manager.get_token()
    fake.hold()
    waiters = [asyncio.create_task(manager.token_rejected(old)) for _ in range(30)]
    await fake.wait_calls(2)
    assert manager.info()["token_status"] == "refreshing"
    fake.release()
    tokens = await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    assert tokens == [fake.issued[1]] * 30 and fake.issued[1] != old
    # A late caller that still holds the old token gets the new one, with no login.
    assert no_await(manager.token_rejected(old)) == fake.issued[1]
    assert fake.calls == 2


async def test_rejected_env_token_without_credentials_is_unavailable(make):
    fake = FakeLogin()
    manager = make(fake, email=None, password=None, env_token="env-token-abc123")
    await manager.start()
    assert manager.info()["token_source"] == "env"
    assert await manager.get_token() == "env-token-abc123"
    with pytest.raises(TokenUnavailable, match="SAMBA_ACCESS_TOKEN"):
        await manager.token_rejected("env-token-abc123")
    assert fake.calls == 0
    assert manager.info()["token_status"] == "expired"


async def test_env_token_without_exp_or_credentials_is_trusted_until_rejected(make, clock):
    fake = FakeLogin()
    manager = make(fake, email=None, password=None, env_token="env-token-long-lived", cache_time=100.0)
    await manager.start()
    clock.now += 1000.0  # ten cache times later: nothing could replace it, so it stays in use
    assert await manager.get_token() == "env-token-long-lived"
    assert manager.info()["token_status"] == "active" and manager.info()["token_expires_in"] > 0
    with pytest.raises(TokenUnavailable):
        await manager.token_rejected("env-token-long-lived")
    assert fake.calls == 0


async def test_env_token_without_exp_but_with_credentials_is_replaced_after_cache_time(make, clock):
    fake = FakeLogin()
    manager = make(fake, env_token="env-token-no-exp", cache_time=100.0)
    clock.now += 99.0
    assert await manager.get_token() == "env-token-no-exp"
    clock.now += 2.0  # past TOKEN_CACHE_TIME: credentials can replace it, so it is not trusted on
    assert await asyncio.wait_for(manager.get_token(), 1.0) == fake.issued[0]
    assert fake.calls == 1 and manager.info()["token_source"] == "login"


async def test_a_request_waits_a_bounded_time_for_a_slow_login(make, monkeypatch):
    monkeypatch.setattr(tokens, "LOGIN_WAIT", 0.05)
    fake = FakeLogin()
    fake.hold()
    manager = make(fake)
    with pytest.raises(TokenUnavailable, match="still running"):
        await asyncio.wait_for(manager.get_token(), 5.0)
    fake.release()
    assert await asyncio.wait_for(manager.get_token(), 5.0) == fake.issued[0]
    assert fake.calls == 1


async def test_rejected_env_token_with_credentials_is_replaced_by_a_login(make):
    fake = FakeLogin()
    manager = make(fake, env_token="env-token-abc123")
    assert await manager.token_rejected("env-token-abc123") == fake.issued[0]
    assert manager.info()["token_source"] == "login" and fake.calls == 1


async def test_no_credentials_and_no_token(make):
    fake = FakeLogin()
    manager = make(fake, email=None, password=None)
    await manager.start()
    assert not manager.has_credentials
    assert manager.info()["token_status"] == "not_available"
    with pytest.raises(TokenUnavailable, match="SAMBA_EMAIL"):
        await manager.get_token()
    assert fake.calls == 0
    assert manager.debug_info() == {"token_exists": False, "token_prefix": None, "token_valid": False,
                                    "expires_in_seconds": 0, "expires_at": None, "source": None,
                                    "token_status": "not_available"}


async def test_env_token_uses_jwt_exp_and_needs_no_login_at_start(make, clock):
    fake = FakeLogin()
    jwt = make_jwt({"exp": T0 + 5000})
    manager = make(fake, env_token=jwt, cache_time=100.0)
    await manager.start()
    assert await clock.until_sleeping() == 5000 - 10      # refresh_margin before exp
    assert fake.calls == 0
    info = manager.info()
    assert (info["token_status"], info["token_source"], info["token_expires_in"]) == ("active", "env", 5000)
    assert manager.debug_info()["token_prefix"] == jwt[:8] + "..."


@pytest.mark.parametrize("rand, expected", [
    (lambda: 1.0, [2, 4, 8, 16, 20, 20]),
    (lambda: 0.0, [2, 2, 4, 8, 10, 10]),
    (lambda: 0.5, [2, 3, 6, 12, 15, 15]),
])
async def test_backoff_schedule_is_exponential_with_jitter_and_bounded(make, clock, rand, expected):
    fake = FakeLogin(*[LoginError("login refused: Wrong email or password.")] * 6)
    manager = make(fake, rand=rand, backoff_min=2.0, backoff_max=20.0)
    await manager.start()
    delays = []
    for attempt in range(1, 7):
        delays.append(await clock.until_sleeping())
        assert fake.calls == attempt
        assert manager.info()["next_attempt_in"] == expected[attempt - 1]
        clock.advance(delays[-1])
    assert delays == expected
    await fake.wait_calls(7)                     # the 7th attempt succeeds
    await clock.until_sleeping()
    info = manager.info()
    assert info["token_status"] == "active" and info["last_error"] is None
    assert info["next_attempt_in"] is None and info["login_failures"] == 0


async def test_retry_after_of_a_429_is_honoured(make, clock):
    fake = FakeLogin(LoginError("login rate limited (too_many_attempts)", retry_after=300.0))
    manager = make(fake, backoff_max=20.0)
    await manager.start()
    assert await clock.until_sleeping() == 300.0
    clock.advance(299)
    with pytest.raises(TokenUnavailable, match=r"too_many_attempts.*next login attempt in 1s"):
        await manager.get_token()
    assert fake.calls == 1
    clock.advance(1)
    await fake.wait_calls(2)


async def test_burst_during_an_outage_causes_no_extra_login(make, clock):
    fake = FakeLogin(*[LoginError("could not reach https://cloud.sambanova.ai: ConnectError")] * 3)
    manager = make(fake)
    await manager.start()
    await clock.until_sleeping()
    results = await asyncio.wait_for(
        asyncio.gather(*(manager.get_token() for _ in range(100)), return_exceptions=True), 1.0)
    assert all(isinstance(r, TokenUnavailable) for r in results)
    assert all("could not reach https://cloud.sambanova.ai: ConnectError" in str(r) for r in results)
    assert fake.calls == 1
    info = manager.info()
    assert info["token_status"] == "error" and info["login_failures"] == 1
    assert info["last_error"] == "could not reach https://cloud.sambanova.ai: ConnectError"
    assert info["next_attempt_in"] == 2


async def test_proactive_refresh_serves_the_old_token_meanwhile(make, clock):
    fake = FakeLogin()
    manager = make(fake, cache_time=100.0, refresh_margin=10.0)
    await manager.start()
    assert await clock.until_sleeping() == 90.0
    old = fake.issued[0]
    assert manager.info()["next_refresh_in"] == 90
    fake.hold()
    clock.advance(90)
    await fake.wait_calls(2)
    assert manager.info()["token_status"] == "refreshing"
    assert manager.info()["token_expires_in"] == 10
    assert no_await(manager.get_token()) == old
    fake.release()
    assert await clock.until_sleeping() == 90.0
    assert no_await(manager.get_token()) == fake.issued[1] != old
    info = manager.info()
    assert info["token_status"] == "active" and info["last_refresh"] == T0 + 90
    assert info["token_expires_in"] == 100


async def test_failed_refresh_keeps_the_valid_token_and_backs_off(make, clock):
    fake = FakeLogin("first-token-abc", LoginError("login endpoint answered 503"))
    manager = make(fake)
    await manager.start()
    clock.advance(await clock.until_sleeping())
    assert await clock.until_sleeping() == 2.0
    info = manager.info()
    assert info["token_status"] == "active" and info["last_error"] == "login endpoint answered 503"
    assert no_await(manager.get_token()) == "first-token-abc"


async def test_jwt_exp_sooner_than_cache_time_rules(make, clock):
    fake = FakeLogin(make_jwt({"exp": T0 + 50}))
    manager = make(fake, cache_time=100.0, refresh_margin=10.0)
    await manager.start()
    assert await clock.until_sleeping() == 40.0
    assert manager.info()["token_expires_in"] == 50


async def test_short_lived_token_is_refreshed_at_half_life_not_at_once(make, clock):
    fake = FakeLogin()
    manager = make(fake, cache_time=8.0, refresh_margin=3600.0)
    await manager.start()
    assert await clock.until_sleeping() == 4.0
    assert fake.calls == 1


async def test_already_expired_token_from_login_counts_as_a_failure(make, clock):
    fake = FakeLogin(make_jwt({"exp": T0 - 1}))
    manager = make(fake)
    await manager.start()
    assert await clock.until_sleeping() == 2.0
    assert manager.info()["last_error"] == "login failed: the new token is already expired"
    assert manager.info()["token_status"] == "error"


async def test_unexpected_login_exception_backs_off(make, clock):
    fake = FakeLogin(RuntimeError(f"bug holding {PASSWORD}"))
    manager = make(fake)
    await manager.start()
    await clock.until_sleeping()
    where = f"{os.path.basename(__file__)}:{line_of(FakeLogin.__call__, 'raise result')}"
    assert manager.info()["last_error"] == f"login failed: RuntimeError at {where}"


def line_of(function, statement: str) -> int:
    """The line number of `statement` in `function`'s source: looked up, so editing the file moves it too."""
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if line.strip() == statement)


async def test_a_login_past_login_timeout_is_a_failed_attempt_that_backs_off(make, clock):
    fake = FakeLogin()
    fake.hold()                            # the login never ends by itself
    manager = make(fake, login_timeout=0.05)
    await manager.start()
    with pytest.raises(TokenUnavailable, match=r"LOGIN_TIMEOUT \(0\.05s\)"):
        await asyncio.wait_for(manager.get_token(), 5)
    info = manager.info()
    assert info["token_status"] == "error" and info["login_failures"] == 1
    assert info["next_attempt_in"] == 2   # backoff_min, as for any failed attempt
    assert manager.login_outcomes == {"ok": 0, "refused": 0, "rate_limited": 0, "timeout": 1,
                                      "unreachable": 0, "failed": 0}
    assert fake.calls == 1 and not info["login_in_progress"]


async def test_each_login_gets_a_fresh_client_that_is_closed_after(make, clock):
    import httpx
    opened = []

    def open_client():
        opened.append(httpx.AsyncClient())
        return opened[-1]

    seen = []

    async def login(client, config_url, email, password):
        seen.append(client)
        return f"{TOKEN}-{len(seen)}"

    manager = make(None, open_client=open_client, login=login)
    await manager.start()
    await asyncio.wait_for(manager.get_token(), 5)
    await asyncio.wait_for(manager.token_rejected(f"{TOKEN}-1"), 5)
    assert seen == opened and len(opened) == 2 and opened[0] is not opened[1]
    assert all(client.is_closed for client in opened)


async def test_aclose_stops_the_background_task(make):
    fake = FakeLogin()
    fake.hold()
    manager = make(fake)
    await manager.start()
    await fake.wait_calls(1)
    await manager.aclose()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not names & {"sambaproxy-token", "sambaproxy-login"}


# ---------------------------------------------------------------------------
# Persistence


def cache_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "sambaproxy.auth" and r.levelno == logging.WARNING and "cache file" in r.getMessage()]


async def test_cache_round_trip_needs_no_login_after_a_restart(make, clock, tmp_path):
    path = tmp_path / "private" / "token.json"
    first = make(FakeLogin(), cache_file=str(path))
    token = await first.get_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["token"] == token and saved["expires_at"] == T0 + 100 and saved["saved_at"] == T0
    assert saved["account"] == tokens.account_hash(EMAIL.lower()) and EMAIL.lower() not in path.read_text().lower()
    assert os.listdir(path.parent) == ["token.json"]

    clock.advance(30)
    second_login = FakeLogin()
    second = make(second_login, cache_file=str(path), email=EMAIL.upper())
    await second.start()
    assert await clock.until_sleeping() == 60.0        # refresh at expiry - margin
    assert second_login.calls == 0
    assert no_await(second.get_token()) == token
    info = second.info()
    assert (info["token_source"], info["token_expires_in"], info["last_refresh"]) == ("cache_file", 70, T0)


async def test_cache_write_is_atomic(make, tmp_path, monkeypatch, caplog):
    path = tmp_path / "token.json"
    path.write_text("previous content")
    replaced = []
    real_replace = os.replace

    def failing_replace(src, dst):
        replaced.append((src, dst))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokens.os, "replace", failing_replace)
    manager = make(FakeLogin(), cache_file=str(path))
    await manager.get_token()
    (src, dst), = replaced
    assert os.path.dirname(src) == str(tmp_path) and dst == str(path) and src != dst
    assert path.read_text() == "previous content"       # never half-written
    assert os.listdir(tmp_path) == ["token.json"]       # no temp file left behind
    assert len(cache_warnings(caplog)) == 1

    monkeypatch.setattr(tokens.os, "replace", real_replace)
    tokens.write_private_file(str(path), b"{}")
    assert path.read_text() == "{}" and stat.S_IMODE(path.stat().st_mode) == 0o600


def _cache(token="cached-token-xyz", expires_at=T0 + 1000, account=None, **extra):
    return json.dumps({"version": 1, "token": token, "expires_at": expires_at,
                       "account": account or tokens.account_hash(EMAIL), "saved_at": T0 - 10, **extra})


@pytest.mark.parametrize("content, why", [
    ("{not json", "corrupt"),
    ("[1, 2, 3]", "corrupt"),
    (_cache(expires_at="soon"), "corrupt"),
    (_cache(token="has space; and=semicolon"), "corrupt"),
    (_cache(account=tokens.account_hash("someone-else@example.com")), "another account"),
    (_cache(expires_at=T0 - 1), "expired"),
    (_cache(token=make_jwt({"exp": T0 - 5})), "expired"),
])
async def test_unusable_cache_file_is_ignored_with_one_warning(make, clock, tmp_path, caplog, content, why):
    path = tmp_path / "token.json"
    path.write_text(content)
    fake = FakeLogin()
    manager = make(fake, cache_file=str(path))
    await manager.start()
    await clock.until_sleeping()
    assert fake.calls == 1 and manager.info()["token_source"] == "login"
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and why in warnings[0].getMessage()
    assert "cached-token-xyz" not in caplog.text
    assert json.loads(path.read_text())["token"] == fake.issued[0]   # replaced by the new login


async def test_unreadable_cache_path_is_ignored(make, clock, tmp_path, caplog):
    (tmp_path / "token.json").mkdir()
    manager = make(FakeLogin(), cache_file=str(tmp_path / "token.json"))
    await manager.start()
    await clock.until_sleeping()
    assert manager.info()["token_status"] == "active"
    assert len([r for r in cache_warnings(caplog) if "cannot read" in r.getMessage()]) == 1


async def test_unwritable_cache_path_warns_once_and_carries_on(make, clock, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    fake = FakeLogin()
    manager = make(fake, cache_file=str(tmp_path / "a-file" / "token.json"))
    first = await manager.get_token()
    second = await manager.token_rejected(first)
    assert fake.calls == 2 and second == fake.issued[1]
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "cannot write" in warnings[0].getMessage()


async def test_env_token_wins_over_the_cache_file(make, clock, tmp_path):
    path = tmp_path / "token.json"
    path.write_text(_cache())
    fake = FakeLogin()
    manager = make(fake, cache_file=str(path), env_token="env-token-abc123")
    await manager.start()
    await clock.until_sleeping()
    assert no_await(manager.get_token()) == "env-token-abc123"
    assert manager.info()["token_source"] == "env" and fake.calls == 0


async def test_empty_cache_setting_disables_persistence(make, clock, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = make(FakeLogin(), cache_file="")
    await manager.get_token()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# No secret, anywhere


async def test_no_secret_reaches_a_log_line_an_error_or_a_status(make, clock, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    samba = CannedSamba()
    assert await run_login(samba) == TOKEN
    samba.routes[f"{samba.issuer}/co/authenticate"] = _answer(
        401, {"error": "access_denied", "error_description": f"wrong {PASSWORD} for {EMAIL}"})
    with pytest.raises(LoginError) as caught:
        await run_login(samba)
    errors.append(str(caught.value))

    fake = FakeLogin(TOKEN, LoginError("login refused: Wrong email or password."))
    manager = make(fake, cache_file=str(tmp_path / "token.json"))
    await manager.start()
    await clock.until_sleeping()
    with pytest.raises(TokenUnavailable) as unavailable:
        await manager.token_rejected(TOKEN)
    errors.append(str(unavailable.value))
    statuses = json.dumps([manager.info(), manager.debug_info()])

    assert caplog.records, "expected the flow to log something"
    ours = [r for r in caplog.records if r.name.startswith("sambaproxy")]
    for record in caplog.records:        # httpx logs URLs at INFO; the app keeps it at WARNING
        text = record.getMessage()
        assert PASSWORD not in text and TOKEN not in text and EMAIL not in text
    for record in ours:
        assert not any(secret in record.getMessage() for secret in SECRETS)
    for text in (*errors, statuses):
        assert not any(secret in text for secret in (*SECRETS, EMAIL))
    assert redact(TOKEN) in statuses


# ---------------------------------------------------------------------------
# Against the fake SambaNova, over a real socket on 127.0.0.1 (fixtures from test_auth)


async def test_token_manager_against_the_fake(samba, tmp_path):
    manager = TokenManager(email=EMAIL, password=PASSWORD, env_token=None,
                           config_url=f"{samba.url}/api/config", cache_time=604800,
                           refresh_margin=60, cache_file=str(tmp_path / "token.json"))
    try:
        await manager.start()
        token = await asyncio.wait_for(manager.get_token(), 5.0)
        assert token in samba.tokens and samba.logins == 1
        assert 3500 < manager.info()["token_expires_in"] <= 3600   # the JWT exp rules, not cache_time
        samba.revoke_tokens()
        renewed = await asyncio.wait_for(manager.token_rejected(token), 5.0)
        assert renewed != token and renewed in samba.tokens and samba.logins == 2
        assert json.loads((tmp_path / "token.json").read_text())["token"] == renewed
    finally:
        await manager.aclose()
