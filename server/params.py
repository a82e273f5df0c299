"""From an OpenAI request to engine requests: sampling params, fan-out, usage."""

from collections.abc import Sequence
from dataclasses import replace

from engine import RequestOutput, SamplingParams
from engine.runtime.llm_engine import PromptType
from kv_manager.policies import KV_POLICY_FIELDS
from server.async_engine import EngineRequest
from server.errors import BadRequestError, ModelNotFoundError, bad_request_from
from server.protocol import SamplingFields, UsageInfo

# Request fields passed to SamplingParams under the same name when set.
_PASSTHROUGH = (
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    *KV_POLICY_FIELDS,
)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFoundError(requested)


def build_sampling_params(
    request: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """One engine request's params (n=1: the server fans out n requests itself).
    The engine's ValueError becomes a 400 naming the field."""
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequestError("best_of must equal n: beam search is not supported", "best_of")
    if request.logit_bias:
        raise BadRequestError("logit_bias is not supported", "logit_bias")
    kwargs = {
        name: getattr(request, name) for name in _PASSTHROUGH if getattr(request, name) is not None
    }
    # OpenAI's default temperature is 1 (sampling); 0 is greedy.
    kwargs["temperature"] = 1.0 if request.temperature is None else request.temperature
    kwargs["stop"] = request.stop
    kwargs["stop_token_ids"] = request.stop_token_ids or []
    try:
        return SamplingParams(n=1, max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except ValueError as e:
        raise bad_request_from(e, set(type(request).model_fields)) from e


def fan_out(
    base_id: str, prompts: Sequence[PromptType], params: SamplingParams, n: int
) -> list[EngineRequest]:
    """n engine requests per prompt, choice index = prompt * n + i. A seeded
    request gives completion i the seed seed + i, as vLLM does, so the n
    completions differ yet each is reproducible."""
    requests = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            requests.append((f"{base_id}-{p}-{i}", prompt, replace(params, seed=seed)))
    return requests


def usage_of(outputs: Sequence[RequestOutput], n: int) -> UsageInfo:
    """Prompt tokens count once per prompt (not per completion), as OpenAI counts them."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs[::n])
    completion = sum(len(out.outputs[0].token_ids) for out in outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
