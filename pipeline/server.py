"""``python -m pipeline.server``: a shared MLflow tracking server for a team (one command).

    python -m pipeline.server --backend-store-uri sqlite:///mlflow-server.db \\
        --artifacts-destination ./mlartifacts --host 127.0.0.1 --port 5000

then, on every machine that runs stages::

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # or http://<server-host>:5000
    python -m pipeline.run

This execs ``mlflow server`` (the process *becomes* the server, so stopping it is a SIGTERM to
this PID, or to its process group) with light settings:
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (no huey job workers), ``--workers 1`` and
``--serve-artifacts``: clients upload adapters and summaries through the server's HTTP
``mlflow-artifacts:`` proxy, so they need no access to the artifact folder (or bucket) itself.
Runs, params and metrics go to ``--backend-store-uri`` (a sqlite file for one host; a
PostgreSQL/MySQL URI for a real deployment). Binding to ``0.0.0.0`` exposes an unauthenticated
server to the network: put it behind a VPN / reverse proxy with auth (or ``--app-name basic-auth``
in extra arguments) before doing that.

Extra arguments after ``--`` go to ``mlflow server`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def server_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``mlflow server`` argv for ``args`` (a pure function, tested without starting anything)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    head = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *head,
        "server",
        "--backend-store-uri",
        args.backend_store_uri,
        "--artifacts-destination",
        args.artifacts_destination,
        "--serve-artifacts",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
        *extra,
    ]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--backend-store-uri", default="sqlite:///mlflow-server.db", help="where runs/params/metrics live (default: %(default)s)"
    )
    ap.add_argument(
        "--artifacts-destination",
        default="./mlartifacts",
        help="where served artifacts are stored (folder or s3://..., default: %(default)s)",
    )
    ap.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s; 0.0.0.0 = every interface, unauthenticated)"
    )
    ap.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    return ap.parse_args(argv), extra


def main(argv: list[str] | None = None) -> None:
    args, extra = parse(argv)
    cmd = server_command(args, extra)
    print(
        f"MLflow tracking server on http://{args.host}:{args.port} (stages: export MLFLOW_TRACKING_URI=http://{args.host}:{args.port})",
        file=sys.stderr,
        flush=True,
    )
    os.execvpe(cmd[0], cmd, server_env())


if __name__ == "__main__":
    main()
