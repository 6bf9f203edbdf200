"""The error table: ProxyError, the OpenAI error body, and one mapping of upstream failures.

Every failure a client sees passes through here once: httpx exceptions and upstream statuses
become a ProxyError whose status, type and code follow SPEC.md's error table.
"""

from __future__ import annotations

import httpx

from sse import dumps, openai_error

STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error",
                413: "invalid_request_error", 431: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
                503: "service_unavailable", 504: "timeout"}
RETRYABLE_STATUSES = frozenset((429, 502, 503, 504))
SILENT = "SambaNova went silent past UPSTREAM_READ_TIMEOUT"


class ProxyError(Exception):
    """A failure with its client-facing status; the message is safe to show."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 *, param: str | None = None, retry_after: str | None = None,
                 retryable: bool = False, fallback: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.retryable = retryable
        self.fallback = fallback

    def error(self) -> dict:
        """The inner OpenAI error object, for a body or a final stream event."""
        return openai_error(self.message, self.type, self.param, self.code)


def error_body(status: int, message: str, type_: str | None = None, code: str | None = None,
               param: str | None = None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return dumps({"error": openai_error(message, type_ or STATUS_TYPES.get(status, "api_error"),
                                         param, code)})


def request_failure(exc: httpx.HTTPError) -> ProxyError:
    """An exception raised while sending a request, before any answer arrived."""
    if isinstance(exc, httpx.ConnectTimeout):
        return ProxyError(502, "SambaNova could not be reached (connect timeout)",
                          "upstream_error", "upstream_unreachable", retryable=True)
    if isinstance(exc, httpx.PoolTimeout):
        return ProxyError(503, "every upstream connection (UPSTREAM_MAX_CONNECTIONS) stayed busy",
                          "service_unavailable", "upstream_pool_full")
    if isinstance(exc, httpx.TimeoutException):
        # Not retried: the client has already waited a whole UPSTREAM_READ_TIMEOUT.
        return ProxyError(504, SILENT, "timeout", "upstream_timeout")
    return ProxyError(502, f"SambaNova could not be reached ({type(exc).__name__})",
                      "upstream_error", "upstream_unreachable", retryable=True)


def answer_failure(exc: httpx.HTTPError) -> ProxyError:
    """An exception raised while reading an answer that had begun (status 200 received)."""
    if isinstance(exc, httpx.TimeoutException):
        return ProxyError(504, SILENT, "timeout", "upstream_timeout")
    return ProxyError(502, f"SambaNova connection lost mid-answer ({type(exc).__name__})",
                      "upstream_error", "upstream_disconnected")


def stream_error_failure(error: dict) -> ProxyError:
    """An error event upstream sent after its 200, for a client that has no stream yet."""
    return ProxyError(502, f"SambaNova failed mid-answer: {error.get('message')}",
                      "upstream_error", error.get("code") or "upstream_error")


def incomplete_failure() -> ProxyError:
    """An answer whose upstream ended (EOF) before [DONE]."""
    return ProxyError(502, "SambaNova ended the answer before [DONE]", "upstream_error",
                      "upstream_incomplete")


def status_failure(status: int, detail: dict, retry_after: str | None, fallback: bool) -> ProxyError:
    """An upstream error status (other than 401/403, which trigger a re-login)."""
    message = detail.get("message") or f"SambaNova answered HTTP {status}"
    code = detail.get("code")
    if status == 429:
        return ProxyError(429, f"SambaNova rate limit: {message}", "rate_limit_error",
                          code or "rate_limit_exceeded", retry_after=retry_after,
                          retryable=True, fallback=fallback)
    if status >= 500:
        return ProxyError(502, f"SambaNova failed (HTTP {status}): {message}", "upstream_error",
                          code or "bad_gateway", retryable=status in RETRYABLE_STATUSES,
                          retry_after=retry_after)
    return ProxyError(status, message, detail.get("type") or "invalid_request_error", code)


def model_not_found(name: str, closest: list[str]) -> ProxyError:
    """A model name that the model list, known from upstream, does not hold."""
    shown = name if len(name) <= 100 else name[:100] + "..."
    hint = f" The closest known models: {', '.join(closest)}." if closest else ""
    return ProxyError(404, f"The model '{shown}' does not exist.{hint}", "invalid_request_error",
                      "model_not_found", param="model")


def key_route_missing(path: str) -> ProxyError:
    """An official-API endpoint asked for while no SAMBANOVA_API_KEY is set."""
    return ProxyError(404, f"{path} needs SAMBANOVA_API_KEY: it is forwarded to SambaNova's "
                      "official API only", "invalid_request_error", "not_found")


def answer_too_large(limit: int) -> ProxyError:
    """A non-streamed upstream answer larger than the proxy will hold."""
    return ProxyError(502, f"SambaNova's answer is larger than {limit} bytes", "upstream_error",
                      "upstream_answer_too_large")
