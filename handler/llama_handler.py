"""TorchServe handler: glue between TorchServe's batches and the llama engine.

Two batching modes, picked by `continuousBatching` in model-config.yaml:
- continuous: each handler call is one engine step (a few tokens within a small
  time budget) for the requests TorchServe hands over; finished requests are
  reported through `context.stopping_criteria`;
- dynamic batching: the whole batch is generated together, streaming chunks go
  out with `send_intermediate_predict_response`.

TorchServe takes the one class this module defines as the handler: other classes
belong in the other modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from http import HTTPStatus

from api_errors import ApiError, RequestTimedOut, api_error
from chat_prompt import ChatPrompter, ContextOverflow
from chat_protocol import ChatCompletionRequest, CompletionRequest, parse_request
from chat_response import Exchange
from llama_engine import Engine, GenerationRequest, PromptTooLong, RequestHandle, Update
from llama_metrics import MetricsReporter
from llama_settings import workers_sharing_cpus, engine_config, load_settings, request_timeout_s

logger = logging.getLogger(__name__)

ROUTES = {"": "auto", "v1/chat/completions": "chat", "v1/completions": "completion", "v1/models": "models"}


def send_intermediate_predict_response(*args):
    """TorchServe's own, imported when first used (its module imports torch)."""
    from ts.handler_utils.utils import send_intermediate_predict_response as send

    return send(*args)


class LlamaHandler:
    def __init__(self, make_engine=Engine, send_intermediate=send_intermediate_predict_response):
        # TorchServe calls LlamaHandler(); tests give a fake engine and catch intermediate responses.
        self.make_engine = make_engine
        self.send_intermediate = send_intermediate

    def initialize(self, context):
        model_config = context.model_yaml_config or {}
        self.settings = settings = load_settings(model_config)
        props = context.system_properties
        self.model_name = context.manifest.get("model", {}).get("modelName", "llama")
        self.model_version = context.manifest.get("model", {}).get("modelVersion")   # returned with each answer
        model_path = os.path.join(props["model_dir"], settings.model_path)   # an absolute model_path stays as it is
        config = engine_config(settings, batch_size=int(props.get("batch_size") or 1),
                               n_workers=workers_sharing_cpus(model_config), gpu_id=props.get("gpu_id"))
        self.continuous = bool(model_config.get("continuousBatching", False))
        self.step_budget_s = settings.step_budget_ms / 1000.0
        # In continuous batching each handler call is short, so TorchServe's
        # responseTimeout never fires for a long request; the handler enforces it.
        self.request_timeout_s = request_timeout_s(settings, model_config)
        logger.info("loading %s with %s (continuous batching: %s)", model_path, config, self.continuous)
        self.engine = self.make_engine(model_path, config)
        self.prompter = ChatPrompter(
            self.engine.metadata.get("tokenizer.chat_template"), self.engine.bos_text, self.engine.eos_text,
            lambda text: self.engine.tokenize(text, add_special=False, parse_special=True),
        )
        if self.prompter.uses_fallback_template:
            logger.warning("the GGUF has no tokenizer.chat_template; chat uses ChatML")
        self.exchanges: dict[str, Exchange] = {}   # requests in the engine, by TorchServe's request id
        self.reporter = MetricsReporter(getattr(context, "metrics", None), self.model_name)

    # ---- TorchServe entry point ------------------------------------------------

    def handle(self, data, context):
        if self.continuous:
            outputs = self._continuous_step(data, context)
        else:
            outputs = self._generate_batch(data, context)
        # While requests run, the next calls report within a second. A call that leaves the engine
        # idle may be the last for a while (TorchServe calls only with requests): report it now,
        # so /metrics is current when a client reads it. (Forcing one at every finished request
        # would cost, under load, nearly every step ~4 ms and ~50 log lines for the frontend to
        # parse: bench/bench_metrics_report.py.)
        self.reporter.report(self.engine.stats, force=not self.engine.is_busy())
        return outputs

    def _continuous_step(self, data, context):
        ids = context.request_ids
        outputs: dict[int, str] = {}
        finished: dict[int, bool] = {}
        # Requests TorchServe no longer sends lost their client: free their slots, answer nobody.
        live = set(ids.values())
        for rid in [r for r in self.exchanges if r not in live]:
            self.exchanges.pop(rid).cancel()
        fresh = {rid for rid in live if rid not in self.exchanges}
        for idx, rid in ids.items():
            if rid in fresh:
                early = self._open(idx, rid, data[idx], context)
                if early is not None:
                    outputs[idx], finished[idx] = early, True
        updates = self._run_engine() if self.engine.is_busy() else {}
        for idx, rid in ids.items():
            if idx not in outputs:
                outputs[idx], finished[idx] = self._advance(rid, updates, context, idx)
        # TorchServe 0.12 sends no HTTP headers when the first response of a
        # request is also marked last, so a request answered in its first call
        # is reported as a plain (non-stream) response: None, not True.
        stop = [None if (finished[i] and ids[i] in fresh) else finished[i] for i in range(len(data))]
        context.stopping_criteria = [(lambda _, s=s: s) for s in stop]
        return [outputs[i] for i in range(len(data))]

    def _generate_batch(self, data, context):
        ids = context.request_ids
        outputs: dict[int, str] = {}
        running: dict[str, int] = {}
        for idx, rid in ids.items():
            early = self._open(idx, rid, data[idx], context)
            outputs[idx] = "" if early is None else early
            if early is None:
                running[rid] = idx
        while self.engine.is_busy():
            updates = self._run_engine()
            pieces = {}
            for rid, idx in running.items():
                if rid not in self.exchanges:
                    continue
                stream = self.exchanges[rid].stream
                piece, done = self._advance(rid, updates, context, idx)
                if stream:
                    # Send now, even the last piece: the HTTP response closes when the batch ends.
                    if piece:
                        pieces[idx] = piece
                elif done:
                    outputs[idx] = piece
            if pieces:
                self.send_intermediate(pieces, {i: ids[i] for i in pieces}, "Intermediate response", 200, context)
        return [outputs[i] for i in range(len(data))]

    # ---- per request ------------------------------------------------------------------

    def _open(self, idx, rid, request_data, context) -> str | None:
        """Validate and submit one request. Returns the complete response when
        it is answered at once (an error, or /v1/models), else None."""
        arrived_at = time.monotonic()   # the answer's timings count from here (answer_timings.py)
        try:
            route = self._route(context.get_request_header(idx, "url_path"))
            if route == "models":
                _set_headers(context, idx, "application/json")
                return json.dumps(self.models_list())
            body = request_data.get("body", request_data.get("data")) if isinstance(request_data, dict) else request_data
            if body is None:
                raise ApiError("request body is empty; send a JSON object with `messages` or `prompt`")
            request = parse_request(body, route)
            generation = request.to_generation_request(self.settings)
            generation.arrived_at = arrived_at
            self._check_token_ids(generation.sampling.logit_bias)
            generation.prompt_tokens, dropped, thinking = self._fit_prompt(request, generation.max_tokens)
            handles = self._submit_choices(rid, generation, request.n or 1)
        except Exception as e:  # the worker must outlive any single request
            error = api_error(e)
            if error.status >= 500:
                logger.exception("request %s failed", rid)
            _set_headers(context, idx, "application/json", error.status)
            return error.to_json()
        self.exchanges[rid] = Exchange(handles, request, route, self.model_name, dropped, self.engine.n_ctx_seq,
                                       opens_reasoning=thinking, model_version=self.model_version)
        return None

    def _fit_prompt(self, request: ChatCompletionRequest | CompletionRequest,
                    max_tokens: int) -> tuple[list[int], int, bool]:
        """The prompt's tokens, leaving max_tokens of the context for the answer, how many
        earlier messages of a chat were left out to fit (a rolling window), and whether the
        prompt opened the model's thinking."""
        n_ctx = self.engine.n_ctx_seq
        if max_tokens >= n_ctx:
            raise ApiError(f"max_tokens: {max_tokens} is more than the context allows "
                           f"(context length {n_ctx}, max_tokens must be below it)", param="max_tokens")
        n_fit = n_ctx - max_tokens
        try:
            if isinstance(request, ChatCompletionRequest):
                native = self.prompter.supports_tools
                fitted = self.prompter.fit(request.template_messages(native), n_fit,
                                           tools=request.tools_for_prompt() if native else None,
                                           **(request.chat_template_kwargs or {}))
                return fitted.tokens, fitted.messages_dropped, fitted.opens_reasoning
            tokens = self.engine.tokenize(request.prompt, add_special=True, parse_special=False)
            if len(tokens) > n_fit:
                raise PromptTooLong(len(tokens), n_fit)
            return tokens, 0, False
        except (ContextOverflow, PromptTooLong) as e:
            e.add_note(f"max_tokens {max_tokens} is reserved for the answer; context length {n_ctx}")
            raise

    def _submit_choices(self, rid, generation: GenerationRequest, n: int) -> list[RequestHandle]:
        """One engine request per choice: the first reads the prompt, the others copy its KV
        (fork_of) and sample with their own sampler, the seed offset by the choice's index."""
        handles = [self.engine.submit(rid, generation)]
        seed = generation.sampling.seed
        try:
            for i in range(1, n):
                sampling = dataclasses.replace(generation.sampling, seed=None if seed is None else seed + i)
                choice = dataclasses.replace(generation, sampling=sampling, fork_of=rid)
                handles.append(self.engine.submit(f"{rid}#{i}", choice))
        except Exception:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def _check_token_ids(self, logit_bias: dict[int, float]) -> None:
        unknown = sorted(t for t in logit_bias if t >= self.engine.n_vocab)
        if unknown:
            raise ApiError(f"logit_bias: token id {unknown[0]} is not in the model's vocabulary "
                           f"(ids 0 to {self.engine.n_vocab - 1})", param="logit_bias")

    def _run_engine(self) -> dict[str, Update]:
        updates = self.engine.run(self.step_budget_s)
        for upd in updates.values():
            if upd.finished:
                self.reporter.observe_finished(upd.time_to_first_token, upd.tokens_per_second)
        # The slot gauges move while an answer streams; in dynamic batching one handler call lasts
        # the whole batch, so report from here (at most once a second), not only when the call ends.
        self.reporter.report(self.engine.stats)
        return updates

    def _advance(self, rid, updates: dict[str, Update], context, idx) -> tuple[str, bool]:
        """The next output of a request in flight, and whether it is its last. A request
        past its time limit is cancelled and answered with a timeout error."""
        ex = self.exchanges[rid]
        output = ex.render(updates)
        if not ex.finished and time.monotonic() - ex.started_at > self.request_timeout_s:
            ex.cancel()
            output += ex.render_error(api_error(RequestTimedOut(self.request_timeout_s)))
        done = ex.finished
        if done:
            del self.exchanges[rid]
            self.reporter.observe_answer(ex.timings())
        _set_headers(context, idx, ex.content_type, ex.status)
        return output, done

    def _route(self, url_path) -> str:
        path = (url_path or "").strip("/")
        if path not in ROUTES:
            raise ApiError(f"unknown path {path!r}; served: v1/chat/completions, v1/completions, v1/models",
                           param="url_path")
        return ROUTES[path]

    def models_list(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                             "created": int(time.time()), "owned_by": "local"}]}


def _set_headers(context, idx: int, content_type: str, status: int = 200) -> None:
    context.set_response_content_type(idx, content_type)
    if status != 200:
        context.set_response_status(status, HTTPStatus(status).phrase, idx)
