"""The live server, through the openai SDK and raw HTTP: logit_bias, echo with
logprobs, vLLM's prompt_logprobs, chat roles beyond OpenAI's five, and prompt
token ids outside the vocabulary, as vLLM and OpenAI clients expect them."""

import asyncio

import httpx
import openai
import pytest
from live_server import MODEL_NAME, wait_pool_whole

from engine.loading.tokenizer import load_tokenizer
from server import ServerSettings, build_app

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 4}
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    wait_pool_whole(live_server)


def _tokens(live_server, text: str) -> list[int]:
    return httpx.post(f"{live_server.url}/tokenize", json={"prompt": text}).json()["tokens"]


def _post(live_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live_server.url}/v1/{path}", json=body, timeout=60)


def _error(response: httpx.Response, param: str | None) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


# -- logit_bias ---------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens_in_completions(client, live_server):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=0, **GREEDY)
    first = _tokens(live_server, plain.choices[0].logprobs.tokens[0])
    assert len(first) == 1
    banned = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, logit_bias={str(first[0]): -100}, logprobs=0, **GREEDY
    )
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    (banana,) = _tokens(live_server, " banana")
    forced = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, logit_bias={str(banana): 100}, max_tokens=4, seed=1
    )
    assert forced.choices[0].text == " banana" * 4


def test_logit_bias_in_chat(client, live_server):
    (banana,) = _tokens(live_server, " banana")
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, logit_bias={str(banana): 100}, **GREEDY
    )
    assert out.choices[0].message.content == " banana" * 4


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
@pytest.mark.parametrize(
    "bias, param, named",
    [
        ({"abc": 1}, "logit_bias", "'abc'"),
        ({"1.5": 1}, "logit_bias", "'1.5'"),
        ({" 12": 1}, "logit_bias", "' 12'"),
        ({"١٢": 1}, "logit_bias", "'١٢'"),  # Arabic-Indic digits: int() would take them
        ({"12": 1, "49152": -5}, "logit_bias", "token id 49152 is out of vocabulary"),
        ({"-1": 1}, "logit_bias", "token id -1 is out of vocabulary"),
        ({"9" * 5000: 1}, "logit_bias", "out of vocabulary"),
        ({"5": 100.5}, "logit_bias.5", "less than or equal to 100"),
        ({"5": -101}, "logit_bias.5", "greater than or equal to -100"),
    ],
)
def test_bad_logit_bias_is_400_naming_the_key(live_server, path, bias, param, named):
    body = {"logit_bias": bias, "max_tokens": 1}
    body.update({"messages": CHAT} if path.startswith("chat") else {"prompt": "x"})
    assert named in _error(_post(live_server, path, body), param)


def test_bad_logit_bias_reaches_the_sdk_as_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="logit_bias key 'x' is not an integer"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, logit_bias={"x": 1})


# -- echo with logprobs, prompt_logprobs ----------------------------------------


def test_echo_with_logprobs_covers_the_prompt(client, live_server):
    prompt_ids = _tokens(live_server, PROMPT)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=2, **GREEDY)
    echo = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2, **GREEDY
    )
    lp, gen = echo.choices[0].logprobs, plain.choices[0].logprobs
    n = len(prompt_ids)
    assert echo.choices[0].text == PROMPT + plain.choices[0].text
    assert "".join(lp.tokens) == echo.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 4
    # OpenAI's shape: the first prompt token has no logprob and no alternatives.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, logprob, top in zip(
        lp.tokens[1:n], lp.token_logprobs[1:n], lp.top_logprobs[1:n], strict=True
    ):
        assert logprob < 0 and top[token] == logprob
        assert 2 <= len(top) <= 3 and max(top.values()) >= logprob  # top 2 + the prompt token
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    # The generated tokens' part is the plain response's, offsets shifted by the prompt.
    assert lp.tokens[n:] == gen.tokens and lp.token_logprobs[n:] == gen.token_logprobs
    assert lp.top_logprobs[n:] == gen.top_logprobs
    assert lp.text_offset[n:] == [o + len(PROMPT) for o in gen.text_offset]
    # vLLM also returns them as prompt_logprobs, keyed by token id.
    prompt_lp = echo.choices[0].prompt_logprobs
    assert prompt_lp[0] is None
    for token_id, entry, logprob in zip(
        prompt_ids[1:], prompt_lp[1:], lp.token_logprobs[1:n], strict=True
    ):
        assert entry[str(token_id)]["logprob"] == logprob


def test_streamed_echo_with_logprobs_equals_the_whole_response(client):
    kwargs = {"model": MODEL_NAME, "prompt": PROMPT, "echo": True, "logprobs": 1, "n": 2}
    whole = client.completions.create(**kwargs, **GREEDY)
    chunks = list(client.completions.create(stream=True, **kwargs, **GREEDY))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == whole.choices[index].text
        streamed = [c.logprobs for c in mine if c.logprobs]
        expected = whole.choices[index].logprobs
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((getattr(s, field) for s in streamed), []) == getattr(expected, field)


def test_completion_prompt_logprobs_are_vllm_shaped(client, live_server):
    prompt_ids = _tokens(live_server, PROMPT)
    body = {"prompt": PROMPT, "prompt_logprobs": 2, **GREEDY}
    choice = _post(live_server, "completions", body).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    assert choice["logprobs"] is None  # prompt_logprobs alone asks for no sample logprobs
    for token_id, entry in zip(prompt_ids[1:], entries[1:], strict=True):
        mine = entry[str(token_id)]
        assert set(mine) == {"logprob", "rank", "decoded_token"} and mine["rank"] >= 1
        # The top 2, and the prompt token (one of them, or after them).
        assert sorted(e["rank"] for e in entry.values() if e["rank"] <= 2) == [1, 2]
        assert all(e["rank"] <= 2 for t, e in entry.items() if t != str(token_id))
    # The last prompt token's logprob is what a run on the prompt before it gives that token.
    head = client.completions.create(
        model=MODEL_NAME, prompt=prompt_ids[:-1], logprobs=20, temperature=0, max_tokens=1
    )
    last = entries[-1][str(prompt_ids[-1])]
    assert head.choices[0].logprobs.top_logprobs[0][last["decoded_token"]] == pytest.approx(
        last["logprob"], abs=1e-4
    )
    # The SDK keeps vLLM's extra field.
    sdk = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, extra_body={"prompt_logprobs": 0}, **GREEDY
    )
    assert [e and list(e) for e in sdk.choices[0].prompt_logprobs] == [None] + [
        [str(t)] for t in prompt_ids[1:]
    ]


def test_chat_prompt_logprobs_cover_the_rendered_prompt(live_server):
    body = {"messages": CHAT, "prompt_logprobs": 1, **GREEDY}
    out = _post(live_server, "chat/completions", body).json()
    entries = out["prompt_logprobs"]
    assert len(entries) == out["usage"]["prompt_tokens"] and entries[0] is None
    assert all(1 <= len(e) <= 2 for e in entries[1:])
    plain = _post(live_server, "chat/completions", {"messages": CHAT, **GREEDY}).json()
    assert plain["prompt_logprobs"] is None
    assert plain["choices"][0]["message"] == out["choices"][0]["message"]


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_prompt_logprobs_are_not_streamed(live_server, path):
    body = {"prompt_logprobs": 1, "stream": True, "max_tokens": 2}
    body.update({"messages": CHAT} if path.startswith("chat") else {"prompt": "x"})
    assert "stream" in _error(_post(live_server, path, body), "prompt_logprobs")
    body["prompt_logprobs"] = 0  # as vLLM: accepted, and not in the stream
    with httpx.stream("POST", f"{live_server.url}/v1/{path}", json=body) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and not any("prompt_logprobs" in e for e in events)


@pytest.mark.parametrize("value", [-1, 21, "two"])
def test_prompt_logprobs_out_of_range_is_400(live_server, value):
    _error(
        _post(live_server, "completions", {"prompt": "x", "prompt_logprobs": value}),
        "prompt_logprobs",
    )


# -- chat roles -------------------------------------------------------------------


def test_any_role_goes_to_the_chat_template(client, live_server):
    messages = [{"role": "wizard", "content": "Cast a spell."}, {"role": "SYSTEM", "content": "x"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    tokens = httpx.post(f"{live_server.url}/tokenize", json={"messages": messages}).json()
    text = httpx.post(f"{live_server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert "<|im_start|>wizard\nCast a spell.<|im_end|>" in text["prompt"]
    assert "<|im_start|>SYSTEM\nx<|im_end|>" in text["prompt"]


@pytest.mark.parametrize("role", [None, 7, ["user"]])
def test_a_role_that_is_not_a_string_is_400(live_server, role):
    body = {"messages": [{"role": role, "content": "hi"}]}
    _error(_post(live_server, "chat/completions", body), "messages.0.role")


def test_a_role_the_template_refuses_is_400_with_its_message(live_server):
    """A template that knows only some roles (many raise on others): its
    error is the client's 400, for chat and /tokenize alike."""
    strict = load_tokenizer(live_server.engine.model_path)
    strict.hf.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    # A second app over the same engine with that template; it refuses before
    # anything is generated, so it needs no lifespan of its own.
    app = build_app(live_server.app.state.engine, ServerSettings(MODEL_NAME), strict)
    wizard = [{"role": "wizard", "content": "hi"}]

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            chat = await c.post("/v1/chat/completions", json={"messages": wizard})
            assert "Unknown role: wizard" in _error(chat, "messages")
            assert "Unknown role: wizard" in _error(
                await c.post("/tokenize", json={"messages": wizard}), "messages"
            )
            ok = await c.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
            assert ok.status_code == 200

    asyncio.run(run())


# -- prompt token ids outside the vocabulary ---------------------------------------


def test_out_of_vocabulary_prompt_ids_are_named(client, live_server):
    with pytest.raises(openai.BadRequestError, match="out of vocabulary") as raised:
        client.completions.create(model=MODEL_NAME, prompt=[1, 2, 99999], max_tokens=2)
    assert "token id 99999 is out of vocabulary" in raised.value.message
    body = {"prompt": [[1, 2], [7, 10**9, -3]], "max_tokens": 2}
    message = _error(_post(live_server, "completions", body), "prompt")
    assert "token ids 1000000000, -3 are out of vocabulary" in message
