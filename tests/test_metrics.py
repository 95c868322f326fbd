"""``GET /metrics`` after a known backfill: every counter against the numbers the simulated network implies.

One discovery run over ``demo_spec`` (healthy accounts of 0-120 records, and one account each of plc_404,
doc_no_pds, pds_takendown, pds_404_first, pds_500_once, pds_429_once and pds_bad_records) against the real
daemon process; the scrape is parsed with prometheus_client's own parser. Request counts are also checked
against the simulated network's counters of what it actually served.

The daemon runs in list mode (``sync.mode = "list"``, SPEC 6.3), where every request is a listRecords page
whose number follows from the spec alone; verified mode's requests depend on the shape of each account's
MST, and its outcomes are checked in test_pipeline.py.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.simnet import DaemonLimits, demo_spec, expected_failed, expected_records, relay_dids
from daemon.simnet.model import junk_per_page, pages_needed
from tests.daemonproc import DaemonProcess
from tests.simnetproc import SimnetProcess

COLLECTIONS = ("com.example.alpha", "com.example.beta")
PAGE_SIZE = 40
DISCOVERY_PAGE_SIZE = 10
WORKERS = 4
SPEC = demo_spec(COLLECTIONS)
MODE = "list"
LIMITS = DaemonLimits(page_size=PAGE_SIZE, mode=MODE)
DISCOVERED = sorted({did for c in COLLECTIONS for did in relay_dids(SPEC, c)})
ACCOUNTS = [a for a in SPEC.accounts if a.did in DISCOVERED]
FAILED = expected_failed(SPEC, limits=LIMITS, dids=DISCOVERED)
RECORDS = expected_records(SPEC, limits=LIMITS, dids=DISCOVERED)
PAIRS = len(ACCOUNTS) * len(COLLECTIONS)
JUNK = junk_per_page(PAGE_SIZE)


def behaviour_did(name: str) -> str:
    return next(a.did for a in SPEC.accounts if a.behaviour == name)


def pages(did: str, collection: str) -> int:
    """listRecords pages a correct daemon stores for the pair (none for failed pairs).

    A first-page 404 (no such collection) is stored as one empty, final page: it completes the listing,
    which reconciles the pair's delivered set against nothing (SPEC 6.4).
    """
    account = SPEC.account(did)
    if (did, collection) in FAILED:
        return 0
    if account.behaviour == "pds_404_first":
        return 1
    per_page = PAGE_SIZE - (JUNK if account.behaviour == "pds_bad_records" else 0)
    return pages_needed(account.records.get(collection, 0), per_page, False)


def pages_of(behaviour: str) -> int:
    return sum(pages(behaviour_did(behaviour), c) for c in COLLECTIONS)


@dataclass(frozen=True)
class Scrape:
    run: dict[str, Any]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    served: dict[str, Any]  # the simulated network's own counters, by origin URL
    info: dict[str, Any]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value (0 when it was not exported: a counter that never moved)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """Every sample of ``name``, by the value of one label."""
        return {dict(key)[label]: v for (n, key), v in self.samples.items() if n == name and v}

    def requests(self, host_class: str) -> dict[str, float]:
        """``backfilld_http_requests_total`` of one host class, by status."""
        return {
            dict(key)["status"]: v
            for (n, key), v in self.samples.items()
            if n == "backfilld_http_requests_total" and dict(key)["host_class"] == host_class and v
        }

    def served_statuses(self, *urls: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for url in urls:
            total.update(self.served[url]["statuses"])
        return total


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    net = SimnetProcess(
        tmp_path_factory.mktemp("simnet"), ["--demo", f"--collections={','.join(COLLECTIONS)}"]
    )
    daemon = DaemonProcess(
        tmp_path_factory.mktemp("metrics"),
        {
            "daemon": {"workers": WORKERS},
            "atproto": {
                "relay": net.info["relay_url"],
                "plc_directory": net.info["plc_url"],
                "collections": list(COLLECTIONS),
            },
            "limits": {
                "page_size": PAGE_SIZE,
                "discovery_page_size": DISCOVERY_PAGE_SIZE,
                "page_timeout": 5.0,
            },
            "retry": {"backoff_base": 0.05, "backoff_cap": 0.5},
            "network": {"per_host_rate": 0.0, "rate_limit_pause": 1.0},
            "sync": {"mode": MODE},
        },
    )
    try:
        daemon.start()
        run_id = daemon.call("POST", "/_admin/backfill", content=b"").json()["run_id"]
        run = daemon.wait_run_finished(run_id)
        response = daemon.call("GET", "/metrics", token=None)
        assert response.status_code == 200
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }
        yield Scrape(run, samples, net.stats(), net.info)
    finally:
        daemon.stop()
        net.stop()


def test_the_run_itself_is_as_expected(scrape: Scrape) -> None:
    assert scrape.run["state"] == "finished"
    assert scrape.run["dids"] == len(DISCOVERED)
    assert scrape.run["records_enqueued"] == len(RECORDS)
    assert scrape.run["jobs"]["failed"] == len(FAILED) == 6


def test_records_enqueued_by_collection(scrape: Scrape) -> None:
    expected = Counter(collection for _, collection, _, _ in RECORDS)
    assert scrape.by("backfilld_records_enqueued_total", "collection") == dict(expected)
    assert scrape.value("backfilld_records_queue_depth") == len(RECORDS)


def test_pages_fetched_and_records_skipped_by_collection(scrape: Scrape) -> None:
    assert scrape.by("backfilld_pages_fetched_total", "collection") == {
        c: sum(pages(a.did, c) for a in ACCOUNTS) for c in COLLECTIONS
    }
    bad = behaviour_did("pds_bad_records")
    assert scrape.by("backfilld_records_skipped_total", "collection") == {
        c: pages(bad, c) * JUNK for c in COLLECTIONS
    }


def test_jobs_by_kind_and_state(scrape: Scrape) -> None:
    expected = {
        ("discover", "done"): len(COLLECTIONS),
        ("backfill", "done"): PAIRS - len(FAILED),
        ("backfill", "failed"): len(FAILED),
    }
    for name in ("backfilld_jobs", "backfilld_jobs_finished_total"):
        found = {
            (dict(key)["kind"], dict(key)["state"]): v
            for (n, key), v in scrape.samples.items()
            if n == name and v
        }
        assert found == expected, name
    for kind in ("discover", "backfill"):
        finished = sum(v for (k, _), v in expected.items() if k == kind)
        assert scrape.value("backfilld_job_duration_seconds_count", kind=kind) == finished


def test_discovery(scrape: Scrape) -> None:
    expected_pages = {
        c: max(1, math.ceil(len(relay_dids(SPEC, c)) / DISCOVERY_PAGE_SIZE)) for c in COLLECTIONS
    }
    assert scrape.by("backfilld_discovery_pages_total", "collection") == expected_pages
    assert scrape.value("backfilld_discovered_dids_total") == len(DISCOVERED)
    assert scrape.value("backfilld_http_requests_total", host_class="relay", status="200") == sum(
        expected_pages.values()
    )


def test_http_requests_by_host_class_and_status(scrape: Scrape) -> None:
    total_pages = sum(pages(a.did, c) for a in ACCOUNTS for c in COLLECTIONS) - pages_of("pds_404_first")
    pds_statuses = scrape.requests("pds")
    assert pds_statuses == {
        "200": total_pages,
        "404": len(COLLECTIONS),  # pds_404_first: no such collection, done with 0 records
        "400": len(COLLECTIONS),  # pds_takendown
        "429": len(COLLECTIONS),  # pds_429_once: once per pair
        "500": pages_of("pds_500_once"),  # every page fails once
    }
    # What the daemon counted is what the simulated network served.
    assert pds_statuses == {k: float(v) for k, v in scrape.served_statuses(*scrape.info["pds_urls"]).items()}
    plc_statuses = scrape.requests("plc")
    assert plc_statuses == {k: float(v) for k, v in scrape.served_statuses(scrape.info["plc_url"]).items()}
    # plc_404: permanent, no retries, nothing cached; its pairs' jobs share a lookup when they overlap
    assert 1 <= plc_statuses["404"] <= len(COLLECTIONS)
    # Each DID resolves at least once; a cached resolution is not fetched again.
    assert len(DISCOVERED) - 1 <= plc_statuses["200"] <= PAIRS - len(COLLECTIONS)
    assert (
        scrape.value("backfilld_http_requests_total", host_class="relay", status="200")
        == (scrape.served_statuses(scrape.info["relay_url"])["200"])
    )


def test_request_latency_histogram_counts_every_request(scrape: Scrape) -> None:
    for host_class in ("pds", "plc", "relay"):
        requests = sum(scrape.requests(host_class).values())
        assert requests > 0
        assert (
            scrape.value("backfilld_http_request_duration_seconds_count", host_class=host_class) == requests
        )
        assert scrape.value(
            "backfilld_http_request_duration_seconds_bucket", host_class=host_class, le="+Inf"
        ) == (requests)


def test_errors_by_code(scrape: Scrape) -> None:
    errors = scrape.by("backfilld_job_errors_total", "code")
    # Every 429 is one; so is a job of the same host that found it paused (how many depends on timing).
    assert errors.pop("rate_limited") >= len(COLLECTIONS)
    assert errors == {
        "did_not_found": len(COLLECTIONS),
        "no_pds_service": len(COLLECTIONS),
        "repo_takendown": len(COLLECTIONS),
        "http_status": pages_of("pds_500_once"),
    }


def test_host_pauses_workers_and_gauges(scrape: Scrape) -> None:
    assert scrape.value("backfilld_host_pauses_total") == len(COLLECTIONS)
    assert scrape.value("backfilld_hosts_paused") == 0
    assert scrape.value("backfilld_workers") == WORKERS
    assert scrape.value("backfilld_workers_busy") == 0
