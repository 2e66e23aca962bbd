"""spatialthinker_mcp --http: refused on a non-loopback address without a bearer token; with one, a request without
it gets 401 and the official client with it is served (streamable HTTP)."""

import subprocess

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from spatialthinker_ros.testing.mcp_client import mcp_executable
from spatialthinker_ros.testing.processes import free_port, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN_VARIABLE = "SPATIALTHINKER_MCP_TEST_TOKEN"


@pytest.mark.parametrize("args, env, message", [
    (["--http", "--host", "0.0.0.0"], {}, "--host 0.0.0.0 is not a loopback address: serving it needs a bearer "
                                          "token, read from the environment variable --token-env names"),
    (["--http", "--host", "192.168.1.20", "--token-env", TOKEN_VARIABLE], {},
     f"--token-env {TOKEN_VARIABLE}: that environment variable is unset or empty"),
])
def test_a_non_loopback_address_without_a_token_is_refused(args, env, message):
    done = subprocess.run([mcp_executable(), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.strip().endswith(f"spatialthinker_mcp: error: {message}"), done.stderr


def test_with_a_token_only_requests_bearing_it_are_served(spawn, monkeypatch):
    monkeypatch.setenv(TOKEN_VARIABLE, "s3cret-token")
    port = free_port()
    server = spawn([mcp_executable(), "--http", "--port", str(port), "--token-env", TOKEN_VARIABLE,
                    "--namespace", "nobody", "--wait", "1"], name="mcp-http")
    url = f"http://127.0.0.1:{port}/mcp"

    def answers() -> bool:
        try:
            return httpx.post(url, json={}, timeout=2).status_code == 401
        except httpx.TransportError:
            return False
    wait_for(answers, 60, "the HTTP server to answer", server)
    wrong = httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert (wrong.status_code, wrong.headers["www-authenticate"]) == (401, "Bearer")

    async def scenario():
        http = create_mcp_http_client(headers={"Authorization": "Bearer s3cret-token"})
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            status = await client.call_tool("node_status", {}, 30)
            return {t.name for t in tools.tools}, status

    names, status = anyio.run(scenario)
    assert names == {"ask_spatial", "describe_scene", "locate", "node_status"}
    assert status.is_error and status.content[0].text.startswith("NODE_UNAVAILABLE: the node /nobody/spatialthinker")
