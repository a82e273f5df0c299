"""One streamed completion request, timed chunk by chunk."""

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

COMPLETIONS_PATH = "/v1/completions"


@dataclass
class RequestRecord:
    """What one request did. Times are time.perf_counter() seconds."""

    index: int
    prompt_tokens: int
    send_time: float = 0.0
    finish_time: float = 0.0
    status: int | None = None  # HTTP status; None when no response came
    # Why it failed ("500", "stream_error", "ConnectError", ...); None when it completed.
    failure: str | None = None
    error: str | None = None  # the server's message or the exception, shortened
    token_times: list[float] = field(default_factory=list)  # chunks that carried text
    completion_tokens: int | None = None  # from the usage chunk
    usage_prompt_tokens: int | None = None
    # keyserve's usage.kv_cache_details (None from a server without it).
    kv_squeezed: bool | None = None
    kv_squeezed_budget: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def output_tokens(self) -> int:
        """The usage figure; without a usage chunk, one token per text chunk."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.send_time if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if n < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def summary(self) -> dict[str, Any]:
        """The per-request row of the JSON report (times relative to the send)."""
        ms = 1000.0
        return {
            "index": self.index,
            "status": self.status,
            "failure": self.failure,
            "error": self.error,
            "prompt_tokens": self.usage_prompt_tokens or self.prompt_tokens,
            "completion_tokens": self.output_tokens if self.ok else None,
            "token_chunks": len(self.token_times),
            "ttft_ms": None if self.ttft is None else self.ttft * ms,
            "tpot_ms": None if self.tpot is None else self.tpot * ms,
            "latency_ms": (self.finish_time - self.send_time) * ms,
            "kv_squeezed": self.kv_squeezed,
            "kv_squeezed_budget": self.kv_squeezed_budget,
        }


def request_body(
    model: str, prompt: list[int], output_tokens: int, extra_body: dict[str, Any] | None
) -> dict[str, Any]:
    """Greedy, EOS ignored, so every request generates exactly output_tokens."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra_body or {})
    return body


async def send_request(
    http: httpx.AsyncClient, body: dict[str, Any], record: RequestRecord
) -> None:
    """POST one streamed completion and fill `record`; never raises for a
    failed request (a load test reports failures, it does not stop at one)."""
    record.send_time = time.perf_counter()
    try:
        async with http.stream("POST", COMPLETIONS_PATH, json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.failure = str(response.status_code)
                record.error = _short((await response.aread()).decode(errors="replace"))
            else:
                await _read_events(response, record)
    except httpx.HTTPError as e:
        record.failure = type(e).__name__
        record.error = _short(str(e))
    finally:
        record.finish_time = time.perf_counter()


async def _read_events(response: httpx.Response, record: RequestRecord) -> None:
    """Server-sent events: "data: {json}" lines, then "data: [DONE]"."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, other SSE fields
        arrived = time.perf_counter()
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            record.failure, record.error = "bad_event", _short(data)
            return
        if "error" in event:
            # An error mid-stream (status already 200): keyserve and vLLM send
            # {"error": {...}} and then [DONE].
            record.failure, record.error = "stream_error", _short(json.dumps(event["error"]))
            return
        _take_event(event, arrived, record)
    record.failure = "incomplete"  # the stream closed without [DONE]


def _take_event(event: dict[str, Any], arrived: float, record: RequestRecord) -> None:
    # A finish chunk may carry only finish_reason and an empty text: no token in it.
    if any(choice.get("text") for choice in event.get("choices") or []):
        record.token_times.append(arrived)
    usage = event.get("usage")
    if usage:
        record.completion_tokens = usage.get("completion_tokens", record.completion_tokens)
        record.usage_prompt_tokens = usage.get("prompt_tokens", record.usage_prompt_tokens)
        kv = usage.get("kv_cache_details")
        if kv:
            record.kv_squeezed = kv.get("squeezed")
            record.kv_squeezed_budget = kv.get("squeezed_budget_tokens")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
