"""At LOG_LEVEL=debug, with main()'s own logging set-up, no log line holds a secret (unique values)."""

from __future__ import annotations

import contextlib
import logging

import httpx

from conftest import AUTH, CLIENT_KEY, EMAIL, PASSWORD
from fake_samba import FakeSamba
from sambaproxy import configure_logging

HELLO = {"model": "Meta-Llama-3.3-70B-Instruct", "messages": [{"role": "user", "content": "hello"}]}


class RecordingSamba(FakeSamba):
    """The fake, noting every login ticket and authorization code it is handed back."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tickets: list[str] = []
        self.codes: list[str] = []

    async def _authorize(self, conn, req) -> None:
        self.tickets.append(req.query.get("login_ticket", ""))
        await super()._authorize(conn, req)

    async def _callback(self, conn, req) -> None:
        self.codes.append(req.query.get("code", ""))
        await super()._callback(conn, req)


class Lines(logging.Handler):
    """Keeps every record as a formatted line (with its traceback, if any)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("fake_"):  # the fake's own lines are not the proxy's
            self.lines.append(self.format(record))


@contextlib.contextmanager
def real_debug_logging():
    """main()'s logging set-up at debug on a bare root logger; every logger's state is restored after."""
    root = logging.getLogger()
    saved_handlers, saved_root_level = root.handlers[:], root.level
    loggers = {name: logger for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    saved_levels = {name: logger.level for name, logger in loggers.items()}
    lines = Lines()
    root.handlers = []  # as in a fresh process, so that configure_logging configures for real
    try:
        configure_logging("debug")
        assert root.getEffectiveLevel() == logging.DEBUG
        root.addHandler(lines)
        yield lines.lines
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_root_level)
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(saved_levels.get(name, logging.NOTSET))


async def test_no_secret_in_any_log_line_at_debug_level_over_http2_with_logins(start_proxy):
    fake = RecordingSamba(email=EMAIL, password=PASSWORD)
    await fake.start()
    try:
        with real_debug_logging() as lines:
            app = await start_proxy(fake, LOG_LEVEL="debug")
            await fake.wait_for(lambda f: f.logins == 1)
            async with httpx.AsyncClient(http1=False, http2=True, timeout=10, headers=AUTH) as client:
                url = f"{app.url}/v1/chat/completions"
                answers = [await client.post(url, json=HELLO), await client.post(url, json={**HELLO, "stream": True})]
                fake.revoke_tokens()  # the next request is refused, and the proxy logs in again
                answers.append(await client.post(url, json=HELLO))
                answers.append(await client.get(f"{app.url}/v1/models"))
                answers.append(await client.get(f"{app.url}/debug/token"))
            await app.aclose(grace=1.0)
        assert [(a.http_version, a.status_code) for a in answers] == [("HTTP/2", 200)] * 5
        assert fake.logins == 2 and len(fake.tickets) == 2 and len(fake.codes) == 2
        assert any("logged in to SambaNova" in line for line in lines)  # the capture does see the proxy
        secrets = {"client key": CLIENT_KEY, "password": PASSWORD, "email": EMAIL,
                   **{f"ticket {i}": t for i, t in enumerate(fake.tickets)},
                   **{f"code {i}": c for i, c in enumerate(fake.codes)},
                   **{f"token {i}": t for i, t in enumerate(fake.issued)}}
        leaks = {what: line for what, secret in secrets.items() for line in lines if secret in line}
        assert not leaks
    finally:
        await fake.stop()
