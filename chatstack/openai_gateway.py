"""One OpenAI base URL for every registered model: a small HTTP proxy in front of TorchServe.

Why: TorchServe hands extra path segments (`v1/chat/completions`) to the handler only after a
version segment, so an SDK's base_url had to name a version (`/predictions/llama/1.0/v1`) and
broke with a 404 as soon as a batch change made 2.0 the default. The gateway listens on one
address (default http://127.0.0.1:8000, `openai_gateway_address` in config.properties) and serves

  POST /v1/chat/completions, /v1/completions  ->  /predictions/{model}/{default version}/v1/...
  GET  /v1/models, /v1/models/{model}         ->  the models the management API lists

The body's `model` picks the model; without `model` the only registered model answers (a 400
naming `model` when several are registered); a model that is not registered is a 404 naming
`model`. Which version is the default is asked of the management API and kept for CACHE_S; when
TorchServe answers 404 or 503 for that version and the default has moved meanwhile (a swap set a
new default and unregistered the old one), the request is sent once more to the new default.
That is safe: those answers come from TorchServe's frontend before any worker saw the request.
So a swap never shows a client a 404.

Keys: the client's `Authorization: Bearer <inference key>` goes to TorchServe unchanged and
TorchServe checks it; the gateway compares no key itself. Where the gateway answers by itself
(model lists, a model it cannot find) it first has TorchServe check the key on /ping, so an
unauthenticated client learns nothing. TorchServe 0.12 refuses a key with HTTP 400
InvalidKeyException; the gateway answers that as the 401 OpenAI clients expect
(openai.AuthenticationError). The management key, for the lists, is read from TorchServe's
key_file.json (again when TorchServe refuses it: the console may have rotated it). No key is
ever logged.

Bodies go to TorchServe byte for byte; answers come back chunk by chunk as TorchServe sends them
(server-sent events unbuffered), with TorchServe's status; error bodies pass through as
TorchServe wrote them. A client that hangs up closes the connection to TorchServe, which stops
the generation (handler_cancellation).

aiohttp: server and streaming client in one well-kept library, both with C HTTP parsers, which
matters on 2 cores shared with llama.cpp (bench/bench_gateway.py measures the cost).

    python -m chatstack.openai_gateway --listen http://127.0.0.1:8000 \
        --inference http://127.0.0.1:8080 --management http://127.0.0.1:8081 \
        --key-file .run/key_file.json [--torchserve-pid PID]

chatstack.gateway_process starts it beside TorchServe; with --torchserve-pid it stops by itself
when that process is gone, so it never outlives its server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import psutil
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from chatstack.torchserve_client import Keys

logger = logging.getLogger("chatstack.openai_gateway")

CACHE_S = 1.0             # how long a model list or default version is trusted
WATCH_INTERVAL_S = 1.0    # how often the gateway checks that its TorchServe still runs
ROUTES = ("chat/completions", "completions")   # what the handler serves under /v1/ besides models
# Answer headers worth passing back; hop-by-hop ones (Transfer-Encoding, Connection) are aiohttp's.
PASSED_HEADERS = ("Content-Type", "Cache-Control", "x-request-id")


@dataclass(frozen=True)
class GatewayConfig:
    inference_url: str
    management_url: str
    key_file: Path
    torchserve_pid: int | None = None
    cache_s: float = CACHE_S


class GatewayError(Exception):
    """An answer the gateway gives by itself, in OpenAI's error shape (the handler's convention:
    code is the HTTP status)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.type, "param": self.param,
                                            "code": self.status}}, status=self.status)


def requested_model(body: bytes) -> str | None:
    """The body's `model` (None when it has none). Raises GatewayError when the body is not a JSON
    object or `model` is not a string."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise GatewayError(400, "the request body is not JSON: send a JSON object with `model` and `messages` "
                                "(or `prompt`)") from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    model = payload.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise GatewayError(400, "model: must be the name of a registered model (a non-empty string)", "model")
    return model


def pick_model(requested: str | None, registered: list[str]) -> str:
    """Which registered model answers a request for `requested`. Raises GatewayError (400/404, naming model)."""
    listing = ", ".join(registered) or "none"
    if requested is None:
        if len(registered) == 1:
            return registered[0]
        if not registered:
            raise GatewayError(404, "model: no model is registered on this server", "model")
        raise GatewayError(400, f"model: required when several models are registered ({listing})", "model")
    if requested not in registered:
        raise GatewayError(404, f"model: {requested!r} is not registered (registered: {listing})", "model")
    return requested


def _is_key_refusal(status: int, body: bytes) -> bool:
    """TorchServe 0.12 refuses a missing or wrong key with 400 InvalidKeyException."""
    if status == 401:
        return True
    if status != 400:
        return False
    try:
        return json.loads(body).get("type") == "InvalidKeyException"
    except (ValueError, AttributeError):
        return False


def _key_refused(body: bytes) -> web.Response:
    try:
        message = json.loads(body).get("message") or "the key was refused"
    except (ValueError, AttributeError):
        message = "the key was refused"
    return GatewayError(401, f"{message}: send the inference key as `Authorization: Bearer <key>` "
                             "(python -m chatstack key prints it)", type="authentication_error").response()


class ModelDirectory:
    """The registered models and each one's default version, as TorchServe's management API lists
    them, each kept for CACHE_S."""

    def __init__(self, session: ClientSession, management_url: str, key_file: Path, cache_s: float = CACHE_S):
        self.session, self.management_url, self.key_file = session, management_url.rstrip("/"), key_file
        self.cache_s = cache_s
        self._key: str | None = None
        self._names: tuple[float, list[str]] | None = None
        self._versions: dict[str, tuple[float, str | None]] = {}

    def _read_key(self) -> str | None:
        try:
            return Keys.from_key_file(self.key_file).management
        except (OSError, ValueError):
            return None

    async def _get(self, path: str) -> tuple[int, object]:
        for attempt in (1, 2):
            if self._key is None or attempt == 2:
                self._key = self._read_key()   # again on a refusal: the key may have been rotated
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            async with self.session.get(f"{self.management_url}{path}", headers=headers) as resp:
                body = await resp.read()
            if not _is_key_refusal(resp.status, body):
                break
        if resp.status >= 400 and resp.status != 404:
            raise GatewayError(502, f"TorchServe's management API answered {resp.status} to {path}: "
                                    f"{body[:300].decode(errors='replace')}", type="server_error")
        return resp.status, json.loads(body) if resp.status == 200 else None

    async def names(self, fresh: bool = False) -> list[str]:
        now = time.monotonic()
        if fresh or self._names is None or now - self._names[0] > self.cache_s:
            _, listing = await self._get("/models?limit=1000")
            self._names = (now, sorted(m["modelName"] for m in listing.get("models", [])))
        return self._names[1]

    async def default_version(self, name: str, fresh: bool = False) -> str | None:
        """The version TorchServe answers for `name`; None when the model is not registered."""
        now = time.monotonic()
        cached = self._versions.get(name)
        if fresh or cached is None or now - cached[0] > self.cache_s:
            status, described = await self._get(f"/models/{quote(name, safe='')}")
            version = str(described[0]["modelVersion"]) if status == 200 and described else None
            cached = self._versions[name] = (now, version)
        return cached[1]


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.inference_url = config.inference_url.rstrip("/")
        self.session: ClientSession | None = None
        self.models: ModelDirectory | None = None

    async def session_context(self, app: web.Application):
        # No total or read timeout: a stream lasts as long as TorchServe's responseTimeout allows.
        self.session = ClientSession(connector=TCPConnector(limit=256), auto_decompress=False,
                                     timeout=ClientTimeout(total=None, sock_connect=10))
        self.models = ModelDirectory(self.session, self.config.management_url, self.config.key_file,
                                     self.config.cache_s)
        yield
        await self.session.close()

    @staticmethod
    def _upstream_headers(request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        for name in ("Authorization", "Accept"):
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    async def _check_key(self, request: web.Request) -> web.Response | None:
        """Have TorchServe check the client's key (on /ping); the refusal to send back, or None."""
        auth = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        async with self.session.get(f"{self.inference_url}/ping", headers=auth) as resp:
            body = await resp.read()
        return _key_refused(body) if _is_key_refusal(resp.status, body) else None

    async def _pick(self, requested: str | None) -> tuple[str, str]:
        """(model, default version) for a request; a model registered within the last CACHE_S is found too."""
        try:
            name = pick_model(requested, await self.models.names())
        except GatewayError:
            name = pick_model(requested, await self.models.names(fresh=True))
        version = await self.models.default_version(name)
        if version is None:   # unregistered since the list was read
            raise GatewayError(404, f"model: {name!r} is not registered", "model")
        return name, version

    # ---- routes --------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        try:
            body = await request.read()
            name, version = await self._pick(requested_model(body))
            return await self._forward(request, route, body, name, version)
        except GatewayError as e:
            try:
                return await self._check_key(request) or e.response()
            except ClientError as unreachable:
                return self._unreachable(unreachable)
        except ClientError as e:
            return self._unreachable(e)

    def _unreachable(self, e: ClientError) -> web.Response:
        return GatewayError(502, f"TorchServe did not answer ({type(e).__name__}): is it running at "
                                 f"{self.inference_url}?", type="server_error").response()

    async def _forward(self, request: web.Request, route: str, body: bytes, name: str,
                       version: str) -> web.StreamResponse:
        headers = self._upstream_headers(request)
        for attempt in (1, 2):
            url = f"{self.inference_url}/predictions/{quote(name, safe='')}/{quote(version, safe='')}/v1/{route}"
            async with self.session.post(url, data=body, headers=headers) as upstream:
                if upstream.status >= 400:
                    error = await upstream.read()
                    if _is_key_refusal(upstream.status, error):
                        return _key_refused(error)
                    if upstream.status in (404, 503) and attempt == 1:
                        moved = await self.models.default_version(name, fresh=True)
                        if moved is None:
                            raise GatewayError(404, f"model: {name!r} is not registered", "model")
                        if moved != version:
                            logger.info("%s: version %s answered %s; %s is the default now, sending there",
                                        name, version, upstream.status, moved)
                            version = moved
                            continue
                    return web.Response(status=upstream.status, body=error, headers=self._answer_headers(
                        upstream, name, version))
                return await self._stream_back(request, upstream, name, version)
        raise AssertionError("unreachable: the second attempt always answers")

    @staticmethod
    def _answer_headers(upstream, name: str, version: str) -> dict[str, str]:
        headers = {h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
        # Which model and version answered: a client can see a swap happen.
        headers["x-torchserve-model"] = name
        headers["x-torchserve-model-version"] = version
        return headers

    async def _stream_back(self, request: web.Request, upstream, name: str, version: str) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=self._answer_headers(upstream, name, version))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():   # whatever has arrived, at once
                await response.write(chunk)
        except ClientError as e:
            # TorchServe went away mid-answer; the status is sent, so the stream says it, as the
            # handler's own errors do in a stream (an event with an error object).
            logger.warning("%s %s: the answer broke off (%s)", name, version, type(e).__name__)
            error = {"error": {"message": f"TorchServe broke off the answer ({type(e).__name__})",
                               "type": "server_error", "param": None, "code": 502}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            if refused := await self._check_key(request):
                return refused
            names = await self.models.names()
            entries = [await self._model_entry(name) for name in names]
        except GatewayError as e:
            return e.response()
        except ClientError as e:
            return self._unreachable(e)
        return web.json_response({"object": "list", "data": [e for e in entries if e]})

    async def get_model(self, request: web.Request) -> web.Response:
        try:
            if refused := await self._check_key(request):
                return refused
            entry = await self._model_entry(request.match_info["model"])
        except GatewayError as e:
            return e.response()
        except ClientError as e:
            return self._unreachable(e)
        if entry is None:
            return GatewayError(404, f"model: {request.match_info['model']!r} is not registered", "model").response()
        return web.json_response(entry)

    async def _model_entry(self, name: str) -> dict | None:
        version = await self.models.default_version(name)
        if version is None:
            return None
        # TorchServe keeps no registration time: created is 0. `version` (not OpenAI's) is the
        # default version, the one that answers.
        return {"id": name, "object": "model", "created": 0, "owned_by": "torchserve", "version": version}

    async def unknown_path(self, request: web.Request) -> web.Response:
        return GatewayError(404, f"unknown path {request.method} {request.path}; served: POST /v1/chat/completions, "
                                 "POST /v1/completions, GET /v1/models, GET /v1/models/{model}").response()


def make_app(config: GatewayConfig) -> web.Application:
    # Long chats are big bodies; TorchServe's max_request_size is the limit that counts.
    app = web.Application(client_max_size=64 * 2**20)
    gateway = Gateway(config)
    app.cleanup_ctx.append(gateway.session_context)
    if config.torchserve_pid:
        app.cleanup_ctx.append(_watch(config.torchserve_pid))
    app.router.add_post("/v1/{route:" + "|".join(ROUTES) + "}", gateway.completions)
    app.router.add_get("/v1/models", gateway.list_models)
    app.router.add_get("/v1/models/{model}", gateway.get_model)
    app.router.add_route("*", "/{tail:.*}", gateway.unknown_path)
    return app


def _watch(pid: int):
    """Stop the gateway (as SIGTERM would) once TorchServe's process is gone."""
    async def context(app: web.Application):
        async def watch():
            while _alive(pid):
                await asyncio.sleep(WATCH_INTERVAL_S)
            logger.info("TorchServe (pid %d) is gone: stopping", pid)
            os.kill(os.getpid(), signal.SIGTERM)
        task = asyncio.get_running_loop().create_task(watch())
        yield
        task.cancel()
    return context


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatstack.openai_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="http://127.0.0.1:8000")
    parser.add_argument("--inference", default="http://127.0.0.1:8080", help="TorchServe's inference address")
    parser.add_argument("--management", default="http://127.0.0.1:8081", help="TorchServe's management address")
    parser.add_argument("--key-file", required=True, help="TorchServe's key_file.json (for the management key)")
    parser.add_argument("--torchserve-pid", type=int, help="stop when this process is gone")
    parser.add_argument("--cache-s", type=float, default=CACHE_S,
                        help="how long a model list or default version is trusted (seconds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listen = urlparse(args.listen)
    config = GatewayConfig(args.inference, args.management, Path(args.key_file), args.torchserve_pid, args.cache_s)
    logger.info("OpenAI gateway on %s/v1 for TorchServe at %s (management %s)", args.listen.rstrip("/"),
                args.inference, args.management)
    try:
        # The access log names method, path, status and time only: never headers (keys).
        web.run_app(make_app(config), host=listen.hostname or "127.0.0.1", port=listen.port or 8000,
                    handler_cancellation=True, print=None, access_log_format='%a "%r" %s %Tfs')
    except OSError as e:
        logger.error("cannot listen on %s: %s", args.listen, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
