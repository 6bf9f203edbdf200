"""Settings: the process environment, then a `.env` file, then command-line flags.

Every setting of SPEC.md is declared once in SETTINGS; parsing, `--help`, the
`.env` example and validation all read that one table.
"""

from __future__ import annotations

import argparse
import difflib
import dataclasses
import os
import ssl
from typing import Callable


class ConfigError(Exception):
    """A setting is malformed; the message names it and never echoes a secret."""


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str):
    """Parse `text` as `kind`; any failure says what is expected, not what Python thought."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(expected) from None
    if not ok(value):
        raise ValueError(expected)
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "must be a whole number of at least 1")


def _port(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= 65535, "must be a port number from 0 to 65535")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "must be a positive number of seconds")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"),
                   "must be zero or a positive number of seconds")


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) < 10:
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 0 or 1")


def _log_level(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return lowered


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in options:
            raise ValueError("must be one of " + ", ".join(options))
        return lowered
    return parse


def _origins(text: str) -> tuple[str, ...] | None:
    """CORS origins; None (unset) means the default that depends on LOCAL_API_KEY."""
    if not text.strip():
        return None
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError("must be * or comma-separated origins such as https://chat.example.com")
    return origins


def _aliases(text: str) -> tuple[tuple[str, str], ...]:
    """`alias=Target,...` pairs, in the order given."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ValueError("must be alias=Target pairs separated by commas")
        pairs.append((alias.strip(), target.strip()))
    return tuple(pairs)


def _key_list(text: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in text.split(",") if key.strip())


def _optional(text: str) -> str | None:
    return text or None


def _cache_path(text: str) -> str | None:
    return os.path.expanduser(text) if text.strip() else None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its environment name, default text, parser and help line."""

    name: str
    default: str
    parse: Callable[[str], object]
    help: str
    secret: bool = False

    @property
    def field(self) -> str:
        return self.name.lower()

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")


SETTINGS = (
    Setting("SAMBA_EMAIL", "", _optional, "account email for the automatic login"),
    Setting("SAMBA_PASSWORD", "", _optional, "account password (environment or .env only)", True),
    Setting("SAMBA_ACCESS_TOKEN", "", _optional, "a ready access_token cookie value (environment or .env only)", True),
    Setting("SAMBANOVA_API_KEY", "", _optional, "official SambaNova API key (environment or .env only)", True),
    Setting("SAMBANOVA_API_URL", "https://api.sambanova.ai/v1", _url, "base of the official OpenAI-compatible API"),
    Setting("LOCAL_API_KEY", "", _key_list, "comma-separated client key(s); empty: no client auth (environment or .env only)", True),
    Setting("TOKEN_CACHE_TIME", "604800", _positive_float, "seconds a fresh token is trusted"),
    Setting("TOKEN_REFRESH_MARGIN", "3600", _non_negative_float, "refresh this many seconds before expiry"),
    Setting("TOKEN_CACHE_FILE", "~/.cache/sambaproxy/token.json", _cache_path, "token cache file; empty disables"),
    Setting("FINGERPRINT_PREFIX", "anon_", str, "prefix of the per-request fingerprint"),
    Setting("SAMBA_COMPLETION_URL", "https://cloud.sambanova.ai/api/completion", _url, "upstream completion endpoint"),
    Setting("SAMBA_MODELS_URL", "https://api.sambanova.ai/v1/models", _url, "upstream model list"),
    Setting("SAMBA_CONFIG_URL", "https://cloud.sambanova.ai/api/config", _url, "login configuration endpoint"),
    Setting("HOST", "0.0.0.0", str, "listen address"),
    Setting("PORT", "8666", _port, "listen port"),
    Setting("TLS_CERT_FILE", "", _optional, "certificate file: serve HTTPS with h2 and http/1.1 by ALPN"),
    Setting("TLS_KEY_FILE", "", _optional, "private key file for TLS_CERT_FILE"),
    Setting("UPSTREAM_MAX_CONNECTIONS", "50", _positive_int, "outbound connection pool size"),
    Setting("UPSTREAM_CONNECT_TIMEOUT", "10", _positive_float, "seconds to connect upstream"),
    Setting("UPSTREAM_READ_TIMEOUT", "600", _positive_float, "longest upstream silence tolerated, seconds"),
    Setting("SSE_KEEPALIVE", "15", _non_negative_float, "seconds of upstream silence before a keep-alive comment; 0 disables"),
    Setting("DEFAULT_MODEL", "DeepSeek-R1", str, "model used when a request names none"),
    Setting("MAX_BODY_BYTES", "33554432", _positive_int, "largest accepted request body"),
    Setting("DEBUG_ENDPOINTS", "1", _flag, "0 makes /debug/token answer 404"),
    Setting("LOG_LEVEL", "info", _log_level, "debug, info, warning or error"),
    Setting("LOG_FORMAT", "text", _choice("text", "json"), "text, or json: one JSON object per line"),
    Setting("METRICS_PUBLIC", "0", _flag, "1 serves /metrics without the client key"),
    Setting("CORS_ORIGINS", "", _origins, "origins allowed from browsers, comma-separated or *; "
            "unset: * with a LOCAL_API_KEY, loopback origins without"),
    Setting("MAX_CONNECTIONS", "1024", _positive_int, "open client connections; more are closed at accept"),
    Setting("MAX_CONCURRENT_REQUESTS", "256", _positive_int, "requests handled at once; beyond it 503"),
    Setting("MAX_BUFFERED_BYTES", "67108864", _positive_int, "request-body bytes buffered at once across all clients"),
    Setting("HEADER_TIMEOUT", "10", _positive_float, "seconds a client has to send a whole request head"),
    Setting("LOGIN_TIMEOUT", "60", _positive_float, "seconds one whole login may take"),
    Setting("REASONING_FORMAT", "parsed", _choice("parsed", "raw", "hidden"), "where thinking goes: parsed, raw or hidden"),
    Setting("REASONING_MODELS", "", _key_list, "patterns of models whose answers begin inside a thinking block"),
    Setting("MODEL_ALIASES", "", _aliases, "alias=Target,... names clients may use for upstream models"),
    Setting("RESPONSES_STORE_SIZE", "1000", _positive_int, "Responses API objects kept in memory"),
)

SETTING_NAMES = frozenset(s.name for s in SETTINGS)


@dataclasses.dataclass(frozen=True)
class Config:
    """Parsed settings; secrets are kept out of repr so a logged config leaks nothing."""

    samba_email: str | None = None
    samba_password: str | None = dataclasses.field(default=None, repr=False)
    samba_access_token: str | None = dataclasses.field(default=None, repr=False)
    sambanova_api_key: str | None = dataclasses.field(default=None, repr=False)
    sambanova_api_url: str = "https://api.sambanova.ai/v1"
    local_api_key: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    token_cache_time: float = 604800.0
    token_refresh_margin: float = 3600.0
    token_cache_file: str | None = None
    fingerprint_prefix: str = "anon_"
    samba_completion_url: str = "https://cloud.sambanova.ai/api/completion"
    samba_models_url: str = "https://api.sambanova.ai/v1/models"
    samba_config_url: str = "https://cloud.sambanova.ai/api/config"
    host: str = "0.0.0.0"
    port: int = 8666
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    upstream_max_connections: int = 50
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    sse_keepalive: float = 15.0
    default_model: str = "DeepSeek-R1"
    max_body_bytes: int = 33554432
    debug_endpoints: bool = True
    log_level: str = "info"
    log_format: str = "text"
    metrics_public: bool = False
    cors_origins: tuple[str, ...] | None = None
    max_connections: int = 1024
    max_concurrent_requests: int = 256
    max_buffered_bytes: int = 67108864
    header_timeout: float = 10.0
    login_timeout: float = 60.0
    reasoning_format: str = "parsed"
    reasoning_models: tuple[str, ...] = ()
    model_aliases: tuple[tuple[str, str], ...] = ()
    responses_store_size: int = 1000

    @property
    def has_credentials(self) -> bool:
        return bool(self.samba_email and self.samba_password)

    @classmethod
    def from_mapping(cls, values: dict[str, str], flags: frozenset[str] = frozenset()) -> "Config":
        """Parse raw setting texts (missing names take their defaults); `flags` names those given as flags."""
        parsed = {}
        for setting in SETTINGS:
            raw = values.get(setting.name, setting.default)
            try:
                parsed[setting.field] = setting.parse(raw.strip())
            except ValueError as exc:
                shown = "(hidden)" if setting.secret else repr(raw)
                where = f"{setting.flag} {shown}" if setting.name in flags else f"{setting.name}={shown}"
                raise ConfigError(f"invalid {where}: {exc}") from None
        config = cls(**parsed)
        config._check_pairs()
        return config

    def _check_pairs(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("invalid TLS_CERT_FILE/TLS_KEY_FILE: set both or neither")
        for name, path in (("TLS_CERT_FILE", self.tls_cert_file), ("TLS_KEY_FILE", self.tls_key_file)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"invalid {name}={path!r}: no such file")
        if self.tls_cert_file:
            self.ssl_context()  # a junk certificate or key stops start-up here, naming the setting
        if bool(self.samba_email) != bool(self.samba_password):
            missing = "SAMBA_PASSWORD" if self.samba_email else "SAMBA_EMAIL"
            raise ConfigError(f"invalid credentials: {missing} is not set (set both or neither)")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (h2 and http/1.1 by ALPN); a file that cannot be used is a ConfigError."""
        if not self.tls_cert_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except ssl.SSLError as exc:
            raise ConfigError(_tls_problem(self.tls_cert_file, self.tls_key_file, exc)) from None
        except OSError as exc:
            name, path = ("TLS_KEY_FILE", self.tls_key_file) if exc.filename == self.tls_key_file \
                else ("TLS_CERT_FILE", self.tls_cert_file)
            raise ConfigError(f"invalid {name}={path!r}: cannot read it ({exc.strerror})") from None
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context


def _tls_problem(cert: str, key: str, exc: ssl.SSLError) -> str:
    """Say which TLS file is unusable: the certificate alone is checked first, then the key against it."""
    reason = (exc.reason or "unreadable").lower().replace("_", " ")
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"invalid TLS_CERT_FILE={cert!r}: not a PEM certificate ({reason})"
    return f"invalid TLS_KEY_FILE={key!r}: not a PEM private key matching TLS_CERT_FILE ({reason})"


def read_env_file(path: str, *, required: bool = False) -> dict[str, str]:
    """Read `KEY=VALUE` lines: optional BOM, optional `export`, optional quotes, `#` comments.

    A missing file is no error unless it was named explicitly (`required`).
    """
    values: dict[str, str] = {}
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"cannot read env file {path!r}: no such file") from None
        return values
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path!r}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not part of line 1
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"cannot read env file {path!r}: line {line} is not valid UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"invalid line {number} in {path!r}: expected KEY=VALUE")
        values[key] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    """A quoted value loses its quotes and any `# comment` after them; an unquoted one its ` # comment`."""
    if len(value) >= 2 and value[0] in "'\"":
        end = value.find(value[0], 1)
        rest = value[end + 1:].strip() if end > 0 else None
        if rest is not None and (not rest or rest.startswith("#")):
            return value[1:end]
    if " #" in value:
        value = value.split(" #", 1)[0].rstrip()
    return value


# Prefixes of our own settings: an unknown name with one of them in .env is most likely a typo.
OWN_PREFIXES = ("SAMBA_", "SAMBANOVA_", "TOKEN_", "UPSTREAM_")


def unknown_setting_warnings(values: dict[str, str], path: str) -> list[str]:
    """One warning per unknown name that looks like ours, with the closest known name."""
    warnings = []
    for key in values:
        if key in SETTING_NAMES or not key.startswith(OWN_PREFIXES):
            continue
        close = difflib.get_close_matches(key, SETTING_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "it is ignored"
        warnings.append(f"unknown setting {key} in {path}: {hint}")
    return warnings


def build_parser(version: str) -> argparse.ArgumentParser:
    """Flags for every non-secret setting; secrets are listed but read from the environment only."""
    parser = argparse.ArgumentParser(
        prog="sambaproxy.py",
        description="OpenAI-compatible gateway to SambaNova Cloud. Settings come from the "
        "environment, then the .env file; flags override both.",
        epilog="Environment/.env only (secrets): "
        + ", ".join(s.name for s in SETTINGS if s.secret),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sambaproxy {version}")
    parser.add_argument("--env-file", default=None,
                        help="settings file read after the environment (default: .env, if present)")
    for setting in SETTINGS:
        default = setting.default or "unset"
        if setting.secret:
            continue
        parser.add_argument(setting.flag, dest=setting.name, default=None, metavar=setting.name,
                            help=f"{setting.help} (default: {default})")
    return parser


def load_config(argv: list[str] | None, environ: dict[str, str], version: str,
                warnings: list[str] | None = None) -> Config:
    """Combine flags, environment and `.env` (in that order of precedence) into a Config.

    Warnings about the `.env` file (unknown names) are appended to `warnings`, for the caller to log.
    """
    args = build_parser(version).parse_args(argv)
    path = args.env_file or ".env"
    values = read_env_file(path, required=args.env_file is not None)
    if warnings is not None:
        warnings.extend(unknown_setting_warnings(values, path))
    values.update({k: v for k, v in environ.items() if k in SETTING_NAMES})
    flags = {s.name: getattr(args, s.name) for s in SETTINGS
             if not s.secret and getattr(args, s.name) is not None}
    values.update(flags)
    return Config.from_mapping(values, frozenset(flags))
