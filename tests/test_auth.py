"""auth.py: the login flow on canned answers, and against the fake SambaNova over a socket."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys

import httpx
import pytest

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

import auth  # noqa: E402
from auth import LoginError, login, redact  # noqa: E402
from fake_samba import FakeSamba  # noqa: E402
from tokens import jwt_expiry  # noqa: E402

EMAIL = "Tester-4c1d@Example.com"
PASSWORD = "pw-secret-Q8v2Lm7x"
TICKET = "ticket-secret-Z3k9"
CODE = "code-secret-W7p1"
TOKEN = "tok-secret-R5n8Jq2m"
CONFIG_URL = "https://cloud.sambanova.ai/api/config"
SECRETS = (PASSWORD, TICKET, CODE, TOKEN)
T0 = 1_700_000_000.0


# ---------------------------------------------------------------------------
# The login flow, on canned answers through httpx.MockTransport


class CannedSamba:
    """Config endpoint, Auth0 and the callback as UPSTREAM.md describes them; routes can be replaced."""

    def __init__(self, issuer: str = "login.sambanova.ai", base: str = "https://cloud.sambanova.ai"):
        self.issuer = issuer if "://" in issuer else f"https://{issuer}"
        self.issuer_config = issuer
        self.base = base
        self.requests: list[httpx.Request] = []
        self.nonce: str | None = None
        self.routes = {
            f"{base}/api/config": self.config,
            f"{self.issuer}/co/authenticate": self.authenticate,
            f"{self.issuer}/authorize": self.authorize,
            f"{base}/api/auth/callback": self.callback,
            f"{base}/": self.home,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        route = self.routes.get(f"{url.scheme}://{url.netloc.decode()}{url.path}")
        return route(request) if route else httpx.Response(404)

    def client(self) -> httpx.AsyncClient:
        return auth.login_client(httpx.MockTransport(self.handler))

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.scheme}://{r.url.netloc.decode()}{r.url.path}" for r in self.requests]

    def config(self, request):
        return httpx.Response(200, json={"clientId": "cid-1", "issuerBaseUrl": self.issuer_config,
                                         "redirectURL": f"{self.base}/api/auth/callback"})

    def authenticate(self, request):
        body = json.loads(request.content)
        if (body.get("username"), body.get("password")) != (EMAIL, PASSWORD):
            return httpx.Response(403, json={"error": "access_denied",
                                             "error_description": "Wrong email or password."})
        return httpx.Response(200, json={"login_ticket": TICKET, "co_verifier": "v", "co_id": "i"})

    def authorize(self, request):
        params = request.url.params
        self.nonce = params["nonce"]
        location = f"{self.base}/api/auth/callback?code={CODE}&state={params['state']}"
        return httpx.Response(302, headers={"location": location})

    def callback(self, request):
        if request.headers.get("cookie") != f"nonce={self.nonce}":
            return httpx.Response(400)
        return httpx.Response(302, headers=[
            ("location", "/"),
            ("set-cookie", "appSession=s1; Path=/; HttpOnly"),
            ("set-cookie", f"access_token={TOKEN}; Domain=sambanova.ai; Path=/; Secure")])

    def home(self, request):
        return httpx.Response(200, text="<html>playground</html>")


async def run_login(samba: CannedSamba, email: str = EMAIL, password: str = PASSWORD) -> str:
    async with samba.client() as client:
        return await login(client, f"{samba.base}/api/config", email, password)


async def test_login_happy_path_with_bare_host_issuer():
    samba = CannedSamba(issuer="login.sambanova.ai")
    assert await run_login(samba) == TOKEN
    assert samba.paths() == [
        "GET https://cloud.sambanova.ai/api/config",
        "POST https://login.sambanova.ai/co/authenticate",
        "GET https://login.sambanova.ai/authorize",
        "GET https://cloud.sambanova.ai/api/auth/callback",
        "GET https://cloud.sambanova.ai/",
    ]
    config, authenticate, authorize, callback, _ = samba.requests
    assert all(r.headers["origin"] == "https://cloud.sambanova.ai" for r in samba.requests)
    assert "Mozilla" in config.headers["user-agent"]
    assert json.loads(authenticate.content) == {
        "client_id": "cid-1", "username": EMAIL, "password": PASSWORD,
        "realm": "Username-Password-Authentication",
        "credential_type": "http://auth0.com/oauth/grant-type/password-realm"}
    params = authorize.url.params
    assert params["client_id"] == "cid-1" and params["response_type"] == "code"
    assert params["redirect_uri"] == "https://cloud.sambanova.ai/api/auth/callback"
    assert params["scope"] == "openid profile email" and params["login_ticket"] == TICKET
    assert params["realm"] == "Username-Password-Authentication"
    assert params["nonce"] and params["state"] and params["nonce"] != params["state"]
    assert json.loads(base64.urlsafe_b64decode(params["auth0Client"] + "=="))["name"] == "auth0.js"
    assert callback.url.params["code"] == CODE
    assert callback.headers["cookie"] == f"nonce={params['nonce']}"


async def test_login_full_url_issuer_keeps_its_path():
    samba = CannedSamba(issuer="http://127.0.0.1:8123/auth", base="http://127.0.0.1:8123")
    assert await run_login(samba) == TOKEN
    assert "POST http://127.0.0.1:8123/auth/co/authenticate" in samba.paths()
    assert "GET http://127.0.0.1:8123/auth/authorize" in samba.paths()


async def test_login_nonce_and_state_are_fresh_each_time():
    samba = CannedSamba()
    await run_login(samba)
    await run_login(samba)
    first, second = (r.url.params for r in samba.requests if r.url.path == "/authorize")
    assert first["nonce"] != second["nonce"] and first["state"] != second["state"]


async def test_login_finds_the_cookie_in_a_middle_redirect_hop():
    samba = CannedSamba(base="http://127.0.0.1:8123")
    samba.routes[f"{samba.base}/api/auth/callback"] = lambda r: httpx.Response(
        302, headers={"location": "/api/auth/finish"})
    # An IP host sets the cookie without a domain, in a hop that is neither first nor last.
    samba.routes[f"{samba.base}/api/auth/finish"] = lambda r: httpx.Response(
        303, headers=[("location", "/"), ("set-cookie", f"access_token={TOKEN}; Path=/; HttpOnly")])
    assert await run_login(samba) == TOKEN
    assert samba.paths()[-3:] == ["GET http://127.0.0.1:8123/api/auth/callback",
                                  "GET http://127.0.0.1:8123/api/auth/finish",
                                  "GET http://127.0.0.1:8123/"]


def _answer(status, body=None, headers=None):
    return lambda request: httpx.Response(status, json=body, headers=headers)


def _redirect_to(location):
    return lambda request: httpx.Response(302, headers={"location": location})


LOGIN_FAILURES = [
    pytest.param("/api/config", _answer(500, {"error": "boom"}), "config endpoint answered 500", None,
                 id="config-500"),
    pytest.param("/api/config", _answer(200, {"clientId": "x"}),
                 "config endpoint answer lacks clientId, issuerBaseUrl or redirectURL", None,
                 id="config-incomplete"),
    pytest.param("/co/authenticate", _answer(403, {"error": "access_denied",
                                                   "error_description": "Wrong email or password."}),
                 "login refused: Wrong email or password.", None, id="wrong-password"),
    pytest.param("/co/authenticate", _answer(401, {"error": "access_denied",
                                                   "error_description": f"bad {PASSWORD} for {EMAIL}"}),
                 "login refused: bad *** for ***", None, id="upstream-echoes-secrets"),
    pytest.param("/co/authenticate", _answer(429, {"error": "too_many_attempts"}, {"retry-after": "30"}),
                 "login rate limited (too_many_attempts)", 30.0, id="429-retry-after"),
    pytest.param("/co/authenticate", _answer(429, None), "login rate limited (too_many_attempts)", None,
                 id="429-no-retry-after"),
    pytest.param("/co/authenticate", _answer(200, {"co_id": "x"}),
                 "login failed: co/authenticate gave no login_ticket", None, id="no-ticket"),
    pytest.param("/co/authenticate", _answer(503, None), "login endpoint answered 503", None, id="auth0-503"),
    pytest.param("/authorize", _answer(200, {}), "login failed: authorize answered 200 without a redirect",
                 None, id="authorize-no-redirect"),
    pytest.param("/authorize", _redirect_to(f"https://cloud.sambanova.ai/api/auth/callback?code={CODE}&state=x"),
                 "login failed: state mismatch in the authorize redirect", None, id="state-mismatch"),
    pytest.param("/authorize", _redirect_to("https://cloud.sambanova.ai/api/auth/callback?error=access_denied"
                                            "&error_description=user%20is%20blocked"),
                 "login refused: user is blocked", None, id="authorize-error"),
    pytest.param("/api/auth/callback", _redirect_to("/"),
                 "login failed: no access_token cookie after the callback (last answer 200)", None,
                 id="no-cookie"),
    pytest.param("/api/auth/callback", _redirect_to("/api/auth/callback"),
                 "login failed: too many redirects after the callback", None, id="redirect-loop"),
]


@pytest.mark.parametrize("path, route, message, retry_after", LOGIN_FAILURES)
async def test_login_failures_raise_safe_login_errors(path, route, message, retry_after):
    samba = CannedSamba()
    key = next(url for url in samba.routes if url.endswith(path))
    samba.routes[key] = route
    with pytest.raises(LoginError) as caught:
        await run_login(samba)
    assert str(caught.value) == message
    assert caught.value.retry_after == retry_after
    assert not any(secret in str(caught.value) for secret in (*SECRETS, EMAIL))
    assert caught.value.__cause__ is None
    assert len(samba.requests) <= 5 + auth.MAX_REDIRECTS


async def test_login_unreachable_names_the_host_and_the_error_only():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(LoginError) as caught:
            await login(client, CONFIG_URL, EMAIL, PASSWORD)
    assert str(caught.value) == "could not reach https://cloud.sambanova.ai: ConnectError"
    assert caught.value.retry_after is None


@pytest.mark.parametrize("value, expected", [
    ("30", 30.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None), ("", None), (None, None),
    ("Tue, 14 Nov 2023 22:14:20 GMT", 60.0),
])
def test_parse_retry_after(value, expected):
    assert auth.parse_retry_after(value, now=T0) == expected


@pytest.mark.parametrize("secret, shown", [
    ("abcdefghijklmnopqrstuvwxyz0123456789", "abcdefgh..."),
    ("abcdefghijkl", "abc..."),
    ("abc", "..."),
    ("", ""),
    (None, ""),
])
def test_redact(secret, shown):
    assert redact(secret) == shown


# ---------------------------------------------------------------------------
# Against the fake SambaNova, over a real socket on 127.0.0.1


@pytest.fixture
async def samba():
    fake = FakeSamba(email=EMAIL, password=PASSWORD, token_ttl=3600)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def client():
    async with auth.login_client() as own:
        yield own


async def test_login_against_the_fake_over_a_socket(samba, client):
    token = await asyncio.wait_for(login(client, f"{samba.url}/api/config", EMAIL, PASSWORD), 5.0)
    assert token in samba.tokens and samba.logins == 1 and samba.login_attempts == 1
    assert 3500 < jwt_expiry(token) - auth.time.time() <= 3601


@pytest.mark.parametrize("status, retry_after, message, expected_retry", [
    (None, None, "login refused: Wrong email or password.", None),
    (429, "7", "login rate limited (too_many_attempts)", 7.0),
    (500, None, "login endpoint answered 500", None),
])
async def test_login_failures_against_the_fake(samba, client, status, retry_after, message, expected_retry):
    samba.login_status, samba.login_retry_after = status, retry_after
    password = PASSWORD + "-wrong" if status is None else PASSWORD
    with pytest.raises(LoginError) as caught:
        await asyncio.wait_for(login(client, f"{samba.url}/api/config", EMAIL, password), 5.0)
    assert (str(caught.value), caught.value.retry_after) == (message, expected_retry)
    assert samba.logins == 0 and samba.login_attempts == 1


async def test_unreachable_upstream(client, closed_port):
    url = f"http://127.0.0.1:{closed_port}"  # bound for the test's life, never listening
    with pytest.raises(LoginError, match=r"^could not reach http://127\.0\.0\.1:\d+: ConnectError$"):
        await asyncio.wait_for(login(client, f"{url}/api/config", EMAIL, PASSWORD), 5.0)


def test_a_login_client_has_its_own_jar_timeouts_and_redirect_bound():
    first, second = auth.login_client(), auth.login_client()
    assert first.cookies is not second.cookies
    assert first.timeout == httpx.Timeout(auth.LOGIN_STEP_TIMEOUT)
    assert first.max_redirects == auth.MAX_REDIRECTS and not first.follow_redirects


async def test_a_hung_login_step_fails_after_the_step_timeout(monkeypatch):
    monkeypatch.setattr(auth, "LOGIN_STEP_TIMEOUT", 0.2)
    samba = CannedSamba()
    hung = asyncio.Event()

    async def hang(request):
        hung.set()
        await asyncio.Event().wait()   # never answers; cancelled by the step timeout

    samba.routes[f"{samba.issuer}/co/authenticate"] = hang
    with pytest.raises(LoginError) as caught:
        await asyncio.wait_for(run_login(samba), 10)
    assert hung.is_set()
    assert str(caught.value) == "login step https://login.sambanova.ai/co/authenticate took longer than 0.2s"
    assert caught.value.outcome == "timeout"


def test_upstream_text_hides_our_secrets_in_any_case():
    text = auth._upstream_text("Wrong login for USER-7F3A@EXAMPLE.COM", ("user-7f3a@example.com",))
    assert "7f3a" not in text.lower() and "***" in text
