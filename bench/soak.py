"""A loopback soak: many concurrent greedy requests of mixed prompt lengths and
KV policies, streamed and not, about a third of the clients leaving at random
points, and a share of bad requests that must each get their own 4xx.
Afterwards: zero 5xx, every finished request's text equal to the same request
run alone, the KV pool empty, and the server's RSS at start, after warm-up and
at the end. The committed run (bench/results/soak/):

    python -m bench.soak --serve "--kv-cache-bytes 64MiB" --requests 2000 \
        --concurrency 32 --max-tokens 16 --out bench/results/soak

or against a server already running: --url URL --pid PID.

tests/test_soak.py runs a short version (40 requests) against the test server.
"""

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.provenance import git_provenance, write_json
from bench.server_process import free_port, keyserve_command, start_server, stop_server

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
    bad: int | None = None  # an index into BAD_BODIES instead of the spec


def make_plans(
    num: int, seed: int, max_tokens: int = 8, num_specs: int = 10, bad_share: float = 0.0
) -> list[Plan]:
    rng = random.Random(seed)
    plans = _good_plans(num, rng, max_tokens, num_specs)
    for plan in plans:
        if rng.random() < bad_share:
            plan.bad = rng.randrange(len(BAD_BODIES))
    return plans


# Bad requests mixed into the load, with the status each must get: they must
# never disturb the good ones, and an error must free whatever it held.
BAD_BODIES = [
    ({"prompt": "x", "max_tokens": 4, "kv_ratio": 2.0}, 400),
    ({"prompt": "x", "max_tokens": -1}, 400),
    ({"prompt": "word " * 5000, "max_tokens": 4}, 400),  # past the context length
    ({"prompt": "x", "max_tokens": 4, "model": "../../etc/passwd"}, 404),
    ({"prompt": [[10**9]], "max_tokens": 4}, 400),  # a token id outside the vocabulary
]


@dataclass
class Report:
    requests: int = 0
    finished: int = 0
    left: int = 0
    bad: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    wrong_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rss_mib: list[float] = field(default_factory=list)  # after warm-up, after the run
    rss_start_mib: float | None = None  # before the first request
    kv_blocks_total: float | None = None
    kv_blocks_used_peak: float | None = None
    kv_blocks_used_final: float | None = None
    preemptions: float | None = None
    tokens_evicted: float | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _good_plans(num: int, rng: random.Random, max_tokens: int, num_specs: int) -> list[Plan]:
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
    if plan.bad is not None:
        r = await http.post("/v1/completions", json=BAD_BODIES[plan.bad][0])
        return r.status_code, r.text
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


async def _metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The server's unlabelled-by-reason samples from /metrics, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "finished_reason" not in sample.labels
    }


async def _wait_idle(http: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (aborts land between engine steps)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await _metrics(http)
        busy = m["keyserve:num_requests_running"] + m["keyserve:num_requests_waiting"]
        if (busy == 0 and m["keyserve:kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.1)


async def soak(
    url: str,
    num_requests: int,
    seed: int = 0,
    concurrency: int = 16,
    pid: int | str | None = None,
    max_tokens: int = 8,
    bad_share: float = 0.0,
    progress: bool = False,
) -> Report:
    plans = make_plans(num_requests, seed, max_tokens, bad_share=bad_share)
    report = Report(requests=num_requests)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        if pid is not None:
            report.rss_start_mib = rss_mib(pid)
        # The reference: each distinct request alone, one at a time (also the warm-up).
        solo = {}
        for spec in sorted({p.spec for p in plans}, key=lambda s: (s.prompt, s.policy)):
            r = await http.post("/v1/completions", json=spec.body(False))
            r.raise_for_status()
            solo[spec] = r.json()["choices"][0]["text"]
        if pid is not None:
            report.rss_mib.append(rss_mib(pid))
        gate = asyncio.Semaphore(concurrency)
        bar = _progress_bar(num_requests) if progress else None

        async def client(i: int, plan: Plan) -> None:
            async with gate:
                status, text = await _run_one(http, plan)
            if bar is not None:
                bar.update()
            if status is not None:
                report.statuses[status] = report.statuses.get(status, 0) + 1
            if plan.bad is not None:
                report.bad += 1
                if status != BAD_BODIES[plan.bad][1] or '"error"' not in (text or ""):
                    report.wrong_errors.append(f"#{i} bad body {plan.bad}: {status} {text}")
                return
            if text is None:
                report.left += 1
                return
            report.finished += 1
            if text != solo[plan.spec]:
                report.mismatches.append(f"#{i} {plan.spec}: {text!r} != {solo[plan.spec]!r}")

        start = time.monotonic()
        await asyncio.gather(*(client(i, p) for i, p in enumerate(plans)))
        report.seconds = time.monotonic() - start
        if bar is not None:
            bar.close()
        final = await _wait_idle(http)
        report.kv_blocks_total = final["keyserve:kv_blocks_total"]
        report.kv_blocks_used_peak = final["keyserve:kv_blocks_used_peak"]
        report.kv_blocks_used_final = final["keyserve:kv_blocks_used"]
        report.preemptions = final["keyserve:num_preemptions_total"]
        report.tokens_evicted = final["keyserve:tokens_evicted_total"]
        if pid is not None:
            report.rss_mib.append(rss_mib(pid))
    return report


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)


def markdown(report: Report, command: str) -> str:
    r = report
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(r.statuses.items()))
    warm, end = (r.rss_mib + [float("nan"), float("nan")])[:2]
    rows = [
        ("requests", r.requests),
        ("finished (text checked against its solo run)", r.finished),
        ("clients that left early (aborts)", r.left),
        ("bad requests (each must get its own 4xx)", r.bad),
        ("responses by status code", codes),
        ("5xx responses", sum(n for code, n in r.statuses.items() if code >= 500)),
        ("finished texts unequal to their solo run", len(r.mismatches)),
        ("bad requests with the wrong status or body", len(r.wrong_errors)),
        ("KV blocks in the pool", _int(r.kv_blocks_total)),
        ("KV blocks in use, peak", _int(r.kv_blocks_used_peak)),
        ("KV blocks in use, final", _int(r.kv_blocks_used_final)),
        ("preemptions", _int(r.preemptions)),
        ("tokens evicted", _int(r.tokens_evicted)),
        (
            "server RSS at start / after warm-up / at end (MiB)",
            f"{_mib(r.rss_start_mib)} / {_mib(warm)} / {_mib(end)}",
        ),
        ("wall time (s)", f"{r.seconds:.0f}"),
    ]
    lines = ["# Soak", "", f"Command: `{command}`", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _int(value: float | None) -> str:
    return "n/a" if value is None else str(int(value))


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def write_report(out: Path, report: Report, command: str) -> None:
    """out/soak.json (every figure, and the git commit) and out/soak.md."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "soak.json", report.as_dict(), indent=2)
    (out / "soak.md").write_text(markdown(report, command))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--bad-share", type=float, default=0.05, help="share of bad requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", help="the server's pid, to read its RSS")
    parser.add_argument(
        "--serve",
        help="start `keyserve serve` with these flags (quoted) instead of using --url",
    )
    parser.add_argument("--out", type=Path, help="write soak.json and soak.md here")
    args = parser.parse_args()
    git_provenance()  # the commit as the run starts: it may outlive later commits
    proc = None
    url, pid = args.url, args.pid
    if args.serve is not None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(keyserve_command(port, *shlex.split(args.serve)), url, timeout=300)
        pid = proc.pid
    try:
        report = asyncio.run(
            soak(
                url,
                args.requests,
                args.seed,
                args.concurrency,
                pid,
                args.max_tokens,
                args.bad_share,
                progress=True,
            )
        )
    finally:
        stop_server(proc)
    print(json.dumps(report.as_dict(), indent=2))
    if args.out is not None:
        write_report(args.out, report, "python -m bench.soak " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
