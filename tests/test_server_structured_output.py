"""Structured output through the live server (SmolLM2), with the openai SDK
and raw HTTP: response_format json_object / json_schema, vLLM's guided_* and
structured_outputs fields, streamed or not, n > 1; a bad constraint is a 400
naming its field; the pool is whole after every test."""

import json
import re

import httpx
import jsonschema_rs
import openai
import pytest
from live_server import MODEL_NAME, wait_pool_whole
from pydantic import BaseModel

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a user of a web site as JSON."}]
SAMPLED = {"max_tokens": 48, "temperature": 0.8, "seed": 11}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    wait_pool_whole(live_server)


def _valid(text: str, schema: dict = PERSON) -> dict:
    doc = json.loads(text)
    assert jsonschema_rs.validator_for(schema).is_valid(doc), text
    return doc


def _post(live_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live_server.url}/v1/{path}", json=body, timeout=120)


def test_chat_json_schema_whole_and_streamed(client):
    kwargs = {"model": MODEL_NAME, "messages": ASK, "n": 2, "response_format": RESPONSE_FORMAT}
    whole = client.chat.completions.create(**kwargs, **SAMPLED)
    for choice in whole.choices:
        _valid(choice.message.content)
        assert choice.finish_reason == "stop"
    chunks = list(client.chat.completions.create(stream=True, **kwargs, **SAMPLED))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        # Same seed, same tokens: the stream adds up to the whole response.
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].finish_reason == "stop"


def test_completions_guided_json_whole_and_streamed(client):
    prompt = "A user of a web site, as JSON: "
    kwargs = {"model": MODEL_NAME, "prompt": prompt, "extra_body": {"guided_json": PERSON}}
    whole = client.completions.create(**kwargs, **SAMPLED)
    _valid(whole.choices[0].text)
    streamed = list(client.completions.create(stream=True, **kwargs, **SAMPLED))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_sdk_parse_with_a_pydantic_model(client):
    class Fruit(BaseModel):
        name: str
        color: str
        sweet: bool

    ask = [{"role": "user", "content": "Describe an apple as JSON."}]
    out = client.chat.completions.parse(
        model=MODEL_NAME, messages=ask, response_format=Fruit, max_tokens=64, temperature=0
    )
    fruit = out.choices[0].message.parsed
    assert isinstance(fruit, Fruit) and out.choices[0].finish_reason == "stop"


def test_json_object_is_any_json_object(client):
    ask = [{"role": "user", "content": "Give the name and age of a person as a JSON object."}]
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=ask,
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_guided_choice_and_regex_by_raw_http(live_server, path):
    body = {"prompt": "Is the sea salty?"} if path == "completions" else {"messages": ASK}
    body.update(n=3, **SAMPLED)
    choices = ["yes", "no", "it depends"]
    r = _post(live_server, path, {**body, "guided_choice": choices})
    assert r.status_code == 200, r.text
    assert all(_text(c) in choices for c in r.json()["choices"])
    regex = r"[A-Z][a-z]{1,8} [0-9]{2}"  # bounded: it ends within max_tokens
    r = _post(live_server, path, {**body, "guided_regex": regex})
    assert r.status_code == 200, r.text
    texts = [_text(c) for c in r.json()["choices"]]
    assert all(re.fullmatch(regex, t) for t in texts), texts
    assert all(c["finish_reason"] == "stop" for c in r.json()["choices"])


def _text(choice: dict) -> str:
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_vllm_structured_outputs_field(live_server):
    body = {"messages": ASK, **SAMPLED}
    r = _post(live_server, "chat/completions", {**body, "structured_outputs": {"json": PERSON}})
    assert r.status_code == 200, r.text
    _valid(r.json()["choices"][0]["message"]["content"])
    r = _post(live_server, "completions", {"prompt": "x", "structured_outputs": {"regex": "a{3}"}})
    assert r.json()["choices"][0]["text"] == "aaa"


@pytest.mark.parametrize(
    "extra, param, message",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
            "invalid JSON schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "number", "minimum": 2, "maximum": 1}}, "guided_json", "min"),
        ({"guided_regex": "a(b"}, "guided_regex", "invalid regex"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_grammar": "start: ("}, "guided_grammar", "invalid grammar"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one kind"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn", "Extra inputs"),
    ],
)
@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_bad_constraints_are_400_naming_the_field(live_server, path, extra, param, message):
    body = {"prompt": "x"} if path == "completions" else {"messages": ASK}
    r = _post(live_server, path, {**body, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert message in error["message"], error


def test_bad_schema_reaches_the_sdk_as_bad_request_and_the_engine_carries_on(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError, match="Invalid type: objekt"):
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=bad)
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, extra_body={"guided_choice": ["fine"]}, max_tokens=4
    )
    assert out.choices[0].message.content == "fine"
