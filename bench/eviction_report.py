"""The eviction benchmark's outputs: raw JSON, a markdown table per figure,
and one PNG plot of attention mass against budget."""

from pathlib import Path
from typing import Any

from bench.provenance import describe, with_provenance, write_json

POLICY_ORDER = ("window", "streaming", "h2o", "keyformer")


def write_results(report: dict[str, Any], out_dir: Path, name: str, plot: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    report = with_provenance(report)
    write_json(paths[0], report, indent=1)
    paths[1].write_text(render_markdown(report, f"{name}.png" if plot else None))
    if plot and "attention_mass" in report:
        paths.append(plot_mass(report, out_dir / f"{name}.png"))
    return paths


# -- markdown --------------------------------------------------------------------


def render_markdown(report: dict[str, Any], png: str | None) -> str:
    lines = [
        "# Eviction-aware KV memory: attention mass, greedy match, capacity",
        "",
        *_header(report),
        *_figure1(report, png),
        *_figure2(report),
        *_figure3(report),
    ]
    return "\n".join(lines) + "\n"


def _header(report: dict[str, Any]) -> list[str]:
    s, m = report["settings"], report["machine"]
    lengths = [p["tokens"] for p in report.get("prompts", [])]
    incomplete = [] if report["complete"] else ["**Incomplete run** (stopped early).", ""]
    kv = s["kv_settings"]
    return [
        *incomplete,
        f"Command: `{report['command']}`  ",
        f"Wall time of the whole command{'' if report['complete'] else ' so far'}: "
        f"{report['wall_time_s']:.0f} s ({report['wall_time_s'] / 60:.1f} min, process start "
        "to results written)  ",
        f"Date (UTC): {m['date_utc']}; git {describe(report)}",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), shared with other work; torch "
        f"{m['torch']}, torch threads {s['threads']}; load average at start "
        f"{report['load_average_start']} / end {report['load_average_end']}.",
        "",
        f"Model: {s['model']}. Decoding: {s['decoding']}; {s['new_tokens']} new tokens. "
        f"KV settings: kv_min_tokens=0 (the ratio is the budget: k = floor(n * kv_ratio)), "
        f"recent_ratio={kv['recent_ratio']}, sink_tokens={kv['sink_tokens']}, "
        f"tau {kv['tau_init']} -> {kv['tau_end']}. Engine Keyformer noise: "
        f"`{s['engine_gumbel']}` (see bench/README.md).",
        "",
        f"Prompts (figures 1-2): {len(lengths)} chat prompts asking the model to summarize "
        "consecutive articles of the gensim Lee news corpus"
        + (f", {min(lengths)}-{max(lengths)} tokens ({sorted(lengths)})." if lengths else "."),
        "",
    ]


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:g}%"


def _by_cell(cells: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(c["policy"], c["ratio"]): c for c in cells}


def _policies(cells: list[dict[str, Any]]) -> list[str]:
    present = {c["policy"] for c in cells}
    return [p for p in POLICY_ORDER if p in present]


def _ratios(cells: list[dict[str, Any]]) -> list[float]:
    return sorted({c["ratio"] for c in cells})


def _figure1(report: dict[str, Any], png: str | None) -> list[str]:
    mass = report.get("attention_mass")
    if not mass:
        return []
    cells, ratios = _by_cell(mass["cells"]), _ratios(mass["cells"])
    out = [
        "## 1. Attention mass on the kept tokens",
        "",
        "Share of full attention's probability mass (ordinary softmax over every token "
        "so far) that falls on the tokens the policy reads at a decode step (its kept "
        "set plus the new token), per layer and query head, averaged over layers, heads, "
        "decode steps and prompts. In brackets: the lowest per-layer average, and its "
        "layer. Measured with the dense model of bench/eviction_dense.py, whose runs "
        "produce the engine's greedy tokens (see figure 2's cross-check).",
        "",
        "| policy | " + " | ".join(f"budget {_pct(r)}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for policy in _policies(mass["cells"]):
        row = [_mass_text(cells[policy, r]) for r in ratios]
        out.append(f"| {policy} | " + " | ".join(row) + " |")
    oracle = {c["ratio"]: c for c in mass.get("oracle", [])}
    if oracle:
        row = [_mass_text(oracle[r]) if r in oracle else "-" for r in ratios]
        out.append("| *oracle* | " + " | ".join(row) + " |")
    out += [
        "",
        "*oracle*: on full attention's own decoding, the mass of the best possible set of "
        "the same size (budget + 1 tokens per kv-head, the top of the mass summed over the "
        "kv-head's query heads), chosen afresh at every step, which no policy can do (an "
        "evicted token never returns): the ceiling to read the policies against (they run "
        "on their own decoding, so it is a reference rather than a strict bound). A uniform "
        "attention would give about the budget itself.",
        "",
        f"Time: {mass.get('time_s', 0):.0f} s. Per-layer and per-step curves, and per-prompt "
        "values, are in the JSON.",
        "",
    ]
    if png:
        out += [f"![attention mass vs budget]({png})", ""]
    return out


def _mass_text(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.3f} ({cell['worst_layer_mean']:.2f}, L{cell['worst_layer']})"


def _figure2(report: dict[str, Any]) -> list[str]:
    match = report.get("greedy_match")
    if not match:
        return []
    new = report["settings"]["new_tokens"]
    tool, engine = match["tool"], match["engine"]
    check = match["cross_check"]
    out = [
        "## 2. How long greedy output stays identical to full attention's",
        "",
        f"Leading generated tokens identical to full attention's greedy output, out of {new} "
        "(EOS ignored), mean / median over prompts, and in brackets the prompts whose whole "
        "output is identical.",
        "",
        f"Over all {len(report.get('prompts', []))} prompts (the greedy tokens of figure 1's "
        "runs):",
        "",
        *_match_table(tool),
        "",
        f"The engine itself (`LLM.generate`, every config of the first {match['engine_prompts']}"
        f" prompt(s) in one call, {match['engine_stats']['time_s']:.0f} s):",
        "",
        *_match_table(engine),
        "",
        f"Cross-check: the engine's greedy tokens equal the measurement model's in "
        f"{check['identical']} of {check['runs']} runs (every policy and budget, and full)"
        + (f"; mismatches: {check['mismatches']}." if check["mismatches"] else "."),
        "",
    ]
    return out


def _match_table(cells: list[dict[str, Any]]) -> list[str]:
    by, ratios = _by_cell(cells), _ratios(cells)
    out = [
        "| policy | " + " | ".join(f"budget {_pct(r)}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for policy in _policies(cells):
        row = []
        for r in ratios:
            c = by[policy, r]
            n = len(c["per_prompt"])
            row.append(f"{c['mean']:.1f} / {c['median']:g} ({c['identical_outputs']}/{n})")
        out.append(f"| {policy} | " + " | ".join(row) + " |")
    return out


def _figure3(report: dict[str, Any]) -> list[str]:
    cap = report.get("capacity")
    if not cap or not cap["runs"]:
        return []
    c = report["settings"]["capacity"]
    new = report["settings"]["new_tokens"]
    out = [
        "## 3. Sequences and KV blocks at a fixed pool",
        "",
        f"{c['requests']} requests submitted at once, each a raw news passage of exactly "
        f"{c['prompt_tokens']} tokens plus {new} new tokens (EOS ignored); pool of "
        f"{cap['pool_blocks']} blocks of {c['block_size']} tokens (full attention's "
        f"{c['full_sequences']} sequences at their longest), max_num_seqs {c['max_num_seqs']}, "
        f"evicting policies at kv_ratio {c['kv_ratio']}. The engine is stepped by hand; peaks "
        "are read right after each step's scheduling (when blocks are taken), before the "
        "step's eviction returns any.",
        "",
        "| policy | peak running | mean running | peak KV blocks | preemptions "
        "| tokens evicted | blocks freed by eviction | steps | time s | output tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cap["runs"]:
        label = r["policy"] if r["ratio"] is None else f"{r['policy']} ({_pct(r['ratio'])})"
        out.append(
            f"| {label} | {r['peak_running']} | {r['mean_running']:.1f} "
            f"| {r['peak_used_blocks']}/{r['pool_blocks']} | {r['preemptions']} "
            f"| {r['tokens_evicted']} | {r['blocks_freed_by_eviction']} | {r['steps']} "
            f"| {r['time_s']:.0f} | {r['output_tokens'] / r['time_s']:.1f} |"
        )
    out += [
        "",
        "mean running: the running count averaged over steps (prefill steps included). "
        "Times are single runs on a shared machine: indicative only.",
        "",
    ]
    return out


# -- the plot --------------------------------------------------------------------


def plot_mass(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = report["attention_mass"]
    by, ratios = _by_cell(mass["cells"]), _ratios(mass["cells"])
    fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=120)
    xs = [r * 100 for r in ratios]
    for policy in _policies(mass["cells"]):
        ax.plot(xs, [by[policy, r]["mean"] for r in ratios], marker="o", label=policy)
    oracle = {c["ratio"]: c["mean"] for c in mass.get("oracle", [])}
    if oracle:
        ax.plot(xs, [oracle[r] for r in ratios], "k--", marker="x", label="oracle (best set)")
    ax.plot(xs, [r for r in ratios], ":", color="grey", label="uniform attention")
    lengths = [p["tokens"] for p in report.get("prompts", [])]
    ax.set(
        xlabel="KV budget (% of prompt tokens)",
        ylabel="full-attention mass on kept tokens",
        ylim=(0, 1.02),
        xticks=xs,
        title=f"SmolLM2-135M, {len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
