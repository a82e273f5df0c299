"""The usage block says whether a request was squeezed and to what budget,
and /metrics counts the squeezes; a tiny random llama behind a real server,
read with the openai SDK."""

import openai
import pytest
import torch
from live_server import LiveServer, metric
from tiny_models import build_tiny_model

from engine import CompletionOutput, EngineConfig, KVUsage, LLMEngine, RequestOutput
from server import ServerSettings, create_app
from server.params import usage_of

# Five prompts of 4 + 4 + 5 + 6 + 3 blocks fill the 22-block pool; at kv_ratio
# 1 each decode then needs one block more, so the first decode step is short.
LENGTHS = [16, 16, 20, 24, 12]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    engine = LLMEngine(
        EngineConfig(
            model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=4,
            kv_cache_blocks=22, max_num_batched_tokens=128, kv_policy="keyformer",
            kv_ratio=1.0, kv_min_tokens=4, kv_pressure="squeeze",
        )
    )  # fmt: skip
    with LiveServer(create_app(engine, ServerSettings(model_name="tiny"))) as s:
        s.engine = engine
        yield s


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in LENGTHS]


def _complete(server, **extra):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    return client.completions.create(
        model="tiny", prompt=_prompts(), max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )  # fmt: skip


def test_usage_says_the_request_was_squeezed_and_to_what_budget(server):
    before = metric(server, "keyserve:num_squeezes_total")
    response = _complete(server)
    details = response.usage.model_extra["kv_cache_details"]
    assert details["policy"] == "keyformer" and details["budget_tokens"] == 12
    assert details["squeezed"] is True
    assert 4 <= details["squeezed_budget_tokens"] < 24
    assert response.usage.completion_tokens == 5 * 6
    assert metric(server, "keyserve:num_squeezes_total") > before
    assert metric(server, "keyserve:tokens_evicted_by_squeeze_total") > 0
    assert server.engine.kv.num_used_blocks == 0


def test_a_request_that_says_preempt_is_preempted_not_squeezed(server):
    before = metric(server, "keyserve:num_preemptions_total")
    response = _complete(server, kv_pressure="preempt")
    details = response.usage.model_extra["kv_cache_details"]
    assert details == {
        "policy": "keyformer",
        "budget_tokens": 12,
        "squeezed": False,
        "squeezed_budget_tokens": None,
        "target_mass": None,
    }
    assert metric(server, "keyserve:num_preemptions_total") > before


def test_a_bad_pressure_value_is_a_400_naming_it(server):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(server, kv_pressure="shrink")
    assert "kv_pressure" in str(err.value)


def test_usage_over_several_sequences_gives_the_smallest_budgets():
    def out(kv):
        return RequestOutput("r", None, [1, 2], [CompletionOutput(0, "", [3])], True, kv=kv)

    n = 1
    outputs = [
        out(KVUsage("h2o", 40, squeezed_budget=31, num_squeezes=2)),
        out(KVUsage("h2o", 30)),
        out(KVUsage("h2o", 50, squeezed_budget=35, num_squeezes=1)),
    ]
    details = usage_of(outputs, n).kv_cache_details
    assert (details.budget_tokens, details.squeezed, details.squeezed_budget_tokens) == (
        30,
        True,
        31,
    )
    full = usage_of([out(KVUsage("full", None))], n).kv_cache_details
    assert (full.budget_tokens, full.squeezed, full.squeezed_budget_tokens) == (None, False, None)
