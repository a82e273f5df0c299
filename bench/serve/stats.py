"""From per-request records to the run's figures."""

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.serve.client import RequestRecord

PERCENTILES = (50, 90, 99)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds; None for each when there is no value."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    figures = [ms.mean(), *np.percentile(ms, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, figures, strict=True)}


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Throughput and latency figures of one run.

    Throughputs count completed requests only, over the whole run (first send
    to last finish, failures included, since they held the server too).
    """
    done = [r for r in records if r.ok]
    duration = _duration(records)
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.usage_prompt_tokens or r.prompt_tokens for r in done)
    failed = Counter(r.failure for r in records if not r.ok)
    return {
        "duration_s": duration,
        "num_requests": len(records),
        "completed": len(done),
        "failed": sum(failed.values()),
        "failed_by_code": dict(sorted(failed.items())),
        "total_prompt_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": _per_s(len(done), duration),
        "output_throughput": _per_s(output, duration),
        "total_token_throughput": _per_s(prompt + output, duration),
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itls]),
        # keyserve's usage says which were squeezed; None from other servers.
        "squeezed_requests": _count_squeezed(done),
    }


def _count_squeezed(done: Sequence[RequestRecord]) -> int | None:
    known = [r.kv_squeezed for r in done if r.kv_squeezed is not None]
    return sum(known) if known else None


def _duration(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.finish_time for r in records) - min(r.send_time for r in records)


def _per_s(count: float, duration: float) -> float | None:
    return count / duration if duration > 0 else None
