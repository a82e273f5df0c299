"""Markdown tables and the JSON/markdown files of a run."""

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.provenance import write_json

Result = Mapping[str, Any]

# The comparison table: (header, how to read and format a figure of a result).
COLUMNS: list[tuple[str, Callable[[Result], str]]] = [
    ("label", lambda r: str(r["label"])),
    ("completed", lambda r: f"{r['completed']}/{r['num_requests']}"),
    ("req/s", lambda r: _num(r["request_throughput"], 2)),
    ("output tok/s", lambda r: _num(r["output_throughput"], 1)),
    ("TTFT p50 (ms)", lambda r: _num(r["ttft_ms"]["p50"], 1)),
    ("TTFT p99 (ms)", lambda r: _num(r["ttft_ms"]["p99"], 1)),
    ("TPOT p50 (ms)", lambda r: _num(r["tpot_ms"]["p50"], 1)),
    ("TPOT p99 (ms)", lambda r: _num(r["tpot_ms"]["p99"], 1)),
    ("ITL p50 (ms)", lambda r: _num(r["itl_ms"]["p50"], 1)),
    ("ITL p99 (ms)", lambda r: _num(r["itl_ms"]["p99"], 1)),
    ("peak running", lambda r: _num(r["peak_running"], 0)),
    ("peak KV usage", lambda r: _percent(r["peak_kv_usage"])),
    # Older results have no counters: n/a.
    ("preemptions", lambda r: _num(r.get("preemptions"), 0)),
    ("squeezes", lambda r: _num(r.get("squeezes"), 0)),
    ("squeezed req", lambda r: _num(r.get("squeezed_requests"), 0)),
]


def render_table(results: Sequence[Result]) -> str:
    """One markdown table, a row per run_load result (an A/B compares rows)."""
    lines = [
        "| " + " | ".join(header for header, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in results]
    return "\n".join(lines) + "\n"


def render_report(result: Result) -> str:
    """The markdown of one run: settings, the comparison row, every latency figure."""
    s = result["settings"]
    mode = f"concurrency {s['concurrency']}" if s["concurrency"] else f"Poisson {s['rate']} req/s"
    lines = [
        f"# Serving load: {result['label']}",
        "",
        f"{s['num_requests']} requests of {s['prompt_tokens']} prompt tokens + "
        f"{s['output_tokens']} output tokens, {mode}, against `{s['model']}` at {s['url']}"
        f" (extra body: `{json.dumps(s['extra_body'])}`, seed {s['seed']}), {result['date_utc']}.",
        "",
        render_table([result]),
        _failures_line(result),
        "| figure | mean | p50 | p90 | p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)")):
        d = result[key]
        lines.append(f"| {label} | " + " | ".join(_num(d[k], 1) for k in d) + " |")
    lines += ["", _totals_line(result), _server_line(result["server_metrics"])]
    return "\n".join(lines) + "\n"


def _failures_line(result: Result) -> str:
    if not result["failed"]:
        return "No request failed.\n"
    codes = ", ".join(f"{code}: {n}" for code, n in result["failed_by_code"].items())
    return f"**{result['failed']} requests failed** ({codes}).\n"


def _totals_line(result: Result) -> str:
    return (
        f"Duration {result['duration_s']:.2f} s; {result['total_prompt_tokens']} prompt and "
        f"{result['total_output_tokens']} output tokens; "
        f"{_num(result['total_token_throughput'], 1)} total tok/s."
    )


def _server_line(server: Mapping[str, Any]) -> str:
    if server["metrics_polls"] == 0:
        return "Server metrics: /metrics did not answer."
    line = (
        f"Server metrics: polled maxima running {_num(server['polled_peak_running'], 0)}, "
        f"KV usage {_percent(server['polled_peak_kv_usage'])} ({server['metrics_polls']} scrapes)"
    )
    peaks = server["keyserve_peaks"]
    if peaks:
        line += (
            f"; keyserve's high-water marks since server start: running "
            f"{_num(peaks['peak_running'], 0)}, KV blocks {_num(peaks['peak_kv_blocks_used'], 0)}"
            f" of {_num(peaks['kv_blocks_total'], 0)}"
        )
    source = server["peak_source"]
    return (
        line
        + f". The table's peaks come from: running {source['running']}, KV {source['kv_usage']}."
    )


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def write_results(result: Result, out_dir: str | Path) -> tuple[Path, Path]:
    """out_dir/LABEL.json (every figure, and the git commit) and out_dir/LABEL.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{result['label']}.json", out / f"{result['label']}.md"
    write_json(json_path, result, indent=2)
    md_path.write_text(render_report(result), encoding="utf-8")
    return json_path, md_path
