"""Drive the real ``backfilld run`` process: a temp config, a free port, HTTP calls, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class DaemonProcess:
    """One ``backfilld run`` child process with its own config, database and port."""

    def __init__(self, workdir: Path, overrides: dict[str, dict[str, object]] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        sections: dict[str, dict[str, object]] = {
            "daemon": {
                "database": "data/db.sqlite3",
                "workers": 4,
                "shutdown_grace": 5.0,
                "log_format": "json",
            },
            "admin": {"listen": f"127.0.0.1:{self.port}", "token_file": "admin.token"},
            "atproto": {"collections": ["com.example.record"]},
            "network": {"allow_private_addresses": True},
        }
        for section, values in (overrides or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config = write_config(workdir / "config.toml", sections)
        (workdir / "admin.token").write_text(TOKEN + "\n")
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> DaemonProcess:
        base_env = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "BACKFILLD_ADMIN_TOKEN")
        }
        env = {**base_env, **(env or {})}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if wait:
            self.wait_ready()
        return self

    def run_to_exit(
        self, *, timeout: float = 60.0, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run a daemon that is expected to exit by itself (a start-up failure), stdout and stderr apart.

        ``prefix`` goes before the command (``setpriv ...`` to run it as another user).
        """
        base_env = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "BACKFILLD_ADMIN_TOKEN")
        }
        return subprocess.run(
            [*prefix, sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**base_env, **(env or {})},
            check=False,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def call(self, method: str, path: str, *, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        return httpx.request(method, self.base + path, headers=headers, timeout=10.0, **kwargs)

    def wait_run_finished(self, run_id: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run: dict[str, Any] = self.call("GET", f"/_admin/runs/{run_id}").json()
            if run["state"] in ("finished", "cancelled"):
                return run
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} not finished: {run}\n{self.logs()[-4000:]}")

    def all_jobs(self, **params: Any) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.call("GET", "/_admin/jobs", params={**params, "after": after, "limit": 1000}).json()
            jobs.extend(page["jobs"])
            if page["cursor"] is None:
                return jobs
            after = page["cursor"]

    def all_records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.call("GET", "/_admin/records", params={"after": after, "limit": 1000}).json()
            if not page["records"]:
                return records
            records.extend(page["records"])
            after = page["cursor"]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
