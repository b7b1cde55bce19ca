"""Request parsing and sampling defaults, without a server."""

from __future__ import annotations

import pytest

from chat_protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_request, sampling_params

USER = [{"role": "user", "content": "hi"}]


def test_request_value_beats_server_default_beats_built_in():
    request = parse_request({"messages": USER, "temperature": 0.2}, "chat")
    params = sampling_params(request, {"temperature": 0.9, "top_k": 7})
    assert params.temperature == 0.2      # the request's
    assert params.top_k == 7              # the server's
    assert params.top_p == 0.95           # llama.cpp's usual default, built in


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


def test_unknown_openai_fields_are_ignored_not_refused():
    request = parse_request({"messages": USER, "n": 1, "user": "me", "stream_options": {"include_usage": True}},
                            "chat")
    assert request.messages[0].content == "hi"


def test_single_stop_string_becomes_a_list():
    assert parse_request({"prompt": "x", "stop": "END"}, "completion").stop_list == ["END"]
