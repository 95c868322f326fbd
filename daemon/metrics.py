"""Prometheus metrics (``GET /metrics``), on a registry of the daemon's own so tests can run many daemons.

Counters and histograms are updated where things happen; gauges that mirror durable state (jobs by
state, queue depth) are read from the store when scraped, so they are right after a restart too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _DurableStateCollector(Collector):
    """Jobs by kind and state and the queue depth, as read from the store just before a scrape."""

    def __init__(self) -> None:
        self.jobs: Mapping[tuple[str, str], int] = {}
        self.queue_depth = 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("backfilld_jobs", "Jobs by kind and state.", labels=["kind", "state"])
        for (kind, state), n in sorted(self.jobs.items()):
            jobs.add_metric([kind, state], n)
        yield jobs
        yield GaugeMetricFamily(
            "backfilld_records_queue_depth",
            "Records jobs waiting to be acknowledged.",
            value=self.queue_depth,
        )


class Metrics:
    """Every metric backfilld exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.durable = _DurableStateCollector()
        r.register(self.durable)
        self.jobs_finished = Counter(
            "backfilld_jobs_finished_total", "Jobs that reached a final state.", ["kind", "state"], registry=r
        )
        self.job_duration = Histogram(
            "backfilld_job_duration_seconds",
            "Wall time of one job execution (one claim to its outcome).",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.job_errors = Counter(
            "backfilld_job_errors_total",
            "Job executions that ended in an error, by error code.",
            ["code"],
            registry=r,
        )
        self.pages_fetched = Counter(
            "backfilld_pages_fetched_total",
            "listRecords pages stored, by collection.",
            ["collection"],
            registry=r,
        )
        self.records_enqueued = Counter(
            "backfilld_records_enqueued_total",
            "Records jobs added to the records queue, by collection.",
            ["collection"],
            registry=r,
        )
        self.records_skipped = Counter(
            "backfilld_records_skipped_total",
            "Records skipped as invalid (bad URI, other DID or collection, bad rkey or CID).",
            ["collection"],
            registry=r,
        )
        self.http_requests = Counter(
            "backfilld_http_requests_total",
            "Upstream HTTP requests by host class and status (status 'error' when none arrived).",
            ["host_class", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "backfilld_http_request_duration_seconds",
            "Upstream request latency, headers and body.",
            ["host_class"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.host_pauses = Counter(
            "backfilld_host_pauses_total", "Times a PDS host was paused after a 429.", registry=r
        )
        self.hosts_paused = Gauge("backfilld_hosts_paused", "PDS hosts paused right now.", registry=r)
        self.workers_busy = Gauge("backfilld_workers_busy", "Workers running a job right now.", registry=r)
        self.workers_total = Gauge("backfilld_workers", "Configured worker tasks.", registry=r)
        self.discovered_dids = Counter(
            "backfilld_discovered_dids_total", "DIDs admitted into runs by relay discovery.", registry=r
        )
        self.discovery_pages = Counter(
            "backfilld_discovery_pages_total",
            "listReposByCollection pages processed.",
            ["collection"],
            registry=r,
        )

    def observe_request(self, host_class: str, status: int | None, seconds: float) -> None:
        """The fetcher's hook: one upstream request finished (``status`` None when no response came)."""
        self.http_requests.labels(host_class, "error" if status is None else str(status)).inc()
        self.http_latency.labels(host_class).observe(seconds)

    def render(self, jobs: Mapping[tuple[str, str], int], queue_depth: int, hosts_paused: int) -> bytes:
        """The exposition text, with the durable gauges set from the store's current counts."""
        self.durable.jobs, self.durable.queue_depth = jobs, queue_depth
        self.hosts_paused.set(hosts_paused)
        return generate_latest(self.registry)
