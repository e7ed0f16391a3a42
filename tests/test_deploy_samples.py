"""The sample deployment files in ``ops/deploy/`` name only real settings and routes."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ops.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "ops" / "deploy"


def _env_file() -> dict[str, str]:
    """Read as systemd's ``EnvironmentFile`` does: a comment is a whole line, and a value is
    everything after ``=`` (a ``#`` after a value would be part of it)."""
    out: dict[str, str] = {}
    for line in (DEPLOY / "coscribe.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            name, _, value = line.partition("=")
            out[name.strip()] = value
    return out


def test_the_env_file_sets_every_setting_and_loads() -> None:
    """Every ``COSCRIBE_*`` of the sample is a setting, every setting is in it, and it loads."""
    env = _env_file()
    assert set(env) == {f"COSCRIBE_{f.name.upper()}" for f in fields(Settings)}
    settings = Settings.load(env)
    assert settings.workers == 2 and settings.redis_url and settings.database_url


def _unit(name: str) -> dict[str, str]:
    """The ``Key=value`` lines of a systemd unit sample."""
    return dict(
        line.split("=", 1)
        for line in (DEPLOY / name).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def test_the_unit_runs_serve_with_the_env_file_and_time_to_drain() -> None:
    """systemd: the env file, ``coscribe serve``, SIGTERM, and more than the 10 s drain."""
    unit = _unit("coscribe.service")
    assert unit["EnvironmentFile"] == "/etc/coscribe/env"
    assert unit["ExecStart"].endswith("coscribe serve")
    assert unit["KillSignal"] == "SIGTERM" and int(unit["TimeoutStopSec"]) > 2 * 10


def test_the_projections_unit_waits_for_the_store_a_gateway_makes() -> None:
    """``projections run`` exits 2 until a gateway has made the event store: its unit
    starts after the gateway's and restarts it after a pause, for as long as it takes."""
    unit = _unit("coscribe-projections.service")
    assert unit["EnvironmentFile"] == "/etc/coscribe/env"
    assert unit["ExecStart"].endswith("coscribe projections run")
    assert "coscribe.service" in unit["After"].split()
    assert unit["Restart"] in ("on-failure", "always") and float(unit["RestartSec"]) >= 1
    assert unit["StartLimitIntervalSec"] == "0"  # else systemd gives up after a few exits


def test_the_proxies_route_the_websocket_and_check_readiness() -> None:
    """nginx upgrades ``/v1/ws``; HAProxy checks ``/readyz``."""
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "location /v1/ws" in nginx and "proxy_set_header Upgrade $http_upgrade;" in nginx
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    assert "option httpchk GET /readyz" in haproxy and "timeout tunnel" in haproxy
