"""The KServe manifests, the image recipe and the pod's TorchServe config, checked offline.

KServe objects are validated against KServe's own CRD schemas (vendored in deploy/kserve/schemas,
release v0.20.0), core Kubernetes objects with kubernetes-validate; both strictly: a field the
schema does not know fails, as `kubectl apply --validate=strict` would.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

ROOT = Path(__file__).resolve().parent.parent
KSERVE_DIR = ROOT / "deploy" / "kserve"
SCHEMAS = KSERVE_DIR / "schemas"
KSERVE_VERSION = "v0.20.0"
K8S_VERSION = "1.33.0"
MANIFESTS = sorted(p for p in KSERVE_DIR.glob("*.yaml") if not p.name.startswith("model-config"))

sys.path.insert(0, str(ROOT / "deploy"))
import kserve_config  # noqa: E402
import llama_metrics  # noqa: E402  (handler/, on the path from conftest)
from chatstack.torchserve_process import parse_properties, read_properties


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in MANIFESTS for d in documents(p)]


def find(kind: str, name: str | None = None, path: Path | None = None) -> dict:
    docs = documents(path) if path else [d for _, d in all_documents()]
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise LookupError(f"no {kind} {name or ''}")


# ---- strict validators -------------------------------------------------------------------------

def _strict(schema):
    """Close every object schema that lists its properties, unless it keeps unknown fields
    (x-kubernetes-preserve-unknown-fields) or describes a map (additionalProperties)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


K8S_SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


def _k8s_strict_dir() -> Path:
    major_minor = ".".join(K8S_VERSION.split(".")[:2])
    return K8S_SCHEMA_DIR / f"v{major_minor}.0-local-strict"


@lru_cache(maxsize=None)
def object_meta_validator() -> jsonschema.Validator:
    """ObjectMeta of the pinned Kubernetes version, strict: CRD schemas leave metadata open."""
    folder = _k8s_strict_dir()
    schema = json.loads((folder / "objectmeta-meta-v1.json").read_text())
    defs = json.loads((folder / "_definitions.json").read_text())
    registry = referencing.Registry().with_resources([
        ("", referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)),
    ])
    registry = referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT202012) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


@lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    group, version = api_version.split("/")
    for path in SCHEMAS.glob(f"{group}_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                schema = _strict(v["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}  # checked by object_meta_validator
                return jsonschema.Draft7Validator(schema)
    raise LookupError(f"no vendored CRD schema for {kind} {api_version}")


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError / kubernetes_validate.ValidationError on a bad manifest."""
    if doc["apiVersion"].startswith("serving.kserve.io/"):
        crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)
        object_meta_validator().validate(doc["metadata"])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def rejected(doc: dict) -> bool:
    try:
        validate(doc)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError):
        return True
    return False


# ---- the manifests are valid ------------------------------------------------------------------

def test_vendored_schemas_name_their_kserve_release_and_license():
    readme = (SCHEMAS / "README.md").read_text()
    assert KSERVE_VERSION in readme and "Apache" in readme
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()
    assert len(MANIFESTS) >= 5


@pytest.mark.parametrize("name,doc", all_documents(), ids=[n for n, _ in all_documents()])
def test_manifest_passes_strict_validation(name, doc):
    validate(doc)


# ---- ...and the validation is able to fail -------------------------------------------------------

def _misspell(doc: dict, path: list, wrong: str) -> dict:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    return doc


@pytest.mark.parametrize("kind,name,path,wrong", [
    ("ServingRuntime", "llama-torchserve", ["spec", "containers", 0, "securityContext"], "securityContex"),
    ("ServingRuntime", "llama-torchserve", ["spec", "containers", 0, "resources"], "resource"),
    ("ServingRuntime", "llama-torchserve", ["spec", "supportedModelFormats"], "supportedModelFormat"),
    ("InferenceService", "llama", ["spec", "predictor", "minReplicas"], "minReplica"),
    ("InferenceService", "llama", ["spec", "predictor", "model", "storageUri"], "storageURI"),
    ("InferenceService", "llama", ["metadata", "annotations"], "anotations"),
    ("InferenceService", "llama-gpu", ["spec", "predictor", "model", "resources", "limits"], "limit"),
    ("PersistentVolumeClaim", "llama-models", ["spec", "accessModes"], "acessModes"),
    ("NetworkPolicy", "llama-predictor", ["spec", "podSelector"], "podselector"),
])
def test_misspelled_field_is_rejected(kind, name, path, wrong):
    doc = find(kind, name)
    validate(doc)
    assert rejected(_misspell(doc, path, wrong)), f"{'.'.join(map(str, path))} -> {wrong} was accepted"


def test_wrong_types_and_values_are_rejected():
    isvc = find("InferenceService", "llama")
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["scaleTarget"] = "six"
    assert rejected(bad)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["scaleMetric"] = "tokens"
    assert rejected(bad)
    runtime = find("ServingRuntime")
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert rejected(bad)


# ---- the manifests agree with each other and with the layout -----------------------------------

def runtime_container() -> dict:
    return find("ServingRuntime", "llama-torchserve")["spec"]["containers"][0]


def pod_config() -> dict[str, str]:
    return parse_properties(kserve_config.build("llama"))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_runtime_starts_torchserve_on_the_layout_like_kserve_torchserve():
    c = runtime_container()
    argv = c["command"] + c["args"]
    assert "torchserve" in argv and "--start" in argv and "--foreground" in argv
    assert "--model-store=/mnt/models/model-store" in argv
    assert "--ts-config=/mnt/models/config/config.properties" in argv


def test_runtime_ports_and_prometheus_annotations_match_the_pod_config():
    runtime = find("ServingRuntime", "llama-torchserve")
    config = pod_config()
    [port] = runtime_container()["ports"]
    assert port["containerPort"] == port_of(config["inference_address"]) == 8080
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(port_of(config["metrics_address"])) == "8082"
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert config["metrics_mode"] == "prometheus"
    assert runtime_container()["readinessProbe"]["httpGet"]["path"] == "/ping"


def test_runtime_runs_as_uid_1000_without_capabilities_or_privilege():
    sc = runtime_container()["securityContext"]
    assert sc["runAsUser"] == 1000 and sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    # a read-only root needs writable scratch space where TorchServe writes
    mounts = {m["mountPath"] for m in runtime_container()["volumeMounts"]}
    assert sc["readOnlyRootFilesystem"] is True and {"/tmp", runtime_container()["workingDir"]} <= mounts


def load_model_config(name: str) -> dict:
    return yaml.safe_load((KSERVE_DIR / name).read_text())


def test_llama_threads_equal_the_runtime_cpu_limit():
    # n_threads 0 would count the node's cores, not the pod's quota
    limit = runtime_container()["resources"]["limits"]["cpu"]
    assert load_model_config("model-config-cpu.yaml")["handler"]["n_threads"] == int(limit)
    assert runtime_container()["resources"]["requests"]["cpu"] == limit


def test_scaling_follows_the_slots_of_a_pod():
    slots = load_model_config("model-config-cpu.yaml")["batchSize"]
    runtime = find("ServingRuntime", "llama-torchserve")
    for path in ("inferenceservice.yaml", "inferenceservice-s3.yaml"):
        isvc = find("InferenceService", "llama", KSERVE_DIR / path)
        p = isvc["spec"]["predictor"]
        assert p["containerConcurrency"] == slots  # one worker per pod, batchSize slots
        assert p["scaleMetric"] == "concurrency" and 0 < p["scaleTarget"] < slots
        assert 1 <= p["minReplicas"] < p["maxReplicas"]
        assert p["model"]["runtime"] == runtime["metadata"]["name"]
        assert p["model"]["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert find("InferenceService", "llama", KSERVE_DIR / "inferenceservice.yaml")["spec"]["predictor"]["model"][
        "storageUri"].startswith("pvc://" + find("PersistentVolumeClaim")["metadata"]["name"] + "/")
    s3 = find("InferenceService", "llama", KSERVE_DIR / "inferenceservice-s3.yaml")["spec"]["predictor"]
    assert s3["model"]["storageUri"].startswith("s3://")
    assert s3["serviceAccountName"] == find("ServiceAccount")["metadata"]["name"]


def test_gpu_variant_requests_a_gpu_and_its_archive_config_offloads_layers():
    p = find("InferenceService", "llama-gpu")["spec"]["predictor"]
    assert p["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert p["model"]["image"] != runtime_container()["image"]  # the CUDA build
    gpu = load_model_config("model-config-gpu.yaml")
    assert gpu["handler"]["n_gpu_layers"] > 0
    assert gpu["handler"]["n_threads"] == int(p["model"]["resources"]["limits"]["cpu"])
    assert p["containerConcurrency"] == gpu["batchSize"] and 0 < p["scaleTarget"] < gpu["batchSize"]


@pytest.mark.parametrize("name,changed", [
    ("model-config-cpu.yaml", {("handler", "n_threads"), ("handler", "cache_answers")}),
    ("model-config-gpu.yaml", {("handler", "n_threads"), ("handler", "n_gpu_layers"), ("batchSize",),
                               ("handler", "step_budget_ms"), ("handler", "cache_answers")}),
])
def test_kserve_model_configs_differ_from_the_repo_config_only_where_documented(name, changed):
    def flat(d, prefix=()):
        out = {}
        for k, v in d.items():
            out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
        return out
    repo, mine = flat(yaml.safe_load((ROOT / "model-config.yaml").read_text())), flat(load_model_config(name))
    assert repo.keys() == mine.keys()
    assert {k for k in repo if repo[k] != mine[k]} == changed


def test_network_policy_selects_the_predictor_and_opens_no_management_port():
    pol = find("NetworkPolicy", "llama-predictor")
    assert pol["spec"]["podSelector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == "llama"
    ports = {p["port"] for rule in pol["spec"]["ingress"] for p in rule.get("ports", [])}
    assert port_of(pod_config()["management_address"]) not in ports
    assert {8080, 8082} <= ports


# ---- the pod's TorchServe config (deploy/kserve_config.py) --------------------------------------

def run_config(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "kserve_config.py"), *args],
                          capture_output=True, text=True)


def test_pod_config_serves_the_model_from_the_layout_with_management_on_loopback():
    out = run_config("--model", "qwen")
    assert out.returncode == 0, out.stderr
    props = parse_properties(out.stdout)
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["load_models"] == "qwen.mar" and props["model_store"] == "/mnt/models/model-store"
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "true"  # auth at the ingress: keys differ per replica
    # the repo's serving limits travel along
    repo = read_properties(ROOT / "config.properties")
    assert props["default_response_timeout"] == repo["default_response_timeout"]
    assert props["job_queue_size"] == repo["job_queue_size"]


def test_pod_config_opens_management_and_token_auth_only_when_asked():
    props = parse_properties(run_config("--model", "llama", "--token-auth", "--management-address", "http://0.0.0.0:8081").stdout)
    assert props["disable_token_authorization"] == "false"
    assert props["management_address"] == "http://0.0.0.0:8081"
    warned = run_config("--model", "llama", "--management-address", "http://0.0.0.0:8081")
    assert warned.returncode == 0 and "warning" in warned.stderr


@pytest.mark.parametrize("args", [["--model", "../evil"], ["--model", "llama", "--inference-address", "0.0.0.0"], []])
def test_pod_config_refuses_bad_arguments(args):
    out = run_config(*args)
    assert out.returncode != 0 and out.stdout == ""


def test_pod_metrics_yaml_declares_the_handler_metrics():
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    names = {m["name"] for kind in declared.values() for m in kind}
    handler_metrics = set(llama_metrics.COUNTERS + llama_metrics.GAUGES)   # histograms as their _bucket/_sum/_count
    assert handler_metrics and handler_metrics <= names


# ---- the image recipe ----------------------------------------------------------------------------

CONTAINERFILE = (ROOT / "deploy" / "Containerfile").read_text()


def test_image_pins_equal_the_repo_pins():
    def pins(path):
        out = {}
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)\s*((?:==|>=|<=|<|>|~=)[^#\s]*)", line.strip())
            if m:
                out[m.group(1).lower()] = m.group(2)
        return out
    image, repo = pins(ROOT / "deploy" / "requirements-image.txt"), pins(ROOT / "requirements.txt")
    assert {"torch", "torchserve", "llama-cpp-python"} <= image.keys()
    for name, spec in image.items():
        assert repo.get(name) == spec, f"{name}: image {spec}, requirements.txt {repo.get(name)}"


def test_containerfile_builds_in_a_builder_stage_and_runs_as_uid_1000_with_a_health_check():
    stages = re.split(r"^FROM ", CONTAINERFILE, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].startswith("${BASE_IMAGE} AS builder")
    final = stages[1]
    assert "build-essential" in stages[0] and "build-essential" not in final and "cmake" not in final
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert re.search(r"^ARG BASE_IMAGE=\S*python:3\.11-slim-bookworm$", CONTAINERFILE, re.M)
    assert re.search(r"^ARG UID=1000$", final, re.M) and re.search(r"^USER \$\{UID\}", final, re.M)
    assert re.search(r"^HEALTHCHECK .*", final, re.M) and "TS_HEALTH_URL=http://127.0.0.1:8080/ping" in final
    assert "openjdk-17-jre-headless" in final
    # the default command is the ServingRuntime's
    c = runtime_container()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M).group(1))
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M).group(1))
    assert entry + cmd == c["command"] + c["args"]
    # the machine's own settings (CA bundle, wheel folder) are not baked in
    instructions = "\n".join(line for line in CONTAINERFILE.splitlines() if not line.lstrip().startswith("#"))
    assert "/host-ca.crt" not in instructions and "/opt/wheels" not in instructions
