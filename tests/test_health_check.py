"""The chat client's health check against a real TorchServe: it says whether a chat can start
without showing up on the server's metrics as a failed request (it used to send a chat
without messages, which the handler refused: a 4XX at every check)."""

from __future__ import annotations

import time

from chatstack.server_health import LOADING, MISSING, READY, check_health
from chatstack.server_settings import ServerSettings


def settings_for(torchserve) -> ServerSettings:
    return ServerSettings.from_sources(env={
        "TORCHSERVE_URL": torchserve.address("inference"),
        "TORCHSERVE_MANAGEMENT_URL": torchserve.address("management"),
        "TORCHSERVE_KEY_FILE": str(torchserve.key_file)})


def failed_requests(client) -> float:
    totals = client.metrics()
    return totals.get("Requests4XX", 0.0) + totals.get("Requests5XX", 0.0)


def test_health_checks_are_not_counted_as_failed_requests(torchserve, client):
    server = settings_for(torchserve)
    before = failed_requests(client)
    for _ in range(5):
        assert check_health(server, "llama").state == READY
    assert check_health(server, "nope").state == MISSING   # a 404 the operator should see: one
    deadline = time.monotonic() + 10   # the frontend's metrics may lag the answers a moment
    while failed_requests(client) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert failed_requests(client) - before == 1


def test_a_model_scaled_to_zero_workers_is_loading(torchserve, client):
    server = settings_for(torchserve)
    client.scale("llama", 0)
    try:
        health = check_health(server, "llama")
    finally:
        client.scale("llama", 1)
    assert health.state == LOADING and "0 of 0 workers ready" in health.message
    assert check_health(server, "llama").state == READY
