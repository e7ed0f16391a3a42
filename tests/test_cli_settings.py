"""Every setting has a ``COSCRIBE_*`` variable and a ``serve`` flag of the same name."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from ops import cli
from ops.settings import Settings


def _serve_flags() -> set[str]:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return {opt for action in serve._actions for opt in action.option_strings}


def test_every_setting_has_a_serve_flag() -> None:
    """``--database-url`` for ``database_url``, and so on for every field."""
    missing = {f.name for f in fields(Settings)} - {
        flag[2:].replace("-", "_") for flag in _serve_flags()
    }
    assert not missing


@pytest.mark.parametrize(
    ("flag", "name", "value"),
    [("--max-frame-bytes", "max_frame_bytes", 4096), ("--max-buffer-bytes", "max_buffer_bytes", 8)],
)
def test_a_flag_wins_over_its_variable(
    monkeypatch: pytest.MonkeyPatch, flag: str, name: str, value: int
) -> None:
    """The flag's value, not the variable's, is the setting."""
    monkeypatch.setenv(f"COSCRIBE_{name.upper()}", "1")
    args = cli.build_parser().parse_args(["serve", flag, str(value)])
    assert getattr(cli._settings(args), name) == value
    assert getattr(cli._settings(cli.build_parser().parse_args(["serve"])), name) == 1


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_serve_refuses_fewer_than_one_worker(
    capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    """``--workers 0`` is a usage error (exit 2), not one process in silence."""
    assert cli.main(["serve", "--workers", workers]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_the_secret_goes_in_a_private_data_dir(tmp_path: Path) -> None:
    """The first secret makes its data directory 0700 and the secret file 0600."""
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.secret_bytes()
    modes = [(p.stat().st_mode & 0o777) for p in (settings.data_dir, settings.data_dir / "secret")]
    assert modes == [0o700, 0o600]
