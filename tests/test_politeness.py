"""Issue 4 in the whole pipeline: per-host limits under many workers, 429 pauses, the SSRF guard."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import trio

from daemon.simnet import Account, HostOptions, NetworkSpec, build_spec, open_network, plc_did, with_account
from tests.inprocess import COLL, finish, jobs_of, running_daemon, start_run


@pytest.mark.parametrize("mode", ["list", "verified"])
@pytest.mark.parametrize("rate", [0.0, 25.0])
async def test_peak_in_flight_and_rate_per_host_stay_within_limits(
    tmp_path: Path, rate: float, mode: str
) -> None:
    spec = build_spec(24, 250, collections=[COLL], hosts=2, latency=0.02)
    async with open_network(spec) as network:
        overrides = {
            "daemon": {"workers": 16},
            "network": {"per_host_concurrency": 3, "per_host_rate": rate},
            "sync": {"mode": mode},
        }
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run = await finish(daemon, await start_run(daemon, dids=[a.did for a in spec.accounts]))
    assert run.jobs["done"] == 24
    for host in range(2):
        stats = network.pds_stats(host)
        paths = Counter(path.rsplit("/", 1)[-1] for path, _ in stats.seen)
        if mode == "list":
            assert stats.requests == 36  # 12 accounts x 3 pages
        else:
            # one commit probe per account, the rest are blocks (getBlocks batches or a whole getRepo)
            assert paths["com.atproto.sync.getRecord"] == 12
            assert set(paths) <= {
                "com.atproto.sync.getRecord",
                "com.atproto.sync.getBlocks",
                "com.atproto.sync.getRepo",
            }
        if rate:
            # request starts are spaced 1/25 s apart, so a one-second window holds at most 25 of them;
            # arrival jitter on the way to the server can squeeze one more into a window it observes
            assert stats.peak_rate(1.0) <= 26
            assert stats.peak_in_flight <= 3
        else:
            assert 1 < stats.peak_in_flight <= 3  # 16 workers, 8 pairs per host at a time: capped at 3


async def test_a_rate_limited_host_pauses_while_other_hosts_keep_flowing(tmp_path: Path) -> None:
    spec = build_spec(8, 150, collections=[COLL], hosts=2)
    spec = with_account(spec, Account(plc_did(50), 0, {COLL: 150}, "pds_429_retry_after_secs", {"times": 2}))
    async with open_network(spec) as network:
        overrides = {"daemon": {"workers": 4}, "network": {"per_host_rate": 0.0}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(50)])
            with trio.fail_after(10):
                while not daemon.paused_hosts():
                    await trio.sleep(0.01)
            [paused] = daemon.paused_hosts()
            assert paused == network.pds_urls[0]
            assert next(h for h in daemon.host_status() if h["paused"])["paused_until"] is not None
            others = [a.did for a in spec.accounts if a.pds == 1]
            other_run = await start_run(daemon, dids=others)
            done = await finish(daemon, other_run)
            assert done.jobs["done"] == 4
            assert daemon.paused_hosts()  # the other host's jobs finished while this one was still paused
            await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
    assert (job.state, job.attempts, job.rate_limit_waits) == ("done", 1, 2)


@pytest.mark.parametrize(
    "pds",
    [
        "https://127.0.0.1:{port}",
        "https://[::1]:9",
        "https://10.1.2.3",
        "https://169.254.169.254",
        "https://100.64.1.1",
        "https://[::ffff:127.0.0.1]:{port}",
        "https://localhost:{port}",
    ],
)
async def test_pds_at_a_non_global_address_is_refused_without_a_request(tmp_path: Path, pds: str) -> None:
    """The DID document names a private address; the guard refuses before connecting (no packet leaves)."""
    async with open_network(build_spec(1, 1, collections=[COLL])) as decoy:
        # "{port}" is a live loopback PDS: had the guard let the connection through, it would count it
        url = pds.format(port=decoy.pds_urls[0].rsplit(":", 1)[1])
        spec = build_spec(0, 0, collections=[COLL])
        spec = with_account(spec, Account(plc_did(7), 0, {COLL: 3}, "doc_pds_url", {"url": url}))
        await _refused(tmp_path, spec)
        assert decoy.pds_stats(0).requests == 0


async def _refused(tmp_path: Path, spec: NetworkSpec) -> None:
    async with open_network(spec) as network:
        overrides = {"network": {"allow_private_addresses": False}, "retry": {"max_attempts": 3}}
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(7)])
            await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
    assert (job.state, job.error_code, job.attempts) == ("failed", "blocked_address", 1)
    assert network.pds_stats(0).requests == 0


async def test_http_pds_is_refused_unless_private_addresses_are_allowed(tmp_path: Path) -> None:
    spec = build_spec(1, 10, collections=[COLL])
    async with open_network(spec) as network:
        async with running_daemon(
            tmp_path, network, {"network": {"allow_private_addresses": False}}
        ) as daemon:
            run_id = await start_run(daemon, dids=[plc_did(0)])
            await finish(daemon, run_id)
            [job] = await jobs_of(daemon, run_id)
    assert (job.state, job.error_code, job.attempts) == ("failed", "insecure_url", 1)
    assert network.pds_stats(0).requests == 0


async def test_a_down_host_does_not_stall_the_others(tmp_path: Path) -> None:
    spec = build_spec(6, 120, collections=[COLL], hosts=2)
    spec = dataclasses.replace(spec, host_options={0: HostOptions(behaviour="pds_hang")})
    async with open_network(spec) as network:
        overrides = {
            "daemon": {"workers": 4},
            "limits": {"page_timeout": 2.0},
            "retry": {"max_attempts": 1},
            "network": {"per_host_concurrency": 2},
        }
        async with running_daemon(tmp_path, network, overrides) as daemon:
            run_id = await start_run(daemon, dids=[a.did for a in spec.accounts if a.pds == 1])
            hung = await start_run(daemon, dids=[a.did for a in spec.accounts if a.pds == 0])
            run = await finish(daemon, run_id)
            assert run.jobs["done"] == 3  # finished while host 0 held its two slots, hung
            assert network.pds_stats(0).peak_in_flight <= 2
            await finish(daemon, hung)
