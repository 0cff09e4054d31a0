"""A live MLflow server on a free loopback port for slow tests: start, wait for /health, stop by process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody listens on (right now): a dead tracking URI, or a port for a server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def start(cmd: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (process group), stderr to ``log``."""
    return subprocess.Popen(cmd, cwd=cwd, env=env or clean_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)


def wait_healthy(server: subprocess.Popen, base: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (gunicorn/uvicorn workers included), SIGKILL after 30 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
