"""Shared fixtures: a real fake SambaNova and a real proxy, both on 127.0.0.1 free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from config import Config  # noqa: E402
from fake_samba import FakeSamba  # noqa: E402
from sambaproxy import App  # noqa: E402

EMAIL = "user-7f3a@example.com"
PASSWORD = "pw-unique-5b8c2e91d4"
CLIENT_KEY = "sk-local-unique-9d1e7c"


def fake_settings(fake: FakeSamba, **overrides: str) -> dict[str, str]:
    """Settings wiring the proxy to the fake; values are the raw texts of the environment."""
    settings = {
        "HOST": "127.0.0.1",
        "PORT": "0",
        "SAMBA_EMAIL": EMAIL,
        "SAMBA_PASSWORD": PASSWORD,
        "SAMBA_CONFIG_URL": f"{fake.url}/api/config",
        "SAMBA_COMPLETION_URL": f"{fake.url}/api/completion",
        "SAMBA_MODELS_URL": f"{fake.url}/v1/models",
        "SAMBANOVA_API_URL": f"{fake.url}/v1",
        "TOKEN_CACHE_FILE": "",
        "LOCAL_API_KEY": CLIENT_KEY,
        "UPSTREAM_READ_TIMEOUT": "5",
        "UPSTREAM_CONNECT_TIMEOUT": "2",
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


@pytest.fixture
async def fake():
    server = FakeSamba(email=EMAIL, password=PASSWORD)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def start_proxy():
    """Factory: start_proxy(fake, **settings) -> a running App; every one is stopped afterwards."""
    apps: list[App] = []

    async def start(fake: FakeSamba | None = None, **overrides: str) -> App:
        settings = fake_settings(fake, **overrides) if fake else {"HOST": "127.0.0.1", "PORT": "0",
                                                                   "TOKEN_CACHE_FILE": "", **overrides}
        app = App(Config.from_mapping(settings), retry_delays=(0.01, 0.02), retry_after_cap=0.05)
        await app.start()
        apps.append(app)
        app.url = f"http://127.0.0.1:{app.port}"
        return app

    yield start
    for app in apps:
        await app.aclose(grace=1.0)


@pytest.fixture
async def proxy(fake, start_proxy):
    return await start_proxy(fake)


AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture
def closed_port():
    """A 127.0.0.1 port where connections are refused: bound for the test's life, never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A throwaway self-signed certificate for 127.0.0.1: (cert path, key path)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found: cannot make a throwaway certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return str(cert), str(key)
