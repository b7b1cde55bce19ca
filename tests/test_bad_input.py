"""Bad input gets a 400 with a JSON message naming the problem, and the worker keeps serving."""

from __future__ import annotations

import pytest
import requests

OK = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
USER = [{"role": "user", "content": "Hi"}]

BAD_BODIES = {
    "not_json": (b"this is not json", "not valid JSON"),
    "json_not_object": (b"[1, 2, 3]", "must be a JSON object"),
    "no_messages_or_prompt": ({"max_tokens": 5}, "messages"),
    "message_without_role": ({"messages": [{"content": "hi"}]}, "role"),
    "message_without_content": ({"messages": [{"role": "user"}]}, "content"),
    "unknown_role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "messages_not_a_list": ({"messages": "hello"}, "messages"),
    "empty_messages": ({"messages": []}, "messages"),
    "content_wrong_type": ({"messages": [{"role": "user", "content": 42}]}, "content"),
    "max_tokens_string": ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    "max_tokens_zero": ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    "max_tokens_above_context": ({"messages": USER, "max_tokens": 10**9}, "max_tokens"),
    "temperature_negative": ({"messages": USER, "temperature": -1}, "temperature"),
    "temperature_too_high": ({"messages": USER, "temperature": 7.5}, "temperature"),
    "top_p_zero": ({"messages": USER, "top_p": 0}, "top_p"),
    "top_p_above_one": ({"messages": USER, "top_p": 1.5}, "top_p"),
    "min_p_above_one": ({"messages": USER, "min_p": 2}, "min_p"),
    "top_k_negative": ({"messages": USER, "top_k": -3}, "top_k"),
    "presence_penalty_huge": ({"messages": USER, "presence_penalty": 1e300}, "presence_penalty"),
    "stream_not_bool": ({"messages": USER, "stream": "yes"}, "stream"),
    "stop_wrong_type": ({"messages": USER, "stop": 5}, "stop"),
    "too_many_stop_strings": ({"messages": USER, "stop": [f"s{i}" for i in range(1000)]}, "stop"),
    "nan_temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    "infinite_top_p": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "image input is not supported"),
    "unsupported_field": ({"messages": USER, "audio": {"voice": "alloy"}}, "audio: is not supported"),
    "unknown_field": ({"messages": USER, "temprature": 0.5}, "temprature: is not a parameter"),
    "deeply_nested": (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    "huge_seed": ({"messages": USER, "seed": 10**30}, "seed"),
    "empty_prompt": ({"prompt": ""}, "prompt"),
}


def send(server, body, path="/predictions/llama"):
    headers = {"Authorization": f"Bearer {server.client().keys.inference}"}
    if isinstance(body, bytes):
        return requests.post(f"{server.address('inference')}{path}", data=body,
                             headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return requests.post(f"{server.address('inference')}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_gets_400_naming_the_problem_and_next_request_is_served(torchserve, case):
    body, mention = BAD_BODIES[case]
    resp = send(torchserve, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert mention.lower() in error["message"].lower(), error
    assert error["type"] == "invalid_request_error"
    follow_up = send(torchserve, OK)
    assert follow_up.status_code == 200
    assert follow_up.json()["choices"][0]["message"]["content"]


def test_control_characters_in_a_message_are_served(torchserve):
    # a pasted terminal log: bell, ANSI colours, NUL (dropped), a lone surrogate (becomes U+FFFD)
    text = "Summarize this log: \x1b[31mERROR\x1b[0m disk full\x07\x00 \ud800"
    resp = send(torchserve, {"messages": [{"role": "user", "content": text}], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]


def test_unknown_url_path_gets_400(torchserve):
    resp = send(torchserve, OK, path="/predictions/llama/1.0/v1/embeddings")
    assert resp.status_code == 400
    assert "unknown path" in resp.json()["error"]["message"]


def test_prompt_longer_than_context_says_how_many_tokens_fit(torchserve):
    long_text = "word " * 5000  # far beyond the 2048-token context
    resp = send(torchserve, {"messages": [{"role": "user", "content": long_text}], "max_tokens": 16})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "tokens but at most 2032 fit" in message, message


def test_body_over_the_size_limit_is_refused_by_torchserve(torchserve):
    resp = send(torchserve, b'{"messages": [{"role": "user", "content": "' + b"a" * 10_000_000 + b'"}]}')
    assert resp.status_code == 413
    assert send(torchserve, OK).status_code == 200


def test_bad_request_in_a_batch_does_not_fail_the_others(torchserve):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [OK, {"messages": [{"role": "nobody", "content": "x"}]}, OK, {"messages": USER, "top_p": 9}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = [r.status_code for r in pool.map(lambda b: send(torchserve, b), bodies)]
    assert codes == [200, 400, 200, 400]
