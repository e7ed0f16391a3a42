"""The sample nginx and HAProxy configurations of ``ops/deploy/`` work: in front of two
gateways that share PostgreSQL and Redis, a WebSocket through each proxy edits one document
with the other, the REST API answers through both, and with one gateway stopped both proxies
still serve. Only the addresses, ports and certificate paths of the samples are replaced.
Skipped where nginx, HAProxy or openssl is not installed."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import sign_token
from tests.conftest import PG_URL
from tests.procs import TEST_SECRET, ServerProcess, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

DEPLOY = Path(__file__).resolve().parent.parent / "ops" / "deploy"


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "proxy.pem", tmp / "proxy.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def _sample(name: str, replace: dict[str, str]) -> str:
    text = (DEPLOY / name).read_text()
    for old, new in replace.items():
        assert old in text, f"{name} no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def gateways(tmp_path: Path, pg_schema: str, redis_url: str,
             redis_prefix: str) -> Iterator[list[ServerProcess]]:
    """Two gateways sharing one store and one Redis, the first running the projections."""
    shared = {"database_url": PG_URL, "database_schema": pg_schema, "redis_url": redis_url,
              "redis_prefix": redis_prefix}
    servers = [ServerProcess(tmp_path / "g1", **shared),
               ServerProcess(tmp_path / "g2", projections="off", **shared)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _upstreams(gateways: list[ServerProcess]) -> dict[str, str]:
    return {"10.0.0.11:8080": f"127.0.0.1:{gateways[0].port}",
            "10.0.0.12:8080": f"127.0.0.1:{gateways[1].port}"}


def _nginx(tmp: Path, gateways: list[ServerProcess]) -> tuple[subprocess.Popen[bytes], int]:
    cert, key = _certificate(tmp)
    port = free_port()
    site = _sample("nginx.conf", {
        **_upstreams(gateways), "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "/etc/nginx/tls/coscribe.pem": str(cert), "/etc/nginx/tls/coscribe.key": str(key)})
    (tmp / "site.conf").write_text(site)
    (tmp / "nginx.conf").write_text(
        f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n"
        f"  proxy_temp_path {tmp}/proxy;\n  include {tmp}/site.conf;\n}}\n")
    conf = ["nginx", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")]
    subprocess.run([*conf, "-t"], check=True, capture_output=True)
    return subprocess.Popen(conf), port


def _haproxy(tmp: Path, gateways: list[ServerProcess]) -> tuple[subprocess.Popen[bytes], int]:
    cert, key = _certificate(tmp)
    both = tmp / "proxy-both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    port = free_port()
    cfg = _sample("haproxy.cfg", {
        **_upstreams(gateways), "bind :443 ssl crt /etc/haproxy/tls/coscribe.pem":
        f"bind 127.0.0.1:{port} ssl crt {both}"})
    (tmp / "haproxy.cfg").write_text(cfg)
    subprocess.run(["haproxy", "-c", "-f", str(tmp / "haproxy.cfg")], check=True,
                   capture_output=True)
    return subprocess.Popen(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")]), port


async def _ready(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            async with http.get(base + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{base} never answered /readyz"
        await asyncio.sleep(0.1)


async def _next(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        for item in orjson.loads(msg.data):
            assert item["t"] != "error", item
            if item["t"] == kind:
                return dict(item)


async def _edit_together(nginx: str, haproxy: str) -> None:
    """Alice through nginx and bob through HAProxy edit one document: each gets its ack and
    the other's op, and both proxies then serve the same text."""
    alice, bob = sign_token(TEST_SECRET.encode(), "alice"), sign_token(TEST_SECRET.encode(), "bob")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        await _ready(http, nginx)
        await _ready(http, haproxy)
        auth = {"Authorization": f"Bearer {alice}"}
        async with http.post(nginx + "/v1/documents", json={"title": "p", "text": "ab"},
                             headers=auth) as r:
            assert r.status == 201, await r.text()
            doc = (await r.json())["id"]
        async with http.post(haproxy + f"/v1/documents/{doc}/members",
                             json={"user": "bob", "role": "editor"}, headers=auth) as r:
            assert r.status == 201, await r.text()
        socks = []
        for base, token, client in ((nginx, alice, "px-a"), (haproxy, bob, "px-b")):
            ws = await http.ws_connect(base.replace("https", "wss") + "/v1/ws",
                                       protocols=["json"])
            await ws.send_str(orjson.dumps([{"t": "hello", "token": token, "client": client},
                                            {"t": "sub", "doc": doc}]).decode())
            await _next(ws, "snapshot")
            socks.append(ws)
        wa, wb = socks
        await wa.send_str(orjson.dumps([{"t": "op", "doc": doc, "v": 0, "op": [2, "!"],
                                         "seq": 1}]).decode())
        assert (await _next(wa, "ack"))["v"] == 1
        assert (await _next(wb, "ops"))["ops"][0]["op"] == [2, "!"]
        await wb.send_str(orjson.dumps([{"t": "op", "doc": doc, "v": 1, "op": ["?"],
                                         "seq": 1}]).decode())
        assert (await _next(wb, "ack"))["v"] == 2
        assert (await _next(wa, "ops"))["ops"][0]["op"] == ["?"]
        for base in (nginx, haproxy):
            async with http.get(base + f"/v1/documents/{doc}",
                                headers={"Authorization": f"Bearer {bob}"}) as r:
                assert (await r.json())["text"] == "?ab!", base
        for ws in socks:
            await ws.close()


@pytest.mark.slow
async def test_the_sample_proxies_serve_two_gateways(
    tmp_path: Path, gateways: list[ServerProcess]
) -> None:
    """nginx and HAProxy as in the samples, in front of the same two gateways; then again
    with the second gateway stopped (passive and active health checks take it out)."""
    _need("nginx", "haproxy", "openssl")
    (tmp_path / "n").mkdir()
    (tmp_path / "h").mkdir()
    nginx, nginx_port = _nginx(tmp_path / "n", gateways)
    haproxy, haproxy_port = _haproxy(tmp_path / "h", gateways)
    try:
        urls = (f"https://127.0.0.1:{nginx_port}", f"https://127.0.0.1:{haproxy_port}")
        await _edit_together(*urls)
        gateways[1].stop()
        await asyncio.sleep(7)  # HAProxy: 3 failed checks 3 s apart after its last success
        await _edit_together(*urls)
    finally:
        for proc in (nginx, haproxy):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
