"""The OpenAI features SDKs and agent frameworks use (issue #17), on the default model.

The engine tests drive llama_engine.Engine directly (a grammar request and a free one in
the same decode step); the rest go through a real TorchServe with the official `openai`
client or plain HTTP. Answers are short (max_tokens 16-64) to keep the file near two
minutes on two cores.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from chat_prompt import ChatPrompter
from llama_engine import Engine, GenerationRequest, InvalidGrammar, SamplingParams
from llama_settings import HandlerSettings, engine_config
from structured_output import json_schema as schema_constraint
from reasoning import ReasoningSplitter
from tool_calls import ToolCallParser, template_messages

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK_PERSON = [{"role": "user", "content": "Make up a person. Answer in JSON with a name and an age."}]


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": {"type": "object", "properties": {
                                               "tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int


# ---- the engine: constrained and free requests share a decode step ---------------------------

@pytest.fixture(scope="module")
def engine(default_gguf):
    config = engine_config(HandlerSettings(n_threads=2, n_slots=4, n_ctx=512, max_tokens=64),
                           batch_size=1, n_workers=1, gpu_id=None)
    eng = Engine(str(default_gguf), config)
    yield eng
    eng.close()


def generate(engine, requests_by_id: dict[str, GenerationRequest]) -> tuple[dict[str, str], list[set[str]]]:
    """Run requests together; returns each one's text and, per decode step, which were sampled."""
    for rid, request in requests_by_id.items():
        engine.submit(rid, request)
    texts, steps = {rid: "" for rid in requests_by_id}, []
    while engine.is_busy():
        updates = engine.step()
        steps.append({rid for rid, u in updates.items() if u.completion_tokens})
        for rid, upd in updates.items():
            texts[rid] += upd.text
    return texts, steps


def test_a_grammar_request_and_a_free_request_decode_in_the_same_step_and_both_are_right(engine, prompter):
    free_prompt = prompter.tokens([{"role": "user", "content": "Name three colors."}])
    json_prompt = prompter.tokens(ASK_PERSON)
    grammar = schema_constraint(PERSON_SCHEMA, "response_format").gbnf
    engine.clear_cache()
    alone, _ = generate(engine, {"alone": GenerationRequest(free_prompt, 24, SamplingParams(temperature=0))})
    engine.clear_cache()
    texts, steps = generate(engine, {
        "free": GenerationRequest(free_prompt, 24, SamplingParams(temperature=0)),
        "json": GenerationRequest(json_prompt, 64, SamplingParams(temperature=1.0, seed=3, grammar=grammar)),
    })
    assert any({"free", "json"} <= sampled for sampled in steps), "never sampled in the same step"
    assert texts["free"] == alone["alone"]
    jsonschema.validate(json.loads(texts["json"]), PERSON_SCHEMA)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_object_grammar_holds_at_temperature_one(engine, prompter, seed):
    from llama_cpp.llama_grammar import JSON_GBNF

    texts, _ = generate(engine, {"j": GenerationRequest(prompter.tokens(ASK_PERSON), 96,
                                                        SamplingParams(temperature=1.0, seed=seed, grammar=JSON_GBNF))})
    assert isinstance(json.loads(texts["j"]), dict)


def test_greedy_with_a_grammar_or_a_bias_does_not_take_the_argmax_path():
    assert SamplingParams(temperature=0).is_plain_greedy
    assert not SamplingParams(temperature=0, grammar='root ::= "a"').is_plain_greedy
    assert not SamplingParams(temperature=0, logit_bias={5: 1.0}).is_plain_greedy


def test_logit_bias_steers_greedy_choice(engine, prompter):
    prompt = prompter.tokens([{"role": "user", "content": "Say yes."}])
    target = engine.tokenize("Banana", add_special=False)[0]
    texts, _ = generate(engine, {"b": GenerationRequest(prompt, 1, SamplingParams(temperature=0,
                                                                                   logit_bias={target: 100.0}))})
    assert texts["b"] == engine.token_bytes(target).decode()


def test_a_grammar_llama_cpp_cannot_parse_is_refused_with_the_parsers_reason(engine, prompter):
    with pytest.raises(InvalidGrammar, match="Undefined rule identifier 'colour'"):
        engine.submit("bad", GenerationRequest(prompter.tokens(ASK_PERSON), 8,
                                               SamplingParams(grammar="root ::= colour")))
    assert not engine.is_busy()


def test_greedys_token_has_the_highest_logprob_and_the_logprobs_are_a_distribution(engine, prompter):
    import math

    engine.submit("lp", GenerationRequest(prompter.tokens(ASK_WEATHER), 8, SamplingParams(temperature=0),
                                          logprobs=5))
    entries, text = [], b""
    while engine.is_busy():
        for upd in engine.step().values():
            entries += upd.logprobs
            final = upd
    assert len(entries) == final.completion_tokens == 8
    for e in entries:
        assert e.top[0] == (e.token, e.logprob) and [lp for _, lp in e.top] == sorted((lp for _, lp in e.top),
                                                                                     reverse=True)
        assert e.logprob <= 0 and sum(math.exp(lp) for _, lp in e.top) <= 1.0 + 1e-6


def test_forked_choices_copy_the_prompts_kv_and_greedy_forks_answer_alike(engine, prompter):
    prompt = prompter.tokens([{"role": "user", "content": "Write a haiku about the sea."}])
    engine.clear_cache()
    before = engine.stats.tokens_prefilled
    texts, _ = generate(engine, {"lead": GenerationRequest(prompt, 16, SamplingParams(temperature=0)),
                                 **{f"lead#{i}": GenerationRequest(prompt, 16, SamplingParams(temperature=0),
                                                                   fork_of="lead") for i in (1, 2)}})
    assert texts["lead#1"] == texts["lead#2"] == texts["lead"] != ""
    assert engine.stats.tokens_prefilled - before == len(prompt) + 2   # each fork reads only the last token


# ---- tool calls: the parser and the prompt, without a model -----------------------------------

HERMES = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
SMOLLM = '<tool_call>[{"name": "get_time", "arguments": {"tz": "CET"}}, {"name": "get_weather", "parameters": {}}]</tool_call>'


def parse_in_pieces(text: str, size: int, max_calls=None) -> tuple[str, list[dict], list[dict]]:
    parser, content, deltas = ToolCallParser(max_calls), "", []
    for i in range(0, len(text), size):
        piece, more = parser.feed(text[i:i + size])
        content, deltas = content + piece, deltas + more
    piece, more = parser.finish()
    return content + piece, deltas, parser.calls


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_a_call_fed_in_any_pieces_is_found_and_never_shown_as_text(size):
    content, deltas, calls = parse_in_pieces(HERMES, size)
    assert content == "Let me look. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assembled = "".join(d["function"].get("arguments", "") for d in deltas)
    assert json.loads(assembled) == {"city": "Paris", "unit": "celsius"} and deltas[0]["id"] == calls[0]["id"]


@pytest.mark.parametrize("size", [1, 1000])
def test_smollm2s_list_of_calls_in_one_tag_is_read(size):
    _, _, calls = parse_in_pieces(SMOLLM, size)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_time", {"tz": "CET"}), ("get_weather", {})]


def test_text_that_only_looks_like_a_tag_is_passed_on_and_a_block_with_no_call_stays_text():
    assert parse_in_pieces("a <tool_ b <tool_c", 3)[0] == "a <tool_ b <tool_c"
    assert parse_in_pieces("<tool_call>not json</tool_call> ok", 4)[0] == "<tool_call>not json</tool_call> ok"


def test_a_call_cut_off_keeps_its_name_and_a_headless_fragment_is_dropped():
    assert parse_in_pieces('<tool_call>{"name": "get_time", "arguments": {"tz": "C', 3)[2][0]["function"] == \
        {"name": "get_time", "arguments": '{"tz": "C'}
    assert parse_in_pieces('<tool_call>{"na', 3)[:2] == ("", [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    assert len(parse_in_pieces(SMOLLM, 4, max_calls=1)[2]) == 1


HISTORY = [*ASK_WEATHER,
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]


def test_a_template_without_tools_gets_the_generic_prompt_and_calls_written_out():
    messages = template_messages(HISTORY, TOOLS, native=False)
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": '
                                                          '{"city": "Paris", "unit": "celsius"}}</tool_call>'}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n18 degrees, sunny\n</tool_response>"}


def test_a_template_with_tools_renders_them_and_the_calls_itself():
    template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]"
                "{% endfor %}{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}{% endfor %}")
    prompter = ChatPrompter(template, "", "", lambda text: [])
    assert prompter.supports_tools
    text = prompter.render(template_messages(HISTORY, TOOLS, native=True), tools=TOOLS)
    assert text == ('[tool get_weather][tool get_time]<user>What is the weather like in Paris?'
                    '<assistant>[call get_weather {"city": "Paris", "unit": "celsius"}]'
                    '<tool>18 degrees, sunny[for call_1]')


# ---- reasoning -----------------------------------------------------------------------------

def split_in_pieces(text: str, size: int, thinking=False) -> tuple[str, str]:
    splitter, reasoning, content = ReasoningSplitter(thinking), "", ""
    for i in range(0, len(text), size):
        r, c = splitter.feed(text[i:i + size])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("text, thinking, expected", [
    ("<think>Two and two.</think>\n\nIt is 4.", False, ("Two and two.", "It is 4.")),
    ("It is 4. <think>no</think>", False, ("", "It is 4. <think>no</think>")),
    ("Two and two.</think> It is 4.", True, ("Two and two.", "It is 4.")),    # the template opened <think>
    ("<think>cut off befo", False, ("cut off befo", "")),
])
def test_thinking_at_the_start_is_reasoning_and_the_rest_content(size, text, thinking, expected):
    assert split_in_pieces(text, size, thinking) == expected


def test_chat_template_kwargs_reach_the_template_and_a_prompt_opening_think_is_noticed():
    template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if enable_thinking %}<think>{% endif %}")
    prompter = ChatPrompter(template, "", "", lambda text: list(text.encode()))
    assert prompter.fit([{"role": "user", "content": "hi"}], 100, enable_thinking=True).opens_reasoning
    assert not prompter.fit([{"role": "user", "content": "hi"}], 100, enable_thinking=False).opens_reasoning


# ---- through TorchServe ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_client(torchserve) -> openai.OpenAI:
    base = f"{torchserve.address('inference')}/predictions/llama/1.0/v1"
    return openai.OpenAI(base_url=base, api_key=torchserve.client().keys.inference, max_retries=0, timeout=120)


def post(server, body, path="/predictions/llama"):
    headers = {"Authorization": f"Bearer {server.client().keys.inference}"}
    return requests.post(f"{server.address('inference')}{path}", json=body, headers=headers, timeout=120)


@pytest.mark.parametrize("seed", [1, 2])
def test_openai_client_json_schema_answers_follow_the_schema(openai_client, seed):
    reply = openai_client.chat.completions.create(
        model="llama", messages=ASK_PERSON, max_tokens=64, temperature=1.0, seed=seed,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)


@pytest.mark.parametrize("seed", [4, 5])
def test_openai_client_parse_gives_a_pydantic_object(openai_client, seed):
    reply = openai_client.chat.completions.parse(model="llama", messages=ASK_PERSON, max_tokens=64, temperature=1.0,
                                          seed=seed, response_format=Person)
    assert isinstance(reply.choices[0].message.parsed, Person)


def test_json_object_and_grammar_fields_on_the_bare_route(torchserve):
    body = {"messages": ASK_PERSON, "max_tokens": 96, "temperature": 0, "repeat_penalty": 1.0,
            "response_format": {"type": "json_object"}}
    assert isinstance(json.loads(post(torchserve, body).json()["choices"][0]["message"]["content"]), dict)
    body = {"messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 4,
            "grammar": 'root ::= "yes" | "no"'}
    assert post(torchserve, body).json()["choices"][0]["message"]["content"] in ("yes", "no")


def test_streamed_json_schema_answer_assembles_into_valid_json(torchserve):
    body = {"messages": ASK_PERSON, "max_tokens": 64, "temperature": 1.0, "seed": 11, "stream": True,
            "json_schema": PERSON_SCHEMA}
    headers = {"Authorization": f"Bearer {torchserve.client().keys.inference}"}
    with requests.post(f"{torchserve.address('inference')}/predictions/llama", json=body, headers=headers,
                       stream=True, timeout=120) as resp:
        chunks = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_openai_client_named_tool_choice_gives_a_valid_call(openai_client):
    reply = openai_client.chat.completions.create(model="llama", messages=ASK_WEATHER, tools=TOOLS, max_tokens=64,
                                                  tool_choice=FORCE_WEATHER, temperature=1.0, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_required_tool_choice_streams_deltas_that_assemble_into_valid_arguments(openai_client):
    stream = openai_client.chat.completions.create(model="llama", messages=ASK_WEATHER, tools=TOOLS, max_tokens=64,
                                                   tool_choice="required", temperature=1.0, seed=2, stream=True)
    calls, finish, text = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
                call["name"] += part.function.name or "" if part.function else ""
                call["arguments"] += part.function.arguments or "" if part.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and not text.strip() and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
    schema = WEATHER_PARAMS if call["name"] == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(call["arguments"]), schema)


def test_a_two_turn_tool_conversation(openai_client):
    first = openai_client.chat.completions.create(model="llama", messages=ASK_WEATHER, tools=TOOLS, max_tokens=64,
                                                  tool_choice=FORCE_WEATHER, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK_WEATHER, first.choices[0].message,     # the SDK's own message object, sent back as it came
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    second = openai_client.chat.completions.create(model="llama", messages=messages, tools=TOOLS, max_tokens=32,
                                                   temperature=0)
    assert second.choices[0].message.content.strip() and second.choices[0].finish_reason in ("stop", "length")


def test_openai_client_logprobs_plain_and_streamed(openai_client):
    ask = {"model": "llama", "messages": ASK_WEATHER, "max_tokens": 6, "temperature": 0, "logprobs": True,
           "top_logprobs": 3, "extra_body": {"repeat_penalty": 1.0}}
    reply = openai_client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:   # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == max(a.logprob for a in t.top_logprobs)
        assert bytes(t.bytes).decode() == t.token
    streamed = [t for chunk in openai_client.chat.completions.create(**ask, stream=True) for c in chunk.choices
                if c.logprobs for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_plain_completion_logprobs_have_the_legacy_shape(torchserve):
    body = {"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    logprobs = post(torchserve, body).json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert all(len(alternatives) <= 2 for alternatives in logprobs["top_logprobs"])


def test_openai_client_n_3_gives_three_choices_and_usage_counts_all(openai_client):
    ask = {"model": "llama", "messages": ASK_WEATHER, "max_tokens": 5, "temperature": 1.0, "seed": 3, "n": 3,
           "extra_body": {"ignore_eos": True}}
    reply = openai_client.chat.completions.create(**ask)
    assert [c.index for c in reply.choices] == [0, 1, 2] and all(c.message.content for c in reply.choices)
    assert reply.usage.completion_tokens == 15
    assert len({c.message.content for c in reply.choices}) > 1     # seeds 3, 4, 5
    streamed = {}
    for chunk in openai_client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert sorted(streamed) == [0, 1, 2] and all(streamed.values())


THINK_THEN_ANSWER = 'root ::= "<think>" [a-z ]{3,20} "</think>" [a-z ]{3,20}'


def test_thinking_comes_back_as_reasoning_content_plain_and_streamed(openai_client):
    ask = {"model": "llama", "messages": ASK_WEATHER, "max_tokens": 48, "temperature": 0,
           "extra_body": {"grammar": THINK_THEN_ANSWER, "chat_template_kwargs": {"enable_thinking": True}}}
    message = openai_client.chat.completions.create(**ask).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content and "<think>" not in message.content + reasoning
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in openai_client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            streamed["content"] += c.delta.content or ""
            streamed["reasoning_content"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": reasoning, "content": message.content}


REFUSALS = {
    "schema_the_converter_cannot_take": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "tuple"}}}},
        "response_format", "cannot be turned into a grammar"),
    "schema_keyword_it_would_ignore": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "integer", "minimum": 3}}}}, "response_format", "`minimum` is not supported"),
    "grammar_llama_cpp_cannot_parse": ({"grammar": "root ::= colour"}, "grammar", "Undefined rule identifier"),
    "two_constraints": ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar",
                        "cannot be combined with response_format"),
    "logit_bias_unknown_token": ({"logit_bias": {"999999": 5}}, "logit_bias", "not in the model's vocabulary"),
    "logit_bias_not_a_token_id": ({"logit_bias": {"hello": 5}}, "logit_bias", "keys are token ids"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages.0.content.0", "image input is not supported"),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "is not supported"),
    "tool_choice_without_tools": ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    "tool_choice_naming_no_tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                                   "tool_choice", "no tool named 'x'"),
    "forced_call_with_a_schema_it_cannot_keep": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "maximum": 3}}}}}], "tool_choice": "required"}, "tools", "`maximum`"),
    "response_format_beside_tools_the_model_may_call": (
        {"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    "n_above_8": ({"n": 9}, "n", "less than or equal to 8"),
    "chat_template_kwargs_setting_messages": ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs",
                                              "is set by the server"),
    "top_logprobs_without_logprobs": ({"top_logprobs": 3}, "top_logprobs", "needs logprobs true"),
    "top_logprobs_above_20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    "tool_calls_on_a_user_message": (
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0", "only assistant"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("path", ["/predictions/llama", "/predictions/llama/1.0/v1/chat/completions"])
def test_each_refusal_is_a_400_naming_its_field(torchserve, case, path):
    fields, param, mention = REFUSALS[case]
    resp = post(torchserve, {"messages": ASK_PERSON, "max_tokens": 8, **fields}, path=path)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and mention in error["message"], error
