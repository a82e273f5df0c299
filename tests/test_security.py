"""A guarded API: the key on every client route, compared in constant time and
never logged; loopback by default; no CORS unless configured; size and queue
limits in the config; weights only from safetensors or GGUF."""

import asyncio
import hmac
import logging
import re
from pathlib import Path

import httpx
import openai
import pytest
from live_server import MODEL_NAME, wait_pool_whole
from starlette.requests import Request

from server import ServerSettings, build_app, create_app
from server.cli import build_parser, main, serve_config, server_config
from server.errors import AuthenticationError, check_api_key
from server.limits import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_WAITING,
    MAX_SEQUENCES_PER_REQUEST,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-keyserve-Zq8Lw3Xv9Tn2"
OPEN_ROUTES = {"/health", "/metrics"}  # probes and Prometheus scrape without a key


def _app(live_server, **settings):
    # Over the live engine, without a lifespan of its own: only routes that do
    # not generate are called, or ones refused before they reach the engine.
    return build_app(live_server.app.state.engine, ServerSettings(MODEL_NAME, **settings), None)


def _call(app, fn):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await fn(c)

    return asyncio.run(run())


def test_every_route_but_health_and_metrics_needs_the_key(live_server):
    app = _app(live_server, api_key=KEY)
    # The published routes, and the schema itself (not listed in it).
    routes = [(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops]
    routes.append(("GET", "/openapi.json"))
    paths = {p for _, p in routes}
    assert {"/v1/completions", "/tokenize", "/version", "/health"} <= paths

    async def check(c):
        for method, path in routes:
            anonymous = await c.request(method, path)
            wrong = await c.request(method, path, headers={"authorization": f"Bearer {KEY}x"})
            if path in OPEN_ROUTES:
                assert anonymous.status_code == 200, path
                continue
            for r in (anonymous, wrong):
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/docs", "/redoc"):  # no docs pages (they load scripts from a CDN)
            assert (await c.get(path)).status_code in (401, 404)
        good = {"authorization": f"Bearer {KEY}"}
        assert (await c.get("/version", headers=good)).status_code == 200
        schema = await c.get("/openapi.json", headers=good)
        assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]

    _call(app, check)


def _request(authorization: str | None = None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def _accepts(authorization: str | None, api_key: str | None = KEY) -> bool:
    try:
        check_api_key(_request(authorization), api_key)
    except AuthenticationError:
        return False
    return True


def test_the_key_check_accepts_the_key_and_nothing_else():
    assert _accepts(f"Bearer {KEY}")
    assert _accepts(f"bearer {KEY}")  # the scheme is case-insensitive
    wrong_same_length = KEY[:-1] + ("x" if KEY[-1] != "x" else "y")
    assert len(wrong_same_length) == len(KEY)
    refused = {
        "wrong key, same length": f"Bearer {wrong_same_length}",
        "a prefix of the key": f"Bearer {KEY[:-1]}",
        "the key and more": f"Bearer {KEY}x",
        "empty key": "Bearer ",
        "no scheme": KEY,
        "another scheme": f"Basic {KEY}",
        "no header": None,
    }
    for what, header in refused.items():
        assert not _accepts(header), what
    # No key configured: no auth at all.
    assert _accepts(None, api_key=None) and _accepts("Bearer anything", api_key=None)


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_key_is_refused_at_start(monkeypatch, capsys, key):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the key was checked")

    monkeypatch.setattr("engine.LLMEngine", must_not_load)
    assert main(["serve", "--api-key", key]) == 2
    assert "API key (--api-key or $KEYSERVE_API_KEY) is empty" in capsys.readouterr().err
    monkeypatch.setenv("KEYSERVE_API_KEY", key)  # the flag's default when the parser is built
    assert main(["serve"]) == 2
    assert "is empty" in capsys.readouterr().err
    # Nor by any other way in: the app never holds a key that "Bearer " would match.
    with pytest.raises(ValueError, match="is empty"):
        ServerSettings(MODEL_NAME, api_key=key)


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """The verdict is hmac.compare_digest's alone (whose time does not depend
    on where the bytes differ): no == or early exit decides before it."""
    calls = []

    def compare_digest_says_yes(a, b):
        calls.append((a, b))
        return True

    monkeypatch.setattr(hmac, "compare_digest", compare_digest_says_yes)
    for token in (KEY[:-1] + "?", "short", ""):
        assert _accepts(f"Bearer {token}")  # so no other comparison refused it
    assert calls == [(t.encode(), KEY.encode()) for t in (KEY[:-1] + "?", "short", "")]


def test_the_key_never_reaches_the_logs(live_server, caplog):
    app = _app(live_server, api_key=KEY)

    async def requests(c):
        good = {"authorization": f"Bearer {KEY}"}
        bad = {"authorization": f"Bearer {KEY[:-1]}"}
        out = [
            await c.get("/v1/models", headers=good),
            await c.get("/v1/models", headers=bad),
            await c.post("/tokenize", headers=good, json={"prompt": "x"}),
            await c.post("/v1/completions", headers=bad, json={"prompt": "x"}),
            await c.post("/v1/completions", headers=good, json={"model": "other", "prompt": "x"}),
        ]
        return out

    with caplog.at_level(logging.DEBUG):
        responses = _call(app, requests)
    assert [r.status_code for r in responses] == [200, 401, 400, 401, 404]
    assert KEY not in caplog.text and KEY[:-1] not in caplog.text
    for r in responses:
        assert KEY[:-1] not in r.text  # nor in any answer


def test_binds_loopback_unless_told_otherwise():
    assert server_config(build_parser().parse_args(["serve"])).host == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    assert server_config(args).host == "0.0.0.0"


def test_no_cors_headers_by_default(live_server):
    app = _app(live_server)

    async def check(c):
        origin = {"origin": "https://evil.example"}
        r = await c.get("/v1/models", headers=origin)
        assert r.status_code == 200
        preflight = await c.options(
            "/v1/completions",
            headers=origin | {"access-control-request-method": "POST"},
        )
        for response in (r, preflight):
            assert not any(h.startswith("access-control-") for h in response.headers)

    _call(app, check)
    # Also on the real server.
    r = httpx.get(f"{live_server.url}/v1/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_only_for_the_configured_origins(live_server):
    app = _app(live_server, allowed_origins=["https://ok.example"])

    async def check(c):
        ok = await c.get("/v1/models", headers={"origin": "https://ok.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ok.example"
        other = await c.get("/v1/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers

    _call(app, check)


def test_the_model_list_names_no_path(live_server):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    listed = client.models.with_raw_response.list()
    (card,) = listed.parse().data
    assert (card.id, card.root) == (MODEL_NAME, MODEL_NAME)
    assert card.max_model_len == live_server.engine.max_model_len
    model_path = live_server.engine.model_path
    assert model_path.exists() and str(model_path) not in listed.text


def test_limits_are_in_the_config(tmp_path):
    serve = server_config(build_parser().parse_args(["serve"]))
    assert serve.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert (serve.allowed_origins, serve.max_waiting) == (None, DEFAULT_MAX_WAITING)
    args = build_parser().parse_args(
        ["serve", "--max-request-bytes", "4096", "--max-waiting", "8", "--max-num-seqs", "4"]
        + ["--allowed-origins", "https://a.example", "https://b.example"]
    )
    serve = server_config(args)
    assert (serve.max_request_bytes, serve.max_waiting, args.max_num_seqs) == (4096, 8, 4)
    assert serve.allowed_origins == ["https://a.example", "https://b.example"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-request-bytes", "0"])
    # The same limits from a YAML file (engine: and server: sections); flags still win.
    path = tmp_path / "limits.yaml"
    path.write_text(
        "engine:\n  max_num_seqs: 4\n"
        "server:\n  max_request_bytes: 2048\n  max_waiting: 16\n"
        "  allowed_origins: [https://a.example]\n"
    )
    args = build_parser().parse_args(["serve", "--config", str(path), "--max-waiting", "2"])
    serve = server_config(args)
    assert (serve.max_request_bytes, serve.max_waiting) == (2048, 2)
    assert serve.allowed_origins == ["https://a.example"]
    assert serve_config(args).max_num_seqs == 4


def test_the_queue_is_bounded_by_default(live_server):
    assert DEFAULT_MAX_WAITING == 1024
    app = create_app(live_server.engine, ServerSettings(MODEL_NAME))  # not started
    assert app.state.engine.max_waiting == DEFAULT_MAX_WAITING


def test_one_request_adds_at_most_256_sequences(live_server):
    assert MAX_SEQUENCES_PER_REQUEST == 256
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    # Ten thousand one-token prompts (a 1 MiB body holds ten times more).
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[[1]] * 10_000, max_tokens=1)
    assert e.value.param == "prompt" and "10000 sequences" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=["a", "b", "c"], n=128, max_tokens=1)
    assert e.value.param == "n" and "384 sequences (3 prompts x n=128)" in e.value.message
    # Right at the limit it is served, every choice.
    out = client.completions.create(
        model=MODEL_NAME, prompt=[[1, 2], [3, 4]], n=128, max_tokens=1, temperature=0
    )
    assert sorted(c.index for c in out.choices) == list(range(256))
    assert out.usage.completion_tokens == 256
    wait_pool_whole(live_server)


def _package_sources():
    for package in ("server", "engine", "scheduler", "kv_manager"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_weights_load_only_from_safetensors_or_gguf():
    """No pickle anywhere in the package: no pickle/dill/joblib import, no
    torch.load without weights_only=True, no numpy load with allow_pickle."""
    bad = []
    for path in _package_sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve)\b", text, re.M):
            bad.append(f"{rel}: imports a pickle module")
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                bad.append(f"{rel}: {call.group(0)}")
        if "allow_pickle=True" in text:
            bad.append(f"{rel}: allow_pickle=True")
    assert not bad, bad
