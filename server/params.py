"""From an OpenAI request to engine requests: sampling params, fan-out, usage."""

import re
from collections.abc import Sequence
from dataclasses import replace

from engine import KVUsage, RequestOutput, SamplingParams, StructuredOutputsParams
from engine.runtime.llm_engine import PromptType
from kv_manager.policies import KV_POLICY_FIELDS
from server.async_engine import EngineRequest
from server.errors import BadRequestError, ModelNotFoundError, bad_request_from
from server.protocol import KVCacheDetails, SamplingFields, UsageInfo

# ASCII digits only: int() would also take "١٢", " 12" and "1_2".
_INTEGER = re.compile(r"-?[0-9]+")
_MAX_ID_DIGITS = 18

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
    request: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """One engine request's params (n=1: the server fans out n requests itself).
    The engine's ValueError becomes a 400 naming the field."""
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequestError("best_of must equal n: beam search is not supported", "best_of")
    kwargs = {
        name: getattr(request, name) for name in _PASSTHROUGH if getattr(request, name) is not None
    }
    # OpenAI's default temperature is 1 (sampling); 0 is greedy.
    kwargs["temperature"] = 1.0 if request.temperature is None else request.temperature
    kwargs["stop"] = request.stop
    kwargs["stop_token_ids"] = request.stop_token_ids or []
    kwargs["logit_bias"] = parse_logit_bias(request.logit_bias)
    try:
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
            **kwargs,
        )
    except ValueError as e:
        raise bad_request_from(e, set(type(request).model_fields)) from e


def parse_logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI writes the token ids as strings: a key that is not an integer is
    a 400 naming it. Ids outside the vocabulary are the engine's to refuse."""
    if not bias:
        return None
    parsed = {}
    for key, value in bias.items():
        if not _INTEGER.fullmatch(key):
            raise BadRequestError(
                f"logit_bias key {_shown(key)} is not an integer token id", "logit_bias"
            )
        if len(key.lstrip("-")) > _MAX_ID_DIGITS:
            # int() of a huge digit string is slow (and refused past 4,300
            # digits); no vocabulary comes near it anyway.
            raise BadRequestError(
                f"logit_bias: token id {_shown(key)} is out of vocabulary", "logit_bias"
            )
        parsed[int(key)] = value
    return parsed


def _shown(key: str) -> str:
    """A client's key for an error message, cut short if it is long."""
    return repr(key if len(key) <= 40 else key[:40] + "...")


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
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        kv_cache_details=_kv_details(KVUsage.merge([out.kv for out in outputs])),
    )


def _kv_details(kv: KVUsage | None) -> KVCacheDetails | None:
    if kv is None:
        return None
    return KVCacheDetails(
        policy=kv.policy,
        budget_tokens=kv.budget,
        squeezed=kv.squeezed_budget is not None,
        squeezed_budget_tokens=kv.squeezed_budget,
        target_mass=kv.target_mass,
    )


def check_prompt_logprobs(request: SamplingFields) -> None:
    """As vLLM: prompt logprobs come in the whole response only, not in a stream."""
    if request.stream and request.prompt_logprobs:
        raise BadRequestError(
            "prompt_logprobs are not available when stream is true", "prompt_logprobs"
        )
