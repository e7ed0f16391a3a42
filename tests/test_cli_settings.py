"""Every setting has a ``COSCRIBE_*`` variable and a ``serve`` flag of the same name; both are
checked alike (a value out of range or not one of the choices exits 2 with a message)."""

from __future__ import annotations

import base64
import json
import multiprocessing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ops import cli
from ops.settings import DataDirUnusable, Settings, SettingsError


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
    [("--max-frame-bytes", "max_frame_bytes", 4096),
     ("--max-buffer-bytes", "max_buffer_bytes", 8192)],
)
def test_a_flag_wins_over_its_variable(
    monkeypatch: pytest.MonkeyPatch, flag: str, name: str, value: int
) -> None:
    """The flag's value, not the variable's, is the setting."""
    monkeypatch.setenv(f"COSCRIBE_{name.upper()}", "2048")
    args = cli.build_parser().parse_args(["serve", flag, str(value)])
    assert getattr(cli._settings(args), name) == value
    assert getattr(cli._settings(cli.build_parser().parse_args(["serve"])), name) == 2048


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
    assert [p.name for p in settings.data_dir.iterdir()] == ["secret"]  # no temporary left


def _take_secret(data_dir: Path, barrier: Any, out: Any) -> None:
    barrier.wait()
    try:
        out.put(Settings(data_dir=data_dir).secret_bytes())
    except Exception as exc:
        out.put(repr(exc).encode())


def test_processes_taking_a_new_secret_at_once_agree_on_one(tmp_path: Path) -> None:
    """Two processes making the secret of a new data dir at the same moment: one failed
    ("File exists") or read it empty in 10-77% of tries; now both get the same secret."""
    ctx = multiprocessing.get_context("fork")
    for i in range(30):
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_take_secret, args=(tmp_path / str(i), barrier, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [out.get(timeout=20), out.get(timeout=20)]
        for p in procs:
            p.join(20)
        assert got[0] == got[1] and len(got[0]) == 64, (i, got)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    """An empty ``secret`` (left by a crash between create and write) made an empty HMAC key
    that verified tokens anyone could forge; it is now a start-up error."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "secret").write_text("\n")
    with pytest.raises(DataDirUnusable, match="is empty"):
        Settings(data_dir=data).secret_bytes()
    assert cli.main(["token", "alice", "--data-dir", str(data)]) == 1


BAD_VALUES = [
    ("port", "99999", "1..65535"),  # was bound as 34463 (the 16-bit wrap)
    ("port", "70000", "1..65535"),
    ("port", "-1", "1..65535"),  # was a socket.gaierror traceback
    ("port", "0", "1..65535"),  # "any port": nobody could find the server
    ("port", "abc", "integer"),
    ("projections", "bogus", "inline, off"),  # the variable turned the read side off
    ("log_level", "bogus", "debug, info, warning, error"),  # a ValueError traceback
    ("max_frame_bytes", "0", "at least 1024"),
    ("max_buffer_bytes", "-1", "at least 1024"),
    ("max_buffer_bytes", "0", "at least 1024"),
    ("workers", "0", "at least 1"),
    ("database_url", "mysql://db/x", "postgresql://"),
    ("redis_url", "http://cache:6379", "redis://"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_a_bad_flag_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], name: str, value: str, message: str
) -> None:
    """``serve --port 99999`` (and each bad value) is a usage error naming the flag."""
    flag = "--" + name.replace("_", "-")
    try:
        code = cli.main(["serve", f"{flag}={value}"])
    except SystemExit as exc:  # argparse itself refuses what is not an integer
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err or "invalid" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_a_bad_variable_exits_2_like_its_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    name: str, value: str, message: str
) -> None:
    """``COSCRIBE_PORT=70000`` is refused as ``--port 70000`` is, and named in the message."""
    monkeypatch.setenv(f"COSCRIBE_{name.upper()}", value)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"COSCRIBE_{name.upper()}" in err and message in err


def test_settings_accept_the_bounds_and_any_case_of_a_level() -> None:
    """Port 1 and 65535, 1 KiB limits and ``INFO`` load; ``SettingsError`` is a ValueError."""
    s = Settings.load({"COSCRIBE_PORT": "65535", "COSCRIBE_LOG_LEVEL": "INFO",
                       "COSCRIBE_MAX_FRAME_BYTES": "1024", "COSCRIBE_DATABASE_URL": "postgres://x"})
    assert (s.port, s.log_level, s.max_frame_bytes) == (65535, "info", 1024)
    assert Settings.load({}, {"port": 1}).port == 1
    with pytest.raises(ValueError, match="--port"):
        Settings.load({}, {"port": 65536})
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize("ttl", ["-5", "0", "0.9", "inf", "nan", "1e300"])
def test_token_refuses_a_ttl_below_one_second_or_past_a_century(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    """``token --ttl -5`` printed a token that had already expired, ``--ttl inf`` was an
    OverflowError traceback; now both exit 2 with one line."""
    assert cli.main(["token", "alice", "--ttl", ttl, "--data-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--ttl must be in 1..3,153,600,000 seconds" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["token", "alice", "--ttl", "1", "--data-dir", str(tmp_path)]) == 0


def test_token_for_an_empty_user_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``coscribe token ""`` was a ValueError traceback."""
    assert cli.main(["token", "", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "user must be non-empty" in err and len(err.strip().splitlines()) == 1


def test_token_with_a_data_dir_that_is_a_file_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data dir that cannot be made is a runtime failure with the path, not a traceback."""
    plain = tmp_path / "afile"
    plain.write_text("")
    assert cli.main(["token", "alice", "--data-dir", str(plain)]) == 1
    err = capsys.readouterr().err
    assert str(plain) in err and len(err.strip().splitlines()) == 1


BAD_URLS = [
    ("redis_url", "redis:x", "must start with redis://"),  # a ValueError traceback in serve
    ("redis_url", "redis://:99999", "port must be an integer in 1..65535, not '99999'"),
    ("redis_url", "redis://h:abc", "port must be an integer in 1..65535, not 'abc'"),
    ("redis_url", "redis://h:0/0", "1..65535, not '0'"),
    ("redis_url", "redis:///0", "no host"),  # redis-py would quietly take localhost
    ("redis_url", "unix://", "no socket path"),
    ("redis_url", "redis://[::1/0", "not a URL"),
    ("redis_url", "redis://h/0?socket_timeout=abc", "socket_timeout"),
    ("database_url", "postgresql:foo", "must start with postgresql://"),  # a psycopg traceback
    ("database_url", "postgresql://127.0.0.1:99999/x", "1..65535, not '99999'"),
    ("database_url", "postgres://127.0.0.1:abc/x", "1..65535, not 'abc'"),
    ("database_url", "postgresql://u:secret@h/x?nosuch=1", 'invalid URI query parameter: "nosuch"'),
    ("database_url", "postgresql://h1:5432,h2:5433/x", "share one port"),
    ("database_url", "//u:secret@db/x", "not a URL without a scheme"),
    # Found by the operator audit: a password in libpq's message, and query parameters that
    # were checked only when the first connection was made (exit 1 or a failing hub).
    ("database_url", "postgresql://u:%zzsecret@h/x", "invalid percent-encoded token"),
    ("database_url", "postgresql://u:secret@h/x?port=99999", "1..65535, not '99999'"),
    ("database_url", "postgresql://h/x?host=/tmp&port=abc", "1..65535, not 'abc'"),
    ("database_url", "postgresql://u:secret@h/x?sslmode=bogus", "sslmode must be one of"),
    ("redis_url", "redis://:secret@h:6379/0?nosuch=1", "unexpected keyword argument 'nosuch'"),
    ("redis_url", "rediss://h:6379/0?ssl_cert_reqs=bogus", "Certificate Requirements"),
]


@pytest.mark.parametrize("from_env", [False, True], ids=["flag", "variable"])
@pytest.mark.parametrize(("name", "value", "message"), BAD_URLS)
def test_a_malformed_url_is_a_settings_error_naming_its_source(
    name: str, value: str, message: str, from_env: bool
) -> None:
    """A URL its driver would not take is refused at load, flag and variable alike (the
    scheme was all that was checked), and the message does not repeat a password."""
    variable, flag = f"COSCRIBE_{name.upper()}", "--" + name.replace("_", "-")
    with pytest.raises(SettingsError) as refused:
        if from_env:
            Settings.load({variable: value})
        else:
            Settings.load({}, {name: value})
    text = str(refused.value)
    assert text.startswith(variable if from_env else flag) and message in text
    assert "secret" not in text and len(text.splitlines()) == 1


@pytest.mark.parametrize(("name", "value"), [
    ("redis_url", "redis://127.0.0.1:6379/0"), ("redis_url", "rediss://u:p@cache:6380/1"),
    ("redis_url", "redis://[::1]:6379"), ("redis_url", "unix:///run/redis/redis.sock"),
    ("redis_url", "REDIS://cache"), ("database_url", "postgres://db"),
    ("database_url", "postgresql://coscribe@/coscribe?host=/var/run/postgresql"),
    ("database_url", "postgresql://u:p@[::1]:5432/x?sslmode=require"),
    ("database_url", "postgresql://h1,h2:5432/x"),
    ("database_url", "postgresql://h1,h2/x?port=5432,5433"),
    ("redis_url", "redis://h/0?socket_timeout=2"),
])
def test_well_formed_urls_load(name: str, value: str) -> None:
    """Sockets, TLS, IPv6, passwords, libpq's query parameters and host lists still load."""
    assert getattr(Settings.load({}, {name: value}), name) == value


SHOW = ["audit", "show", "00000000-0000-0000-0000-000000000001"]


@pytest.mark.parametrize("command", [["serve"], ["token", "alice"], ["replay", "--quiet"],
                                     ["projections", "run"], ["audit", "verify"], SHOW])
@pytest.mark.parametrize(("variable", "value"), [
    ("COSCRIBE_REDIS_URL", "redis://h:abc"),
    ("COSCRIBE_DATABASE_URL", "postgresql://127.0.0.1:99999/x"),
])
def test_every_command_exits_2_on_a_malformed_url_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    command: list[str], variable: str, value: str
) -> None:
    """A malformed ``COSCRIBE_*_URL`` is one line and exit 2 before anything is opened or
    made, in every command that reads the settings (it was a traceback and exit 1)."""
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("COSCRIBE_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert variable in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv", [
    ["serve", "--redis-url", "redis://:99999"], ["serve", "--database-url", "postgresql:foo"],
    ["projections", "run", "--redis-url", "redis:x"],
    ["projections", "run", "--database-url", "postgresql://127.0.0.1:99999/x"],
    ["replay", "--quiet", "--database-url", "postgresql://127.0.0.1:99999/x"],
    ["audit", "verify", "--database-url", "postgresql:foo"],
    [*SHOW, "--database-url", "postgres://h:abc/x"],
])
def test_every_command_exits_2_on_a_malformed_url_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    argv: list[str]
) -> None:
    """``--redis-url redis://:99999`` and the like: one line naming the flag, exit 2."""
    for name in ("DATABASE_URL", "DATABASE_SCHEMA", "REDIS_URL"):
        monkeypatch.delenv(f"COSCRIBE_{name}", raising=False)
    assert cli.main([*argv, "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert argv[-2] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [(["serve", "--port", "abc"], "coscribe serve: error: argument --port: invalid int value"),
     (["loadtest", "--procs", "x"], "coscribe loadtest: error: argument --procs"),
     (["audit", "show"], "coscribe audit show: error: the following arguments are required: doc")],
)
def test_a_bad_flag_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """argparse printed ten lines of ``serve``'s usage before the error; now the error is one
    line, with where the flags are listed."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "--help" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("argv", "says"), [([], "required: command"),
                                            (["serve", "--bogus"], "unrecognized arguments")])
def test_a_top_level_error_shows_the_commands(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """``coscribe`` alone, or a flag no command has: the one-line usage (the commands), then
    the error."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: coscribe") and "serve" in err[0] and len(err) == 2
    assert says in err[1]


def test_a_token_expires_after_a_day_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``coscribe token USER`` printed a token valid for ever; now for a day unless --ttl."""
    from gateway.auth import verify_token

    assert cli.main(["token", "alice", "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    secret = Settings(data_dir=tmp_path).secret_bytes()
    assert verify_token(secret, token) == "alice"
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["exp"] - payload["iat"] == cli.DEFAULT_TTL_SECONDS


@pytest.mark.parametrize(("value", "says"), [("", "is empty"), ("  \t", "is only whitespace")])
def test_an_empty_or_blank_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    value: str, says: str,
) -> None:
    """``COSCRIBE_SECRET=`` fell back to this machine's own secret file (so tokens from the
    other machines failed), and ``COSCRIBE_SECRET='   '`` was a key anyone could guess."""
    monkeypatch.setenv("COSCRIBE_SECRET", value)
    assert cli.main(["token", "alice", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"COSCRIBE_SECRET {says}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "secret").exists()


def test_a_weak_secret_is_warned_about(tmp_path: Path) -> None:
    """A short ``COSCRIBE_SECRET``, or a secret file others may read, gets a warning at start."""
    assert "COSCRIBE_SECRET (or --secret) has 5 characters" in str(
        Settings(secret="short").secret_warning())
    assert Settings(secret="x" * 32).secret_warning() is None
    settings = Settings(data_dir=tmp_path)
    settings.secret_bytes()
    assert settings.secret_warning() is None  # made 0600
    (tmp_path / "secret").chmod(0o644)
    assert "mode 0644" in str(settings.secret_warning())
    (tmp_path / "secret").write_text("abc\n")  # written by hand
    (tmp_path / "secret").chmod(0o600)
    assert f"{tmp_path / 'secret'} has 3 characters" in str(settings.secret_warning())
