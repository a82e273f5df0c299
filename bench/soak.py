"""A loopback soak: many concurrent greedy requests of mixed prompt lengths and
KV policies, streamed and not, about a third of the clients leaving at random
points. Afterwards: zero 5xx, every finished request's text equal to the same
request run alone, and (with --pid) the server's RSS after warm-up.

    keyserve serve --kv-cache-bytes 64MiB &
    python -m bench.soak --url http://127.0.0.1:8000 --requests 400 --pid $!

tests/test_soak.py runs a short version (40 requests) against the test server.
"""

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

POLICIES = ["full", "window", "streaming", "h2o", "keyformer"]
# Mixed lengths: from a few tokens to a few hundred.
PROMPTS = [
    "The sea is",
    "Count: 1, 2, 3,",
    "My favourite food is " + "very " * 20 + "good, because",
    "Once upon a time, " + "there was a small village by a river. " * 8 + "One day,",
    "A list of rivers: " + ", ".join(["Nile", "Amazon", "Danube", "Rhine"] * 15) + ", and",
]


@dataclass(frozen=True)
class Spec:
    """What a request asks; two requests with the same spec must give the same text."""

    prompt: int
    policy: str
    max_tokens: int

    def body(self, stream: bool) -> dict:
        return {
            "prompt": PROMPTS[self.prompt],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "seed": 1234,  # keyformer's Gumbel noise is seeded: the same run alone and in a batch
            "kv_policy": self.policy,
            "kv_ratio": 0.5,
            "stream": stream,
        }


@dataclass
class Plan:
    spec: Spec
    stream: bool
    leave_after: int | None  # streaming: events; plain: None or a delay in ms
    leave_delay: float | None = None


@dataclass
class Report:
    requests: int = 0
    finished: int = 0
    left: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # after warm-up, after the run

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def make_plans(num: int, seed: int, max_tokens: int = 8, num_specs: int = 10) -> list[Plan]:
    rng = random.Random(seed)
    specs = [
        Spec(i % len(PROMPTS), POLICIES[(i * 3 + i // len(PROMPTS)) % len(POLICIES)], max_tokens)
        for i in range(num_specs)
    ]
    plans = []
    for _ in range(num):
        stream = rng.random() < 0.5
        leaves = rng.random() < 1 / 3
        plan = Plan(rng.choice(specs), stream, None)
        if leaves and stream:
            plan.leave_after = rng.randint(1, 4)
        elif leaves:
            plan.leave_delay = rng.uniform(0.0, 0.6)
        plans.append(plan)
    return plans


async def _run_one(http: httpx.AsyncClient, plan: Plan) -> tuple[int | None, str | None]:
    """(status or None if we left before it came, text or None if we left)."""
    if not plan.stream:
        call = http.post("/v1/completions", json=plan.spec.body(False))
        if plan.leave_delay is None:
            r = await call
            ok = r.status_code == 200
            return r.status_code, r.json()["choices"][0]["text"] if ok else None
        try:
            r = await asyncio.wait_for(call, plan.leave_delay)
        except asyncio.TimeoutError:
            return None, None  # the connection is closed: the server must abort it
        return r.status_code, None
    text, events = "", 0
    async with http.stream("POST", "/v1/completions", json=plan.spec.body(True)) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return 200, text
            data = json.loads(line.removeprefix("data: "))
            if "error" in data:
                return 500, None
            text += data["choices"][0]["text"]
            events += 1
            if plan.leave_after is not None and events >= plan.leave_after:
                return 200, None
    return 200, None


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(
    url: str,
    num_requests: int,
    seed: int = 0,
    concurrency: int = 16,
    pid: int | str | None = None,
    max_tokens: int = 8,
) -> Report:
    plans = make_plans(num_requests, seed, max_tokens)
    report = Report(requests=num_requests)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        # The reference: each distinct request alone, one at a time (also the warm-up).
        solo = {}
        for spec in sorted({p.spec for p in plans}, key=lambda s: (s.prompt, s.policy)):
            r = await http.post("/v1/completions", json=spec.body(False))
            r.raise_for_status()
            solo[spec] = r.json()["choices"][0]["text"]
        if pid is not None:
            report.rss_mib.append(rss_mib(pid))
        gate = asyncio.Semaphore(concurrency)

        async def client(i: int, plan: Plan) -> None:
            async with gate:
                status, text = await _run_one(http, plan)
            if status is not None:
                report.statuses[status] = report.statuses.get(status, 0) + 1
            if text is None:
                report.left += 1
                return
            report.finished += 1
            if text != solo[plan.spec]:
                report.mismatches.append(f"#{i} {plan.spec}: {text!r} != {solo[plan.spec]!r}")

        start = time.monotonic()
        await asyncio.gather(*(client(i, p) for i, p in enumerate(plans)))
        report.seconds = time.monotonic() - start
        if pid is not None:
            report.rss_mib.append(rss_mib(pid))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", help="the server's pid, to read its RSS")
    args = parser.parse_args()
    report = asyncio.run(soak(args.url, args.requests, args.seed, args.concurrency, args.pid))
    print(json.dumps(report.as_dict(), indent=2))


if __name__ == "__main__":
    main()
