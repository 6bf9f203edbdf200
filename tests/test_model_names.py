"""Model names: MODEL_ALIASES, ids in any case, 404 for unknown names, answers in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conftest import AUTH
from test_proxy import sdk, sse_data

HI = [{"role": "user", "content": "hi"}]
ALIASES = "gpt-4o=Meta-Llama-3.3-70B-Instruct, r1=deepseek-r1"


async def chat(app, model: str, stream: bool) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{app.url}/v1/chat/completions", headers=AUTH,
                                 json={"model": model, "messages": HI, "stream": stream})


def answer_models(r: httpx.Response, stream: bool) -> set[str]:
    """The model names an answer gives, each of its objects checked against the SDK's types."""
    if not stream:
        completion = ChatCompletion.model_validate(r.json(), strict=True)
        assert completion.id.startswith("chatcmpl-")
        return {completion.model}
    chunks = [ChatCompletionChunk.model_validate(json.loads(d), strict=True) for d in sse_data(r.text)[:-1]]
    assert chunks and all(c.id.startswith("chatcmpl-") for c in chunks)
    assert len({c.id for c in chunks}) == 1
    return {c.model for c in chunks}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("asked, upstream", [
    ("gpt-4o", "Meta-Llama-3.3-70B-Instruct"), ("GPT-4O", "Meta-Llama-3.3-70B-Instruct"),
    ("r1", "DeepSeek-R1"), ("deepseek-r1", "DeepSeek-R1"),
    ("meta-llama-3.3-70b-instruct", "Meta-Llama-3.3-70B-Instruct"),
])
async def test_aliases_and_case_go_upstream_as_the_target(fake, start_proxy, asked, upstream, stream):
    app = await start_proxy(fake, MODEL_ALIASES=ALIASES)
    r = await chat(app, asked, stream)
    assert r.status_code == 200
    assert fake.completions[-1]["json"]["body"]["model"] == upstream
    assert answer_models(r, stream) == {asked}


async def test_upstream_ids_get_the_chatcmpl_prefix_once(proxy, fake):
    r = await chat(proxy, "DeepSeek-V3-0324", True)
    ids = {json.loads(d)["id"] for d in sse_data(r.text)[:-1]}
    assert len(ids) == 1 and ids.pop().count("chatcmpl-") == 1
    whole = await chat(proxy, "DeepSeek-V3-0324", False)
    assert whole.json()["id"].startswith("chatcmpl-") and whole.json()["id"].count("chatcmpl-") == 1


async def test_model_list_shows_aliases_and_finds_ids_in_any_case(fake, start_proxy):
    app = await start_proxy(fake, MODEL_ALIASES=ALIASES)
    client = sdk(app)
    models = {m.id: m async for m in client.models.list()}
    async with httpx.AsyncClient(timeout=10) as raw:
        listing = (await raw.get(f"{app.url}/v1/models", headers=AUTH)).json()
    for entry in listing["data"]:
        Model.model_validate(entry, strict=True)
    assert {"gpt-4o", "r1", "DeepSeek-R1", "Meta-Llama-3.3-70B-Instruct"} <= set(models)
    assert models["r1"].root == "DeepSeek-R1" and models["r1"].owned_by == "deepseek-ai"
    assert (await client.models.retrieve("deepseek-r1")).id == "DeepSeek-R1"
    assert (await client.models.retrieve("gpt-4o")).id == "gpt-4o"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_unknown_model_is_404_once_the_list_is_known(proxy, fake, stream):
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
        await client.get(f"{proxy.url}/v1/models")  # the list is now known from upstream
    sent = len(fake.completions)
    with pytest.raises(openai.NotFoundError) as info:
        await sdk(proxy).chat.completions.create(model="deepseek-r2", messages=HI, stream=stream)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "deepseek-r2" in error["message"] and "DeepSeek-R1" in error["message"]
    assert len(fake.completions) == sent


async def test_unknown_model_goes_upstream_while_the_list_is_unknown(fake, start_proxy):
    fake.models_status = 503
    app = await start_proxy(fake)
    r = await chat(app, "Brand-New-Model", False)
    assert r.status_code == 200 and fake.completions[-1]["json"]["body"]["model"] == "Brand-New-Model"
    await fake.wait_for(lambda f: f.models_requests >= 1)  # fetched in the background, not waited for
    r = await chat(app, "Brand-New-Model", False)
    assert r.status_code == 200


async def test_a_chat_request_refreshes_the_model_list_in_the_background(proxy, fake):
    assert (await chat(proxy, "deepseek-r1", False)).status_code == 200
    await fake.wait_for(lambda f: f.models_requests == 1)
    await proxy.catalog.models()  # waits for the background refresh to finish, fetches nothing more
    assert (await chat(proxy, "no-such-model", False)).status_code == 404
    for _ in range(3):
        assert (await chat(proxy, "deepseek-r1", True)).status_code == 200
    assert fake.models_requests == 1
