"""TorchServe handler: glue between TorchServe's batches and the llama engine.

Two batching modes, picked by `continuousBatching` in model-config.yaml:
- continuous: each handler call is one engine step (a few tokens within a small
  time budget) for the requests TorchServe hands over; finished requests are
  reported through `context.stopping_criteria`;
- dynamic batching: the whole batch is generated together, streaming chunks go
  out with `send_intermediate_predict_response`.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
import os
import time

from chat_prompt import ChatPrompter, ContextOverflow
from chat_protocol import ApiError, ChatCompletionRequest, parse_request, sampling_params
from chat_response import Exchange
from llama_engine import Engine, EngineConfig, GenerationRequest, PromptTooLong, Update
from llama_metrics import MetricsReporter

logger = logging.getLogger(__name__)

ROUTES = {"": "auto", "v1/chat/completions": "chat", "v1/completions": "completion", "v1/models": "models"}


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (in a
    container os.cpu_count() is the node's core count, not the pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


class LlamaHandler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        props = context.system_properties
        yaml_config = context.model_yaml_config or {}
        settings = yaml_config.get("handler", {}) or {}
        self.model_name = context.manifest.get("model", {}).get("modelName", "llama")
        model_path = settings.get("model_path", "model.gguf")
        if not os.path.isabs(model_path):
            model_path = os.path.join(props["model_dir"], model_path)
        n_workers = max(int(yaml_config.get("minWorkers", 1) or 1), 1)
        n_threads = int(settings.get("n_threads", 0)) or max(1, available_cpus() // n_workers)
        n_gpu_layers = int(settings.get("n_gpu_layers", 0))
        gpu_id = props.get("gpu_id")
        # TorchServe gives each worker a GPU (gpu_id); without an explicit split, the worker uses just that one.
        one_gpu_per_worker = bool(n_gpu_layers) and gpu_id is not None and not settings.get("tensor_split")
        config = EngineConfig(
            n_slots=int(settings.get("n_slots", 0)) or int(props.get("batch_size") or 1),
            n_ctx_per_slot=int(settings.get("n_ctx", 2048)),
            n_batch=int(settings.get("n_batch", 512)),
            prefill_chunk=int(settings.get("prefill_chunk", 256)),
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            main_gpu=int(gpu_id) if one_gpu_per_worker else int(settings.get("main_gpu", 0)),
            # llama.cpp only honours main_gpu with split mode "none"; otherwise it spreads layers over all GPUs.
            split_mode=0 if one_gpu_per_worker else int(settings.get("split_mode", 1)),
            tensor_split=settings.get("tensor_split"),
            flash_attn=bool(settings.get("flash_attn", True)),
            cache_answers=bool(settings.get("cache_answers", True)),
        )
        self.step_budget_s = float(settings.get("step_budget_ms", 50)) / 1000.0
        self.default_max_tokens = int(settings.get("max_tokens", 512))
        self.sampling_defaults = dict(settings.get("sampling", {}) or {})
        self.continuous = bool(yaml_config.get("continuousBatching", False))
        # In continuous batching each handler call is short, so TorchServe's
        # responseTimeout never fires for a long request; the handler enforces it.
        self.request_timeout_s = float(settings.get("request_timeout_s", yaml_config.get("responseTimeout", 300)))
        logger.info("loading %s with %s (continuous batching: %s)", model_path, config, self.continuous)
        self.engine = Engine(model_path, config)
        meta = self.engine.metadata
        self.prompter = ChatPrompter(
            meta.get("tokenizer.chat_template"), self.engine.bos_text, self.engine.eos_text,
            lambda text: self.engine.tokenize(text, add_special=False, parse_special=True),
        )
        if self.prompter.uses_fallback_template:
            logger.warning("the GGUF has no tokenizer.chat_template; chat uses ChatML")
        self.exchanges: dict[str, Exchange] = {}
        self.reporter = MetricsReporter(getattr(context, "metrics", None), self.model_name)
        self.finished_since_report = False
        self.initialized = True

    # ---- TorchServe entry point ------------------------------------------------

    def handle(self, data, context):
        if self.continuous:
            outputs = self._continuous_step(data, context)
        else:
            outputs = self._generate_batch(data, context)
        # Report at once when a request finished, so /metrics is current when a client reads it.
        self.reporter.report(self.engine.stats, force=self.finished_since_report)
        self.finished_since_report = False
        return outputs

    def _run_engine(self) -> dict[str, Update]:
        updates = self.engine.run(self.step_budget_s)
        for upd in updates.values():
            if upd.finished:
                self.reporter.observe_finished(upd.time_to_first_token, upd.tokens_per_second)
                self.finished_since_report = True
        return updates

    def _continuous_step(self, data, context):
        ids = context.request_ids
        outputs: dict[int, str] = {}
        finished: dict[int, bool] = {}
        # Requests TorchServe no longer sends lost their client: free their slots.
        live = set(ids.values())
        for rid in [r for r in self.exchanges if r not in live]:
            self.engine.cancel(rid)
            del self.exchanges[rid]
        fresh = {rid for rid in live if rid not in self.exchanges}
        for idx, rid in ids.items():
            if rid in fresh:
                early = self._open(idx, rid, data[idx], context)
                if early is not None:
                    outputs[idx], finished[idx] = early, True
        updates = self._run_engine() if self.engine.is_busy() else {}
        for idx, rid in ids.items():
            if idx in outputs:
                continue
            ex = self.exchanges[rid]
            upd = updates.get(rid)
            if (upd is not None and upd.finished) or not self._timed_out(ex):
                outputs[idx] = ex.render(upd)
                finished[idx] = bool(upd and upd.finished)
            else:
                self.engine.cancel(rid)
                outputs[idx] = ex.render_error(self._timeout_error())
                finished[idx] = True
            context.set_response_content_type(idx, ex.content_type)
            if ex.failed_status:
                context.set_response_status(ex.failed_status, HTTPStatus(ex.failed_status).phrase, idx)
            if finished[idx]:
                del self.exchanges[rid]
        # TorchServe 0.12 sends no HTTP headers when the first response of a
        # request is also marked last, so a request answered in its first call
        # is reported as a plain (non-stream) response: None, not True.
        stop = [None if (finished[i] and ids[i] in fresh) else finished[i] for i in range(len(data))]
        context.stopping_criteria = [(lambda _, s=s: s) for s in stop]
        return [outputs[i] for i in range(len(data))]

    def _generate_batch(self, data, context):
        from ts.handler_utils.utils import send_intermediate_predict_response

        ids = context.request_ids
        outputs: dict[int, str] = {}
        running: dict[str, int] = {}
        for idx, rid in ids.items():
            early = self._open(idx, rid, data[idx], context)
            if early is None:
                running[rid] = idx
                outputs[idx] = ""
            else:
                outputs[idx] = early
        while any(rid in self.exchanges for rid in running):
            updates = self._run_engine()
            partial = {}
            for rid in [r for r in running if r in self.exchanges and r not in updates]:
                if self._timed_out(self.exchanges[rid]):
                    self.engine.cancel(rid)
            for rid, upd in updates.items():
                idx = running.get(rid)
                if idx is None:
                    continue
                ex = self.exchanges[rid]
                piece = ex.render_error(self._timeout_error()) if upd.finish_reason == "cancelled" else ex.render(upd)
                context.set_response_content_type(idx, ex.content_type)
                if ex.failed_status:
                    context.set_response_status(ex.failed_status, HTTPStatus(ex.failed_status).phrase, idx)
                if upd.finished:
                    del self.exchanges[rid]
                if ex.stream:
                    # Send now, even the last piece: the HTTP response closes when the batch ends.
                    if piece:
                        partial[idx] = piece
                elif upd.finished:
                    outputs[idx] = piece
            if partial:
                send_intermediate_predict_response(
                    partial, {i: ids[i] for i in partial}, "Intermediate response", 200, context)
        return [outputs[i] for i in range(len(data))]

    # ---- per request ------------------------------------------------------------------

    def _open(self, idx, rid, request_data, context) -> str | None:
        """Validate and submit one request. Returns the complete response when
        it is answered at once (an error, or /v1/models), else None."""
        try:
            route = self._route(context.get_request_header(idx, "url_path"))
            if route == "models":
                context.set_response_content_type(idx, "application/json")
                return json.dumps(self.models_list())
            body = request_data.get("body", request_data.get("data")) if isinstance(request_data, dict) else request_data
            if body is None:
                raise ApiError("request body is empty; send a JSON object with `messages` or `prompt`")
            request = parse_request(body, route)
            max_tokens = request.max_tokens or self.default_max_tokens
            if max_tokens >= self.engine.n_ctx_seq:
                raise ApiError(f"max_tokens: {max_tokens} is more than the context allows "
                               f"(context length {self.engine.n_ctx_seq}, max_tokens must be below it)",
                               param="max_tokens")
            n_fit = self.engine.n_ctx_seq - max_tokens
            dropped = 0
            if isinstance(request, ChatCompletionRequest):
                fitted = self.prompter.fit([m.as_template_dict() for m in request.messages], n_fit)
                tokens, dropped = fitted.tokens, fitted.messages_dropped
            else:
                tokens = self.engine.tokenize(request.prompt, add_special=True, parse_special=False)
                if len(tokens) > n_fit:
                    raise PromptTooLong(len(tokens), n_fit)
            self.engine.submit(rid, GenerationRequest(
                prompt_tokens=tokens, max_tokens=max_tokens,
                sampling=sampling_params(request, self.sampling_defaults), stop=request.stop_list,
                ignore_eos=request.ignore_eos))
            self.exchanges[rid] = Exchange(rid, request, route, self.model_name, dropped, self.engine.n_ctx_seq)
            return None
        except (ContextOverflow, PromptTooLong) as e:
            err = ApiError(f"{e} (max_tokens {request.max_tokens or self.default_max_tokens} is reserved "
                           f"for the answer; context length {self.engine.n_ctx_seq})", param="messages")
        except ApiError as e:
            err = e
        except Exception as e:  # the worker must outlive any single request
            logger.exception("request %s failed", rid)
            err = ApiError(f"internal error: {type(e).__name__}", status=500, type="server_error")
        context.set_response_status(err.status, HTTPStatus(err.status).phrase, idx)
        context.set_response_content_type(idx, "application/json")
        return err.to_json()

    def _timed_out(self, ex: Exchange) -> bool:
        return time.monotonic() - ex.started_at > self.request_timeout_s

    def _timeout_error(self) -> ApiError:
        return ApiError(f"the request ran longer than the response timeout ({self.request_timeout_s:.0f} s) "
                        "and was stopped", status=504, type="timeout")

    def _route(self, url_path) -> str:
        path = (url_path or "").strip("/")
        if path not in ROUTES:
            raise ApiError(f"unknown path {path!r}; served: v1/chat/completions, v1/completions, v1/models",
                           param="url_path")
        return ROUTES[path]

    def models_list(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                             "created": int(time.time()), "owned_by": "local"}]}
