"""Request parsing and the engine request made from it, without a server."""

from __future__ import annotations

import pytest

from chat_protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request
from llama_settings import HandlerSettings

USER = [{"role": "user", "content": "hi"}]
SERVER = HandlerSettings(max_tokens=100, sampling={"temperature": 0.9, "top_k": 7, "penalty_last_n": 32})


def test_request_value_beats_server_default_beats_built_in():
    request = parse_request({"messages": USER, "temperature": 0.2}, "chat")
    params = request.to_generation_request(SERVER).sampling
    assert params.temperature == 0.2      # the request's
    assert params.top_k == 7              # the server's
    assert params.top_p == 0.95           # llama.cpp's usual default, built in
    assert params.penalty_last_n == 32 and params.seed is None


@pytest.mark.parametrize("body, max_tokens", [({}, 100), ({"max_tokens": 5}, 5), ({"max_completion_tokens": 6}, 6)])
def test_max_tokens_is_the_requests_else_the_servers(body, max_tokens):
    request = parse_request({"prompt": "Once", **body}, "completion")
    assert request.to_generation_request(SERVER).max_tokens == max_tokens


def test_stop_and_ignore_eos_reach_the_engine_and_the_prompt_is_left_to_fit():
    generation = parse_request({"prompt": "x", "stop": "END", "ignore_eos": True}, "completion") \
        .to_generation_request(SERVER)
    assert (generation.stop, generation.ignore_eos, generation.prompt_tokens) == (["END"], True, [])


def test_bare_route_picks_chat_or_completion_from_the_body():
    assert isinstance(parse_request({"messages": USER}, "auto"), ChatCompletionRequest)
    assert isinstance(parse_request({"prompt": "Once"}, "auto"), CompletionRequest)


def test_error_names_the_nested_parameter():
    with pytest.raises(ApiError) as e:
        parse_request({"messages": [{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}]}, "chat")
    assert e.value.param == "messages.1.role" and e.value.status == 400


def test_content_parts_are_joined_and_developer_is_a_system_message():
    request = parse_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                             {"type": "text", "text": "brief"}]}]},
                            "chat")
    assert request.messages[0].as_template_dict() == {"role": "system", "content": "Be brief"}


@pytest.mark.parametrize("field, value, mention", [
    ("audio", {"voice": "alloy", "format": "wav"}, "audio: is not supported"),
    ("functions", [{"name": "f"}], "functions: is not supported"),
    ("web_search_options", {}, "web_search_options: is not supported"),
    ("store", True, "store: stored completions are not supported"),
    ("frobnicate", 1, "frobnicate: is not a parameter this server knows"),
])
def test_a_field_this_server_does_not_serve_is_refused_by_name(field, value, mention):
    with pytest.raises(ApiError) as e:
        parse_request({"messages": USER, field: value}, "chat")
    assert e.value.param == field and mention in e.value.message


def test_an_image_part_is_refused_naming_the_part():
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ApiError) as e:
        parse_request({"messages": [{"role": "user", "content": content}]}, "chat")
    assert e.value.param == "messages.0.content.1" and "image input is not supported" in e.value.message


def test_an_unknown_field_inside_a_message_is_refused_by_name():
    with pytest.raises(ApiError) as e:
        parse_request({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "chat")
    assert e.value.param == "messages.0.colour"


def test_harmless_openai_fields_are_accepted():
    request = parse_request({"messages": [{"role": "user", "content": "hi", "name": "ann"}], "n": 1, "user": "me",
                             "metadata": {"k": "v"}, "store": False, "stream_options": {"include_usage": True}},
                            "chat")
    assert request.messages[0].content == "hi"


def test_control_characters_are_kept_and_only_nul_and_lone_surrogates_are_changed():
    text = "bell\x07 esc\x1b[31mred\x1b[0m nul\x00 half\ud800"
    request = parse_request({"messages": [{"role": "user", "content": text}], "stop": ["\x07", "a\x00b"]}, "chat")
    assert request.messages[0].text == "bell\x07 esc\x1b[31mred\x1b[0m nul half\ufffd"
    assert request.stop == ["\x07", "ab"]
    assert parse_request({"prompt": "\x01\x02"}, "completion").prompt == "\x01\x02"


def test_response_format_json_schema_becomes_the_engines_grammar():
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}, "strict": True}}
    sampling = parse_request({"messages": USER, "response_format": fmt}, "chat").to_generation_request(SERVER).sampling
    assert 'a-kv ::= "\\"a\\""' in sampling.grammar and not sampling.is_plain_greedy


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "tuple"}}}},
     "response_format"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema"),
    ({"grammar": "  "}, "grammar"),
    ({"json_schema": {"type": "string"}, "grammar": 'root ::= "a"'}, "json_schema"),
])
def test_a_constraint_that_cannot_be_kept_is_a_400_naming_its_field(fields, param):
    with pytest.raises(ApiError) as e:
        parse_request({"messages": USER, **fields}, "chat").to_generation_request(SERVER)
    assert e.value.param == param


def test_logit_bias_keys_become_token_ids():
    request = parse_request({"prompt": "x", "logit_bias": {"42": -100, "7": 2.5}}, "completion")
    assert request.to_generation_request(SERVER).sampling.logit_bias == {42: -100.0, 7: 2.5}
