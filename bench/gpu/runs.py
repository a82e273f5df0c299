"""The timed stages: one engine run per (policy, prompt count), transformers'
batched generate as the floor, and the step profile.

Every KV policy runs on one engine (a request carries its policy), started
once; each run adds its prompts and steps the engine until they finish, or
until its deadline, when it aborts what is left and says so (`timed_out`).
"""

import gc
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu.steps import StepClock, profile_steps, summarize
from engine import LLM, SamplingParams

# The GPU check's warm-up before each timed run: a few prompts, a few tokens.
WARMUP_PROMPTS, WARMUP_TOKENS = 4, 4


def load_engine(folder: Path, args: Any, max_num_seqs: int) -> LLM:
    return LLM(
        model=str(folder),
        device=args.device,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )


def engine_facts(llm: LLM) -> dict[str, Any]:
    engine = llm.engine
    return {
        "attention_backends": sorted({a.backend.name for a in engine.model.attention_layers()}),
        "kv_blocks_total": engine.kv.num_total_blocks,
        "block_size": engine.config.block_size,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


def params(policy: str, kv_ratio: float, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        seed=0,
        kv_policy=policy,
        kv_ratio=kv_ratio,
    )


def _cuda(llm: LLM) -> bool:
    return llm.engine.device.type == "cuda"


def _settle(llm: LLM) -> None:
    """Between runs: collect garbage, and on CUDA drain the queue and reset the peak."""
    gc.collect()
    if _cuda(llm):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def warm_up(llm: LLM, policy: str, kv_ratio: float, prompts: list[list[int]]) -> None:
    batch = [{"prompt_token_ids": p} for p in prompts[:WARMUP_PROMPTS]]
    llm.generate(batch, params(policy, kv_ratio, WARMUP_TOKENS))


class Requests:
    """Requests added to an engine for one run; on exit, any left are aborted."""

    def __init__(self, llm: LLM, tag: str, prompts: list[list[int]], sp: SamplingParams) -> None:
        self.engine = llm.engine
        self.ids = [f"gpu-{tag}-{i}" for i in range(len(prompts))]
        self._prompts, self._params = prompts, sp

    def __enter__(self) -> "Requests":
        for rid, prompt in zip(self.ids, self._prompts, strict=True):
            self.engine.add_request(rid, {"prompt_token_ids": prompt}, self._params)
        return self

    def __exit__(self, *exc: object) -> None:
        for rid in self.ids:
            self.engine.abort_request(rid)  # None for those that finished


def _deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    names = ("preemptions", "tokens_evicted", "blocks_freed_by_eviction")
    return {k: after[k] - before[k] for k in names}


def engine_throughput(llm: LLM, policy: str, prompts: list[list[int]], args: Any) -> dict[str, Any]:
    """Output tok/s of `prompts` under `policy`, stepped to completion."""
    warm_up(llm, policy, args.kv_ratio, prompts)
    _settle(llm)
    engine, before = llm.engine, llm.engine.stats()
    deadline = time.perf_counter() + args.timeout_s
    tokens, timed_out = 0, False
    sp = params(policy, args.kv_ratio, args.new_tokens)
    with Requests(llm, f"{policy}-{len(prompts)}", prompts, sp), StepClock(engine, False) as clock:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            if time.perf_counter() > deadline:
                timed_out = True
                break
            tokens += len(clock.step())  # one output per request that got a token
        if _cuda(llm):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    steps = clock.steps
    return {
        "policy": policy,
        "prompts": len(prompts),
        "output_tokens": tokens,
        "expected_tokens": len(prompts) * args.new_tokens,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "peak_running": max((s.running for s in steps), default=0),
        **_deltas(before, engine.stats()),
        "engine_steps": len(steps),
        "prompt_step": summarize(steps, "prompt"),
        "decode_step": summarize(steps, "decode"),
        "peak_gpu_gib": _peak_gib(llm),
        "timed_out": timed_out,
    }


def _peak_gib(llm: LLM) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if _cuda(llm) else None


def step_profile(llm: LLM, policy: str, prompts: list[list[int]], args: Any) -> dict[str, Any]:
    """Step times with len(prompts) running, each step synchronized: prompt
    steps, then `profile_decode_steps` decode steps of the whole batch, then
    `profile_steps` more under torch.profiler; what is left is aborted."""
    running = len(prompts)
    # Enough tokens that every timed step is a decode of the whole batch.
    max_tokens = max(args.new_tokens, args.profile_decode_steps + args.profile_steps + 2)
    warm_up(llm, policy, args.kv_ratio, prompts)
    _settle(llm)
    engine = llm.engine
    deadline = time.perf_counter() + args.timeout_s
    timed_out, decoded, profiler = False, 0, None
    sp = params(policy, args.kv_ratio, max_tokens)
    with Requests(llm, f"profile-{policy}", prompts, sp), StepClock(engine, True) as clock:
        while engine.has_unfinished_requests() and decoded < args.profile_decode_steps:
            if time.perf_counter() > deadline:
                timed_out = True
                break
            clock.step()
            last = clock.steps[-1] if clock.steps else None
            decoded += bool(last and last.kind == "decode" and last.batch == running)
        if not timed_out and args.profile_steps > 0:
            profiler = profile_steps(clock, args.profile_steps)
    return {
        "policy": policy,
        "running": running,
        "prompt_step": summarize(clock.steps, "prompt"),
        "decode_step": summarize(clock.steps, "decode", batch=running),
        "profiler": profiler,
        "timed_out": timed_out,
    }


def transformers_floor(folder: Path, prompts: list[list[int]], args: Any) -> dict[str, Any]:
    """transformers' batched generate on the same weights and prompts (all of
    one length: no padding), greedy, the full new tokens; `max_time` bounds it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(args.device).eval()
    model.generation_config.eos_token_id = None  # the full length, as ignore_eos
    ids = torch.tensor(prompts, device=args.device)
    cuda = ids.device.type == "cuda"
    try:
        _hf_generate(model, ids[:1], WARMUP_TOKENS, args.timeout_s)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = _hf_generate(model, ids, args.new_tokens, args.timeout_s)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    new = out.shape[1] - ids.shape[1]
    return {
        "prompts": len(prompts),
        "output_tokens": len(prompts) * new,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(len(prompts) * new / seconds, 1),
        "timed_out": new < args.new_tokens,
    }


def _hf_generate(model: Any, ids: torch.Tensor, new_tokens: int, max_time: float) -> Any:
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            max_time=max_time,
        )
