"""The admin API's auth and error contract (SPEC 5), against the real daemon process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonproc import TOKEN, DaemonProcess

DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    # The relay points at a closed port so discover jobs fail fast; these tests look at the API only.
    proc = DaemonProcess(
        tmp_path_factory.mktemp("admin"),
        {
            "atproto": {
                "relay": "http://127.0.0.1:9",
                "plc_directory": "http://127.0.0.1:9",
                "collections": ["com.example.record", "com.example.other"],
            },
            "retry": {"max_attempts": 1},
        },
    ).start()
    yield proc
    proc.stop()


ADMIN_ROUTES = [
    ("GET", "/_admin/status"),
    ("GET", "/_admin/jobs"),
    ("POST", "/_admin/jobs/retry"),
    ("POST", "/_admin/backfill"),
    ("GET", "/_admin/runs"),
    ("GET", "/_admin/runs/1"),
    ("POST", "/_admin/runs/1/cancel"),
    ("GET", "/_admin/records"),
    ("POST", "/_admin/records/ack"),
    ("GET", "/_admin/publishers"),
]


def test_healthz_and_metrics_need_no_token(daemon: DaemonProcess) -> None:
    health = daemon.call("GET", "/healthz", token=None)
    assert health.status_code == 200 and health.json() == {"ok": True}
    metrics = daemon.call("GET", "/metrics", token=None)
    assert metrics.status_code == 200 and "backfilld_jobs" in metrics.text


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_missing_token_is_401_with_challenge(daemon: DaemonProcess, method: str, path: str) -> None:
    response = daemon.call(method, path, token=None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {"error": "Unauthorized", "message": "unauthorized"}


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
        f"Token {TOKEN}",
        "Bearer  x",
    ],
)
def test_wrong_token_or_scheme_is_401(daemon: DaemonProcess, header: str) -> None:
    response = daemon.call("GET", "/_admin/status", token=None, headers={"Authorization": header})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(daemon: DaemonProcess, scheme: str) -> None:
    response = daemon.call(
        "GET", "/_admin/status", token=None, headers={"Authorization": f"{scheme} {TOKEN}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/_admin/status", "GET"),
        ("GET", "/_admin/backfill", "POST"),
        ("PUT", "/_admin/records/ack", "POST"),
        ("POST", "/healthz", "GET"),
        ("GET", "/_admin/runs/1/cancel", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow_before_auth(
    daemon: DaemonProcess, method: str, path: str, allow: str
) -> None:
    response = daemon.call(method, path, token=None)
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {allow}
    assert response.json()["error"] == "MethodNotAllowed"


def test_body_over_one_mebibyte_is_413(daemon: DaemonProcess) -> None:
    body = b'{"dids": ["' + b"x" * (1024 * 1024) + b'"]}'
    response = daemon.call("POST", "/_admin/backfill", content=body)
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"


def test_chunked_body_over_one_mebibyte_is_413(daemon: DaemonProcess) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100_000

    response = daemon.call("POST", "/_admin/backfill", content=chunks())
    assert response.status_code == 413


def test_unknown_path_is_json_404(daemon: DaemonProcess) -> None:
    response = daemon.call("GET", "/_admin/nope")
    assert response.status_code == 404 and response.json()["error"] == "NotFound"
    assert daemon.call("GET", "/nope", token=None).status_code == 404


def test_unknown_admin_path_needs_the_token_first(daemon: DaemonProcess) -> None:
    response = daemon.call("GET", "/_admin/nope", token=None)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body must be valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'"x"', "request body must be a JSON object"),
        (
            b'{"dids": "did:plc:x"}',
            "`dids` must be an array of DID strings, or omitted to discover via the relay",
        ),
        (b'{"dids": null}', "`dids` must be an array of DID strings, or omitted to discover via the relay"),
        (b'{"dids": []}', "`dids` must not be empty (omit the field to discover via the relay)"),
        (b'{"dids": [5]}', "invalid DID in list: 5"),
        (b'{"dids": ["not-a-did"]}', 'invalid DID in list: "not-a-did"'),
        (
            b'{"dids": [' + b",".join(b'"%s"' % DID.encode() for _ in range(101)) + b"]}",
            "`dids` must contain at most 100 entries (got 101)",
        ),
    ],
)
def test_backfill_validation_messages(daemon: DaemonProcess, body: bytes, message: str) -> None:
    response = daemon.call("POST", "/_admin/backfill", content=body)
    assert response.status_code == 400
    assert response.json() == {"error": "InvalidRequest", "message": message}


def test_backfill_rejects_unconfigured_collection(daemon: DaemonProcess) -> None:
    response = daemon.call(
        "POST", "/_admin/backfill", json={"dids": [DID], "collections": ["com.example.nope"]}
    )
    assert response.status_code == 400 and response.json()["error"] == "InvalidRequest"


def test_explicit_backfill_dedups_and_does_not_queue_active_pairs_twice(daemon: DaemonProcess) -> None:
    other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
    response = daemon.call(
        "POST", "/_admin/backfill", json={"dids": [DID, other, DID], "collections": ["com.example.record"]}
    )
    assert response.status_code == 202
    body = response.json()
    assert body["mode"] == "explicit" and body["dids"] == 2 and body["collections"] == ["com.example.record"]
    assert body["jobs_enqueued"] + body["jobs_already_queued"] == 2
    run = daemon.call("GET", f"/_admin/runs/{body['run_id']}").json()
    assert run["run_id"] == body["run_id"] and run["mode"] == "explicit" and run["dids"] == 2


def test_discover_mode_with_empty_body(daemon: DaemonProcess) -> None:
    response = daemon.call("POST", "/_admin/backfill", content=b"")
    assert response.status_code == 202
    body = response.json()
    assert body["mode"] == "discover" and body["collections"] == ["com.example.record", "com.example.other"]
    assert body["jobs_enqueued"] == 2


def test_runs_list_and_missing_run(daemon: DaemonProcess) -> None:
    assert daemon.call("GET", "/_admin/runs/999999").status_code == 404
    assert daemon.call("POST", "/_admin/runs/999999/cancel").status_code == 404
    listing = daemon.call("GET", "/_admin/runs").json()
    assert isinstance(listing["runs"], list)


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "after=-1", "state=bogus", "run_id=0"])
def test_jobs_query_validation(daemon: DaemonProcess, query: str) -> None:
    response = daemon.call("GET", f"/_admin/jobs?{query}")
    assert response.status_code == 400 and response.json()["error"] == "InvalidRequest"


@pytest.mark.parametrize(
    "body", [b"{}", b'{"ids": []}', b'{"ids": ["1"]}', b'{"state": "done"}', b"[]", b'{"through": 1}']
)
def test_retry_validation(daemon: DaemonProcess, body: bytes) -> None:
    response = daemon.call("POST", "/_admin/jobs/retry", content=body)
    assert response.status_code == 400 and response.json()["error"] == "InvalidRequest"


@pytest.mark.parametrize(
    "body", [b"{}", b'{"through": -1}', b'{"through": "5"}', b'{"through": true}', b"nope"]
)
def test_ack_validation(daemon: DaemonProcess, body: bytes) -> None:
    response = daemon.call("POST", "/_admin/records/ack", content=body)
    assert response.status_code == 400 and response.json()["error"] == "InvalidRequest"


# Ids past SQLite's integer range (int64): the smallest one past it, and one past any 64-bit integer.
HUGE_IDS = ["9223372036854775808", "99999999999999999999", "1" + "0" * 40]


@pytest.mark.parametrize("run_id", [*HUGE_IDS, "9223372036854775807"])
def test_a_run_id_past_the_integer_range_is_404(daemon: DaemonProcess, run_id: str) -> None:
    for method, path in (("GET", f"/_admin/runs/{run_id}"), ("POST", f"/_admin/runs/{run_id}/cancel")):
        response = daemon.call(method, path)
        assert response.status_code == 404, response.text
        assert response.json() == {"error": "RunNotFound", "message": f"no run with id {run_id}"}


@pytest.mark.parametrize("huge", HUGE_IDS)
@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/_admin/runs", "after"),
        ("/_admin/jobs", "after"),
        ("/_admin/jobs", "run_id"),
        ("/_admin/records", "after"),
    ],
)
def test_a_query_id_past_the_integer_range_is_400(
    daemon: DaemonProcess, path: str, param: str, huge: str
) -> None:
    response = daemon.call("GET", f"{path}?{param}={huge}")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InvalidRequest"


@pytest.mark.parametrize("huge", HUGE_IDS)
@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/_admin/jobs/retry", '{"ids": [%s]}'),
        ("/_admin/jobs/retry", '{"state": "failed", "run_id": %s}'),
        ("/_admin/records/ack", '{"through": %s}'),
    ],
)
def test_a_body_id_past_the_integer_range_is_400(
    daemon: DaemonProcess, path: str, template: str, huge: str
) -> None:
    response = daemon.call("POST", path, content=(template % huge).encode())
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InvalidRequest"


def test_status_shape(daemon: DaemonProcess) -> None:
    status = daemon.call("GET", "/_admin/status").json()
    assert status["version"]
    assert status["workers"]["total"] == 4
    assert set(status["jobs"]) == {"pending", "running", "done", "failed", "cancelled"}
    assert isinstance(status["records_queue"]["depth"], int)
    assert isinstance(status["hosts"], list)
    assert isinstance(status["owner"], str) and status["owner"]
    assert isinstance(status["daemons"], list)


def test_status_lists_the_daemons_holding_leases(tmp_path: Path) -> None:
    # A relay that accepts connections and never answers: the discover jobs stay running, leased.
    with socket.socket() as relay:
        relay.bind(("127.0.0.1", 0))
        relay.listen(16)
        proc = DaemonProcess(
            tmp_path,
            {
                "atproto": {
                    "relay": f"http://127.0.0.1:{relay.getsockname()[1]}",
                    "collections": ["com.example.record", "com.example.other"],
                },
                "limits": {"discovery_timeout": 300.0},
            },
        ).start()
        try:
            idle = proc.call("GET", "/_admin/status").json()
            assert idle["daemons"] == []
            assert proc.call("POST", "/_admin/backfill", json={}).status_code == 202
            deadline = time.monotonic() + 60
            while (status := proc.call("GET", "/_admin/status").json())["jobs"]["running"] < 2:
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
        finally:
            proc.stop()
    assert status["daemons"] == [{"owner": status["owner"], "jobs_running": 2, "this": True}]


def test_no_token_configured_is_503(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, {"admin": {"token_file": ""}})
    proc.start()
    try:
        response = proc.call("GET", "/_admin/status")
        assert response.status_code == 503
        assert response.json() == {"error": "AdminNotConfigured", "message": "admin endpoints not configured"}
        assert proc.call("GET", "/healthz", token=None).status_code == 200
    finally:
        proc.stop()


def test_missing_token_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, {"admin": {"token_file": "secret/admin.token"}})
    proc.start()
    try:
        token_file = tmp_path / "secret" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        assert proc.call("GET", "/_admin/status", token=token).status_code == 200
        assert proc.call("GET", "/_admin/status").status_code == 401
    finally:
        proc.stop()


def test_env_token_overrides_the_file(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path).start(env={"BACKFILLD_ADMIN_TOKEN": "from-the-environment"})
    try:
        assert proc.call("GET", "/_admin/status", token="from-the-environment").status_code == 200
        assert proc.call("GET", "/_admin/status").status_code == 401
    finally:
        proc.stop()
