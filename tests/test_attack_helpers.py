"""Smoke checks of tests/attack.py's measuring helpers (the attacks themselves run in `make attack`)."""

from __future__ import annotations

import asyncio
import os

from attack import Row, during_text, format_table, open_fds, probe_info, probe_text, rss_mib
from attack_clients import counts
from server import Server


def test_process_figures_come_from_proc():
    assert rss_mib(os.getpid()) > 1 and open_fds(os.getpid()) > 2
    assert rss_mib(2 ** 22 + 1) is None and open_fds(2 ** 22 + 1) is None  # above pid_max: gone


async def test_probe_info_times_a_200_and_reports_none_otherwise():
    async def handler(request, responder):
        status = 200 if request.path == "/info" else 404
        await responder.send(status, [("content-type", "application/json")], b"{}")

    server = Server(handler, max_body_bytes=100)
    await server.start("127.0.0.1", 0)
    try:
        latency = await asyncio.to_thread(probe_info, server.port)
    finally:
        await server.shutdown(grace=0.5)
    assert latency is not None and latency < 5
    assert await asyncio.to_thread(probe_info, server.port, 0.5) is None  # nothing listens now


def test_table_and_texts():
    row = Row("PING flood", tried=3, before=30.0, peak=40.25, after=None, fds=None, upstream=0,
              during=during_text([0.002, None, 0.5]), after_probe=probe_text(0.004), note="kept")
    table = format_table([row]).splitlines()
    assert table[0].startswith("attack") and set(table[1]) == {"-"}
    assert "40.2" in table[2] and "gone" in table[2] and table[2].endswith("kept")
    assert row.during == "1/3 max 500ms, 1 unanswered" and row.after_probe == "yes 4ms"
    assert probe_text(None) == "no answer" and probe_text(0.2) == "slow 200ms"
    assert counts(["401", "401", "reset"]) == "401 x2, reset x1"
