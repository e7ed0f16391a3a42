"""The ``coscribe loadtest`` subcommand: arguments, secrets, output. The CLI calls :func:`register`.

Exit status: 0 when the run completed, whatever the figures say (thresholds missed are in
the report); 1 when the run itself failed (server unreachable, setup refused, a load process
died: the report, if asked for, then has the steps that finished before, and ``failed``);
2 for bad arguments or a bad scenario file; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape

from ops.loadtest.scenario import ScenarioError, load

SCENARIOS = Path(__file__).parent / "scenarios"
"""The scenarios shipped with coscribe; ``coscribe loadtest standard`` finds them by name."""
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_PROCS = 64
"""Most load processes: more on one machine would measure the machine, not the server."""


def register(subparsers: Any) -> None:
    """Add ``loadtest`` to an argparse subparsers object; its ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "loadtest",
        help="drive a running server with simulated collaborators and report latency and cost",
        description=(
            "Run a load-test scenario against a coscribe server on this machine: WebSocket "
            "editors with client-side OT, light observers, presence and HTTP reads, in "
            "several processes. Prints live progress and a summary; --json writes the report."
        ),
    )
    p.add_argument(
        "scenario",
        metavar="SCENARIO.toml",
        help="a scenario file, or the name of a shipped one (" + ", ".join(shipped()) + ")",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server (loopback only; {DEFAULT_URL})")
    p.add_argument("--json", dest="json_out", type=Path, metavar="OUT", help="write the report")
    p.add_argument(
        "--procs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help=f"load processes, 1 to {MAX_PROCS} (default: 2, or 1 on one core)",
    )
    p.add_argument(
        "--server-pid",
        dest="server_pids",
        type=int,
        nargs="+",
        action="extend",
        default=[],
        metavar="PID",
        help="gateway processes to measure (default: the ones listening on the URL's port)",
    )
    p.add_argument("--plot", type=Path, metavar="out.png", help="latency over time + histogram")
    p.add_argument(
        "--secret",
        default=None,
        help="token signing secret (default: $COSCRIBE_SECRET, else <data-dir>/secret)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the server's data directory, for its secret (default: $COSCRIBE_DATA_DIR or ./data)",
    )
    p.set_defaults(func=run)


def shipped() -> list[str]:
    """Names of the shipped scenarios."""
    return sorted(p.stem for p in SCENARIOS.glob("*.toml"))


def resolve_scenario(name: str) -> Path:
    """A path as given if it exists, else the shipped scenario of that name."""
    p = Path(name)
    if p.exists() or p.suffix == ".toml":
        return p
    return SCENARIOS / f"{name}.toml"


def resolve_secret(secret: str | None, data_dir: Path | None) -> bytes:
    """``--secret``, else ``$COSCRIBE_SECRET``, else the embedded server's ``<data-dir>/secret``.

    Read through the server's own settings, so the loadtest signs exactly as ``coscribe
    token`` does. Unlike the server it never creates a secret: one the server does not know
    would only get every session refused. Raises ``ValueError`` when there is none.
    """
    from ops.settings import DataDirUnusable, Settings

    settings = Settings.load(overrides={"secret": secret, "data_dir": data_dir})
    path = settings.data_dir / "secret"
    if not settings.secret and not path.is_file():
        raise ValueError(
            "no secret to sign tokens with: pass --secret, set COSCRIBE_SECRET, or point "
            f"--data-dir at the server's data directory (no {path})"
        )
    try:
        return settings.secret_bytes()
    except DataDirUnusable as exc:  # an empty or unreadable secret file
        raise ValueError(str(exc)) from None


PLOT_SUFFIXES = (".png", ".svg", ".pdf")
"""The formats ``--plot`` writes, by the file's name."""


def output_problem(path: Path) -> str | None:
    """Why a report could not be written to ``path`` (None: it could), asked before a run."""
    if path.is_dir():
        return "is a directory"
    if path.exists() and not os.access(path, os.W_OK):
        return "not writable"
    if not os.access(path.parent.resolve(), os.W_OK):
        return f"cannot write in {path.parent.resolve()}"
    return None


def check_output_path(flag: str, path: Path) -> None:
    """Refuse, before the run, an output path the report could not be written to."""
    why = output_problem(path)
    if why is not None:
        raise ValueError(f"{flag} {path}: {why}")


def run(args: argparse.Namespace) -> int:
    """Run the scenario named by ``args``; return the exit status (see the module doc)."""
    from ops.loadtest.progress import Progress
    from ops.loadtest.report import notes, summary_table
    from ops.loadtest.runner import RunFailed, Runner, RunOptions, check_url

    out = Console()
    err = Console(stderr=True)
    try:
        scenario = load(resolve_scenario(args.scenario))
        url = check_url(args.url)
        secret = resolve_secret(args.secret, args.data_dir)
        if not 1 <= args.procs <= MAX_PROCS:
            raise ValueError(f"--procs must be in 1..{MAX_PROCS}")
        for pid in args.server_pids:
            if not Path(f"/proc/{pid}").is_dir():
                raise ValueError(f"--server-pid {pid}: no such process")
        if args.plot is not None:
            check_matplotlib()
        for flag, path in (("--json", args.json_out), ("--plot", args.plot)):
            if path is not None:
                check_output_path(flag, path)
        if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
            raise ValueError(
                f"--plot {args.plot}: the name must end in {', '.join(PLOT_SUFFIXES)}"
            )
    except (ScenarioError, ValueError) as exc:
        err.print(f"[red]coscribe loadtest:[/red] {escape(str(exc))}", highlight=False)
        return 2
    options = RunOptions(
        url=url, procs=args.procs, secret=secret, server_pids=tuple(args.server_pids)
    )
    progress = Progress(err, scenario.name)
    runner = Runner(scenario, options, progress)
    failed: str | None = None
    try:
        with progress:
            report = asyncio.run(runner.run())
    except RunFailed as exc:
        failed = str(exc)
        err.print(f"[red]coscribe loadtest: run failed:[/red] {escape(failed)}", highlight=False)
        if not runner.outcomes:
            _remove_stale(err, args.json_out, args.plot)
            return 1
        # What the steps before the failure measured is still worth having.
        report = runner.report(failed=f"after step {len(runner.outcomes)}: {failed}")
    except KeyboardInterrupt:
        err.print("coscribe loadtest: interrupted")
        return 130
    out.print(summary_table(report))
    for line in notes(report):
        out.print(f"• {escape(line)}", highlight=False)
    if args.json_out is not None:
        try:
            args.json_out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            err.print(f"[red]coscribe loadtest:[/red] --json {escape(str(args.json_out))}: "
                      f"{escape(exc.strerror or str(exc))}", highlight=False)
            return 1
        out.print(f"report written to {args.json_out}")
    if args.plot is not None:
        from ops.loadtest.plot import PlotUnavailable, plot

        try:
            plot(runner.outcomes, args.plot, f"coscribe loadtest · {scenario.name}")
        except PlotUnavailable as exc:
            err.print(f"[red]coscribe loadtest:[/red] {escape(str(exc))}")
            return 1
        except OSError as exc:
            err.print(f"[red]coscribe loadtest:[/red] --plot {escape(str(args.plot))}: "
                      f"{escape(exc.strerror or str(exc))}", highlight=False)
            return 1
        out.print(f"plot written to {args.plot}")
    if failed is not None:
        return 1
    unjoined = [s["name"] for s in report["steps"] if _nobody_joined(s)]
    if unjoined:  # nothing was measured: the run itself failed
        err.print(f"[red]coscribe loadtest: run failed:[/red] no session joined in step "
                  f"{escape(', '.join(unjoined))} (see errors)", highlight=False)
        return 1
    return 0


def check_matplotlib() -> None:
    """Refuse ``--plot`` before the run when matplotlib cannot be imported (not installed,
    or broken): the run would be spent for a plot that cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except Exception as exc:  # ImportError, or a broken install's own error
        raise ValueError(
            "--plot needs matplotlib: pip install 'coscribe[plot]' (or pip install matplotlib)"
            f" ({type(exc).__name__}: {exc})"
        ) from None


def _remove_stale(err: Console, *paths: Path | None) -> None:
    """A run that wrote no report leaves nothing at its output paths: an older report there
    would pass for this run's."""
    for path in paths:
        if path is not None and path.is_file():
            try:
                path.unlink()
            except OSError:
                continue
            err.print(f"coscribe loadtest: no report written; removed the older {path}",
                      highlight=False)


def _nobody_joined(step: dict[str, Any]) -> bool:
    sessions = step.get("sessions") or {}
    return bool(sessions.get("planned")) and not sessions.get("joined")


def main(argv: list[str] | None = None) -> int:
    """``python -m ops.loadtest``: the subcommand on its own, until the main CLI has it."""
    from ops.cli import Parser

    parser = Parser(prog="coscribe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
