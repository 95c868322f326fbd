"""The ``backfilld`` command line against a real daemon process and the simulated network (SPEC 8)."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.cli.client import AdminClient, AdminEndpoint, AdminToken, admin_endpoint, read_admin_token
from daemon.cli.main import build_parser, main
from daemon.cli.progress import ProgressDisplay
from daemon.cli.runs import wait_for_run
from daemon.config import load_config
from daemon.errors import BackfillError
from daemon.simnet import DaemonLimits, account_rev, demo_spec, expected_records, expected_values
from tests.daemonproc import ROOT, TOKEN, DaemonProcess, free_port, write_config
from tests.simnetproc import SimnetProcess

COLLECTIONS = ("com.example.record", "com.example.other")
SPEC = demo_spec(COLLECTIONS)
HEALTHY = [a.did for a in SPEC.accounts if a.behaviour is None and all(a.records.values())]
PLC_404 = next(a.did for a in SPEC.accounts if a.behaviour == "plc_404")
PAGE_SIZE = 50
COMMANDS = ("run", "backfill", "status", "jobs", "retry", "records", "check-config", "demo")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BACKFILLD_ADMIN_TOKEN", "BACKFILLD_CONFIG")}
    return {**env, **extra}


def cli(
    *args: str, config: Path | None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m daemon <args> [--config <config>]`` and capture its output."""
    command = [sys.executable, "-m", "daemon", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        command, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def simnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimnetProcess]:
    net = SimnetProcess(
        tmp_path_factory.mktemp("simnet"), ["--demo", f"--collections={','.join(COLLECTIONS)}"]
    )
    yield net
    net.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, simnet: SimnetProcess) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(
        tmp_path_factory.mktemp("cli"),
        {
            "atproto": {
                "relay": simnet.info["relay_url"],
                "plc_directory": simnet.info["plc_url"],
                "collections": list(COLLECTIONS),
            },
            "limits": {"page_size": PAGE_SIZE, "page_timeout": 5.0},
            "retry": {"backoff_base": 0.05, "backoff_cap": 0.5},
            "network": {"per_host_rate": 0.0, "rate_limit_pause": 1.0},
        },
    ).start()
    yield proc
    proc.stop()


def records_of(dids: list[str]) -> int:
    return len(expected_records(SPEC, limits=DaemonLimits(page_size=PAGE_SIZE), dids=dids))


def started_run_id(stdout: str) -> int:
    match = re.search(r"^run (\d+) started", stdout, re.M)
    assert match, stdout
    return int(match.group(1))


# -- the parser ---------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_takes_config(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config PATH" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "--limit", "0"],
        ["jobs", "--state", "bogus"],
        ["jobs", "--run", "x"],
        ["retry"],
        ["retry", "--failed", "3"],
        ["retry", "--run", "1", "5"],
        ["records", "--after", "-1"],
        ["records", "--interval", "0"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Usage is checked before anything is contacted, so no daemon is needed (the config does not exist).
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--config", str(tmp_path / "none.toml")])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_usage_error_exit_2_as_a_process() -> None:
    result = cli("jobs", "--limit", "zero", config=None)
    assert result.returncode == 2 and "usage: backfilld jobs" in result.stderr


def test_json_is_offered_by_every_client_command() -> None:
    parser = build_parser()
    for command in ("backfill", "status", "jobs", "retry", "records", "check-config", "demo"):
        assert parser.parse_args([command, "--json", *(["--failed"] if command == "retry" else [])]).json


# -- the client, against canned answers ---------------------------------------------------------------


def canned(status: int, body: bytes, content_type: str = "application/json") -> AdminClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"Content-Type": content_type})

    endpoint = AdminEndpoint("http://127.0.0.1:9", None, "127.0.0.1:9")
    return AdminClient(
        endpoint, AdminToken("t", "/etc/backfilld/admin.token"), transport=httpx.MockTransport(handler)
    )


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (
            401,
            b'{"error":"Unauthorized","message":"unauthorized"}',
            "Unauthorized",
            "the daemon at 127.0.0.1:9 rejected the admin token (401 Unauthorized); "
            "the token was taken from /etc/backfilld/admin.token",
        ),
        (
            503,
            b'{"error":"AdminNotConfigured","message":"admin endpoints not configured"}',
            "AdminNotConfigured",
            "the daemon at 127.0.0.1:9 has its admin API disabled (503 AdminNotConfigured): "
            "give it an admin.token_file or $BACKFILLD_ADMIN_TOKEN and restart it",
        ),
        (
            400,
            b'{"error":"InvalidRequest","message":"invalid DID in list: 5"}',
            "InvalidRequest",
            "the daemon refused the request: invalid DID in list: 5",
        ),
        (
            404,
            b'{"error":"RunNotFound","message":"no run with id 9"}',
            "RunNotFound",
            "the admin API at 127.0.0.1:9 answered 404 RunNotFound: no run with id 9",
        ),
        (
            502,
            b"<html>bad gateway</html>",
            "HTTP502",
            "the admin API at 127.0.0.1:9 answered 502 HTTP502: no error message",
        ),
        (
            200,
            b"[1, 2]",
            "admin_bad_response",
            "the admin API at 127.0.0.1:9 answered /_admin/status with something that is not a JSON object",
        ),
    ],
)
def test_client_errors_are_one_clear_message(status: int, body: bytes, code: str, message: str) -> None:
    with canned(status, body) as client, pytest.raises(BackfillError) as error:
        client.status()
    assert error.value.code == code and error.value.message == message
    assert "\n" not in error.value.message


def test_client_unreachable_names_the_address() -> None:
    port = free_port()
    with AdminClient(admin_endpoint(f"127.0.0.1:{port}"), AdminToken("t", "x")) as client:
        with pytest.raises(BackfillError) as error:
            client.status()
    assert error.value.code == "admin_unreachable"
    assert f"127.0.0.1:{port}" in error.value.message and "is backfilld running?" in error.value.message


@pytest.mark.parametrize(
    ("listen", "base_url", "uds"),
    [
        ("127.0.0.1:8470", "http://127.0.0.1:8470", None),
        ("0.0.0.0:8470", "http://127.0.0.1:8470", None),
        ("[::]:8470", "http://[::1]:8470", None),
        ("[::1]:8470", "http://[::1]:8470", None),
        ("localhost:1", "http://localhost:1", None),
        ("unix:/run/backfilld/admin.sock", "http://backfilld", "/run/backfilld/admin.sock"),
    ],
)
def test_admin_endpoint(listen: str, base_url: str, uds: str | None) -> None:
    endpoint = admin_endpoint(listen)
    assert (endpoint.base_url, endpoint.uds) == (base_url, uds)


def test_token_comes_from_env_then_file_and_is_never_created(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    assert read_admin_token(token_file, {"BACKFILLD_ADMIN_TOKEN": " env "}).value == "env"
    with pytest.raises(BackfillError) as error:
        read_admin_token(token_file, {})
    assert error.value.code == "admin_token_missing" and str(token_file) in error.value.message
    assert not token_file.exists()
    token_file.write_text("from-file\n")
    assert read_admin_token(token_file, {}) == AdminToken("from-file", str(token_file))
    assert read_admin_token(None, {}).value is None


def test_wait_keeps_polling_through_a_restart() -> None:
    answers = iter(
        ["down", "down", {"run_id": 4, "state": "running"}, "down", {"run_id": 4, "state": "finished"}]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if answer == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=answer)

    client = AdminClient(
        AdminEndpoint("http://127.0.0.1:9", None, "127.0.0.1:9"),
        AdminToken("t", "x"),
        transport=httpx.MockTransport(handler),
    )
    now = [1000.0]
    out = io.StringIO()
    run = wait_for_run(
        client, 4, ProgressDisplay(out), clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    assert run["state"] == "finished"
    notes = [line for line in out.getvalue().splitlines() if "still trying" in line]
    assert len(notes) == 2 and notes[0].startswith(
        "cannot reach the admin API at 127.0.0.1:9 (connection refused)"
    )


def test_wait_gives_up_after_a_minute_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = AdminClient(
        AdminEndpoint("http://127.0.0.1:9", None, "127.0.0.1:9"),
        AdminToken("t", "x"),
        transport=httpx.MockTransport(handler),
    )
    now = [0.0]
    with pytest.raises(BackfillError) as error:
        wait_for_run(
            client,
            4,
            ProgressDisplay(io.StringIO()),
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
    assert error.value.code == "admin_unreachable" and 60.0 < now[0] < 62.0


# -- commands against the daemon ----------------------------------------------------------------------


def test_backfill_wait_exits_0_when_nothing_failed(daemon: DaemonProcess) -> None:
    dids = HEALTHY[:2]
    result = cli("backfill", "--did", dids[0], "--did", dids[1], "--wait", config=daemon.config)
    assert result.returncode == 0, result.stderr
    run_id = started_run_id(result.stdout)
    assert f"run {run_id} started (explicit mode, 2 DIDs x 2 collections): 4 jobs queued" in result.stdout
    total = daemon.call("GET", f"/_admin/runs/{run_id}").json()["records_enqueued"]
    assert total == records_of(dids)
    assert re.search(
        rf"^run {run_id} finished after \S+: 4 done, 0 failed, 0 cancelled of 4 jobs; {total:,} records "
        r"enqueued from 2 DIDs$",
        result.stdout,
        re.M,
    ), result.stdout
    # Not a terminal: plain lines, no carriage returns.
    assert "\r" not in result.stdout


def test_backfill_wait_json(daemon: DaemonProcess, tmp_path: Path) -> None:
    dids_file = tmp_path / "dids.txt"
    dids_file.write_text(f"# two accounts\n{HEALTHY[2]}\n\n  {HEALTHY[3]}  # trailing comment\n")
    result = cli(
        "backfill",
        "--dids-file",
        str(dids_file),
        "--collection",
        COLLECTIONS[0],
        "--wait",
        "--json",
        config=daemon.config,
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "finished" and run["mode"] == "explicit" and run["collections"] == [COLLECTIONS[0]]
    assert run["jobs"]["done"] == 2 and run["dids"] == 2
    expected = len(
        expected_records(
            SPEC, limits=DaemonLimits(page_size=PAGE_SIZE), dids=HEALTHY[2:4], collections=COLLECTIONS[:1]
        )
    )
    assert run["records_enqueued"] == expected
    assert "started (explicit mode, 2 DIDs x 1 collection)" in result.stderr


def test_backfill_wait_exits_1_when_a_job_failed(daemon: DaemonProcess) -> None:
    result = cli("backfill", "--did", PLC_404, "--wait", config=daemon.config)
    assert result.returncode == 1, result.stdout + result.stderr
    run_id = started_run_id(result.stdout)
    assert "2 jobs failed (did_not_found 2)" in result.stdout
    assert f"backfilld jobs --state failed --run {run_id} --config {daemon.config}" in result.stdout
    assert f"backfilld retry --failed --run {run_id}" in result.stdout

    table = cli("jobs", "--state", "failed", "--run", str(run_id), config=daemon.config)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "RUN",
        "KIND",
        "STATE",
        "TRIES",
        "RECORDS",
        "DID",
        "COLLECTION",
        "UPDATED",
        "ERROR",
    ]
    rows = [line for line in lines[1:] if PLC_404 in line]
    assert len(rows) == 2 and all("failed" in row and "did_not_found:" in row for row in rows)
    assert {row.split()[7] for row in rows} == set(COLLECTIONS)
    assert lines[-1] == "failed by error code: did_not_found 2"

    listed = cli("jobs", "--state", "failed", "--run", str(run_id), "--json", config=daemon.config)
    jobs = json.loads(listed.stdout)["jobs"]
    assert {(j["did"], j["collection"], j["state"], j["error_code"]) for j in jobs} == {
        (PLC_404, c, "failed", "did_not_found") for c in COLLECTIONS
    }

    limited = cli("jobs", "--run", str(run_id), "--limit", "1", "--json", config=daemon.config)
    page = json.loads(limited.stdout)
    assert len(page["jobs"]) == 1 and page["cursor"] == page["jobs"][0]["id"]
    assert "more match" in cli("jobs", "--run", str(run_id), "--limit", "1", config=daemon.config).stdout

    # Redrive: back to pending with attempts reset; with PLC still answering 404 they fail again.
    retried = cli("retry", "--failed", "--run", str(run_id), config=daemon.config)
    assert retried.returncode == 0 and retried.stdout.strip() == "requeued 2 jobs"
    run = daemon.wait_run_finished(run_id)
    assert run["jobs"]["failed"] == 2
    one = cli("retry", str(jobs[0]["id"]), "--json", config=daemon.config)
    assert json.loads(one.stdout) == {"requeued": 1}
    daemon.wait_run_finished(run_id)
    again = cli("retry", str(jobs[0]["id"]), str(jobs[1]["id"]), config=daemon.config)
    assert again.stdout.startswith("requeued 2 jobs")


def test_backfill_without_wait(daemon: DaemonProcess) -> None:
    result = cli("backfill", "--did", HEALTHY[4], config=daemon.config)
    assert result.returncode == 0, result.stderr
    run_id = started_run_id(result.stdout)
    assert f"backfilld status --run {run_id}" in result.stdout
    as_json = cli("backfill", "--did", HEALTHY[5], "--json", config=daemon.config)
    started = json.loads(as_json.stdout)
    assert started["mode"] == "explicit" and started["dids"] == 1 and started["jobs_enqueued"] == 2
    for rid in (run_id, started["run_id"]):
        daemon.wait_run_finished(rid)


def test_status_table_and_json(daemon: DaemonProcess) -> None:
    status = json.loads(cli("status", "--json", config=daemon.config).stdout)
    assert status["workers"]["total"] == 4 and set(status["jobs"]) >= {"done", "failed"}
    table = cli("status", config=daemon.config)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"backfilld {status['version']} at 127.0.0.1:{daemon.port}, up ")
    assert re.search(r"^  workers        \d+ busy of 4$", table.stdout, re.M)
    assert re.search(r"^  records queue  [\d,]+ waiting", table.stdout, re.M)
    jobs = r"^  jobs           pending \d+, running \d+, done [\d,]+, failed [\d,]+, cancelled [\d,]+$"
    assert re.search(jobs, table.stdout, re.M)


def test_status_of_one_run(daemon: DaemonProcess) -> None:
    started = daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[6]]}).json()
    run = daemon.wait_run_finished(started["run_id"])
    table = cli("status", "--run", str(run["run_id"]), config=daemon.config)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"run {run['run_id']} (explicit mode): finished\n")
    assert f"{run['records_enqueued']:,} enqueued from 1 DID\n" in table.stdout
    assert (
        json.loads(cli("status", "--run", str(run["run_id"]), "--json", config=daemon.config).stdout) == run
    )
    missing = cli("status", "--run", "999999", config=daemon.config)
    assert missing.returncode == 1
    assert one_line(missing.stderr) == (
        f"backfilld: the admin API at 127.0.0.1:{daemon.port} answered 404 RunNotFound: no run with id 999999"
    )


def test_discover_run_with_progress_lines(daemon: DaemonProcess) -> None:
    result = cli("backfill", "--collection", COLLECTIONS[1], "--wait", config=daemon.config)
    # The demo network's hostile accounts fail some jobs.
    assert result.returncode == 1
    assert "started (discover mode, 1 collection): 1 job queued" in result.stdout
    assert re.search(r"^run \d+ (discovering|running): .* finished \(", result.stdout, re.M), result.stdout
    assert "3 jobs failed (did_not_found 1, no_pds_service 1, repo_takendown 1)" in result.stdout


def test_records_json_lines_and_ack(daemon: DaemonProcess) -> None:
    started = daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[7]]}).json()
    daemon.wait_run_finished(started["run_id"])
    peek = cli("records", "--limit", "5", config=daemon.config)
    assert peek.returncode == 0, peek.stderr
    lines = [json.loads(line) for line in peek.stdout.splitlines()]
    assert len(lines) == 5
    assert set(lines[0]) == {
        "id",
        "did",
        "collection",
        "rkey",
        "operation",
        "cid",
        "record",
        "rev",
        "verified",
        "source",
        "run_id",
    }
    # the daemon's default mode is verified: each line carries the proven value and its commit's rev
    # (the queue holds the records of this module's earlier runs too)
    values = expected_values(SPEC, limits=DaemonLimits(page_size=PAGE_SIZE), collections=COLLECTIONS)
    for line in lines:
        assert (line["cid"], line["record"]) == values[(line["did"], line["collection"], line["rkey"])]
        assert (line["rev"], line["verified"]) == (account_rev(SPEC, line["did"]), True)
        assert (line["operation"], line["source"]) == ("create", "backfill")
    assert [r["id"] for r in lines] == sorted(r["id"] for r in lines)
    after = cli("records", "--after", str(lines[1]["id"]), "--limit", "2", config=daemon.config)
    assert [json.loads(line)["id"] for line in after.stdout.splitlines()] == [lines[2]["id"], lines[3]["id"]]

    depth = daemon.call("GET", "/_admin/status").json()["records_queue"]["depth"]
    acked = cli("records", "--ack", "--limit", "3", config=daemon.config)
    assert [json.loads(line)["id"] for line in acked.stdout.splitlines()] == [r["id"] for r in lines[:3]]
    assert daemon.call("GET", "/_admin/status").json()["records_queue"]["depth"] == depth - 3
    first = json.loads(cli("records", "--limit", "1", config=daemon.config).stdout)
    assert first["id"] == lines[3]["id"]

    everything = cli("records", config=daemon.config)
    assert len(everything.stdout.splitlines()) == depth - 3


def follow(daemon: DaemonProcess, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """``records --follow`` in a child process, its stdout lines collected by a thread (so reads can time out)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "records", "--follow", "--interval", "0.1", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def test_records_follow_prints_new_records_until_sigterm(daemon: DaemonProcess) -> None:
    last = max((r["id"] for r in daemon.all_records()), default=0)
    proc, lines = follow(daemon, "--after", str(last), "--config", str(daemon.config))
    try:
        started = daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[8]]}).json()
        run = daemon.wait_run_finished(started["run_id"])
        assert run["records_enqueued"] > 0
        got = [json.loads(lines.get(timeout=30)) for _ in range(run["records_enqueued"])]
        assert {r["did"] for r in got} == {HEALTHY[8]} and all(r["id"] > last for r in got)
        assert [r["id"] for r in got] == sorted(r["id"] for r in got)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert lines.empty()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_records_follow_rides_out_a_daemon_restart(daemon: DaemonProcess) -> None:
    if not daemon.all_records():
        daemon.wait_run_finished(
            daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[11]]}).json()["run_id"]
        )
    last = daemon.all_records()[-1]["id"]
    proc, lines = follow(daemon, "--after", str(last - 1), "--config", str(daemon.config))
    try:
        # Only a daemon that answered once is waited for: see the follower get the last record first.
        assert json.loads(lines.get(timeout=30))["id"] == last
        daemon.stop()
        time.sleep(0.5)  # let the follower find the daemon gone at least once
        daemon.start()
        started = daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[10]]}).json()
        run = daemon.wait_run_finished(started["run_id"])
        assert run["records_enqueued"] > 0
        got = [json.loads(lines.get(timeout=30)) for _ in range(run["records_enqueued"])]
        assert {r["did"] for r in got} == {HEALTHY[10]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        note = one_line(proc.stderr.read())
        assert note.startswith(f"backfilld: cannot reach the admin API at 127.0.0.1:{daemon.port} (")
        assert note.endswith("; is backfilld running?; still trying for 60s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_records_follow_stops_on_sigint(daemon: DaemonProcess) -> None:
    started = daemon.call("POST", "/_admin/backfill", json={"dids": [HEALTHY[9]]}).json()
    daemon.wait_run_finished(started["run_id"])
    proc, lines = follow(daemon, "--limit", "1000000", "--config", str(daemon.config))
    try:
        json.loads(lines.get(timeout=30))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_records_ack_stops_when_the_reader_goes_away(daemon: DaemonProcess) -> None:
    # A page bigger than the pipe's buffer, so that the writer is still writing when the reader closes.
    if daemon.call("GET", "/_admin/status").json()["records_queue"]["depth"] <= 1000:
        daemon.wait_run_finished(daemon.call("POST", "/_admin/backfill", content=b"").json()["run_id"])
    depth = daemon.call("GET", "/_admin/status").json()["records_queue"]["depth"]
    assert depth > 1000
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "records", "--ack", "--config", str(daemon.config)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    json.loads(proc.stdout.readline())
    proc.stdout.close()
    assert proc.wait(30) == 1
    assert one_line(proc.stderr.read()) == (
        "backfilld: output closed; records after id 0 were not acknowledged"
    )
    assert daemon.call("GET", "/_admin/status").json()["records_queue"]["depth"] == depth


def test_check_config(daemon: DaemonProcess) -> None:
    table = cli("check-config", config=daemon.config)
    assert table.returncode == 0 and table.stdout.startswith(f"{daemon.config}: OK\n")
    assert "  limits.page_size = 50" in table.stdout
    settings = json.loads(cli("check-config", "--json", config=daemon.config).stdout)
    assert settings["limits"]["page_size"] == 50 and settings["atproto"]["collections"] == list(COLLECTIONS)
    assert settings["admin"]["listen"] == f"127.0.0.1:{daemon.port}"


# -- error paths ---------------------------------------------------------------------------------------


def test_wrong_token_is_one_line_and_exit_1(daemon: DaemonProcess) -> None:
    result = cli("status", config=daemon.config, env=cli_env(BACKFILLD_ADMIN_TOKEN="wrong"))
    assert result.returncode == 1 and result.stdout == ""
    assert one_line(result.stderr) == (
        f"backfilld: the daemon at 127.0.0.1:{daemon.port} rejected the admin token (401 Unauthorized); "
        "the token was taken from $BACKFILLD_ADMIN_TOKEN"
    )


def test_right_token_from_the_environment(daemon: DaemonProcess) -> None:
    result = cli("status", "--json", config=daemon.config, env=cli_env(BACKFILLD_ADMIN_TOKEN=TOKEN))
    assert result.returncode == 0


def test_validation_message_from_the_daemon(daemon: DaemonProcess) -> None:
    result = cli("backfill", "--did", "not-a-did", config=daemon.config)
    assert result.returncode == 1
    assert (
        one_line(result.stderr)
        == 'backfilld: the daemon refused the request: invalid DID in list: "not-a-did"'
    )
    other = cli("backfill", "--collection", "com.example.nope", "--wait", config=daemon.config)
    assert other.returncode == 1
    assert one_line(other.stderr) == (
        'backfilld: the daemon refused the request: collection not configured: "com.example.nope"'
    )


def test_daemon_not_running(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "config.toml", {"admin": {"listen": f"127.0.0.1:{port}"}})
    (tmp_path / "admin.token").write_text("x\n")
    for command in (
        ["status"],
        ["jobs"],
        ["backfill", "--wait"],
        ["records", "--follow"],
        ["retry", "--failed"],
    ):
        result = cli(*command, config=config)
        assert result.returncode == 1, command
        line = one_line(result.stderr)
        assert line.startswith(f"backfilld: cannot reach the admin API at 127.0.0.1:{port} (")
        assert line.endswith("); is backfilld running?")


def test_missing_token_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"admin": {"listen": f"127.0.0.1:{free_port()}"}})
    result = cli("status", config=config)
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"backfilld: no admin token: $BACKFILLD_ADMIN_TOKEN is not set and {tmp_path / 'admin.token'} does not "
        "exist (the daemon creates it at its first start)"
    )
    assert not (tmp_path / "admin.token").exists()


def test_invalid_config_is_reported(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"daemon": {"workers": 0}})
    result = cli("status", config=config)
    assert result.returncode == 1 and "daemon.workers" in result.stderr


def test_unix_socket_admin(tmp_path: Path) -> None:
    socket_path = tmp_path / "admin.sock"
    proc = DaemonProcess(tmp_path, {"admin": {"listen": f"unix:{socket_path}"}})
    proc.start(wait=False)
    try:
        config = load_config(proc.config)
        deadline = time.monotonic() + 30
        while True:
            try:
                with AdminClient.from_config(config, environ={}) as client:
                    client.status()
                break
            except BackfillError:
                assert time.monotonic() < deadline, proc.logs()
                time.sleep(0.05)
        result = cli("status", "--json", config=proc.config)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["workers"]["total"] == 4
        table = cli("status", config=proc.config)
        assert f"at unix:{socket_path}," in table.stdout
    finally:
        proc.stop()
