"""Per-step timing of an engine: host wall time, the GPU's span (CUDA events)
and, for a few steps, the GPU's busy time (torch.profiler's kernel time).

A step is a prompt step when its batch holds a prompt chunk (decodes may ride
along), else a decode step. The batch is read from the scheduler's own
SchedulerOutput, tapped on the live engine: nothing in engine/ is changed.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from scheduler.output import SchedulerOutput


@dataclass
class Step:
    kind: str  # "prompt" or "decode"
    batch: int  # sequences in the step
    tokens: int  # tokens computed
    running: int  # the scheduler's running sequences once the step was scheduled
    wall_ms: float  # host: engine.step() call to return
    gpu_ms: float | None = None  # CUDA events around the call (None on CPU)


def step_kind(sched: SchedulerOutput) -> str:
    prompt = any(c.num_tokens > 1 or c.start < c.request.num_prompt_tokens for c in sched.chunks)
    return "prompt" if prompt else "decode"


class StepClock:
    """Time each `step()` of `engine`; use as a context manager.

    With `sync`, each step ends with torch.cuda.synchronize(), so its wall time
    holds the GPU work it launched (the eviction after sampling included);
    without, the host moves on as the engine would, and the wall time is the
    host's. CUDA events cost no sync: their times are read on exit.
    """

    def __init__(self, engine: Any, sync: bool) -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.sync = sync and self.cuda
        self.steps: list[Step] = []
        self._events: list[tuple[Any, Any]] = []
        self._last: SchedulerOutput | None = None
        self._running = 0
        self._schedule = engine.scheduler.schedule

    def __enter__(self) -> "StepClock":
        # An instance attribute shadows the method: the engine's next
        # schedule() call goes through _tap.
        self.engine.scheduler.schedule = self._tap
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.scheduler.schedule
        if self.cuda:
            torch.cuda.synchronize()
            for step, (start, end) in zip(self.steps, self._events, strict=True):
                step.gpu_ms = start.elapsed_time(end)

    def _tap(self) -> SchedulerOutput:
        self._last = self._schedule()
        self._running = self.engine.scheduler.num_running
        return self._last

    def step(self) -> list[Any]:
        """engine.step(), timed; returns its outputs."""
        self._last = None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        outputs = self.engine.step()
        if self.cuda:
            end.record()
            if self.sync:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        sched = self._last
        if sched is not None and not sched.is_empty:
            kind, batch = step_kind(sched), len(sched.chunks)
            self.steps.append(
                Step(kind, batch, sched.num_batched_tokens, self._running, wall * 1e3)
            )
            if self.cuda:
                self._events.append((start, end))
        return outputs


def summarize(steps: list[Step], kind: str, batch: int | None = None) -> dict[str, Any]:
    """Medians over the steps of `kind` (of `batch` sequences, when given)."""
    chosen = [s for s in steps if s.kind == kind and (batch is None or s.batch == batch)]
    if not chosen:
        return {"steps": 0}
    gpu = [s.gpu_ms for s in chosen if s.gpu_ms is not None]
    return {
        "steps": len(chosen),
        "wall_ms_median": round(statistics.median(s.wall_ms for s in chosen), 2),
        "gpu_ms_median": round(statistics.median(gpu), 2) if gpu else None,
        "batch_median": statistics.median(s.batch for s in chosen),
        "tokens_median": statistics.median(s.tokens for s in chosen),
        "wall_s_total": round(sum(s.wall_ms for s in chosen) / 1e3, 3),
    }


def gpu_busy_us(events: list[Any]) -> float:
    """The GPU's own events' time (kernels, copies), as the profiler's table
    totals it: a launching CPU op's device time would count them twice."""
    from torch.autograd import DeviceType

    return sum(
        e.self_device_time_total
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )


def profile_steps(clock: StepClock, count: int, row_limit: int = 15) -> dict[str, Any]:
    """Run `count` steps under torch.profiler: the GPU's busy time per step
    (its kernels' own time; None on CPU) and the top ops by that time (by
    host time on CPU). The steps are timed too, but kept apart from
    `clock.steps`: the profiler slows the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    kept = len(clock.steps)
    with profile(activities=activities) as prof:
        for _ in range(count):
            if not clock.engine.has_unfinished_requests():
                break
            clock.step()
        if clock.cuda:
            torch.cuda.synchronize()
    profiled, clock.steps = clock.steps[kept:], clock.steps[:kept]
    del clock._events[kept:]
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if clock.cuda else "self_cpu_time_total"
    busy_us = gpu_busy_us(prof.events()) if clock.cuda else None
    n = max(len(profiled), 1)
    return {
        "steps": len(profiled),
        "kinds": sorted({s.kind for s in profiled}),
        "batch": [s.batch for s in profiled],
        "gpu_busy_ms_per_step": None if busy_us is None else round(busy_us / 1e3 / n, 2),
        "top_ops": averages.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=50),
    }
