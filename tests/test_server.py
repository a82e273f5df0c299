"""The live server driven by the official openai SDK: completions, chat,
streaming, sampling controls, n > 1, logprobs, KV policies per request."""

import httpx
import openai
import pytest
from live_server import MODEL_NAME, metric, wait_pool_whole

GREEDY = {"temperature": 0, "max_tokens": 8}
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def _pool_is_whole_after(request):
    yield
    if "live_server" in request.fixturenames:
        wait_pool_whole(request.getfixturevalue("live_server"))


def test_completion_counts_tokens(client, live_server):
    out = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", **GREEDY)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL_NAME
    assert choice.text.strip() and choice.finish_reason == "length"
    tokens = httpx.post(f"{live_server.url}/tokenize", json={"prompt": "The capital of France is"})
    assert out.usage.prompt_tokens == tokens.json()["count"]
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_model_is_optional_and_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    out = client.completions.create(model=None, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert out.usage.prompt_tokens == 3


def test_chat_completion(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **GREEDY)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content
    assert out.usage.completion_tokens <= 8


def test_chat_stream_with_usage_equals_the_whole_response(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_stream_is_sse_ending_in_done(live_server, client):
    body = {"prompt": "Once upon a time", "stream": True, **GREEDY}
    with httpx.stream("POST", f"{live_server.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    whole = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", **GREEDY)
    streamed = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        out = client.completions.create(
            model=MODEL_NAME, prompt="My favourite animal is", max_tokens=10, seed=seed
        )
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first


def test_stop_string_ends_text(client):
    out = client.completions.create(
        model=MODEL_NAME, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=16, stop=[" 5"]
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == " 5"
    assert choice.text.endswith("4,") and " 5" not in choice.text


def test_n_completions_have_their_own_seeds(client):
    params = {"max_tokens": 8, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(
        model=MODEL_NAME, prompt="Name a colour:", n=2, seed=5, **params
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text
    # The prompt counts once, the completions each.
    assert out.usage.completion_tokens == 16 and out.usage.prompt_tokens < 16
    # Completion i samples with seed + i: the same as a single request seeded so.
    second = client.completions.create(model=MODEL_NAME, prompt="Name a colour:", seed=6, **params)
    assert second.choices[0].text == out.choices[1].text


def test_vllm_extra_fields(client):
    out = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=6,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 6,
            "seed": 3,
        },
    )
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL_NAME, prompt="The sky is", logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    # Greedy: the chosen token is the most likely one.
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and top[token] == logprob == max(top.values())
    echo = client.completions.create(model=MODEL_NAME, prompt="The sky is", echo=True, **GREEDY)
    assert echo.choices[0].text == "The sky is" + out.choices[0].text


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert content[0].bytes == list(content[0].token.encode())


@pytest.mark.parametrize(
    "kv",
    [
        {"kv_policy": "keyformer"},
        {"kv_policy": "snapkv"},
        {"kv_policy": "snapkv", "score_window": 8, "snapkv_pooling": "avg", "snapkv_kernel": 5},
        {"kv_policy": "keyformer", "score_window": 16, "decode_scoring": "frozen"},
    ],
)
def test_kv_policy_per_request_evicts(client, live_server, kv):
    before = metric(live_server, "keyserve:tokens_evicted_total", model_name=MODEL_NAME)
    freed = metric(live_server, "keyserve:blocks_freed_by_eviction_total", model_name=MODEL_NAME)
    prompt = " ".join(f"item {i} is a {w}." for i, w in enumerate(["cat", "dog", "owl"] * 8))
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={**kv, "kv_ratio": 0.5, "kv_min_tokens": 16},
    )
    assert out.usage.model_extra["kv_cache_details"]["policy"] == kv["kv_policy"]
    assert out.usage.prompt_tokens > 100 and out.usage.completion_tokens == 6
    after = metric(live_server, "keyserve:tokens_evicted_total", model_name=MODEL_NAME)
    # Cut to half the prompt: at least prompt/2 tokens leave the cache.
    assert after - before >= out.usage.prompt_tokens // 2
    assert (
        metric(live_server, "keyserve:blocks_freed_by_eviction_total", model_name=MODEL_NAME)
        > freed
    )


def test_tokenize_detokenize_version_health(live_server):
    url = live_server.url
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] > 0
    text = httpx.post(f"{url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == "hello world"
    chat = httpx.post(f"{url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > ids["count"]
    assert httpx.get(f"{url}/version").json()["version"]
    assert httpx.get(f"{url}/health").status_code == 200
