"""The handler's own metrics reach TorchServe's Prometheus endpoint with plausible values."""

from __future__ import annotations

import requests


def samples(text, name, model="llama"):
    """Lines of one metric for one model (other tests register other models on the same server)."""
    return [line for line in text.splitlines()
            if line.startswith(name + "{") and f'ModelName="{model}"' in line]


def value(line):
    return float(line.rsplit(" ", 1)[1])


def test_metrics_appear_with_plausible_values_after_a_few_chats(torchserve):
    client = torchserve.client(timeout=120)
    conversation = [{"role": "user", "content": "Name a fruit."}]
    for _ in range(2):
        reply = client.chat("llama", conversation, max_tokens=12, temperature=0)
        conversation += [reply["choices"][0]["message"], {"role": "user", "content": "Another one?"}]
    generated = reply["usage"]["completion_tokens"]
    text = requests.get(f"{torchserve.address('metrics')}/metrics", timeout=30).text

    tokens = sum(value(line) for line in samples(text, "llama_tokens_generated"))
    assert tokens >= generated > 0
    assert sum(value(line) for line in samples(text, "llama_prompt_tokens_evaluated")) > 0
    assert sum(value(line) for line in samples(text, "llama_prompt_tokens_reused")) > 0, "turn 2 reuses turn 1"
    finished = samples(text, "llama_requests_finished")
    assert any('Reason="stop"' in line or 'Reason="length"' in line for line in finished)
    steps = sum(value(line) for line in samples(text, "llama_decode_steps"))
    decoded = sum(value(line) for line in samples(text, "llama_sequences_decoded"))
    assert steps > 0 and decoded >= steps
    free = samples(text, "llama_slots_free")
    assert free and value(free[0]) == 8, free
    ttft = samples(text, "llama_time_to_first_token_ms")
    assert ttft and 0 < value(ttft[0]) < 120_000
    assert samples(text, "llama_tokens_per_second")
