"""What operators watch: the probes, /metrics, the favicon, each request's access line and counts,
and what /info tells the operator to do.

`Operations` reads the App's state (counters, token manager, routes, server) and never changes it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import metrics
from accesslog import AccessEntry, current_entry, log_access
from http1 import H11Driver
from http2 import H2Driver
from http_common import Responder, Request
from sse import dumps

if TYPE_CHECKING:
    from sambaproxy import App

# Paths for people and machines watching the proxy: never counted, logged at debug only.
QUIET_ROUTES = frozenset(("/info", "/", "/healthz", "/readyz", "/metrics", "/favicon.ico"))
PROBE_HEADERS = [("content-type", "application/json"), ("cache-control", "no-store")]
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           b'<rect width="16" height="16" rx="3" fill="#2563eb"/>'
           b'<path d="M3 11.5 8 4l5 7.5z" fill="#fff"/></svg>')
NO_CREDENTIALS = ("no SambaNova credentials: set SAMBA_EMAIL and SAMBA_PASSWORD, "
                  "SAMBA_ACCESS_TOKEN or SAMBANOVA_API_KEY")
NO_KEY_RISK = ("LOCAL_API_KEY is not set: anyone who can reach this port can use your SambaNova "
               "account. Set LOCAL_API_KEY to one or more client keys and restart.")


def _template(path: str) -> str:
    """The route label of a path with an id in it; other unknown paths share one label."""
    if path.startswith(("/v1/models/", "/models/")):
        return "/v1/models/{id}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return "unmatched"


class Operations:
    """Probes, metrics and the access line of one App."""

    def __init__(self, app: App, version: str) -> None:
        self.app = app
        self.metrics = self._make_metrics(version)

    def routes(self) -> dict:
        return {"/healthz": {"GET": self.healthz}, "/readyz": {"GET": self.readyz},
                "/metrics": {"GET": self.metrics_page}, "/favicon.ico": {"GET": self.favicon}}

    @staticmethod
    def open_routes(metrics_public: bool) -> tuple[str, ...]:
        """The routes served without the client key; /metrics only with METRICS_PUBLIC=1."""
        return ("/healthz", "/readyz", "/favicon.ico") + (("/metrics",) if metrics_public else ())

    # -- each request ------------------------------------------------------------------

    def finish(self, entry: AccessEntry, responder: Responder, counted: bool) -> None:
        """The request's one access line and, if counted, its metrics."""
        # 499 (as nginx logs it): the client left before any answer could start.
        status = responder.status or (500 if entry.end == "error" else 499)
        if responder.gone and not responder.ended and entry.end == "done":
            entry.end = "client_gone"
        self._close(entry, status, responder.sent, counted)

    def rejected(self, entry: AccessEntry, status: int, sent: int, counted: bool) -> None:
        """The access line and metrics of a request answered from its head alone (App.admit)."""
        self._close(entry, status, sent, counted)

    def _close(self, entry: AccessEntry, status: int, sent: int, counted: bool) -> None:
        entry.duration = time.perf_counter() - entry.started
        entry.status, entry.sent = status, sent
        if status == 401 or entry.end == "upstream_error":
            log_access(logging.WARNING, entry)
        else:
            log_access(logging.INFO if counted else logging.DEBUG, entry)
        if counted:
            self._count(entry)

    def _count(self, entry: AccessEntry) -> None:
        m = self.metrics
        path = entry.path
        route = path if path in self.app.routes else _template(path)
        method = entry.method if entry.method in metrics.METHODS else "other"
        m.requests.inc((route, method, str(entry.status)))
        if entry.model is None:
            return
        labels = (m.model_label(entry.model), "true" if entry.stream else "false")
        m.duration.observe(labels, entry.duration)
        if entry.ttfb is not None:
            m.ttft.observe(labels, entry.ttfb)
        if entry.prompt_tokens is not None:
            m.prompt_tokens.inc(labels[:1], entry.prompt_tokens)
            m.completion_tokens.inc(labels[:1], entry.completion_tokens)

    def note_attempt(self, route: str, outcome: str) -> None:
        """Upstream's listener: the attempts metric, and the route of the request being handled."""
        self.metrics.upstream_attempts.inc((route, outcome))
        entry = current_entry.get()
        if entry is not None:
            entry.route, entry.upstream = route, True

    # -- state, for /readyz, /info and /metrics ----------------------------------------------

    def unready_reason(self) -> str | None:
        """Why no chat completion could be served now (None: ready); no upstream call."""
        app = self.app
        if app.server.closing:
            return "shutting down"
        if app.key_route is not None:
            return None
        if app.account_route is None:
            return NO_CREDENTIALS
        return app.tokens.unready_reason()

    def actions(self, info: dict) -> list[str]:
        """What the operator should do about each problem: settings to set, never a secret."""
        app, actions = self.app, []
        if not app.upstream.routes:
            actions.append("No SambaNova credentials: set SAMBA_EMAIL and SAMBA_PASSWORD (your SambaNova "
                           "Cloud login), or SAMBA_ACCESS_TOKEN, or SAMBANOVA_API_KEY, in the environment "
                           "or .env, then restart the proxy.")
        elif info["token_status"] == "error" and info["last_error"]:
            wait = info["next_attempt_in"]
            when = f"the next attempt is in {wait}s" if wait else "the next attempt is due now"
            actions.append(f"The last SambaNova login failed: {info['last_error']}; {when}. If the email "
                           "or password is wrong, correct SAMBA_EMAIL / SAMBA_PASSWORD and restart.")
        elif app.key_route is None and not app.tokens.has_credentials \
                and (reason := app.tokens.unready_reason()):
            actions.append(f"{reason}.")
        if not app.keys:
            actions.append(NO_KEY_RISK)
        return actions

    def _make_metrics(self, version: str) -> metrics.GatewayMetrics:
        """The request-path metrics, plus gauges read from live state at each scrape."""
        app, m = self.app, metrics.GatewayMetrics()
        m.gauge("sambaproxy_active_requests", "Requests being handled (not counting the quiet routes).",
                (), lambda: {(): app.counters.active})
        m.gauge("sambaproxy_active_streams", "Streamed answers being relayed.", (),
                lambda: {(): app.counters.streams})
        m.counter("sambaproxy_logins_total", "SambaNova logins by outcome.", ("outcome",),
                  lambda: {(k,): v for k, v in app.tokens.login_outcomes.items()})
        m.gauge("sambaproxy_token_expiry_seconds", "Seconds the SambaNova token stays valid (0: none).",
                (), lambda: {(): app.tokens.expires_in()})
        m.gauge("sambaproxy_ready", "1 when a chat completion can be served now (as /readyz).", (),
                lambda: {(): 0 if self.unready_reason() else 1})
        m.gauge("sambaproxy_open_connections", "Open client connections by protocol.", ("protocol",),
                self._connections_by_protocol)
        m.gauge("sambaproxy_build_info", "Always 1; the version is a label.", ("version",),
                lambda: {(version,): 1})
        metrics.add_process_metrics(m.registry)
        return m

    def _connections_by_protocol(self) -> dict:
        """Open client connections by protocol; "unknown" until the first bytes tell (cleartext)."""
        counts = {("http/1.1",): 0, ("h2",): 0, ("unknown",): 0}
        for conn in self.app.server.connections:
            driver = conn.driver
            key = ("h2",) if isinstance(driver, H2Driver) else ("http/1.1",) if isinstance(driver, H11Driver) \
                else ("unknown",)
            counts[key] += 1
        return counts

    # -- the handlers ---------------------------------------------------------------------

    async def healthz(self, request: Request, responder: Responder) -> None:
        """Liveness: answering at all shows the event loop runs."""
        await responder.send(200, PROBE_HEADERS, b'{"status":"ok"}')

    async def readyz(self, request: Request, responder: Responder) -> None:
        """Readiness: 200 when a completion could be served now, else 503 with the reason."""
        reason = self.unready_reason()
        if reason is None:
            return await responder.send(200, PROBE_HEADERS, b'{"status":"ready"}')
        await responder.send(503, PROBE_HEADERS, dumps({"status": "not_ready", "reason": reason}))

    async def metrics_page(self, request: Request, responder: Responder) -> None:
        headers = [("content-type", metrics.CONTENT_TYPE), ("cache-control", "no-store")]
        await responder.send(200, headers, self.metrics.render())

    async def favicon(self, request: Request, responder: Responder) -> None:
        headers = [("content-type", "image/svg+xml"), ("cache-control", "public, max-age=86400")]
        await responder.send(200, headers, FAVICON)
