"""A faithful fake of SambaNova Cloud, for the test suite and `make demo`.

It speaks HTTP/1.1 on 127.0.0.1 (through fake_http.py) and serves what UPSTREAM.md
describes: the Auth0 login flow, the playground's /api/completion, and the
official API's /v1/models and /v1/chat/completions.  Tests script answers
through `FakeSamba.script` and observe it through its counters and `wait_for`.

Standalone: python tests/fake_samba.py --port 8123 --email E --password P
(GET /_fake/stats shows its counters; POST /_fake/script {"stall_after": 1} scripts the next answer.)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import http
import inspect
import json
import logging
import math
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

from fake_http import Conn, FakeHTTPServer, Gone, Request

log = logging.getLogger("fake_samba")

REALM = "Username-Password-Authentication"
GRANT = "http://auth0.com/oauth/grant-type/password-realm"
DONE = "data: [DONE]\n\n"
PING = b": ping\n\n"
ENV_TYPES = ("text", "vision", "audio")
STREAM_ERROR = {"error": {"message": "Model overloaded: the stream was interrupted",
                          "type": "server_error", "param": None, "code": "stream_error"}}
# status -> (message, type, code) of OpenAI-shaped error bodies, as UPSTREAM.md lists them.
ERRORS = {
    400: ("Bad request", "invalid_request_error", "bad_request"),
    401: ("Invalid authentication credentials", "authentication_error", "invalid_authentication"),
    403: ("Forbidden", "permission_error", "forbidden"),
    404: ("Not found", "invalid_request_error", "not_found"),
    408: ("Request timed out", "server_error", "timeout"),
    410: ("This model has been retired", "invalid_request_error", "model_retired"),
    429: ("Rate limit exceeded", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Unknown error when running prediction service", "server_error", "internal_error"),
    503: ("Service unavailable for maintenance", "server_error", "service_unavailable"),
    504: ("Queue Full", "server_error", "queue_full"),
}


# The official API's /v1/models entries: note there is no "created", unlike OpenAI's schema.
MODELS = tuple(
    {"id": mid, "object": "model", "owned_by": owner, "context_length": ctx,
     "max_completion_tokens": out, "pricing": {"prompt": prompt, "completion": completion}}
    for mid, owner, ctx, out, prompt, completion in (
        ("DeepSeek-R1", "deepseek-ai", 32768, 32768, "0.000005", "0.000007"),
        ("DeepSeek-R1-0528", "deepseek-ai", 131072, 7168, "0.000005", "0.000007"),
        ("DeepSeek-V3-0324", "deepseek-ai", 32768, 32768, "0.000003", "0.0000045"),
        ("Meta-Llama-3.3-70B-Instruct", "meta-llama", 131072, 3072, "0.0000006", "0.0000012"),
        ("Meta-Llama-3.1-8B-Instruct", "meta-llama", 16384, 4096, "0.0000001", "0.0000002"),
        ("Llama-4-Maverick-17B-128E-Instruct", "meta-llama", 131072, 4096, "0.00000063",
         "0.0000018"),
        ("E5-Mistral-7B-Instruct", "intfloat", 4096, 0, "0.00000013", "0"),
        ("Whisper-Large-v3", "openai", 4096, 4096, "0.0000001", "0")))


@dataclass
class Reply:
    """One scripted answer of /api/completion or /v1/chat/completions."""
    status: int = 200
    text: str | None = None
    chunks: list[dict | str] | None = None  # dict -> data: JSON; str -> raw SSE text, sent as is
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    stall_after: int | None = None
    error_event_after: int | None = None
    usage: bool = True
    tool_calls: list | None = None
    # Additions to the shared contract:
    first_delay: float = 0.0   # silence after the 200 headers, before chunk 1 (R1 thinking)
    hang: bool = False         # accept the request, never answer (until the client leaves)
    done: bool = True          # end with data: [DONE] (explicit chunks: unless they hold one)
    body: str | None = None    # raw body of a non-200 answer (e.g. an HTML gateway page)
    reasoning: str | None = None  # thinking sent first as delta.reasoning_content (parsed style)
    head_delay: float = 0.0    # silence before the answer's status line (a slow queue)
    after_events: str | None = None  # then "drop" the TCP connection, or "linger" open and silent


# ---------------------------------------------------------------- answer bodies

def _text_of(content) -> str:
    """Text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _echo(messages: list, model: str = "") -> str:
    """The default answer, so tests can see their prompt went through.

    DeepSeek-R1 thinks first, inside `<think>...</think>`, as SambaNova's does;
    DeepSeek-R1-0528 writes only the closing tag, as R1-0528-style templates do.
    """
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = _text_of(users[-1].get("content")) if users else ""
    thought = f"The user wrote: {prompt}. I will echo it.\n</think>\n\n"
    if model == "DeepSeek-R1":
        return f"<think>\n{thought}Echo: {prompt}"
    if model == "DeepSeek-R1-0528":
        return f"{thought}Echo: {prompt}"
    return "Echo: " + prompt


def _usage(messages: list, completion_tokens: int) -> dict:
    """A usage block with the extra keys the real service adds."""
    prompt = sum(len(_text_of(m.get("content")).split()) + 4
                 for m in messages if isinstance(m, dict))
    total = prompt + completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": total, "completion_tokens_details": {"reasoning_tokens": 0},
            "time_to_first_token": 0.041, "total_latency": 0.2,
            "total_tokens_per_sec": round(total / 0.2, 2),
            "completion_tokens_after_first_per_sec": 120.5, "is_last_response": True}


def _normalise_calls(calls: list) -> list[dict]:
    """Accept OpenAI tool calls or {name, arguments} shorthands; arguments become JSON text."""
    out = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args)
        out.append({"id": call.get("id") or f"call_{secrets.token_hex(12)}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _tool_call_deltas(calls: list[dict]) -> list[dict]:
    """Stream each call as OpenAI does: id and name first, then arguments in pieces."""
    deltas = []
    for i, call in enumerate(calls):
        name, args = call["function"]["name"], call["function"]["arguments"]
        head = {**call, "index": i, "function": {"name": name, "arguments": ""}}
        deltas.append({"role": "assistant", "content": None, "tool_calls": [head]})
        deltas += [{"tool_calls": [{"index": i, "function": {"arguments": args[k:k + 8]}}]}
                   for k in range(0, len(args), 8)]
    return deltas + [{}]


def stream_events(reply: Reply, model: str, messages: list) -> list[dict | str]:
    """The events of a streamed answer, [DONE] included, before any drop or stall."""
    if reply.chunks is not None:
        events = list(reply.chunks)
        has_done = any(isinstance(c, str) and "[DONE]" in c for c in events)
        return events + ([DONE] if reply.done and not has_done else [])
    base = {"id": str(uuid.uuid4()), "object": "chat.completion.chunk",
            "created": round(time.time(), 3), "model": model, "system_fingerprint": "fastcoe"}
    if reply.tool_calls:
        deltas, finish = _tool_call_deltas(_normalise_calls(reply.tool_calls)), "tool_calls"
    else:
        text = reply.text if reply.text is not None else _echo(messages, model)
        pieces = re.findall(r"\S+\s*|\s+", text) or [""]
        deltas, finish = [{"role": "assistant", "content": p} for p in pieces], "stop"
    if reply.reasoning:
        deltas = [{"role": "assistant", "reasoning_content": p}
                  for p in re.findall(r"\S+\s*|\s+", reply.reasoning)] + deltas
    events: list[dict | str] = [
        {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None, "logprobs": None}]}
        for d in deltas]
    events[-1]["choices"][0]["finish_reason"] = finish
    if reply.usage:
        events.append({**base, "choices": [], "usage": _usage(messages, len(deltas))})
    return events + ([DONE] if reply.done else [])


def completion_object(reply: Reply, model: str, messages: list) -> dict:
    """A whole chat.completion, for requests that ask for stream: false."""
    message: dict = {"role": "assistant"}
    if reply.tool_calls:
        message.update(content=None, tool_calls=_normalise_calls(reply.tool_calls))
    else:
        message["content"] = reply.text if reply.text is not None else _echo(messages, model)
    tokens = len((message.get("content") or "x").split())
    return {"id": str(uuid.uuid4()), "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fastcoe",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
            "usage": _usage(messages, tokens)}


def sse_frame(event: dict | str) -> bytes:
    """dict -> one data: event; str -> raw SSE text as the script wrote it."""
    if isinstance(event, str):
        return event.encode()
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def error_body(status: int, message: str | None = None) -> dict:
    """OpenAI-shaped error object for `status`."""
    default, etype, code = ERRORS.get(status, (http.HTTPStatus(status).phrase,
                                               "server_error" if status >= 500
                                               else "invalid_request_error", None))
    return {"error": {"message": message or default, "type": etype, "param": None, "code": code}}


def _check_chat_body(body, *, need_stream: bool) -> str | None:
    """Why a chat body is unacceptable, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if not isinstance(body.get("model"), str):
        return "'model' must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "each message needs a string 'role'"
    if (need_stream or "stream" in body) and not isinstance(body.get("stream"), bool):
        return "'stream' must be a boolean"
    return None


def _check_samba_payload(payload) -> str | None:
    """Why a playground payload is unacceptable, or None."""
    if not isinstance(payload, dict):
        return "payload must be a JSON object"
    for key, kind in (("body", dict), ("env_type", str), ("fingerprint", str)):
        if not isinstance(payload.get(key), kind) or not payload[key]:
            return f"'{key}' is missing or not a {kind.__name__}"
    if payload["env_type"] not in ENV_TYPES:
        return f"unknown env_type {payload['env_type']!r}"
    return _check_chat_body(payload["body"], need_stream=True)


def parse_form(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]] | None:
    """A multipart/form-data body (RFC 7578) as {name: (filename, content)}; None if malformed."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not found:
        return None
    delimiter = b"\r\n--" + found.group(1).encode()
    pieces = (b"\r\n" + body).split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        return None
    fields = {}
    for piece in pieces[1:-1]:
        head, sep, content = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'; name="([^"]*)"', head)
        if not sep or not name:
            return None
        filename = re.search(rb'; filename="([^"]*)"', head)
        fields[name.group(1).decode()] = (filename and filename.group(1).decode(), content)
    return fields


def _vector(text: str) -> list[float]:
    """A small deterministic embedding of a text."""
    return [round(b / 255 - 0.5, 6) for b in hashlib.sha256(text.encode()).digest()[:8]]


def auth0_error(error: str, description: str) -> dict:
    return {"error": error, "error_description": description}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict) -> str:
    """An unsigned-in-spirit JWT: proxies only read `exp` from its payload."""
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(claims).encode())}.{_b64url(secrets.token_bytes(32))}"


# ---------------------------------------------------------------- the fake

class FakeSamba(FakeHTTPServer):
    """SambaNova Cloud on 127.0.0.1, scriptable and observable by tests."""

    logger = log

    def __init__(self, *, email="demo@example.com", password="demo-password",
                 client_id="fake-client-id", api_key="fake-api-key",
                 token_ttl: float | None = None):
        super().__init__()
        self.email, self.password, self.client_id = email, password, client_id
        self.api_key, self.token_ttl = api_key, token_ttl
        self.script: collections.deque[Reply] = collections.deque()
        self.default_reply = Reply()          # answer when the script is empty
        self.login_status: int | None = None
        self.login_retry_after: str | None = None  # Retry-After of a forced login error
        self.login_attempts = 0
        self.logins = 0
        # "config", "authenticate", "authorize" or "callback": that login step never answers
        # (until its client leaves); hung_steps counts the requests held so, gone ones counted too.
        self.login_hang: str | None = None
        self.hung_steps = 0
        self.hung_steps_gone = 0
        self.tokens: set[str] = set()
        self.issued: list[str] = []           # every token ever handed out, revoked ones too
        self.completions: list[dict] = []
        self.open_streams = 0
        self.disconnects = 0
        self.chunks_sent = 0                  # SSE events written, over all streams
        self.models_requests = 0
        self.models_status: int | None = None
        self.uploads: list[dict] = []         # multipart bodies received, byte for byte
        self._expiry: dict[str, float] = {}
        self._tickets: set[str] = set()
        self._codes: dict[str, tuple[str, str]] = {}
        self._changed = asyncio.Event()
        self._routes = {
            "/": ("GET", self._home),
            "/api/config": ("GET", self._config),
            "/auth/co/authenticate": ("POST", self._authenticate),
            "/auth/authorize": ("GET", self._authorize),
            "/api/auth/callback": ("GET", self._callback),
            "/api/completion": ("POST", self._completion),
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._official),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/completions": ("POST", self._text_completion),
            "/v1/audio/transcriptions": ("POST", self._audio),
            "/v1/audio/translations": ("POST", self._audio),
            # Not SambaNova's: how another process (tests/attack.py) scripts and observes the fake.
            "/_fake/stats": ("GET", self._stats),
            "/_fake/script": ("POST", self._script_reply),
        }

    @property
    def redirect_url(self) -> str:
        return f"{self.url}/api/auth/callback"

    def _notify(self) -> None:
        """Wake every wait_for: each waiter holds the old event, the next waits on a new one."""
        self._changed.set()
        self._changed = asyncio.Event()

    def snapshot(self) -> dict:
        """The counters, for failure messages and the standalone log."""
        counters = ("login_attempts", "logins", "open_streams", "disconnects", "chunks_sent",
                    "models_requests")
        return {k: getattr(self, k) for k in counters} | {
            "completions": len(self.completions), "script_left": len(self.script),
            "valid_tokens": len(self.tokens)}

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        """Resolve when predicate(self) holds; re-checked on every state change, never polled."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    await self._changed.wait()
        except TimeoutError:
            try:
                what = inspect.getsource(predicate).strip()
            except (OSError, TypeError):
                what = repr(predicate)
            raise AssertionError(f"FakeSamba.wait_for timed out after {timeout}s "
                                 f"waiting for {what}; state: {self.snapshot()}") from None

    def issue_token(self) -> str:
        """A valid token made without a login (for SAMBA_ACCESS_TOKEN tests)."""
        if self.token_ttl is None:
            token = secrets.token_urlsafe(40)
        else:
            now = time.time()
            exp = math.ceil(now + self.token_ttl)
            token = make_jwt({"sub": "auth0|fake", "iat": int(now), "exp": exp})
            self._expiry[token] = exp
        self.tokens.add(token)
        self.issued.append(token)
        self._notify()
        return token

    def revoke_tokens(self) -> None:
        self.tokens.clear()
        self._notify()

    def _token_valid(self, token: str | None) -> bool:
        if token not in self.tokens:
            return False
        if time.time() >= self._expiry.get(token, math.inf):
            self.tokens.discard(token)
            self._notify()
            return False
        return True

    def error_object(self, status: int, message: str | None = None) -> dict:
        """SambaNova's OpenAI-shaped errors, for unknown routes and malformed requests too."""
        return error_body(status, message)

    async def _stats(self, conn: Conn, req: Request) -> None:
        await self._json(conn, 200, self.snapshot())

    async def _script_reply(self, conn: Conn, req: Request) -> None:
        """Append the Reply whose fields the JSON body names (e.g. {"stall_after": 1})."""
        fields = req.json()
        try:
            self.script.append(Reply(**fields))
        except TypeError as exc:
            return await self._json(conn, 400, error_body(400, str(exc)))
        await self._json(conn, 200, {"script_left": len(self.script)})

    # ------------------------------------------------------------ login flow

    async def _home(self, conn: Conn, req: Request) -> None:
        page = b"<!doctype html><title>SambaNova Cloud (fake)</title><p>Signed in.</p>"
        await conn.respond(200, [("content-type", "text/html; charset=utf-8")], page)

    async def _hang_if(self, conn: Conn, step: str) -> None:
        """Hold a login step that is scripted to hang until its client leaves (raises Gone)."""
        if self.login_hang != step:
            return
        self.hung_steps += 1
        self._notify()
        try:
            await conn.until_gone()
        finally:
            self.hung_steps_gone += 1
            self._notify()

    async def _config(self, conn: Conn, req: Request) -> None:
        await self._hang_if(conn, "config")
        await self._json(conn, 200, {"clientId": self.client_id, "redirectURL": self.redirect_url,
                                     "issuerBaseUrl": f"{self.url}/auth", "baseURL": self.url})

    async def _authenticate(self, conn: Conn, req: Request) -> None:
        """Auth0 cross-origin authentication: credentials in, login ticket out."""
        self.login_attempts += 1
        self._notify()
        await self._hang_if(conn, "authenticate")
        if self.login_status is not None:
            return await self._forced_login_error(conn, self.login_status)
        body = req.json()
        problem = self._check_authenticate(body)
        if problem:
            return await self._json(conn, 400, auth0_error("invalid_request", problem))
        if (body["username"].lower() != self.email.lower()
                or body["password"] != self.password):
            return await self._json(conn, 403, auth0_error(
                "access_denied", "Wrong email or password."))
        ticket = secrets.token_urlsafe(24)
        self._tickets.add(ticket)
        await self._json(conn, 200, {"login_ticket": ticket, "co_id": secrets.token_urlsafe(9),
                                     "co_verifier": secrets.token_urlsafe(32)})

    def _check_authenticate(self, body) -> str | None:
        if not isinstance(body, dict):
            return "body must be a JSON object"
        wanted = {"client_id": self.client_id, "realm": REALM, "credential_type": GRANT}
        wrong = [key for key, value in wanted.items() if body.get(key) != value]
        if wrong:
            return f"wrong or missing {', '.join(wrong)}"
        if not isinstance(body.get("username"), str) or not isinstance(body.get("password"), str):
            return "username and password are required"
        return None

    async def _forced_login_error(self, conn: Conn, status: int) -> None:
        error = {429: "too_many_attempts", 401: "access_denied", 403: "access_denied"}
        body = auth0_error(error.get(status, "server_error"), http.HTTPStatus(status).phrase)
        headers = [("retry-after", self.login_retry_after)] if self.login_retry_after else []
        await self._json(conn, status, body, headers)

    async def _authorize(self, conn: Conn, req: Request) -> None:
        """Trade a login ticket for an authorization code, by redirect (RFC 6749 §4.1.2)."""
        await self._hang_if(conn, "authorize")
        q = req.query
        if q.get("client_id") != self.client_id or q.get("redirect_uri") != self.redirect_url:
            # RFC 6749 §4.1.2.1: never redirect to an unverified redirect_uri.
            return await self._plain(conn, 400, "invalid client_id or redirect_uri")
        problem = self._check_authorize(q)
        if problem:
            error = {**auth0_error(*problem), "state": q.get("state", "")}
            return await self._redirect(conn, f"{self.redirect_url}?{urlencode(error)}")
        self._tickets.discard(q["login_ticket"])
        code = secrets.token_urlsafe(24)
        self._codes[code] = (q["nonce"], q["state"])
        query = urlencode({"code": code, "state": q["state"]})
        await self._redirect(conn, f"{self.redirect_url}?{query}")

    def _check_authorize(self, q: dict) -> tuple[str, str] | None:
        if q.get("response_type") != "code":
            return "unsupported_response_type", "response_type must be code"
        if "openid" not in q.get("scope", "").split():
            return "invalid_scope", "scope must include openid"
        missing = [k for k in ("nonce", "state", "auth0Client") if not q.get(k)]
        if missing:
            return "invalid_request", f"missing {', '.join(missing)}"
        if q.get("realm") != REALM:
            return "invalid_request", "unknown realm"
        if q.get("login_ticket") not in self._tickets:
            return "access_denied", "invalid or used login_ticket"
        return None

    async def _callback(self, conn: Conn, req: Request) -> None:
        """Check code, state and the nonce cookie, then set access_token and go home."""
        await self._hang_if(conn, "callback")
        nonce, state = self._codes.pop(req.query.get("code", ""), (None, None))
        if nonce is None:
            return await self._plain(conn, 400, "invalid or used code")
        if req.cookies().get("nonce") != nonce or req.query.get("state") != state:
            return await self._plain(conn, 400, "nonce or state mismatch")
        token = self.issue_token()
        self.logins += 1
        self._notify()
        # No Domain attribute: a fake on an IP address cannot set one (RFC 6265 §5.3 step 6).
        await self._redirect(conn, f"{self.url}/", [
            ("set-cookie", "nonce=; Path=/; Max-Age=0"),
            ("set-cookie", f"access_token={token}; Path=/; HttpOnly")])

    # ------------------------------------------------------------ models and completions

    async def _models(self, conn: Conn, req: Request) -> None:
        self.models_requests += 1
        self._notify()
        if self.models_status is not None:
            return await self._json(conn, self.models_status, error_body(self.models_status))
        await self._json(conn, 200, {"object": "list", "data": list(MODELS)})

    def _record(self, req: Request, payload) -> None:
        self.completions.append({"path": req.path, "headers": req.headers, "json": payload})
        self._notify()

    async def _completion(self, conn: Conn, req: Request) -> None:
        """The playground endpoint: cookie auth, SambaNova payload, SSE answer."""
        payload = req.json()
        self._record(req, payload)
        if not self._token_valid(req.cookies().get("access_token")):
            return await self._json(conn, 401, error_body(401, "Invalid or expired access token"))
        problem = _check_samba_payload(payload)
        if not req.headers.get("content-type", "").startswith("application/json"):
            problem = "content-type must be application/json"
        if problem:
            return await self._json(conn, 400, error_body(400, problem))
        body = payload["body"]
        await self._answer(conn, body["model"], body["messages"], body["stream"])

    async def _official(self, conn: Conn, req: Request) -> None:
        """The official OpenAI-compatible API: Bearer key, OpenAI body."""
        body = req.json()
        self._record(req, body)
        if req.headers.get("authorization") != f"Bearer {self.api_key}":
            return await self._json(conn, 401, error_body(401, "Invalid API key"))
        problem = _check_chat_body(body, need_stream=False)
        if problem:
            return await self._json(conn, 400, error_body(400, problem))
        await self._answer(conn, body["model"], body["messages"], body.get("stream", False))

    # ------------------------------------------------------------ the official API's other endpoints

    async def _key_refused(self, conn: Conn, req: Request) -> bool:
        """Answer 401 without the API key, or a scripted error status; True if answered."""
        if req.headers.get("authorization") != f"Bearer {self.api_key}":
            await self._json(conn, 401, error_body(401, "Invalid API key"))
            return True
        if self.script and self.script[0].status != 200:
            reply = self.script.popleft()
            await conn.pause(reply.delay)
            await self._json(conn, reply.status, error_body(reply.status), list(reply.headers.items()))
            return True
        return False

    async def _embeddings(self, conn: Conn, req: Request) -> None:
        body = req.json()
        self._record(req, body)
        if await self._key_refused(conn, req):
            return
        inputs = body.get("input") if isinstance(body, dict) else None
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(body.get("model"), str) or not isinstance(inputs, list) or not inputs \
                or not all(isinstance(i, str) for i in inputs):
            return await self._json(conn, 400, error_body(400, "'model' and 'input' are required"))
        tokens = sum(len(i.split()) for i in inputs)
        await self._json(conn, 200, {
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": _vector(text)}
                     for i, text in enumerate(inputs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _text_completion(self, conn: Conn, req: Request) -> None:
        """Legacy completions: `prompt` in, `text_completion` objects out (events when streaming)."""
        body = req.json()
        self._record(req, body)
        if await self._key_refused(conn, req):
            return
        if not isinstance(body.get("model"), str) or not isinstance(body.get("prompt"), str):
            return await self._json(conn, 400, error_body(400, "'model' and 'prompt' are required"))
        words = re.findall(r"\S+\s*", f"Completion of: {body['prompt']}")
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": len(words),
                 "total_tokens": len(body["prompt"].split()) + len(words), "total_latency": 0.1}
        base = {"id": f"cmpl-{secrets.token_hex(8)}", "object": "text_completion",
                "created": round(time.time(), 3), "model": body["model"]}
        if body.get("stream") is not True:
            choice = {"index": 0, "text": "".join(words), "finish_reason": "stop", "logprobs": None}
            return await self._json(conn, 200, {**base, "created": int(time.time()),
                                                "choices": [choice], "usage": usage})
        events = [{**base, "choices": [{"index": 0, "text": w, "logprobs": None,
                                        "finish_reason": "stop" if i == len(words) - 1 else None}]}
                  for i, w in enumerate(words)]
        await self._stream(conn, Reply(), [*events, {**base, "choices": [], "usage": usage}, DONE])

    async def _audio(self, conn: Conn, req: Request) -> None:
        """Transcriptions and translations: a multipart upload, kept byte for byte in `uploads`."""
        content_type = req.headers.get("content-type", "")
        self.uploads.append({"path": req.path, "content_type": content_type, "body": req.body})
        self._record(req, None)
        if await self._key_refused(conn, req):
            return
        form = parse_form(req.body, content_type)
        if form is None or "file" not in form or "model" not in form:
            return await self._json(conn, 400, error_body(400, "multipart 'file' and 'model' are required"))
        audio = form["file"][1]
        model = form["model"][1].decode()
        kind = "translation" if req.path.endswith("translations") else "transcription"
        text = f"{kind} of {len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()[:16]}, by {model}"
        if form.get("response_format", (None, b"json"))[1] == b"text":
            return await conn.respond(200, [("content-type", "text/plain; charset=utf-8")], text.encode())
        await self._json(conn, 200, {"text": text})

    async def _answer(self, conn: Conn, model: str, messages: list, stream: bool) -> None:
        """Play the next scripted Reply, counting it open and noticing if its client leaves."""
        reply = self.script.popleft() if self.script else self.default_reply
        self.open_streams += 1
        self._notify()
        try:
            await self._play(conn, reply, model, messages, stream)
        except Gone:
            if not self._stopping:
                self.disconnects += 1
        finally:
            self.open_streams -= 1
            self._notify()

    async def _play(self, conn: Conn, reply: Reply, model: str, messages: list, stream: bool):
        if reply.hang:
            await conn.until_gone()
        await conn.pause(reply.head_delay)
        if reply.status != 200:
            await conn.pause(reply.delay)
            body = reply.body.encode() if reply.body is not None else json.dumps(
                error_body(reply.status)).encode()
            kind = "text/html" if reply.body is not None else "application/json"
            return await conn.respond(reply.status, [("content-type", kind),
                                                     *reply.headers.items()], body)
        if stream:
            return await self._stream(conn, reply, stream_events(reply, model, messages))
        await conn.pause(reply.first_delay)
        if reply.drop_after is not None:
            return conn.drop()
        if reply.stall_after is not None:
            await conn.until_gone()
        await self._json(conn, 200, completion_object(reply, model, messages),
                         list(reply.headers.items()))

    async def _stream(self, conn: Conn, reply: Reply, events: list) -> None:
        """Send events one chunk each, with delays, drops, stalls and error events as scripted."""
        await conn.start(200, [("content-type", "text/event-stream; charset=utf-8"),
                               ("cache-control", "no-cache"), *reply.headers.items()])
        for i in range(len(events) + 1):
            if i == reply.drop_after:
                return conn.drop()
            if i == reply.stall_after:
                await conn.until_gone()
            if i == reply.error_event_after:
                await conn.write(sse_frame(STREAM_ERROR))
                break
            if i == len(events):
                if reply.after_events == "drop":
                    return conn.drop()
                if reply.after_events == "linger":
                    await conn.until_gone()
                break
            await conn.pause(reply.first_delay if i == 0 else reply.delay)
            await conn.write(sse_frame(events[i]))
            self.chunks_sent += 1
            self._notify()
            if i == 0:
                await conn.write(PING)  # an SSE comment mid-stream, as real servers send
        await conn.end()


# ---------------------------------------------------------------- standalone

async def _run(args: argparse.Namespace) -> None:
    fake = FakeSamba(email=args.email, password=args.password, api_key=args.api_key,
                     token_ttl=args.token_ttl)
    fake.default_reply = Reply(delay=args.delay, stall_after=args.stall_after)
    await fake.start(args.host, args.port)
    log.info("fake SambaNova on %s (login email %s; password and API key not shown)",
             fake.url, args.email)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.stop()
    log.info("fake SambaNova stopped: %s", fake.snapshot())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake SambaNova Cloud for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--email", default="demo@example.com")
    parser.add_argument("--password", default="demo-password")
    parser.add_argument("--api-key", default="fake-api-key")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--stall-after", type=int, default=None,
                        help="send this many chunks, then go silent until the client leaves")
    parser.add_argument("--token-ttl", type=float, default=None, help="issue JWTs with this life")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fake-samba: %(message)s")
    log.setLevel(logging.DEBUG)  # one line per request: the demo's user sees the login flow
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
