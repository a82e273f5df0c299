"""A short soak (bench/soak.py) against the test server: 40 greedy requests of
mixed prompt lengths and KV policies, streamed and not, a third of the clients
leaving at random points. No 5xx, every finished text equal to its solo run,
the KV pool whole afterwards, memory flat."""

import asyncio

from live_server import wait_pool_whole

from bench.soak import soak


def test_short_soak(live_server):
    report = asyncio.run(soak(live_server.url, 40, seed=0, concurrency=16, pid="self"))
    print(report.as_dict())
    assert not [s for s in report.statuses if s >= 500], report.statuses
    assert report.finished + report.left == report.requests
    assert report.finished >= 15 and report.left >= 5
    assert not report.mismatches, report.mismatches
    wait_pool_whole(live_server)
    assert live_server.engine.kv.num_used_blocks == 0
    warm, after = report.rss_mib
    assert after - warm < 200, report.rss_mib  # MiB; a leak per request would show
