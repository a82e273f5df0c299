"""The results of python -m bench.gpu: NAME.json (every figure, stamped with
the git commit by bench/provenance.py) and NAME.md (the tables)."""

from pathlib import Path
from typing import Any

import torch

from bench.provenance import COMMIT_KEY, DIRTY_KEY, write_json
from bench.throughput import machine_info


def machine(device: str) -> dict[str, Any]:
    """bench.throughput's machine facts (date, CPUs, torch, transformers), and the GPU's."""
    info = machine_info()
    info["cuda"] = torch.version.cuda
    info["gpu"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def commit_of(provenance: dict[str, Any], given: str | None) -> dict[str, Any]:
    """The commit the results are of: git's in a checkout; outside one (a copy
    of the tree on a device machine), the one passed with --commit."""
    found = provenance.get(COMMIT_KEY)
    if found is None:
        return {"hash": given, "dirty": None, "source": "--commit" if given else None}
    out = {"hash": found, "dirty": provenance.get(DIRTY_KEY), "source": "git"}
    if given and not (given.startswith(found) or found.startswith(given)):
        out["given"] = given  # --commit disagreed with the checkout: git wins
    return out


def write_results(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out_dir / f"{name}.json", report, indent=2)
    md_path = out_dir / f"{name}.md"
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _commit_line(commit: dict[str, Any]) -> str:
    text = commit.get("hash") or "unknown"
    if commit.get("dirty"):
        text += " (dirty)"
    if commit.get("source") == "--commit":
        text += " (given by --commit: the run's tree had no .git)"
    if commit.get("given"):
        text += f" (--commit said {commit['given']})"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    gpu = m.get("gpu") or f"{s['device']}, no GPU"
    lines = [
        f"# GPU throughput: keyserve's KV policies ({gpu})",
        "",
        *([] if report.get("complete") else ["**Incomplete run**: the stages below so far.", ""]),
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {m['date_utc']}; git {_commit_line(report['commit'])}; "
        f"wall time {report.get('wall_time_s', 0):.0f} s",
        "",
        f"Machine: {gpu}, CUDA {m['cuda']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}, {m['cpu_count']} CPUs. "
        f"Engine: {_engine_line(report.get('engine'), s)}.",
        "",
        _workload(s),
        "",
        *_throughput_table(report.get("rows", [])),
        "",
        *_floor(report.get("transformers")),
        *_profile_table(report.get("profile", [])),
        *_stage_table(report.get("stages", [])),
        *_top_ops(report.get("profile", [])),
    ]
    return "\n".join(lines) + "\n"


def _engine_line(engine: dict[str, Any] | None, s: dict[str, Any]) -> str:
    if not engine:
        return "not loaded"
    tokens = engine["kv_blocks_total"] * engine["block_size"]
    full = tokens // (s["prompt_tokens"] + s["new_tokens"])
    return (
        f"attention {'/'.join(engine['attention_backends'])}, {engine['kv_blocks_total']:,} KV "
        f"blocks of {engine['block_size']} tokens (full attention fits {full:,} sequences at "
        f"their longest), loaded in {engine['load_s']} s"
    )


def _workload(s: dict[str, Any]) -> str:
    sh = s["shape"]
    return (
        f"Workload: shape `{sh['name']}` (hidden {sh['hidden_size']}, {sh['num_hidden_layers']} "
        f"layers, {sh['num_attention_heads']}/{sh['num_key_value_heads']} heads of "
        f"{sh['head_dim']}, intermediate {sh['intermediate_size']}, vocabulary "
        f"{sh['vocab_size']:,}: SmolLM2's tokenizer), random weights, {s['dtype']} on "
        f"{s['device']}. N prompts of {s['prompt_tokens']} random token ids, "
        f"{s['new_tokens']} new tokens each, greedy, ignore_eos. One engine for every "
        f"policy: KV pool {s['kv_cache_bytes']}, max_num_batched_tokens "
        f"{s['max_num_batched_tokens']}, max_num_seqs {s['max_num_seqs']}; evicting policies "
        f"at kv_ratio {s['kv_ratio']}. Before each run, {s['warmup']}. Each stage is "
        f"bounded by {s['timeout_s']} s."
    )


def _ms(summary: dict[str, Any], gpu: bool = False) -> str:
    if not summary.get("steps"):
        return "–"
    wall = f"{summary['wall_ms_median']:.1f}"
    if not gpu:
        return wall
    g = summary.get("gpu_ms_median")
    return f"{wall} / {'–' if g is None else f'{g:.1f}'}"


def _throughput_table(rows: list[dict[str, Any]]) -> list[str]:
    full = {r["prompts"]: r["output_tokens_per_s"] for r in rows if r["policy"] == "full"}
    out = [
        "| policy | prompts | output tok/s | x full | peak running | preemptions "
        "| tokens evicted | prompt step ms | decode step ms (wall / GPU) | decode batch | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = full.get(r["prompts"])
        ratio = f"{r['output_tokens_per_s'] / base:.2f}" if base else "–"
        note = " (timed out)" if r["timed_out"] else ""
        if not r["timed_out"] and r["output_tokens"] != r["expected_tokens"]:
            note = f" ({r['output_tokens']} of {r['expected_tokens']} tokens)"
        d = r["decode_step"]
        out.append(
            f"| {r['policy']} | {r['prompts']} | {r['output_tokens_per_s']:,.1f}{note} | {ratio} "
            f"| {r['peak_running']} | {r['preemptions']} | {r['tokens_evicted']:,} "
            f"| {_ms(r['prompt_step'])} | {_ms(d, gpu=True)} | {d.get('batch_median', '–')} "
            f"| {r['seconds']:.1f} |"
        )
    out += [
        "",
        "output tok/s = output tokens / wall time of the run (prompt passes included); x full "
        "= against full at the same prompt count. Step times are medians: prompt step = a "
        "step with a prompt chunk (up to max_num_batched_tokens tokens), decode step = "
        "decodes only, of `decode batch` sequences (median); wall = host time of "
        "engine.step(), GPU = the span between CUDA events around it.",
    ]
    return out


def _floor(hf: dict[str, Any] | None) -> list[str]:
    if not hf:
        return []
    note = " (timed out: stopped by max_time)" if hf["timed_out"] else ""
    return [
        f"Floor: transformers' batched `generate` on the same weights and prompts, "
        f"{hf['prompts']} prompts: **{hf['output_tokens_per_s']:,.1f} output tok/s** "
        f"({hf['seconds']:.1f} s){note}; after an untimed warm-up of one prompt.",
        "",
    ]


def _profile_table(profile: list[dict[str, Any]]) -> list[str]:
    if not profile:
        return []
    out = [
        f"## Step profile: {profile[0]['running']} running",
        "",
        "| policy | prompt step ms (wall / GPU) | prompt steps | decode step ms (wall / GPU) "
        "| GPU busy ms per decode step | decode steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in profile:
        prof = p.get("profiler") or {}
        busy = prof.get("gpu_busy_ms_per_step")
        out.append(
            f"| {p['policy']} | {_ms(p['prompt_step'], gpu=True)} | {p['prompt_step']['steps']} "
            f"| {_ms(p['decode_step'], gpu=True)} | {'–' if busy is None else f'{busy:.1f}'} "
            f"| {p['decode_step']['steps']} |"
        )
    out += [
        "",
        "Each step synchronized (torch.cuda.synchronize) before the clock stops. GPU = the "
        "CUDA events' span; GPU busy = the kernels' own time under torch.profiler over "
        f"{prof.get('steps', 0)} more decode steps (wall minus busy is the host's share).",
        "",
    ]
    return out


def _stage_table(stages: list[dict[str, Any]]) -> list[str]:
    out = ["## Stages", "", "| stage | status | s | note |", "|---|---|---:|---|"]
    for st in stages:
        out.append(
            f"| {st['name']} | {st['status']} | {st['seconds']:.1f} | {st.get('note', '')} |"
        )
    return [*out, ""]


def _top_ops(profile: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in profile:
        table = (p.get("profiler") or {}).get("top_ops")
        if table:
            out += [f"## Profiler top ops: {p['policy']}", "", "```", table.rstrip(), "```", ""]
    return out
