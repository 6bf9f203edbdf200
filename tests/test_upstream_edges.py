"""Upstream edge cases end to end: a token refused twice, a route without a token, an answer without [DONE]."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import AUTH
from fake_samba import Reply

HELLO = {"model": "Meta-Llama-3.3-70B-Instruct", "messages": [{"role": "user", "content": "hello"}]}


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{app.url}/v1/chat/completions", headers=AUTH, json=body)


async def test_second_401_right_after_a_fresh_login_is_502_not_a_loop(proxy, fake):
    await fake.wait_for(lambda f: f.logins == 1)
    fake.script.extend([Reply(status=401), Reply(status=401)])  # the fresh token is refused too
    r = await post(proxy, HELLO)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert len(fake.completions) == 2 and fake.logins == 2  # one re-login, one more try, no more


async def test_account_route_without_a_token_falls_back_to_the_key_route(fake, start_proxy):
    fake.login_status = 500  # the login fails: the account route has no token to send
    app = await start_proxy(fake, SAMBANOVA_API_KEY="fake-api-key")
    r = await post(app, HELLO)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Echo: hello"
    assert [c["path"] for c in fake.completions] == ["/v1/chat/completions"]
    assert fake.logins == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_ending_without_done_is_upstream_incomplete(proxy, fake, stream):
    # Cut before the finish_reason and the usage chunk: either would make the answer whole.
    pieces = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
              for text in ("cut ", "short")]
    fake.script.append(Reply(chunks=pieces, done=False))
    r = await post(proxy, {**HELLO, "stream": stream})
    if stream:
        data = sse_data(r.text)
        assert r.status_code == 200 and "[DONE]" not in data
        assert json.loads(data[-1])["error"]["code"] == "upstream_incomplete"
        content = "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                          for d in data[:-1] if json.loads(d).get("choices"))
        assert content == "cut short"  # what did arrive was relayed
    else:
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_incomplete"
