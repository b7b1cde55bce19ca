"""A client for TorchServe's inference, management, token and metrics APIs.

Plain Python (no Streamlit): both apps and the tests use it. Every failure is
a `TorchServeError` carrying TorchServe's own message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
DEFAULT_METRICS_URL = "http://127.0.0.1:8082"


class TorchServeError(Exception):
    """A call to TorchServe failed; `message` is what TorchServe said, `kind` its
    exception type (e.g. 'ModelNotFoundException') when it named one."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.message = message
        self.status = status
        self.kind = kind


class ServerUnreachable(TorchServeError):
    """Nothing answers at the address: TorchServe is not running there."""


class Unauthorized(TorchServeError):
    """The key was refused (wrong, expired or missing). TorchServe 0.12 answers
    such requests with HTTP 400 and type InvalidKeyException, not 401."""


class ModelNotFound(TorchServeError):
    """The model (or version) is not registered."""


@dataclass
class Keys:
    inference: str | None = None
    management: str | None = None
    api: str | None = None

    @classmethod
    def from_key_file(cls, path: str | Path) -> "Keys":
        """Read TorchServe's key_file.json (written in its working directory)."""
        data = json.loads(Path(path).read_text())
        return cls(
            inference=data.get("inference", {}).get("key"),
            management=data.get("management", {}).get("key"),
            api=data.get("API", {}).get("key"),
        )


def _error_type(resp: requests.Response) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("type") if isinstance(body, dict) and isinstance(body.get("type"), str) else None


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason or "no message"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return err["message"]
        for key in ("message", "error"):
            if isinstance(body.get(key), str):
                return body[key]
    return json.dumps(body)


class TorchServeClient:
    def __init__(self, inference_url: str = DEFAULT_INFERENCE_URL, management_url: str = DEFAULT_MANAGEMENT_URL,
                 metrics_url: str = DEFAULT_METRICS_URL, keys: Keys | None = None, timeout: float = 10.0,
                 key_file: str | Path | None = None):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.metrics_url = metrics_url.rstrip("/")
        # key_file: TorchServe's key_file.json; rotate_key needs it, since TorchServe
        # writes a rotated key there instead of answering with it.
        self.key_file = Path(key_file) if key_file else None
        if keys is None and self.key_file is not None:
            keys = self._read_keys()
        self.keys = keys or Keys()
        self.timeout = timeout
        self.session = requests.Session()

    def _read_keys(self) -> Keys:
        try:
            return Keys.from_key_file(self.key_file)
        except (OSError, ValueError):  # not written yet, or half-written
            return Keys()

    # ---- plumbing -----------------------------------------------------------------

    def _request(self, method: str, url: str, key: str | None, *, timeout=None, stream=False, **kw):
        headers = kw.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            resp = self.session.request(method, url, headers=headers, timeout=timeout or self.timeout,
                                        stream=stream, **kw)
        except requests.ConnectionError as e:
            # Refused or unresolvable: nothing listens there. Anything else (the server
            # closed the connection mid-answer) is a failed call, not a missing server.
            if isinstance(e, requests.ConnectTimeout) or "NewConnectionError" in str(e) or "refused" in str(e):
                raise ServerUnreachable(f"TorchServe is not reachable at {url.split('/', 3)[:3][-1]}: "
                                        f"{e.__class__.__name__}") from None
            raise TorchServeError(f"the connection to TorchServe broke off during {method} {url}: "
                                  f"{e.__class__.__name__}") from None
        except requests.Timeout:
            raise TorchServeError(f"TorchServe did not answer {method} {url} within {timeout or self.timeout} s") from None
        except requests.RequestException as e:  # e.g. the connection broke while the answer was read
            raise TorchServeError(f"{method} {url} failed: {e.__class__.__name__}: {e}") from None
        if resp.status_code >= 400:
            message, kind = _error_message(resp), _error_type(resp)
            if kind == "InvalidKeyException" or resp.status_code == 401:
                cls = Unauthorized
            elif resp.status_code == 404:
                cls = ModelNotFound
            else:
                cls = TorchServeError
            raise cls(message, resp.status_code, kind)
        return resp

    def _mgmt(self, method, path, timeout=None, **kw):
        return self._request(method, f"{self.management_url}{path}", self.keys.management, timeout=timeout, **kw)

    def _infer(self, method, path, timeout=None, **kw):
        return self._request(method, f"{self.inference_url}{path}", self.keys.inference, timeout=timeout, **kw)

    # ---- health ---------------------------------------------------------------------

    def ping(self) -> str:
        """'Healthy' when TorchServe and its workers are up. With token
        authorization on, TorchServe 0.12 wants the inference key even here."""
        return self._infer("GET", "/ping").json().get("status", "unknown")

    def describe_predictions(self, model: str, version: str | None = None) -> dict:
        """The OpenAPI description of a model's predictions endpoint (OPTIONS /predictions/{model}).

        A cheap check that the inference key is accepted and the model registered: TorchServe
        answers it in the frontend, so it reaches no worker and counts as no inference request
        (a chat without messages would, as a 400 in Requests4XX)."""
        return self._infer("OPTIONS", self._prediction_path(model, version)).json()

    def server_version(self) -> str:
        """TorchServe's version, as its management API describes itself."""
        return self._mgmt("GET", "/api-description").json().get("info", {}).get("version", "unknown")

    # ---- management -------------------------------------------------------------------

    def list_models(self) -> list[dict]:
        return self._mgmt("GET", "/models", params={"limit": 1000}).json().get("models", [])

    def describe_model(self, name: str, version: str | None = None) -> list[dict]:
        """One entry per version (all versions when version is 'all')."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self._mgmt("GET", path).json()

    def register(self, archive: str, *, model_name: str | None = None, initial_workers: int = 1,
                 batch_size: int | None = None, max_batch_delay: int | None = None, timeout: float = 300) -> str:
        """Register an archive of the model store and wait until its workers have loaded it."""
        params = {"url": archive, "initial_workers": initial_workers, "synchronous": "true"}
        for key, value in (("model_name", model_name), ("batch_size", batch_size),
                           ("max_batch_delay", max_batch_delay)):
            if value is not None:
                params[key] = value
        return self._mgmt("POST", "/models", params=params, timeout=timeout).json().get("status", "")

    def unregister(self, name: str, version: str | None = None) -> str:
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self._mgmt("DELETE", path, timeout=120).json().get("status", "")

    def scale(self, name: str, min_worker: int, max_worker: int | None = None, version: str | None = None) -> str:
        """Set a model (version)'s worker numbers and wait until the workers are started or stopped."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        params = {"min_worker": min_worker, "max_worker": max_worker if max_worker is not None else min_worker,
                  "synchronous": "true"}
        return self._mgmt("PUT", path, params=params, timeout=300).json().get("status", "")

    def wait_for_workers(self, name: str, version: str | None = None, count: int = 1,
                         timeout: float = 300) -> list[dict]:
        """Wait until at least `count` workers of the model (version) are READY; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            workers = [w for entry in self.describe_model(name, version) for w in entry.get("workers", [])]
            ready = [w for w in workers if w.get("status") == "READY"]
            if len(ready) >= count:
                return ready
            if time.monotonic() > deadline:
                states = ", ".join(f"{w.get('id')}: {w.get('status')}" for w in workers) or "no workers"
                raise TorchServeError(f"{name} {version or ''} has not {count} READY worker(s) "
                                      f"after {timeout:.0f} s ({states})")
            time.sleep(0.5)

    def set_default_version(self, name: str, version: str) -> str:
        return self._mgmt("PUT", f"/models/{name}/{version}/set-default").json().get("status", "")

    def rotate_key(self, kind: str, wait_s: float = 10.0) -> str:
        """Ask TorchServe for a new 'inference' or 'management' key; returns it and uses it from now on.

        TorchServe 0.12 answers POST /token?type=... (authorized with the API key)
        with an empty 200 and writes the new key into key_file.json, so the new key
        is read from there; the old one stops working at once."""
        if kind not in ("inference", "management"):
            raise ValueError("kind must be 'inference' or 'management'")
        if self.key_file is None:
            raise TorchServeError("rotating a key needs the server's key_file.json: "
                                  "create the client with key_file=...")
        if not self.keys.api:
            self.keys.api = self._read_keys().api
        old = getattr(self.keys, kind)
        self._request("POST", f"{self.management_url}/token", self.keys.api, params={"type": kind})
        deadline = time.monotonic() + wait_s
        while True:
            new = getattr(self._read_keys(), kind)
            if new and new != old:
                setattr(self.keys, kind, new)
                return new
            if time.monotonic() > deadline:
                raise TorchServeError(f"TorchServe accepted the {kind} key rotation but {self.key_file} "
                                      f"shows no new key after {wait_s:.0f} s")
            time.sleep(0.1)

    # ---- metrics ----------------------------------------------------------------------

    def metrics_text(self) -> str:
        return self._request("GET", f"{self.metrics_url}/metrics", None).text

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed over labels: {'ts_inference_requests_total': 12.0, ...}."""
        totals: dict[str, float] = {}
        for name, _, value in self.metric_samples():
            totals[name] = totals.get(name, 0.0) + value
        return totals

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Every Prometheus sample with its labels: [('llama_requests_finished', {'Reason': 'stop', ...}, 3.0), ...]."""
        return parse_metric_samples(self.metrics_text())

    # ---- inference --------------------------------------------------------------------

    @staticmethod
    def _prediction_path(model: str, version: str | None) -> str:
        return f"/predictions/{model}" + (f"/{version}" if version else "")

    def chat(self, model: str, messages: list[dict], version: str | None = None, timeout: float = 300,
             **params) -> dict:
        body = {"messages": messages, **params, "stream": False}
        return self._infer("POST", self._prediction_path(model, version), json=body, timeout=timeout).json()

    def chat_stream(self, model: str, messages: list[dict], version: str | None = None, timeout: float = 300,
                    **params) -> Iterator[dict]:
        """Yields chat.completion.chunk objects as TorchServe streams them.
        Closing the generator closes the connection, which stops generation."""
        body = {"messages": messages, **params, "stream": True}
        resp = self._infer("POST", self._prediction_path(model, version), json=body, timeout=timeout, stream=True)
        try:
            for line in resp.iter_lines(decode_unicode=False):
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise TorchServeError(_error_message_from(chunk), 500)
                yield chunk
        except requests.RequestException as e:
            raise TorchServeError(f"the stream broke off: {e.__class__.__name__}") from None
        finally:
            resp.close()


def _error_message_from(obj: dict) -> str:
    err = obj.get("error")
    return err.get("message", "error") if isinstance(err, dict) else str(err)


def parse_metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page: (name, labels, value), named as the page names it.

    prometheus_client reads counters the OpenMetrics way and names every counter sample
    NAME_total; a counter the page declares without that suffix (llama_tokens_generated)
    gets its own name back."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise TorchServeError(f"TorchServe's metrics page could not be read: {e}") from None
    samples = []
    for family in families:
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name == f"{family.name}_total" and f"# TYPE {name} counter" not in text:
                name = family.name
            samples.append((name, sample.labels, sample.value))
    return samples
