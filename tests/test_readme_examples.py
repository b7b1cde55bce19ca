"""The README's curl examples work as written against a real TorchServe."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from chatstack.gateway_process import DEFAULT_ADDRESS, GatewayProcess
from conftest import ROOT, free_port

README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"<!-- readme-example -->\n```bash\n(.*?)```", README, re.S)


@pytest.fixture(scope="module")
def gateway(torchserve):
    """The OpenAI gateway beside the session's TorchServe, on a free port."""
    gateway = GatewayProcess(torchserve, address=f"http://127.0.0.1:{free_port()}")
    gateway.start()
    yield gateway
    gateway.stop()


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(torchserve, gateway, index):
    script = EXAMPLES[index]
    for kind, port in (("inference", 8080), ("management", 8081), ("metrics", 8082)):
        script = script.replace(f"http://127.0.0.1:{port}", torchserve.address(kind))
    script = script.replace(DEFAULT_ADDRESS, gateway.address)
    env = {**os.environ, "CHATSTACK_RUN_DIR": str(torchserve.run_dir)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "InvalidKeyException" not in out and '"error"' not in out, out
    if "/v1/" in script:
        assert out.rstrip().endswith("data: [DONE]")
    elif '"stream": true' in script:
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert lines[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    elif "/predictions/" in script:
        assert json.loads(out)["choices"][0]["message"]["content"]
    elif gateway.address in script:   # an openai client printing the answer last
        assert json.loads(out.splitlines()[-1])["choices"][0]["message"]["content"]
    else:
        assert '"Healthy"' in out and '"llama"' in out
