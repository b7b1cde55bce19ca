"""Chat through a real TorchServe serving the default model: bare route, OpenAI routes, streaming."""

from __future__ import annotations

import json

import openai
import pytest
import requests

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def post(server, path, body, key="inference", stream=False, **kw):
    keys = server.client().keys
    headers = {"Authorization": f"Bearer {getattr(keys, key)}"} if key else {}
    return requests.post(f"{server.address('inference')}{path}", json=body, headers=headers, stream=stream,
                         timeout=120, **kw)


def test_chat_completion_has_answer_and_usage(torchserve):
    resp = post(torchserve, "/predictions/llama", {"messages": HELLO, "max_tokens": 24, "temperature": 0})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].strip()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_chat_sends_chunks_as_they_are_generated(torchserve):
    resp = post(torchserve, "/predictions/llama", {"messages": HELLO, "max_tokens": 40, "temperature": 0,
                                                    "stream": True}, stream=True)
    assert resp.status_code == 200
    chunks = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    assert len(chunks) >= 3, "tokens must arrive in several chunks, not at the end"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = post(torchserve, "/predictions/llama", {"messages": HELLO, "max_tokens": 40, "temperature": 0}).json()
    assert text == whole["choices"][0]["message"]["content"]


def test_original_example_body_works_as_plain_completion(torchserve):
    resp = post(torchserve, "/predictions/llama",
                {"prompt": "The capital of France is", "max_tokens": 8, "top_p": 0.9, "temperature": 0})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip()


@pytest.fixture
def openai_client(torchserve):
    base = f"{torchserve.address('inference')}/predictions/llama/1.0/v1"
    return openai.OpenAI(base_url=base, api_key=torchserve.client().keys.inference, max_retries=0, timeout=120)


def test_openai_client_chat(openai_client):
    reply = openai_client.chat.completions.create(model="llama", messages=HELLO, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    # the server's own figures reach an OpenAI client as extra fields
    assert reply.model_extra["timings"]["predicted_n"] == reply.usage.completion_tokens
    assert reply.model_extra["model_version"] == "1.0"


def test_openai_client_streaming_chat(openai_client):
    stream = openai_client.chat.completions.create(model="llama", messages=HELLO, max_tokens=24, temperature=0,
                                                   stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["timings"]["ttft_ms"] > 0


def test_openai_client_completion_and_models(openai_client):
    done = openai_client.completions.create(model="llama", prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert done.choices[0].text.strip()
    assert [m.id for m in openai_client.models.list()] == ["llama"]


def test_openai_route_streams_server_sent_events(torchserve):
    resp = post(torchserve, "/predictions/llama/1.0/v1/chat/completions",
                {"messages": HELLO, "max_tokens": 12, "stream": True}, stream=True)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def assert_refused_for_token(resp):
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException.
    assert resp.status_code in (400, 401)
    assert resp.json()["type"] == "InvalidKeyException"


def test_request_without_token_is_refused(torchserve):
    assert_refused_for_token(post(torchserve, "/predictions/llama", {"messages": HELLO}, key=None))


def test_request_with_wrong_token_is_refused(torchserve):
    assert_refused_for_token(requests.post(
        f"{torchserve.address('inference')}/predictions/llama", json={"messages": HELLO},
        headers={"Authorization": "Bearer not-the-key"}, timeout=30))


def test_management_key_is_not_an_inference_key(torchserve):
    assert_refused_for_token(post(torchserve, "/predictions/llama", {"messages": HELLO}, key="management"))
