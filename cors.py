"""CORS: which browser origins may call the proxy, and the fields their answers carry.

Browsers send `Origin` on every cross-site request, even a "simple" text/plain POST that
needs no preflight, so refusing a foreign `Origin` at the request head (403) stops drive-by
and DNS-rebinding use of a proxy on localhost (Fetch standard §3.2; the Ollama class of
problem). Clients that send no `Origin` (SDKs, curl) are not concerned.
"""

from __future__ import annotations

import re

from http_common import Responder

# Loopback origins, the default when no LOCAL_API_KEY protects the proxy.
_LOOPBACK = re.compile(r"http://(?:localhost|127\.0\.0\.1|\[::1\])(?::\d{1,5})?\Z")
PREFLIGHT_ALLOW = "authorization, content-type"
PREFLIGHT_MAX_AGE = "86400"


class CorsPolicy:
    """The origins CORS_ORIGINS allows: a list, `*`, or (unset) `*` with a key, loopback without."""

    __slots__ = ("any", "origins", "loopback")

    def __init__(self, origins: tuple[str, ...] | None, has_key: bool) -> None:
        if origins is None:
            origins = ("*",) if has_key else ()
            self.loopback = not has_key
        else:
            self.loopback = False
        self.any = "*" in origins
        self.origins = frozenset(o.lower() for o in origins if o != "*")

    def allows(self, origin: str) -> bool:
        """Whether a request carrying this `Origin` may go on."""
        if self.any:
            return True
        origin = origin.lower()
        return origin in self.origins or (self.loopback and _LOOPBACK.match(origin) is not None)

    def answer_fields(self, origin: str) -> tuple[tuple[str, str], ...]:
        """The fields an answer to an allowed origin carries (Fetch §3.2.3)."""
        if self.any:
            return (("access-control-allow-origin", "*"),)
        # The answer depends on the Origin: caches must keep one per origin.
        return (("access-control-allow-origin", origin), ("vary", "origin"))

    def describe(self) -> str:
        """The policy in a few words, for the start-up log."""
        if self.any:
            return "any origin"
        names = sorted(self.origins) + (["loopback origins"] if self.loopback else [])
        return ", ".join(names) or "no browser origin"


def preflight_fields(methods: str, asked_headers: str) -> list[tuple[str, str]]:
    """A preflight answer's fields: the allowed methods and headers, cached for a day."""
    safe = asked_headers and all(c.isalnum() or c in "-_, " for c in asked_headers)
    return [("access-control-allow-methods", methods),
            ("access-control-allow-headers", asked_headers if safe else PREFLIGHT_ALLOW),
            ("access-control-max-age", PREFLIGHT_MAX_AGE)]


class CorsResponder:
    """A responder that adds the CORS fields to an answer for an allowed browser origin.

    Only requests with an `Origin` get one, so the SDK path (no Origin) keeps the
    driver's responder untouched; writes go straight to the wrapped responder's methods.
    """

    __slots__ = ("inner", "fields", "write", "write_if_idle", "end", "on_gone")

    def __init__(self, inner: Responder, fields: tuple[tuple[str, str], ...]) -> None:
        self.inner = inner
        self.fields = fields
        self.write = inner.write
        self.write_if_idle = inner.write_if_idle
        self.end = inner.end
        self.on_gone = inner.on_gone

    @property
    def gone(self) -> bool:
        return self.inner.gone

    @property
    def started(self) -> bool:
        return self.inner.started

    @property
    def ended(self) -> bool:
        return self.inner.ended

    async def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await self.inner.send(status, [*headers, *self.fields], body)

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self.inner.start(status, [*headers, *self.fields])
