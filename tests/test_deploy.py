"""The single-file deploy: sambaproxy.pyz run alone, systemd's notify protocol, the service unit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import AUTH, ROOT, fake_settings

sys.path.insert(0, os.path.join(ROOT, "deploy"))
import build_pyz  # noqa: E402
import stdlib_zip  # noqa: E402
from resources import outbound_ssl_context, read_resource  # noqa: E402
from sambaproxy import __version__  # noqa: E402

WAIT = 20.0  # seconds any one step may take on a busy machine
UNIT = Path(ROOT, "deploy", "sambaproxy.service")


def base_python() -> str:
    """The interpreter the venv was made from: a CPython with none of the venv's packages."""
    python = getattr(sys, "_base_executable", sys.executable)
    if sys.prefix != sys.base_prefix and Path(python).resolve().is_relative_to(Path(sys.prefix).resolve()):
        pytest.skip("cannot find the venv's base interpreter")
    return python


class Proxy:
    """A proxy process; its stderr is collected line by line until it ends."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], cwd: Path) -> "Proxy":
        process = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return cls(process)

    async def _read(self) -> None:
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if " listening on http://" in line and not self.listening.done():
                self.listening.set_result(int(line.rsplit(":", 1)[1]))
        if not self.listening.done():
            self.listening.set_exception(AssertionError("the proxy ended:\n" + self.log))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def port(self) -> int:
        return await asyncio.wait_for(asyncio.shield(self.listening), WAIT)

    async def terminate(self) -> int:
        """SIGTERM, then its exit status (killed after WAIT seconds)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), WAIT)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError("the proxy did not stop on SIGTERM:\n" + self.log) from None
        finally:
            await asyncio.wait_for(self.reader, WAIT)


def test_outbound_tls_trusts_certifi_by_default_and_ssl_cert_file_when_set(certificate):
    import certifi
    certifi_only = ssl.create_default_context(cafile=certifi.where()).cert_store_stats()
    assert outbound_ssl_context({}).cert_store_stats() == certifi_only and certifi_only["x509_ca"] > 50
    assert outbound_ssl_context({"SSL_CERT_FILE": certificate[0]}).cert_store_stats()["x509"] == 1


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """sambaproxy.pyz built from this venv's packages, then copied alone into an empty folder."""
    built = tmp_path_factory.mktemp("build") / "sambaproxy.pyz"
    build_pyz.build(Path(sysconfig.get_paths()["purelib"]), built)
    alone = tmp_path_factory.mktemp("alone") / "sambaproxy.pyz"
    shutil.copy(built, alone)
    return alone


def test_archive_holds_every_module_resource_and_pinned_package(archive):
    names = set(zipfile.ZipFile(archive).namelist())
    modules = [p.name for p in Path(ROOT).glob("*.py")]
    assert modules and all(m in names and m[:-3] + ".pyc" in names for m in modules)
    assert {"__main__.py", "__main__.pyc", "status.html", "certifi/cacert.pem"} <= names
    packages = {"h11", "h2", "hpack", "hyperframe", "httpx", "httpcore", "anyio", "sniffio", "idna", "certifi"}
    assert all(f"{p}/__init__.py" in names and f"{p}/__init__.pyc" in names for p in packages)
    assert "typing_extensions.py" in names and not any("__pycache__" in n for n in names)
    assert archive.read_bytes().startswith(b"#!/usr/bin/env python3\n") and os.access(archive, os.X_OK)


def test_every_resource_the_code_reads_is_in_the_archive(archive):
    names = set(zipfile.ZipFile(archive).namelist())
    read = {part.split('"')[1] for path in Path(ROOT).glob("*.py")
            for part in path.read_text().split("read_resource(")[1:] if part.startswith('"')}
    assert "status.html" in read and read <= names


def test_modules_read_their_files_through_resources():
    """Inside the archive a module's folder is no folder: open(dirname(__file__)/...) works from the tree only."""
    by_path = re.compile(r"dirname\((os\.path\.abspath\()?__file__")
    assert [p.name for p in Path(ROOT).glob("*.py") if p.name != "resources.py" and by_path.search(p.read_text())] == []


def test_build_refuses_a_version_other_than_the_pin(tmp_path):
    (tmp_path / "requirements.txt").write_text("h11==0.0.1\n")
    (tmp_path / "sambaproxy.py").write_text("")
    with pytest.raises(build_pyz.BuildError, match="h11 is 0.16.0 .* pins 0.0.1"):
        build_pyz.build(Path(sysconfig.get_paths()["purelib"]), tmp_path / "out.pyz", root=tmp_path)


def test_build_refuses_a_requirement_that_is_not_an_exact_pin(tmp_path):
    (tmp_path / "requirements.txt").write_text("h11>=0.16\n")
    with pytest.raises(build_pyz.BuildError, match="not an exact pin"):
        build_pyz.read_pins(tmp_path / "requirements.txt")


def test_archive_bytecode_is_what_zipimport_loads(archive):
    """The shipped .pyc files are taken (no source compiled at each start) on this Python."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import sambaproxy, httpx, h11; " \
           "print(sambaproxy.__file__, httpx.__file__, h11.__file__)"
    out = subprocess.run([base_python(), "-I", "-S", "-c", code, str(archive)], env={}, capture_output=True,
                         text=True, timeout=WAIT, check=True).stdout.split()
    assert [Path(f).suffix for f in out] == [".pyc"] * 3 and all(f.startswith(str(archive)) for f in out)


def test_bytecode_only_archive_runs_on_its_python(tmp_path):
    built = tmp_path / "sambaproxy.pyz"
    build_pyz.build(Path(sysconfig.get_paths()["purelib"]), built, bytecode_only=True)
    names = zipfile.ZipFile(built).namelist()
    assert "sambaproxy.pyc" in names and not [n for n in names if n.endswith(".py") and n != "__main__.py"]
    run = subprocess.run([base_python(), "-I", "-S", str(built), "--version"], env={}, capture_output=True,
                         text=True, timeout=WAIT)
    assert (run.returncode, run.stdout) == (0, f"sambaproxy {__version__}\n")


def test_stdlib_zip_holds_what_a_start_loads_and_only_whole_packages(archive, tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    chosen = stdlib_zip.zippable(stdlib_zip.loaded_at_start(str(archive)), stdlib)
    assert {"ssl", "argparse", "typing"} <= set(chosen)  # plain modules every start imports
    for package in {name.split(".")[0] for name in chosen if "." in name}:
        assert set(stdlib_zip.package_modules(package, os.path.join(stdlib, package))) <= set(chosen)
    target = tmp_path / "python3x.zip"
    stdlib_zip.write_zip(chosen, stdlib, str(target))
    code = "import sys; sys.path[1:1] = sys.argv[1:]; import ssl, sambaproxy; print(ssl.__file__)"
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(target), str(archive)], env={},
                         capture_output=True, text=True, timeout=WAIT, check=True)
    assert run.stdout.strip() == f"{target}/ssl.pyc"  # zipimport took the bytecode


@pytest.mark.parametrize("how", ["python -I", "shebang"])
def test_archive_version_matches(archive, how):
    argv = [base_python(), "-I", str(archive)] if how == "python -I" else [str(archive)]
    env = {"PATH": os.path.dirname(base_python())}  # where the shebang's `env python3` looks
    run = subprocess.run([*argv, "--version"], env=env, cwd=archive.parent, capture_output=True, text=True,
                         timeout=WAIT)
    assert (run.returncode, run.stdout) == (0, f"sambaproxy {__version__}\n")


async def test_archive_alone_serves_like_make_run(archive, fake, tmp_path):
    """Nothing installed (-I -S: no site-packages at all), settings from the environment and .env."""
    settings = fake_settings(fake)
    (tmp_path / ".env").write_text(f"export LOCAL_API_KEY='{settings.pop('LOCAL_API_KEY')}'\n")
    proxy = await Proxy.start([base_python(), "-I", "-S", str(archive)], settings, tmp_path)
    try:
        url = f"http://127.0.0.1:{await proxy.port()}"
        async with httpx.AsyncClient(timeout=WAIT) as client:
            body = {"model": "Meta-Llama-3.3-70B-Instruct", "stream": True,
                    "messages": [{"role": "user", "content": "hello"}]}
            assert (await client.post(f"{url}/v1/chat/completions", json=body)).status_code == 401
            stream = await client.post(f"{url}/v1/chat/completions", headers=AUTH, json=body)
            info = await client.get(f"{url}/info")
            page = await client.get(f"{url}/")
    finally:
        status = await proxy.terminate()
    events = [line[len("data: "):] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert stream.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"]) \
        == "Echo: hello"
    assert info.json()["token_status"] == "active" and info.json()["version"] == __version__
    assert page.content == read_resource("status.html")
    assert status == 0 and "Traceback" not in proxy.log
    assert os.listdir(archive.parent) == ["sambaproxy.pyz"]  # nothing written next to it


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_ready_once_listening_and_stopping_at_sigterm(kind, tmp_path):
    """systemd's Type=notify protocol, against a real datagram socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setblocking(False)
    if kind == "path":
        listener.bind(str(tmp_path / "notify"))
        address = str(tmp_path / "notify")
    else:
        listener.bind(f"\0sambaproxy-test-{os.getpid()}-{id(listener)}")
        address = "@" + listener.getsockname()[1:].decode()
    env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", "TOKEN_CACHE_FILE": "",
           "NOTIFY_SOCKET": address}
    loop = asyncio.get_running_loop()
    with listener:
        proxy = await Proxy.start([sys.executable, "sambaproxy.py"], env, Path(ROOT))
        try:
            ready = await asyncio.wait_for(loop.sock_recv(listener, 4096), WAIT)
            with socket.create_connection(("127.0.0.1", await proxy.port()), timeout=WAIT):
                pass  # listening by the time READY=1 arrived
        finally:
            status = await proxy.terminate()
        stopping = await asyncio.wait_for(loop.sock_recv(listener, 4096), WAIT)
    assert (ready, stopping, status) == (b"READY=1", b"STOPPING=1", 0)


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if UNIT.name in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


def test_unit_file_runs_the_archive_hardened():
    unit = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line
                and not line.startswith("#"))
    assert unit["Type"] == "notify" and unit["DynamicUser"] == "yes" and unit["StateDirectory"] == "sambaproxy"
    assert unit["EnvironmentFile"].lstrip("-") == "/etc/sambaproxy.env" and "sambaproxy.pyz" in unit["ExecStart"]
    assert unit["Environment"].startswith("TOKEN_CACHE_FILE=%S/sambaproxy/")
    for setting in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "RestrictAddressFamilies",
                    "MemoryMax", "Restart"):
        assert setting in unit
