"""The OpenAI wire format (plus vLLM's extra request fields): pydantic models only.

Requests forbid unknown fields: a misspelt `kv_polcy` in `extra_body` must be
a 400 naming it, not a run silently made with the default policy.
"""

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from engine.runtime.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from kv_manager.policies import KV_SETTINGS, KVSetting

MAX_STOP_STRINGS = 64  # per request: each is searched for after every token
# torch seeds a generator from a 64-bit integer.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1

# -- errors -------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- shared request fields ----------------------------------------------------


class StreamOptions(BaseModel):
    # OpenAI keeps adding stream options; ignore the ones we do not know.
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema the output must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # "schema" would shadow a BaseModel method: aliased.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # outputs always follow the schema here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's structured_outputs field: exactly one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # "json" would shadow a BaseModel method: aliased.
    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _OpenAISamplingFields(BaseModel):
    """Fields shared by completion and chat requests, named as OpenAI and vLLM name them."""

    # NaN and Infinity are valid Python JSON but no valid value of any field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = None  # accepted only when equal to n (no beam search)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Token id (as a string, OpenAI's form) -> value added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = (
        None
    )
    # vLLM's extra sampling fields (the SDK's extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Top-N per prompt token (vLLM's); not with stream, as vLLM.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Structured output: OpenAI's response_format (vLLM takes it on
    # completions too), vLLM's guided_* fields and their newer form.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None


def _kv_request_field(setting: KVSetting) -> tuple[Any, Any]:
    """The request field of one KV setting: optional (None: the server's
    default), its type, help and valid values as KVPolicySettings declares
    them, so the OpenAPI schema documents them and a bad value is a 400."""
    kind = Literal[setting.limits.choices] if setting.limits.choices else setting.kind
    description = f"{setting.help} (null: the server's default)"
    return kind | None, Field(None, description=description, **setting.limits.bounds())


# The shared fields plus the per-request KV policy, whose fields are declared
# once, in kv_manager.policies.KVPolicySettings.
SamplingFields = create_model(
    "SamplingFields",
    __base__=_OpenAISamplingFields,
    __doc__=_OpenAISamplingFields.__doc__,
    **{s.name: _kv_request_field(s) for s in KV_SETTINGS},
)


class KVCacheDetails(BaseModel):
    """keyserve's part of the usage block, shaped as OpenAI's
    prompt_tokens_details: what the KV policy did with the request's cache.
    Over several sequences (n > 1, several prompts): the smallest budgets."""

    policy: str
    # Tokens each sequence keeps; null: the policy (full) keeps every token.
    budget_tokens: int | None = None
    # Whether a full pool squeezed a sequence below its budget (kv_pressure
    # squeeze), and the budget it was left with (null: never squeezed).
    squeezed: bool = False
    squeezed_budget_tokens: int | None = None
    # The kv_target_mass budget_tokens was chosen for at the end of the
    # prompt (null: the budget came from kv_ratio).
    target_mass: float | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    kv_cache_details: KVCacheDetails | None = None


def _now() -> int:
    return int(time.time())


# -- completions --------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one token's logprob, its rank (1: the most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, null for the first, else token id
# -> PromptLogprob for the prompt token and its top-N alternatives.
PromptLogprobsOut = list[dict[int, PromptLogprob] | None]


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or token id that ended the text.
    stop_reason: str | int | None = None


class CompletionChoice(CompletionStreamChoice):
    # vLLM's extra, with prompt_logprobs (or echo with logprobs).
    prompt_logprobs: PromptLogprobsOut | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


# -- chat -----------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template

    # Any role, as vLLM: the chat template decides what it renders (a role it
    # refuses is a 400 with the template's message).
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras.
    add_generation_prompt: bool = True


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    # vLLM's extra, with prompt_logprobs: the rendered prompt's tokens.
    prompt_logprobs: PromptLogprobsOut | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# -- models, tokenizer, version ------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "keyserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """Either `prompt` (raw text) or `messages` (run through the chat template)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
