"""The handler's two batching paths, with TorchServe's own Context and a fake engine.

The fake engine writes one word per step ("w1 w2 ..."), so these tests are about the
glue alone: what goes back to TorchServe for each request of a call (output, status,
content type, whether the stream goes on), cancellations, time limits and errors.
The end-to-end tests (test_chat_api.py, test_bad_input.py, test_batching.py) run the
real TorchServe and model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

import llama_handler
from api_errors import ApiError, GenerationFailed, RequestTimedOut, api_error
from chat_prompt import ContextOverflow, TemplateRefused
from llama_engine import (FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, EngineStats, PromptTooLong,
                          RequestHandle, RequestTimes, Update)
from llama_settings import HandlerSettings, SettingsError, engine_config, load_settings

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Hi"}]


class FakeEngine:
    """Stands in for llama_engine.Engine: a token per character, a word per step. Its clock:
    a slot takes a request 10 ms after it arrived, the first token comes 20 ms later, each
    further step 30 ms later."""

    metadata: dict = {}          # no chat template: the handler falls back to ChatML
    n_vocab = 1000
    bos_text = eos_text = ""

    def __init__(self, model_path, config):
        self.model_path, self.config = model_path, config
        self.n_ctx_seq = config.n_ctx_per_slot
        self.stats = EngineStats(slots_total=config.n_slots)
        self.submitted = {}      # id -> GenerationRequest
        self.live = {}
        self.generated = {}
        self.cancelled: list[str] = []
        self._to_cancel: list[str] = []

    def tokenize(self, text, add_special=True, parse_special=True):
        return [ord(c) for c in text]

    def submit(self, request_id, request):
        self.submitted[request_id] = self.live[request_id] = request
        return RequestHandle(request_id, self)

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self._to_cancel.append(request_id)

    def is_busy(self):
        return bool(self.live or self._to_cancel)

    def run(self, budget_s):
        updates = {}
        for rid in self._to_cancel:     # at the next step, as the engine does
            if self.live.pop(rid, None) is not None:
                updates[rid] = Update(rid, finished=True, finish_reason=FINISH_CANCELLED)
        self._to_cancel = []
        for rid, request in list(self.live.items()):
            n = self.generated[rid] = self.generated.get(rid, 0) + 1
            if "[fail]" in "".join(map(chr, request.prompt_tokens)):
                updates[rid] = Update(rid, finished=True, finish_reason=FINISH_ERROR, error="llama_decode failed")
            else:
                done = n >= request.max_tokens
                arrived = request.arrived_at
                times = RequestTimes(arrived, arrived + 0.010, arrived + 0.030, arrived + 0.030 + 0.030 * (n - 1))
                updates[rid] = Update(rid, text=f"w{n} ", finished=done, finish_reason=FINISH_LENGTH if done else None,
                                      prompt_tokens=len(request.prompt_tokens), completion_tokens=n,
                                      first_token=n == 1, times=times if done else None)
            if updates[rid].finished:
                del self.live[rid]
        return updates


def model_config(continuous=True, **handler_section):
    return {"minWorkers": 1, "batchSize": 4, "responseTimeout": 300, "continuousBatching": continuous,
            "handler": {"n_ctx": 256, "max_tokens": 3, "n_threads": 1, **handler_section}}


class TorchServe:
    """Calls the handler as TorchServe's worker does, and reads back each request's response."""

    def __init__(self, tmp_path, config):
        self.sent: list[tuple[dict, dict]] = []    # intermediate responses: ({idx: output}, {idx: id})
        self.handler = llama_handler.LlamaHandler(
            make_engine=FakeEngine, send_intermediate=lambda out, ids, msg, code, ctx: self.sent.append((out, ids)))
        self.context = Context("llama", str(tmp_path), {"model": {"modelName": "llama", "modelVersion": "2.0"}},
                               4, None, "0.12.0", model_yaml_config=config)
        self.handler.initialize(self.context)
        self.engine: FakeEngine = self.handler.engine

    def call(self, batch: dict[str, object], path: str = "") -> dict[str, dict]:
        """One handler call; batch: request id -> JSON body (None: TorchServe sends the request
        but its body was given in an earlier call)."""
        ctx = self.context
        ctx.request_ids = dict(enumerate(batch))
        ctx.request_processor = [RequestProcessor({"url_path": path}) for _ in batch]
        ctx.stopping_criteria = None
        outputs = self.handler.handle([{"body": body} for body in batch.values()], ctx)
        responses = {}
        for idx, rid in ctx.request_ids.items():
            status, _ = ctx.get_response_status(idx)
            last = ctx.stopping_criteria[idx](outputs[idx]) if ctx.stopping_criteria else None
            responses[rid] = {"output": outputs[idx], "status": status, "last": last,
                              "content_type": ctx.get_response_content_type(idx)}
        return responses


@pytest.fixture
def server(tmp_path):
    return TorchServe(tmp_path, model_config())


def chunks(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_torchserve_finds_exactly_one_handler_class_in_the_module():
    from ts.utils.util import list_classes_from_module   # what TorchServe's model loader calls

    assert list_classes_from_module(llama_handler) == [llama_handler.LlamaHandler]


# ---- continuous batching --------------------------------------------------------------------

def test_a_stream_gets_a_chunk_per_call_and_its_last_call_says_so(server):
    body = {"messages": HI, "stream": True}
    calls = [server.call({"a": body})]
    while not calls[-1]["a"]["last"]:
        calls.append(server.call({"a": body}))
    assert [c["a"]["last"] for c in calls] == [False, False, True]
    assert all(c["a"]["status"] == 200 and c["a"]["content_type"] == "application/x-ndjson" for c in calls)
    frames = [f for c in calls for f in chunks(c["a"]["output"])]
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": "w1 "}
    assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames) == "w1 w2 w3 "
    assert frames[-1]["choices"][0]["finish_reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 3
    assert not server.handler.exchanges


def test_openai_route_streams_server_sent_events(server):
    out = server.call({"a": {"messages": HI, "stream": True, "max_tokens": 1}}, path="v1/chat/completions")["a"]
    assert out["content_type"] == "text/event-stream"
    assert out["output"].startswith("data: {") and out["output"].endswith("data: [DONE]\n\n")


def test_a_request_answered_in_its_first_call_is_a_plain_response_not_a_stream_end(server):
    # TorchServe 0.12 sends no headers when a request's first response is also its last.
    out = server.call({"a": {"messages": HI, "max_tokens": 1}})["a"]
    assert out["last"] is None
    assert json.loads(out["output"])["choices"][0]["message"]["content"] == "w1 "


def test_a_whole_answer_comes_in_the_call_that_finishes_it(server):
    outputs = [server.call({"a": {"messages": HI}})["a"] for _ in range(3)]
    assert [o["output"] for o in outputs[:2]] == ["", ""] and [o["last"] for o in outputs] == [False, False, True]
    answer = json.loads(outputs[-1]["output"])
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == "w1 w2 w3 "
    assert answer["context"] == {"messages_dropped": 0, "context_length": 256}


def test_n_choices_each_run_as_an_engine_request_and_usage_counts_them_all(server):
    out = server.call({"a": {"messages": HI, "n": 3, "seed": 7, "max_tokens": 2}})["a"]
    answer = json.loads(out["output"]) if out["last"] is None else None
    while answer is None:
        out = server.call({"a": None})["a"]
        answer = json.loads(out["output"]) if out["last"] else None
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "w1 w2 " for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] == 6
    sent = server.engine.submitted
    assert list(sent) == ["a", "a#1", "a#2"] and [r.sampling.seed for r in sent.values()] == [7, 8, 9]
    assert [r.fork_of for r in sent.values()] == [None, "a", "a"]


def test_n_choices_stream_with_their_index_and_a_client_that_left_cancels_them_all(server):
    first = server.call({"a": {"messages": HI, "n": 2, "stream": True, "max_tokens": 5}})["a"]
    assert sorted(f["choices"][0]["index"] for f in chunks(first["output"])) == [0, 1]
    server.call({"b": {"messages": HI}})
    assert sorted(server.engine.cancelled) == ["a", "a#1"]


def test_request_values_then_server_settings_reach_the_engine(tmp_path):
    ts = TorchServe(tmp_path, model_config(sampling={"temperature": 0.3, "top_k": 5}))
    ts.call({"a": {"messages": HI, "top_k": 9, "stop": "END", "ignore_eos": True}})
    sent = ts.engine.submitted["a"]
    assert (sent.sampling.temperature, sent.sampling.top_k, sent.max_tokens) == (0.3, 9, 3)
    assert sent.stop == ["END"] and sent.ignore_eos
    assert "".join(map(chr, sent.prompt_tokens)) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_bad_request_gets_a_400_and_the_rest_of_its_batch_carries_on(server):
    out = server.call({"good": {"messages": HI}, "bad": {"messages": HI, "top_p": 9}})
    assert out["bad"]["status"] == 400 and out["bad"]["last"] is None
    assert json.loads(out["bad"]["output"])["error"]["param"] == "top_p"
    assert out["good"]["status"] == 200 and out["good"]["last"] is False
    assert list(server.engine.submitted) == ["good"]


def test_a_client_that_left_is_cancelled_and_answered_nothing(server):
    server.call({"stays": {"messages": HI}, "leaves": {"messages": HI, "max_tokens": 50}})
    out = server.call({"stays": None})
    assert list(out) == ["stays"] and server.engine.cancelled == ["leaves"]
    assert "leaves" not in server.handler.exchanges
    server.call({"stays": None})   # the engine's cancelled update finds no one to answer


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_time_limit_ends_with_a_timeout_error(server, stream):
    first = server.call({"a": {"messages": HI, "stream": stream, "max_tokens": 50}})["a"]
    server.handler.request_timeout_s = 0.0
    out = server.call({"a": None})["a"]
    assert out["last"] is True and server.engine.cancelled == ["a"]
    error = (chunks(out["output"])[-1] if stream else json.loads(out["output"]))["error"]
    assert error["type"] == "timeout" and error["code"] == 504
    # (a stream's client already has its 200 from the first chunk; the 504 is for a plain answer)
    assert (first["status"], out["status"]) == (200, 504)


def test_an_engine_error_ends_the_request_with_a_500(server):
    out = server.call({"a": {"messages": [{"role": "user", "content": "[fail]"}]}})["a"]
    assert out["status"] == 500 and out["last"] is None
    assert json.loads(out["output"])["error"] == {"message": "generation failed: llama_decode failed",
                                                 "type": "server_error", "param": None, "code": 500}


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ({"prompt": "x" * 300}, "prompt"),
])
def test_a_prompt_too_long_for_the_context_is_a_400_naming_its_parameter(server, body, param):
    out = server.call({"a": {**body, "max_tokens": 16}})["a"]
    error = json.loads(out["output"])["error"]
    assert out["status"] == 400 and error["param"] == param
    assert "but at most 240 fit (max_tokens 16 is reserved for the answer; context length 256)" in error["message"]


def test_max_tokens_beyond_the_context_is_a_400(server):
    out = server.call({"a": {"messages": HI, "max_tokens": 256}})["a"]
    assert out["status"] == 400 and json.loads(out["output"])["error"]["param"] == "max_tokens"


def test_models_route_lists_the_model_and_an_unknown_path_is_a_400(server):
    models = server.call({"a": None}, path="v1/models")["a"]
    assert json.loads(models["output"])["data"][0]["id"] == "llama" and models["status"] == 200
    unknown = server.call({"a": {"messages": HI}}, path="v1/embeddings")["a"]
    assert unknown["status"] == 400 and json.loads(unknown["output"])["error"]["param"] == "url_path"


# ---- dynamic batching (continuousBatching: false) ---------------------------------------------

@pytest.fixture
def classic(tmp_path):
    return TorchServe(tmp_path, model_config(continuous=False))


def test_dynamic_batch_streams_through_intermediate_responses_and_answers_the_rest_at_the_end(classic):
    out = classic.call({"s": {"messages": HI, "stream": True}, "p": {"messages": HI}})
    assert out["s"]["output"] == "" and out["s"]["content_type"] == "application/x-ndjson"
    streamed = [pieces[0] for pieces, ids in classic.sent]
    assert all(set(pieces) == {0} and ids == {0: "s"} for pieces, ids in classic.sent)
    assert "".join(f["choices"][0]["delta"].get("content", "") for p in streamed for f in chunks(p)) == "w1 w2 w3 "
    assert json.loads(out["p"]["output"])["choices"][0]["message"]["content"] == "w1 w2 w3 "
    assert not classic.engine.is_busy() and not classic.handler.exchanges


def test_dynamic_batch_answers_n_choices_streamed_and_not(classic):
    out = classic.call({"s": {"messages": HI, "stream": True, "n": 2}, "p": {"messages": HI, "n": 2}})
    frames = [f for pieces, ids in classic.sent for f in chunks(pieces[0])]
    streamed = {i: "".join(f["choices"][0]["delta"].get("content", "") for f in frames
                           if f["choices"] and f["choices"][0]["index"] == i) for i in (0, 1)}
    assert streamed == {0: "w1 w2 w3 ", 1: "w1 w2 w3 "} and frames[-1]["usage"]["completion_tokens"] == 6
    answer = json.loads(out["p"]["output"])
    assert [c["message"]["content"] for c in answer["choices"]] == ["w1 w2 w3 ", "w1 w2 w3 "]
    assert not classic.engine.is_busy() and not classic.handler.exchanges


def test_dynamic_batch_times_out_each_request_with_its_own_error(classic):
    classic.handler.request_timeout_s = 0.0
    out = classic.call({"s": {"messages": HI, "stream": True}, "p": {"messages": HI}, "bad": {"messages": []}})
    assert sorted(classic.engine.cancelled) == ["p", "s"] and not classic.engine.is_busy()
    assert out["p"]["status"] == 504 and json.loads(out["p"]["output"])["error"]["type"] == "timeout"
    assert chunks(classic.sent[-1][0][0])[-1]["error"]["type"] == "timeout"
    assert out["bad"]["status"] == 400


# ---- the server's figures with each answer --------------------------------------------------

TIMING_KEYS = {"prompt_n", "cache_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
               "predicted_per_second", "queue_ms", "ttft_ms"}


def last_frame(output: str) -> dict:
    """The last JSON object of a response: NDJSON lines, server-sent events, or one object."""
    lines = [line.removeprefix("data: ") for line in output.splitlines() if line.strip()]
    return json.loads([line for line in lines if line != "[DONE]"][-1])


def assert_figures(answer: dict, prompt_n: int, predicted_n: int, steps: int):
    assert answer["model_version"] == "2.0"
    timings = answer["timings"]
    assert timings.keys() == TIMING_KEYS
    # the fake engine's clock: 10 ms in the queue, 20 ms reading the prompt, 30 ms a step
    assert (timings["queue_ms"], timings["ttft_ms"], timings["prompt_ms"]) == pytest.approx((10, 30, 20))
    assert (timings["prompt_n"], timings["cache_n"], timings["predicted_n"]) == (prompt_n, 0, predicted_n)
    assert timings["predicted_ms"] == pytest.approx(30 * (steps - 1))
    assert timings["prompt_per_second"] == pytest.approx(prompt_n / 0.020, rel=1e-3)
    assert timings["predicted_per_second"] == pytest.approx(predicted_n / (0.030 * (steps - 1)), rel=1e-3)


@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("path", ["", "v1/chat/completions", "v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_last_chunk_or_the_whole_answer_carries_timings_and_model_version(tmp_path, continuous, path, stream):
    ts = TorchServe(tmp_path, model_config(continuous=continuous))
    body = {"prompt": "Hi"} if path == "v1/completions" else {"messages": HI}
    outputs = [ts.call({"a": {**body, "stream": stream}}, path)["a"]]
    while continuous and not outputs[-1]["last"]:
        outputs.append(ts.call({"a": None}, path)["a"])
    text = "".join(o["output"] for o in outputs) + "".join(pieces[0] for pieces, _ in ts.sent)
    answer = last_frame(text)
    assert answer["usage"]["completion_tokens"] == 3
    assert_figures(answer, answer["usage"]["prompt_tokens"], 3, steps=3)
    # only the last chunk of a stream carries them
    frames = [json.loads(line.removeprefix("data: ")) for line in text.splitlines()
              if line.strip() and line != "data: [DONE]"]
    assert [("timings" in f, "model_version" in f) for f in frames] == [(False, False)] * (len(frames) - 1) + [(True, True)]


def test_n_choices_count_every_choices_tokens_in_their_timings(server):
    out = server.call({"a": {"messages": HI, "n": 2, "max_tokens": 2}})["a"]
    while not out["last"]:
        out = server.call({"a": None})["a"]
    answer = json.loads(out["output"])
    assert_figures(answer, answer["usage"]["prompt_tokens"], 4, steps=2)


def test_an_answer_that_failed_has_no_timings(server):
    out = server.call({"a": {"messages": [{"role": "user", "content": "[fail]"}]}})["a"]
    assert "timings" not in json.loads(out["output"])


# ---- the error table ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc, status, type_, param", [
    (ApiError("top_p: too big", param="top_p"), 400, "invalid_request_error", "top_p"),
    (ContextOverflow(3000, 240, "the last message does not fit"), 400, "invalid_request_error", "messages"),
    (PromptTooLong(3000, 240), 400, "invalid_request_error", "prompt"),
    (TemplateRefused("Conversation roles must alternate"), 400, "invalid_request_error", "messages"),
    (RequestTimedOut(300), 504, "timeout", None),
    (GenerationFailed("llama_decode failed"), 500, "server_error", None),
    (KeyError("x"), 500, "server_error", None),
])
def test_each_exception_becomes_its_api_error(exc, status, type_, param):
    error = api_error(exc)
    assert (error.status, error.type, error.param) == (status, type_, param)


def test_an_unexpected_exception_says_only_its_type():
    assert api_error(KeyError("secret")).message == "internal error: KeyError"


# ---- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["model-config.yaml", "deploy/kserve/model-config-cpu.yaml",
                                  "deploy/kserve/model-config-gpu.yaml"])
def test_every_model_config_of_the_repo_loads(path):
    config = yaml.safe_load((ROOT / path).read_text())
    assert load_settings(config).model_dump(exclude_unset=True).keys() == config["handler"].keys()


@pytest.mark.parametrize("section, mention", [
    ({"n_ctxx": 4096}, "handler.n_ctxx: is not a key the handler knows"),
    ({"n_ctx": "4096"}, "handler.n_ctx: Input should be a valid integer"),
    ({"flash_attn": "yes"}, "handler.flash_attn"),
    ({"sampling": {"temprature": 0.5}}, "handler.sampling.temprature"),
    ({"n_ctx": 256, "max_tokens": 512}, "max_tokens (512) must be below n_ctx (256)"),
])
def test_a_wrong_key_or_type_is_a_load_error_naming_the_key(section, mention):
    with pytest.raises(SettingsError, match="model-config.yaml: ") as e:
        load_settings({"handler": section})
    assert mention in str(e.value)


def test_a_load_error_stops_the_handler_before_any_model_is_loaded(tmp_path):
    with pytest.raises(SettingsError, match="n_slot"):
        TorchServe(tmp_path, {"handler": {"n_slot": 4}})


def test_engine_config_takes_slots_from_batch_size_and_threads_from_the_cpus():
    config = engine_config(HandlerSettings(), batch_size=8, n_workers=2, gpu_id=None, cpus=8)
    assert (config.n_slots, config.n_threads, config.n_ctx_per_slot) == (8, 4, 2048)
    pinned = engine_config(HandlerSettings(n_gpu_layers=99), batch_size=8, n_workers=1, gpu_id=1, cpus=8)
    assert (pinned.main_gpu, pinned.split_mode) == (1, 0)
    spread = engine_config(HandlerSettings(n_gpu_layers=99, tensor_split=[1, 1]), batch_size=8, n_workers=1,
                           gpu_id=1, cpus=8)
    assert (spread.main_gpu, spread.split_mode) == (0, 1)


def test_request_timeout_defaults_to_the_models_response_timeout(tmp_path):
    ts = TorchServe(tmp_path, {**model_config(), "responseTimeout": 42})
    assert ts.handler.request_timeout_s == 42
    ts = TorchServe(tmp_path, model_config(request_timeout_s=7))
    assert ts.handler.request_timeout_s == 7
