"""Each answer of a real TorchServe carries the server's figures (`timings`) and the model
version that answered: in the last streamed chunk or the whole answer, on the bare and the
OpenAI routes, in both batching modes."""

from __future__ import annotations

import json
import time

import pytest
import requests

from test_batching import dynamic_batching_model  # noqa: F401 (a fixture)

TIMING_KEYS = {"prompt_n", "cache_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
               "predicted_per_second", "queue_ms", "ttft_ms"}
FRUIT = [{"role": "user", "content": "Name a fruit."}]


def ask(server, model: str, path: str, body: dict) -> tuple[list[dict], float]:
    """The answer's JSON objects (one, or a stream's chunks) and the milliseconds it took as the client saw it."""
    started = time.monotonic()
    resp = requests.post(f"{server.address('inference')}/predictions/{model}{path}", json=body, timeout=300,
                         headers={"Authorization": f"Bearer {server.client().keys.inference}"})
    took_ms = (time.monotonic() - started) * 1000
    assert resp.status_code == 200, resp.text
    if not body.get("stream"):
        return [resp.json()], took_ms
    lines = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines if line != "[DONE]"], took_ms


def check_figures(answer: dict, took_ms: float) -> dict:
    assert answer["model_version"] == "1.0"
    timings, usage = answer["timings"], answer["usage"]
    assert timings.keys() == TIMING_KEYS
    assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"]
    assert timings["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert timings["predicted_n"] == usage["completion_tokens"] > 1
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] < took_ms
    assert 0 < timings["prompt_ms"] <= timings["ttft_ms"]
    assert 0 < timings["predicted_ms"] < took_ms
    assert timings["prompt_per_second"] == pytest.approx(timings["prompt_n"] / timings["prompt_ms"] * 1000, rel=0.01)
    assert timings["predicted_per_second"] == pytest.approx(
        timings["predicted_n"] / timings["predicted_ms"] * 1000, rel=0.01)
    return timings


ROUTES = [("", {"messages": FRUIT}), ("/1.0/v1/chat/completions", {"messages": FRUIT}),
          ("/1.0/v1/completions", {"prompt": "Three fruits:"})]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path, body", ROUTES, ids=["bare", "openai-chat", "openai-completion"])
def test_continuous_batching_answers_carry_timings_and_model_version(torchserve, path, body, stream):
    objects, took_ms = ask(torchserve, "llama", path, {**body, "max_tokens": 8, "temperature": 0, "stream": stream})
    check_figures(objects[-1], took_ms)
    assert not any("timings" in o or "model_version" in o for o in objects[:-1]), "only the last chunk has them"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_dynamic_batching_answers_carry_timings_and_model_version(torchserve, dynamic_batching_model, stream):
    for path, body in ROUTES[:2]:
        objects, took_ms = ask(torchserve, dynamic_batching_model, path,
                               {**body, "max_tokens": 8, "temperature": 0, "stream": stream})
        check_figures(objects[-1], took_ms)


def test_the_next_turn_of_a_chat_counts_its_cached_prompt_tokens_apart(torchserve):
    [first], took_ms = ask(torchserve, "llama", "", {"messages": FRUIT, "max_tokens": 8, "temperature": 0})
    turn2 = FRUIT + [first["choices"][0]["message"], {"role": "user", "content": "And a vegetable?"}]
    [second], took_ms = ask(torchserve, "llama", "", {"messages": turn2, "max_tokens": 8, "temperature": 0})
    timings = check_figures(second, took_ms)
    assert timings["cache_n"] >= first["usage"]["prompt_tokens"]
    assert timings["prompt_n"] < second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"] + 10
