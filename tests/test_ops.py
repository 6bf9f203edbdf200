"""Operating the proxy, end to end over sockets: probes, access log, request ids, /metrics, quiet routes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from accesslog import AccessEntry, JsonFormatter, RequestIdFilter, TextFormatter
from conftest import AUTH, CLIENT_KEY, PASSWORD, ROOT, fake_settings
from fake_samba import Reply
from prom_check import parse

MODEL = "Meta-Llama-3.3-70B-Instruct"
CONTENT = "content-unique-q9z4"  # message text that must never reach a log line
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": CONTENT}]}
QUIET = ("/info", "/", "/healthz", "/readyz", "/favicon.ico")


class Recorder(logging.Handler):
    """Keeps the records of the loggers it is attached to and wakes whoever waits for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def access(self) -> list[AccessEntry]:
        return [r.msg for r in self.records if isinstance(r.msg, AccessEntry)]

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def recorder():
    handler = Recorder()
    logger = logging.getLogger("sambaproxy")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def entry_for(recorder: Recorder, request_id: str) -> AccessEntry:
    [entry] = [e for e in recorder.access() if e.request_id == request_id]
    return entry


def level_of(recorder: Recorder, request_id: str) -> int:
    [level] = [r.levelno for r in recorder.records
               if isinstance(r.msg, AccessEntry) and r.msg.request_id == request_id]
    return level


async def logged_in(app, fake, url: str | None = None) -> None:
    """Wait until the proxy holds its token: /readyz says so (the fake sees the login end first)."""
    await fake.wait_for(lambda f: f.logins >= 1, 20)
    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.wait_for(_until_status(client, f"{url or app.url}/readyz", 200, "ready"), 10)


# --- probes and quiet routes ---------------------------------------------------------------

async def test_healthz_and_readyz_need_no_key_and_follow_the_token(fake, start_proxy):
    fake.login_status = 403
    app = await start_proxy(fake)
    async with httpx.AsyncClient(timeout=10) as client:
        await fake.wait_for(lambda f: f.login_attempts >= 1)
        health = await client.get(f"{app.url}/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        await asyncio.wait_for(_until_status(client, f"{app.url}/readyz", 503, "login refused"), 10)
        refused = await client.get(f"{app.url}/readyz")
        assert refused.json()["status"] == "not_ready"
        assert "login refused" in refused.json()["reason"] and PASSWORD not in refused.text
        fake.login_status = None
        good = await start_proxy(fake)
        await logged_in(good, fake)
        ready = await client.get(f"{good.url}/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        head = await client.head(f"{good.url}/healthz")
        assert head.status_code == 200 and head.content == b""


async def _until_status(client, url, status, text) -> None:
    while True:
        r = await client.get(url)
        if r.status_code == status and text in r.text:
            return
        await asyncio.sleep(0.05)  # polling an HTTP probe, as a kubelet does; bounded by wait_for


@pytest.mark.parametrize("settings, status, reason", [
    ({"SAMBA_EMAIL": None, "SAMBA_PASSWORD": None}, 503, "SAMBA_EMAIL and SAMBA_PASSWORD"),
    ({"SAMBA_EMAIL": None, "SAMBA_PASSWORD": None, "SAMBANOVA_API_KEY": "fake-api-key"}, 200, None),
])
async def test_readyz_without_credentials_and_with_only_an_api_key(fake, start_proxy, settings, status, reason):
    app = await start_proxy(fake, **settings)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{app.url}/readyz")
    assert r.status_code == status
    assert reason is None or reason in r.json()["reason"]
    assert fake.completions == [] and fake.login_attempts == 0  # cheap: nothing asked upstream


async def test_quiet_routes_are_not_counted_not_logged_at_info_and_favicon_is_served(proxy, fake, recorder):
    await logged_in(proxy, fake)
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(f"{proxy.url}/info")).json()["requests"]
        for _ in range(100):
            info = await client.get(f"{proxy.url}/info")
        for path in QUIET:
            assert (await client.get(f"{proxy.url}{path}")).status_code == 200, path
        assert (await client.get(f"{proxy.url}/metrics", headers=AUTH)).status_code == 200
        icon = await client.get(f"{proxy.url}/favicon.ico")
        after = (await client.get(f"{proxy.url}/info")).json()["requests"]
        scrape = parse((await client.get(f"{proxy.url}/metrics", headers=AUTH)).text)
    assert before == after == {"total": 0, "active": 0, "errors": 0, "upstream_retries": 0, "streams": 0}
    assert info.json()["requests"]["active"] == 0
    assert icon.headers["content-type"] == "image/svg+xml" and icon.content.startswith(b"<svg")
    assert scrape.series("sambaproxy_requests_total") == {}
    assert scrape.value("sambaproxy_active_requests") == 0
    quiet_lines = [r for r in recorder.records if r.name == "sambaproxy.access"]
    assert len(quiet_lines) >= 100 and all(r.levelno == logging.DEBUG for r in quiet_lines)


async def test_metrics_need_the_client_key_unless_public(fake, start_proxy):
    private = await start_proxy(fake)
    public = await start_proxy(fake, METRICS_PUBLIC="1")
    async with httpx.AsyncClient(timeout=10) as client:
        denied = await client.get(f"{private.url}/metrics")
        allowed = await client.get(f"{private.url}/metrics", headers=AUTH)
        open_ = await client.get(f"{public.url}/metrics")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == open_.status_code == 200
    assert allowed.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    parse(open_.text)


async def test_info_says_what_to_do_without_credentials_and_without_a_client_key(fake, start_proxy):
    app = await start_proxy(fake, SAMBA_EMAIL=None, SAMBA_PASSWORD=None, LOCAL_API_KEY=None)
    async with httpx.AsyncClient(timeout=10) as client:
        info = (await client.get(f"{app.url}/info")).json()
    assert info["ready"] is False and "SAMBA_EMAIL" in info["ready_reason"]
    credentials, risk = info["actions"]
    assert "set SAMBA_EMAIL and SAMBA_PASSWORD" in credentials and "SAMBANOVA_API_KEY" in credentials
    assert "LOCAL_API_KEY is not set" in risk and "anyone" in risk


async def test_info_gives_the_login_failure_and_the_next_attempt(fake, start_proxy):
    fake.login_status = 403
    app = await start_proxy(fake)
    await fake.wait_for(lambda f: f.login_attempts >= 1)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO)
        info = (await client.get(f"{app.url}/info")).json()
    assert r.status_code == 503
    [action] = info["actions"]
    assert action.startswith("The last SambaNova login failed: login refused: Forbidden")
    assert "next attempt is in" in action and "SAMBA_PASSWORD" in action and PASSWORD not in action


# --- access log ------------------------------------------------------------------------------

async def test_one_access_line_per_request_with_its_fields_and_levels(proxy, fake, recorder):
    await logged_in(proxy, fake)
    fake.script.extend([Reply(status=503)] * 3)  # three failed attempts: a final 502
    ids = {}
    async with httpx.AsyncClient(timeout=10) as client:
        async def call(name, method, path, **kwargs):
            r = await client.request(method, f"{proxy.url}{path}", **kwargs)
            ids[name] = r.headers["x-request-id"]
            return r

        assert (await call("bad_gateway", "POST", "/v1/chat/completions", headers=AUTH, json=HELLO)).status_code == 502
        assert (await call("ok", "POST", "/v1/chat/completions", headers=AUTH, json=HELLO)).status_code == 200
        streamed = await call("stream", "POST", "/v1/chat/completions", headers=AUTH,
                              json={**HELLO, "stream": True, "stream_options": {"include_usage": True}})
        assert streamed.status_code == 200
        assert (await call("bad", "POST", "/v1/chat/completions", headers=AUTH, content=b"{")).status_code == 400
        wrong_key = {"authorization": "Bearer not-the-key"}
        assert (await call("denied", "GET", "/v1/models", headers=wrong_key)).status_code == 401
        assert (await call("missing", "GET", "/no/such/path", headers=AUTH)).status_code == 404
    await recorder.wait_for(lambda r: all(any(e.request_id == i for e in r.access()) for i in ids.values()))

    ok = entry_for(recorder, ids["ok"])
    assert (ok.method, ok.path, ok.version, ok.status, ok.model, ok.stream) == \
        ("POST", "/v1/chat/completions", "1.1", 200, MODEL, False)
    assert ok.client.startswith("127.0.0.1:") and ok.route == "account" and ok.end == "done"
    assert ok.sent > 0 and ok.duration > 0 and ok.prompt_tokens > 0 and ok.completion_tokens > 0
    stream = entry_for(recorder, ids["stream"])
    assert stream.stream is True and stream.ttfb is not None and 0 < stream.ttfb <= stream.duration
    assert stream.sent == len(streamed.content) and stream.prompt_tokens == ok.prompt_tokens
    failed = entry_for(recorder, ids["bad_gateway"])
    assert (failed.status, failed.end, failed.route) == (502, "upstream_error", "account")
    assert "HTTP 503" in failed.reason
    assert (entry_for(recorder, ids["bad"]).status, entry_for(recorder, ids["bad"]).model) == (400, None)
    denied = entry_for(recorder, ids["denied"])
    assert denied.status == 401 and "invalid API key" in denied.reason
    assert entry_for(recorder, ids["missing"]).status == 404
    levels = {name: level_of(recorder, i) for name, i in ids.items()}
    assert levels == {"bad_gateway": logging.WARNING, "ok": logging.INFO, "stream": logging.INFO,
                      "bad": logging.INFO, "denied": logging.WARNING, "missing": logging.INFO}

    text = "\n".join(TextFormatter().format(r) for r in recorder.records)
    line = next(ln for ln in text.splitlines() if ids["stream"] in ln and "sambaproxy.access" in ln)
    assert f'"POST /v1/chat/completions HTTP/1.1" 200 bytes={stream.sent} ' in line
    assert f"model={MODEL} stream=true ttfb=" in line and "route=account" in line and line.endswith("end=done")
    json_lines = [json.loads(JsonFormatter().format(r)) for r in recorder.records]
    fields = next(f for f in json_lines if f.get("request_id") == ids["ok"] and f["logger"] == "sambaproxy.access")
    assert fields["status"] == 200 and fields["model"] == MODEL and fields["stream"] is False
    assert fields["prompt_tokens"] == ok.prompt_tokens and fields["end"] == "done" and fields["level"] == "info"
    retry = next(f for f in json_lines if f["logger"] == "sambaproxy.upstream")
    assert retry["request_id"] == ids["bad_gateway"]  # error log lines carry the request's id too

    secrets_seen = [CLIENT_KEY, PASSWORD, CONTENT, *fake.issued]
    for rendered in (text, json.dumps(json_lines)):
        assert not [s for s in secrets_seen if s in rendered]


async def test_a_client_leaving_mid_stream_is_logged_as_client_gone(proxy, fake, recorder):
    await logged_in(proxy, fake)
    fake.script.append(Reply(stall_after=1))
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions", headers=AUTH,
                                 json={**HELLO, "stream": True}) as r:
            request_id = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
    await recorder.wait_for(lambda rec: any(e.request_id == request_id for e in rec.access()))
    entry = entry_for(recorder, request_id)
    assert (entry.status, entry.end, entry.stream) == (200, "client_gone", True)
    assert entry.ttfb is not None and entry.sent > 0


async def test_every_log_line_is_json_with_log_format_json(fake):
    """The real process: LOG_FORMAT=json makes every stderr line one JSON object."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           **fake_settings(fake, LOG_FORMAT="json", LOCAL_API_KEY="")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "sambaproxy.py", "--env-file", "/dev/null", cwd=ROOT, env=env,
        stderr=asyncio.subprocess.PIPE)
    lines: list[dict] = []
    try:
        async with asyncio.timeout(30):
            port = None
            while port is None:
                lines.append(json.loads(await process.stderr.readline()))
                if "listening on" in lines[-1].get("message", ""):
                    port = int(lines[-1]["message"].rsplit(":", 1)[1])
            await logged_in(None, fake, f"http://127.0.0.1:{port}")
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=HELLO)
                assert r.status_code == 200
                await client.get(f"http://127.0.0.1:{port}/nope")
            process.send_signal(signal.SIGTERM)
            rest = await process.stderr.read()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines += [json.loads(line) for line in rest.decode().splitlines()]
    access = [line for line in lines if line["logger"] == "sambaproxy.access"]
    assert {line["path"] for line in access} == {"/v1/chat/completions", "/nope"}
    assert all({"time", "level", "logger"} <= line.keys() for line in lines)
    assert any(line["logger"] == "sambaproxy.auth" for line in lines)
    assert PASSWORD not in json.dumps(lines) and CONTENT not in json.dumps(lines)


def test_json_formatter_keeps_one_line_per_record_and_the_exception():
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sambaproxy", logging.ERROR, __file__, 1, "two\nlines %s", ("x",),
                                   sys.exc_info())
    out = formatter.format(record)
    assert "\n" not in out
    data = json.loads(out)
    assert data["message"] == "two\nlines x" and "ValueError" in data["exception"]


# --- request ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("given, kept", [
    ("trace-7f3a/2024:abc", True), ("x" * 128, True), ("x" * 129, False), ("has space", False),
    ("caf\u00e9", False), ("", False),
])
async def test_request_id_is_echoed_when_acceptable_else_made(proxy, given, kept):
    async with httpx.AsyncClient(timeout=10) as client:
        headers = {"x-request-id": given.encode("utf-8")} if given else {}
        r = await client.get(f"{proxy.url}/v1/models", headers={**AUTH, **headers})
    assert (r.headers["x-request-id"] == given) is kept
    assert r.headers["x-request-id"] and len(r.headers["x-request-id"]) <= 128


async def test_made_request_ids_are_unique_and_sent_on_every_answer(proxy):
    answers = []
    async with httpx.AsyncClient(timeout=10) as client:
        answers.append(await client.get(f"{proxy.url}/v1/models"))                 # 401
        answers.append(await client.get(f"{proxy.url}/nope", headers=AUTH))        # 404
        answers.append(await client.post(f"{proxy.url}/v1/chat/completions", headers=AUTH, content=b"[]"))
        answers.append(await client.get(f"{proxy.url}/healthz"))
        answers.append(await client.options(f"{proxy.url}/v1/models"))
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answers.append(await client.get(f"{proxy.url}/info"))
    ids = [a.headers.get("x-request-id") for a in answers]
    assert [a.status_code for a in answers] == [401, 404, 400, 200, 204, 200]
    assert all(ids) and len(set(ids)) == len(ids)


# --- metrics -----------------------------------------------------------------------------------

async def test_metrics_count_a_scripted_mix_of_requests(proxy, fake):
    await logged_in(proxy, fake)
    async with httpx.AsyncClient(timeout=10) as client:
        chat = f"{proxy.url}/v1/chat/completions"
        for _ in range(2):
            assert (await client.post(chat, headers=AUTH, json=HELLO)).status_code == 200
        streamed = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
        assert (await client.post(chat, headers=AUTH, json=streamed)).status_code == 200
        fake.script.extend([Reply(status=503), Reply(status=503), Reply(status=503)])
        assert (await client.post(chat, headers=AUTH, json=HELLO)).status_code == 502
        fake.script.append(Reply(status=429, headers={"retry-after": "0"}))
        assert (await client.post(chat, headers=AUTH, json=HELLO)).status_code == 200
        fake.revoke_tokens()
        assert (await client.post(chat, headers=AUTH, json=HELLO)).status_code == 200
        assert (await client.post(chat, headers=AUTH, content=b"not json")).status_code == 400
        assert (await client.get(f"{proxy.url}/v1/models", headers={"authorization": "Bearer no"})).status_code == 401
        assert (await client.get(f"{proxy.url}/v1/models/{MODEL}", headers=AUTH)).status_code == 200
        assert (await client.delete(f"{proxy.url}/v1/models", headers=AUTH)).status_code == 405
        assert (await client.get(f"{proxy.url}/nope", headers=AUTH)).status_code == 404
        r = await client.get(f"{proxy.url}/metrics", headers=AUTH)
    m = parse(r.text)
    requests = "sambaproxy_requests_total"
    assert m.series(requests) == {
        (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")): 5,
        (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "502")): 1,
        (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "400")): 1,
        (("method", "GET"), ("route", "/v1/models"), ("status", "401")): 1,
        (("method", "GET"), ("route", "/v1/models/{id}"), ("status", "200")): 1,
        (("method", "DELETE"), ("route", "/v1/models"), ("status", "405")): 1,
        (("method", "GET"), ("route", "unmatched"), ("status", "404")): 1,
    }
    attempts = {dict(k)["outcome"]: v for k, v in m.series("sambaproxy_upstream_attempts_total").items()}
    assert attempts == {"ok": 5, "retried": 3, "server_error": 1, "relogin": 1}
    assert m.value("sambaproxy_logins_total", outcome="ok") == 2
    assert m.value("sambaproxy_logins_total", outcome="timeout") == 0
    assert m.value("sambaproxy_request_duration_seconds_count", model=MODEL, stream="false") == 5
    assert m.value("sambaproxy_request_duration_seconds_count", model=MODEL, stream="true") == 1
    assert m.value("sambaproxy_time_to_first_token_seconds_count", model=MODEL, stream="true") == 1
    assert m.value("sambaproxy_time_to_first_token_seconds_count", model=MODEL, stream="false") == 4
    assert m.value("sambaproxy_prompt_tokens_total", model=MODEL) == 5 * 5  # "Echo" usage: words + 4
    assert m.value("sambaproxy_completion_tokens_total", model=MODEL) > 0
    assert m.value("sambaproxy_active_requests") == 0 and m.value("sambaproxy_active_streams") == 0
    assert 604000 < m.value("sambaproxy_token_expiry_seconds") <= 604800
    assert m.value("sambaproxy_ready") == 1
    assert m.value("sambaproxy_open_connections", protocol="http/1.1") >= 1
    assert m.value("process_resident_memory_bytes") > 1_000_000 and m.value("process_open_fds") > 0
    assert m.types["sambaproxy_requests_total"] == "counter"


async def test_open_connections_are_counted_by_protocol(proxy):
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2_client:
        m = parse((await h2_client.get(f"{proxy.url}/metrics", headers=AUTH)).text)
    assert m.value("sambaproxy_open_connections", protocol="h2") == 1


# --- logins are bounded ------------------------------------------------------------------------

async def test_a_hung_login_step_is_bounded_by_login_timeout_and_backs_off(fake, start_proxy):
    fake.login_hang = "authenticate"
    app = await start_proxy(fake, LOGIN_TIMEOUT="1")
    async with httpx.AsyncClient(timeout=30) as client:
        r = await asyncio.wait_for(
            client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=HELLO), 30)
        await fake.wait_for(lambda f: f.hung_steps_gone >= 1, 10)  # the login's own client let go
        info = (await client.get(f"{app.url}/info")).json()
        ready = await client.get(f"{app.url}/readyz")
        m = parse((await client.get(f"{app.url}/metrics", headers=AUTH)).text)
    assert r.status_code == 503 and "LOGIN_TIMEOUT (1s)" in r.json()["error"]["message"]
    assert info["token_status"] == "error" and "LOGIN_TIMEOUT" in info["last_error"]
    assert info["login_failures"] == 1 and info["next_attempt_in"] >= 1
    assert ready.status_code == 503 and "LOGIN_TIMEOUT" in ready.json()["reason"]
    assert m.value("sambaproxy_logins_total", outcome="timeout") == 1
    assert fake.hung_steps == 1 and fake.logins == 0


# --- the status page in a real browser -------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (the suite does not install it)")
async def test_status_page_opens_in_headless_chromium_without_console_errors(proxy, tmp_path):
    args = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
            "--v=0", f"--user-data-dir={tmp_path}", "--virtual-time-budget=4000", "--dump-dom",
            f"{proxy.url}/"]
    result = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'id="svc"' in result.stdout and "unreachable" not in result.stdout.split('id="svc"', 1)[1][:80]
    assert not console, console
    assert "ERR_UNSAFE_PORT" not in result.stderr


# Runs the status page's script under Node with a stub DOM and the /info answer given on stdin;
# prints what the page shows in its warning list and its "ready" field, or throws.
PAGE_HARNESS = r"""
const fs = require("fs");
const info = JSON.parse(fs.readFileSync(0, "utf8"));
const script = fs.readFileSync(process.argv[2], "utf8");
function element() {
  const e = {textContent: "", className: "", title: "", innerHTML: "", children: [],
             classList: {toggle() {}}, appendChild(c) { this.children.push(c); }};
  Object.defineProperty(e, "textContent", {get() { return this._t || ""; },
                                           set(v) { this._t = String(v); if (v === "") this.children = []; }});
  return e;
}
const elements = {};
global.document = {getElementById: (id) => (elements[id] = elements[id] || element()),
                   createElement: () => element(), body: element()};
global.location = {origin: "http://127.0.0.1"};
global.window = global;
global.fetch = () => Promise.resolve({ok: true, json: () => Promise.resolve(info)});
global.setInterval = () => 0;
const realTimeout = setTimeout;
global.setTimeout = (fn, ms) => (ms >= 1000 ? 0 : realTimeout(fn, ms));
process.on("unhandledRejection", (e) => { console.error(e); process.exit(3); });
new Function(script)();
realTimeout(() => {
  const warns = elements.warns.children.map((li) => ({cls: li.className, text: li.textContent}));
  console.log(JSON.stringify({warns, ready: elements.ready.textContent, svc: elements.svc.textContent}));
}, 50);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_status_page_shows_what_to_do(fake, start_proxy, tmp_path):
    app = await start_proxy(fake, SAMBA_EMAIL=None, SAMBA_PASSWORD=None, LOCAL_API_KEY=None)
    async with httpx.AsyncClient(timeout=10) as client:
        page = (await client.get(f"{app.url}/")).text
        info = (await client.get(f"{app.url}/info")).text
    script = tmp_path / "page.js"
    script.write_text(page.split("<script>", 1)[1].split("</script>", 1)[0])
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_HARNESS)
    result = await asyncio.to_thread(subprocess.run, ["node", str(harness), str(script)], input=info,
                                     capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["svc"] == "running" and shown["ready"].startswith("no: no SambaNova credentials")
    todo = [w["text"] for w in shown["warns"] if w["cls"] == "todo"]
    assert len(todo) == 2 and "SAMBA_EMAIL" in todo[0] and "LOCAL_API_KEY" in todo[1]
    assert 'rel="icon"' in page and 'href="favicon.ico"' in page


async def test_probes_answer_while_every_request_slot_is_taken(fake, start_proxy):
    """MAX_CONCURRENT_REQUESTS caps requests, not the probes: a busy proxy is alive, not dead."""
    app = await start_proxy(fake, MAX_CONCURRENT_REQUESTS="1")
    fake.script.append(Reply(text="one two three four", delay=0.5))
    body = {"model": "DeepSeek-R1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{app.url}/v1/chat/completions", headers=AUTH, json=body) as busy:
            assert busy.status_code == 200
            assert (await client.get(f"{app.url}/healthz")).status_code == 200
            assert (await client.get(f"{app.url}/readyz")).status_code == 200
            capped = await client.get(f"{app.url}/v1/models", headers=AUTH)
            assert capped.status_code == 503 and capped.json()["error"]["code"] == "server_busy"
            await busy.aread()


async def test_metrics_name_the_upstream_model_not_each_spelling_a_client_sends(fake, start_proxy):
    """Case variants and aliases of one model are one label: clients cannot use up the label slots."""
    app = await start_proxy(fake, MODEL_ALIASES="r1=DeepSeek-R1")
    async with httpx.AsyncClient(timeout=10) as client:
        await client.get(f"{app.url}/v1/models", headers=AUTH)  # the model list, for case matching
        for name in ("deepseek-r1", "DEEPSEEK-R1", "r1"):
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=body)
            assert r.status_code == 200 and r.json()["model"] == name
        text = (await client.get(f"{app.url}/metrics", headers=AUTH)).text
    assert 'model="DeepSeek-R1"' in text
    assert 'model="deepseek-r1"' not in text and 'model="DEEPSEEK-R1"' not in text and 'model="r1"' not in text
