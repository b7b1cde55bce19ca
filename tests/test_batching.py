"""Every request of a batch gets its own answer, in both TorchServe batching modes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import ROOT, package

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "Who wrote Hamlet?",
]


def ask(server, model, prompt, stream=False):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0, "stream": stream}
    resp = requests.post(f"{server.address('inference')}/predictions/{model}", json=body, timeout=300,
                         headers={"Authorization": f"Bearer {server.client().keys.inference}"}, stream=stream)
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def all_at_once(server, model, stream=False):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: ask(server, model, p, stream), PROMPTS))


@pytest.fixture(scope="module")
def dynamic_batching_model(torchserve, model_store, tmp_path_factory):
    """The default model packed with continuousBatching off, registered with batch_size=4."""
    config = tmp_path_factory.mktemp("cfg") / "model-config.yaml"
    config.write_text((ROOT / "model-config.yaml").read_text().replace("continuousBatching: true",
                                                                      "continuousBatching: false"))
    package("", "false", "--name", "llama_dyn", "--config", config, store=model_store)
    client = torchserve.client(timeout=300)
    client.register("llama_dyn.mar", batch_size=4, max_batch_delay=3000)
    yield "llama_dyn"
    client.unregister("llama_dyn")


@pytest.fixture(scope="module")
def continuous_model_of_four(torchserve):
    client = torchserve.client(timeout=300)
    client.register("llama.mar", model_name="llama4", batch_size=4, max_batch_delay=3000)
    yield "llama4"
    client.unregister("llama4")


def test_second_request_in_dynamic_batch_gets_its_own_answer(torchserve, dynamic_batching_model):
    alone = [ask(torchserve, dynamic_batching_model, p) for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "the prompts must have different answers for this test to mean anything"
    assert all_at_once(torchserve, dynamic_batching_model) == alone


def test_dynamic_batch_streams_each_request_its_own_tokens(torchserve, dynamic_batching_model):
    alone = [ask(torchserve, dynamic_batching_model, p) for p in PROMPTS]
    assert all_at_once(torchserve, dynamic_batching_model, stream=True) == alone


def test_four_prompts_at_once_with_continuous_batching_equal_their_answers_alone(torchserve, continuous_model_of_four):
    alone = [ask(torchserve, continuous_model_of_four, p) for p in PROMPTS]
    assert all_at_once(torchserve, continuous_model_of_four) == alone
    assert all_at_once(torchserve, continuous_model_of_four, stream=True) == alone
