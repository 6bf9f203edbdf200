"""`make attack`: hostile clients against a real proxy and the fake SambaNova, measured.

Starts tests/fake_samba.py and sambaproxy.py as subprocesses on free 127.0.0.1 ports, runs each
attack of tests/attack_clients.py for a few seconds (about a minute in all), and prints one row
per attack: requests tried, the proxy's RSS before/peak/after (VmRSS of /proc/PID/status, in MiB),
its open fds after (/proc/PID/fd), the upstream requests it caused (the fake's counter), and
whether /info answered within 100 ms while the attack ran ("in time/probes", the slowest, and
probes with no answer within 1 s) and after it. The note
says what the server did. Nothing is assumed: a limit that is not built shows as a bad row.
The proxy runs with MAX_CONNECTIONS=64 and HEADER_TIMEOUT=3 so those limits show within the run;
the CORS row uses a second proxy without LOCAL_API_KEY (the case the CORS default protects).
Only 127.0.0.1; every attack is bounded in count, bytes and time. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]

import httpx  # noqa: E402

import attack_clients as clients  # noqa: E402
from config import SETTING_NAMES  # noqa: E402

PY = sys.executable
KEY = "sk-attack-local-7c41"
EMAIL, PASSWORD = "attack@example.com", "attack-password-not-secret"
MAX_CONNECTIONS = 64
PROBE_BUDGET = 0.1   # seconds /info may take
PROBE_EVERY = 0.25   # seconds between /info probes during an attack
SETTLE = 0.5         # seconds between an attack's end and the "after" figures
WAIT = 30.0          # seconds a child may take to start


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB, None once it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match[1]) / 1024 if match else None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def probe_info(port: int, timeout: float = 1.0) -> float | None:
    """Seconds until GET /info's 200 status line arrived on a new connection, None if it did not."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /info HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                piece = sock.recv(4096)
                if not piece:
                    return None
                data += piece
    except OSError:
        return None
    return time.monotonic() - start if data.startswith(b"HTTP/1.1 200") else None


class Monitor(threading.Thread):
    """Samples the proxy's RSS every 50 ms (the peak) and probes /info every PROBE_EVERY seconds.

    A thread of its own with blocking sockets, so the attacks' event loop cannot delay the probes.
    """

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.peak = rss_mib(pid) or 0.0
        self.probes: list[float | None] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        next_probe = time.monotonic()
        while not self.stopping.is_set():
            self.peak = max(self.peak, rss_mib(self.pid) or 0.0)
            if time.monotonic() >= next_probe:
                self.probes.append(probe_info(self.port))
                next_probe = time.monotonic() + PROBE_EVERY
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


@dataclass
class Row:
    name: str
    tried: int = 0
    before: float = 0.0
    peak: float = 0.0
    after: float | None = None
    fds: int | None = None
    upstream: int | str = 0
    during: str = ""
    after_probe: str = ""
    note: str = ""
    columns: tuple = field(default=(), repr=False)


def probe_text(latency: float | None) -> str:
    if latency is None:
        return "no answer"
    return f"{'yes' if latency <= PROBE_BUDGET else 'slow'} {latency * 1000:.0f}ms"


def during_text(probes: list[float | None]) -> str:
    """'in time/probes', the slowest answer, and how many got none within a second."""
    ok = [p for p in probes if p is not None and p <= PROBE_BUDGET]
    worst = max((p for p in probes if p is not None), default=None)
    text = f"{len(ok)}/{len(probes)}" + (f" max {worst * 1000:.0f}ms" if worst is not None else "")
    unanswered = probes.count(None)
    return text + (f", {unanswered} unanswered" if unanswered else "")


HEADERS = ("attack", "tried", "RSS before", "peak", "after", "fds after", "upstream reqs",
           "/info during", "/info after", "what the server did")


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table (MiB figures with one decimal)."""
    def mib(value):
        return "gone" if value is None else f"{value:.1f}"
    cells = [HEADERS] + [(r.name, str(r.tried), mib(r.before), mib(r.peak), mib(r.after),
                          "gone" if r.fds is None else str(r.fds), str(r.upstream), r.during,
                          r.after_probe, r.note) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS) - 1)]
    lines = []
    for row in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class Children:
    """The fake and the proxies, each logging to a file; all stopped at the end."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = Path(self.workdir, f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def wait_for(self, proc: subprocess.Popen, log: Path, pattern: bytes) -> re.Match:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            if match := re.search(pattern, log.read_bytes()):
                return match
            time.sleep(0.02)
        raise SystemExit(f"{log.name}: no {pattern!r}; log tail:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def proxy_env(fake: str, **settings: str) -> dict[str, str]:
    """This environment without the user's proxy settings, wired to the fake."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    return env | {"HOST": "127.0.0.1", "PORT": "0", "TOKEN_CACHE_FILE": "", "SAMBA_EMAIL": EMAIL,
                  "SAMBA_PASSWORD": PASSWORD, "SAMBA_CONFIG_URL": f"{fake}/api/config",
                  "SAMBA_COMPLETION_URL": f"{fake}/api/completion",
                  "SAMBA_MODELS_URL": f"{fake}/v1/models", "UPSTREAM_READ_TIMEOUT": "60"} | settings


def start_proxy(children: Children, name: str, fake: str, **settings: str):
    """A proxy wired to the fake, logged in: (process, port, log path)."""
    proc, log = children.spawn(name, [PY, str(ROOT / "sambaproxy.py")], proxy_env(fake, **settings))
    port = int(children.wait_for(proc, log, rb"listening on http://[\d.]+:(\d+)")[1])
    children.wait_for(proc, log, rb"logged in to SambaNova")
    return proc, port, log


def log_troubles(log: Path, start: int) -> str:
    """Tracebacks and asyncio 'Fatal error' lines a proxy logged since byte `start` of its log."""
    text = log.read_bytes()[start:]
    found = [f"{text.count(word)} {label}" for word, label in
             ((b"Traceback", "traceback(s)"), (b"Fatal error", "fatal error(s)")) if word in text]
    return f"; log: {', '.join(found)}" if found else ""


async def run_attack(name: str, attack, target: clients.Target, proc: subprocess.Popen, log: Path,
                     fake_stats, seconds_budget: float = 20.0) -> Row:
    """Run one attack under the Monitor and fill its row."""
    row = Row(name, before=rss_mib(proc.pid) or 0.0)
    upstream_before = (await fake_stats())["completions"]
    log_start = len(log.read_bytes())
    monitor = Monitor(proc.pid, target.port)
    monitor.start()
    try:
        outcome = await asyncio.wait_for(attack(target), seconds_budget)
        row.tried, row.note = outcome.tried, outcome.note
    except Exception as exc:  # an attack that breaks is reported, and the run goes on
        row.note = f"attack failed: {type(exc).__name__}: {exc}"[:120]
    await asyncio.sleep(SETTLE)
    monitor.stop()
    row.peak = monitor.peak
    row.during = during_text(monitor.probes)
    row.after = rss_mib(proc.pid)
    row.fds = open_fds(proc.pid)
    row.after_probe = probe_text(await asyncio.to_thread(probe_info, target.port))
    row.upstream = (await fake_stats())["completions"] - upstream_before
    row.note += log_troubles(log, log_start)
    if proc.poll() is not None:
        row.note += f"; PROXY EXITED ({proc.returncode})"
    return row


async def attacks(fake: str, proxy, spare) -> list[Row]:
    """Every attack in turn, against the main proxy (and the key-less one for CORS)."""
    async with httpx.AsyncClient(base_url=fake, timeout=10) as control:
        async def fake_stats() -> dict:
            return (await control.get("/_fake/stats")).json()

        async def script_reply(fields: dict) -> None:
            (await control.post("/_fake/script", json=fields)).raise_for_status()

        proc, port, log = proxy
        target = clients.Target(port, KEY, script_reply, fake_stats)
        plan = [
            ("unauth 30MB upload h1", clients.unauthenticated_upload_h1),
            ("unauth 30MB upload h2", clients.unauthenticated_upload_h2),
            ("8x30MB unfinished h2", clients.unfinished_h2_uploads),
            ("40 rapid resets h2", clients.rapid_reset),
            ("slowloris x5", clients.slowloris),
            ("100KB header h1+h2", clients.huge_header),
            ("PING flood", clients.ping_flood),
            ("SETTINGS flood", clients.settings_flood),
            ("non-ASCII :method", clients.non_ascii_method),
            ("CONTINUATION x20", clients.continuation_flood),
            ("starved stream", clients.starved_stream),
            ("pipelined+departure", clients.pipelined_departure),
            (f"{MAX_CONNECTIONS + 36} connections",
             lambda t: clients.many_connections(t, MAX_CONNECTIONS + 36)),
        ]
        rows = []
        for name, attack in plan:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            rows.append(await run_attack(name, attack, target, proc, log, fake_stats))
        spare_proc, spare_port, spare_log = spare
        print("  CORS drive-by ...", file=sys.stderr, flush=True)
        rows.append(await run_attack("CORS drive-by (no key)", clients.cors_drive_by,
                                     clients.Target(spare_port, ""), spare_proc, spare_log, fake_stats))
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sambaproxy-attack-") as workdir:
        children = Children(workdir)
        try:
            fake_proc, fake_log = children.spawn("fake", [PY, str(TESTS / "fake_samba.py"), "--port", "0",
                                                          "--email", EMAIL, "--password", PASSWORD])
            fake = children.wait_for(fake_proc, fake_log, rb"fake SambaNova on (http://\S+)")[1].decode()
            proxy = start_proxy(children, "proxy", fake, LOCAL_API_KEY=KEY,
                                MAX_CONNECTIONS=str(MAX_CONNECTIONS), HEADER_TIMEOUT="3")
            spare = start_proxy(children, "proxy-no-key", fake, LOCAL_API_KEY="")
            started = time.monotonic()
            rows = asyncio.run(attacks(fake, proxy, spare))
            elapsed = time.monotonic() - started
        finally:
            children.stop()
        print(format_table(rows))
        print(f"\n{len(rows)} attacks in {elapsed:.0f} s; RSS in MiB; /info within "
              f"{PROBE_BUDGET * 1000:.0f} ms (during: probes answered in time / probes).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
