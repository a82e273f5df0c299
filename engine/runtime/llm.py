"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, params)."""

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engine.config import EngineConfig
from engine.runtime.llm_engine import LLMEngine, PromptType
from engine.runtime.outputs import KVUsage, RequestMetrics, RequestOutput
from engine.runtime.sampling_params import SamplingParams


class LLM:
    """Generate for a list of prompts with continuous batching.

    `LLM()` loads the embedded default model; `LLM(model=path)` a folder or a
    GGUF file. Other keyword arguments are `EngineConfig` fields.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order, with `n` completions each."""
        prompts = _as_prompt_list(prompts)
        params = _as_param_list(sampling_params, len(prompts))
        # Validate everything before queueing anything, so one bad prompt
        # leaves no half-queued batch behind.
        groups = []
        for prompt, p in zip(prompts, params, strict=True):
            base = f"offline-{next(self._ids)}"
            groups.append([(f"{base}-{i}", prompt, _child_params(p, i)) for i in range(p.n)])
        added = []
        try:
            for group in groups:
                for rid, prompt, p in group:
                    self.engine.add_request(rid, prompt, p)
                    added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        finished = self._run_to_completion()
        return [_merge(group, finished) for group in groups]

    def _run_to_completion(self) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return finished


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def _as_param_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def _child_params(p: SamplingParams, i: int) -> SamplingParams:
    # Each of the n completions samples with its own stream: seed + i.
    seed = None if p.seed is None else p.seed + i
    return replace(p, n=1, seed=seed)


def _merge(
    group: list[tuple[str, PromptType, SamplingParams]], finished: dict[str, RequestOutput]
) -> RequestOutput:
    outs = [finished[rid] for rid, _, _ in group]
    completions = []
    for i, out in enumerate(outs):
        c = out.outputs[0]
        c.index = i
        completions.append(c)
    first = outs[0]
    return RequestOutput(
        group[0][0].rsplit("-", 1)[0],
        first.prompt,
        first.prompt_token_ids,
        completions,
        finished=True,
        prompt_logprobs=first.prompt_logprobs,
        kv=KVUsage.merge([out.kv for out in outs]),
        metrics=RequestMetrics.merge([out.metrics for out in outs]),
    )
