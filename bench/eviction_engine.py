"""The engine side of the eviction benchmark: greedy outputs and capacity.

Everything here drives keyserve's own engine (`engine.LLM`); nothing is
re-implemented.
"""

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bench.eviction_dense import finite_gumbel_noise
from bench.eviction_workload import Prompt
from kv_manager.manager import blocks_for
from kv_manager.policies import KVPolicySettings

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Config:
    """One (policy, budget) cell; ratio None for full."""

    policy: str
    ratio: float | None

    def settings(self) -> KVPolicySettings:
        """The policy's settings: engine defaults, kv_min_tokens 0 so the ratio rules."""
        if self.ratio is None:
            return KVPolicySettings(kv_policy=self.policy)
        return KVPolicySettings(kv_policy=self.policy, kv_ratio=self.ratio, kv_min_tokens=0)

    def kv_fields(self) -> dict[str, Any]:
        """Every KV field of the request, so no engine default is left implicit."""
        return asdict(self.settings())

    @property
    def label(self) -> str:
        return self.policy if self.ratio is None else f"{self.policy}@{self.ratio:g}"


FULL = Config("full", None)


@contextmanager
def engine_noise(mode: str) -> Iterator[None]:
    """`finite`: the engine's attention draws Keyformer's noise through
    finite_gumbel_noise (which would replace a +inf, see
    bench/eviction_dense.py) for the duration; `as-is`: untouched."""
    import engine.attention.scoring as attention

    if mode == "as-is":
        yield
        return
    original = attention.gumbel_noise
    attention.gumbel_noise = finite_gumbel_noise
    try:
        yield
    finally:
        attention.gumbel_noise = original


def sampling(config: Config, prompt: Prompt, max_tokens: int) -> Any:
    from engine import SamplingParams

    return SamplingParams(
        temperature=0.0,
        seed=prompt.seed,
        max_tokens=max_tokens,
        ignore_eos=True,
        **config.kv_fields(),
    )


# -- figure 2: greedy outputs --------------------------------------------------


def load_llm(**kwargs: Any) -> Any:
    """An engine on the CPU in float32. Its warning that a small pool caps the
    context is silenced: every pool here is sized for its workload."""
    from engine import LLM

    engine_log = logging.getLogger("engine.runtime.llm_engine")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        return LLM(dtype="float32", device="cpu", block_size=BLOCK_SIZE, **kwargs)
    finally:
        engine_log.setLevel(level)


def greedy_outputs(
    prompts: Sequence[Prompt], configs: Sequence[Config], max_tokens: int
) -> tuple[dict[tuple[int, Config], list[int]], dict[str, Any]]:
    """Greedy tokens of every (prompt, config), all in one `generate` call.

    The pool holds every request at its full length, so nothing is preempted
    (a preempted evicting request is recomputed chunk by chunk and may then
    differ). Returns the tokens and the engine's stats with the call's time.
    """
    jobs = [(i, c) for i in range(len(prompts)) for c in configs]
    need = sum(blocks_for(len(prompts[i].token_ids) + max_tokens, BLOCK_SIZE) for i, _ in jobs)
    llm = load_llm(kv_cache_blocks=need, max_num_seqs=64)
    params = [sampling(c, prompts[i], max_tokens) for i, c in jobs]
    start = time.perf_counter()
    outputs = llm.generate([prompts[i].token_ids for i, _ in jobs], params)
    stats = {**llm.engine.stats(), "time_s": round(time.perf_counter() - start, 2)}
    if stats["preemptions"]:
        raise RuntimeError(f"greedy runs were preempted ({stats['preemptions']})")
    tokens = {job: list(o.outputs[0].token_ids) for job, o in zip(jobs, outputs, strict=True)}
    return tokens, stats


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# -- figure 3: capacity at a fixed pool ----------------------------------------


@dataclass
class CapacityRun:
    policy: str
    ratio: float | None
    pool_blocks: int
    requests: int
    peak_running: int = 0  # running sequences right after a step's admissions
    mean_running: float = 0.0  # over steps
    peak_used_blocks: int = 0  # used blocks right after a step's allocations
    preemptions: int = 0
    tokens_evicted: int = 0
    blocks_freed_by_eviction: int = 0
    steps: int = 0
    time_s: float = 0.0
    output_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pool_for(full_sequences: int, prompt_tokens: int, max_tokens: int) -> int:
    """Blocks that hold `full_sequences` un-evicted sequences at their longest."""
    return full_sequences * blocks_for(prompt_tokens + max_tokens, BLOCK_SIZE)


def capacity_run(
    llm: Any, prompts: Sequence[Prompt], config: Config, max_tokens: int
) -> CapacityRun:
    """Submit every prompt at once to an idle engine and step it to the end,
    recording its peaks. The peaks are read right after scheduling (the only
    place blocks are taken), before the step's eviction gives any back; the
    engine's cumulative counters are read as differences."""
    engine = llm.engine
    if engine.has_unfinished_requests() or engine.kv.num_used_blocks:
        raise RuntimeError("capacity runs need an idle engine")
    before = engine.stats()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"cap-{i}", prompt.token_ids, sampling(config, prompt, max_tokens))
    run = CapacityRun(config.policy, config.ratio, engine.kv.num_total_blocks, len(prompts))
    running_sum = _watch_schedule(engine, run)
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            engine.step()
            run.steps += 1
    finally:
        del engine.scheduler.schedule  # back to the class's method
    run.time_s = round(time.perf_counter() - start, 2)
    after = engine.stats()
    run.preemptions = after["preemptions"] - before["preemptions"]
    run.tokens_evicted = after["tokens_evicted"] - before["tokens_evicted"]
    freed = "blocks_freed_by_eviction"
    run.blocks_freed_by_eviction = after[freed] - before[freed]
    run.mean_running = round(running_sum[0] / max(run.steps, 1), 2)
    run.output_tokens = len(prompts) * max_tokens  # ignore_eos: every request runs to the end
    return run


def _watch_schedule(engine: Any, run: CapacityRun) -> list[int]:
    """Wrap this engine's scheduler.schedule to record peaks; returns a
    one-element list that accumulates running counts (for the mean)."""
    schedule = engine.scheduler.schedule
    total = [0]

    def watched() -> Any:
        out = schedule()
        running = engine.scheduler.num_running
        run.peak_running = max(run.peak_running, running)
        run.peak_used_blocks = max(run.peak_used_blocks, engine.kv.num_used_blocks)
        total[0] += running
        return out

    engine.scheduler.schedule = watched
    return total
