"""Which grammar library for structured output: xgrammar or llguidance (both
used by vLLM), measured on this CPU with SmolLM2's 49,152-token vocabulary.

For each library: building its view of the vocabulary (once per process),
compiling a JSON schema, any-JSON-object and a regex (median of 5 fresh
compiles), and, walking valid JSON documents token by token (SmolLM2's own
tokenization), the time to fill one token mask and to advance past the
token. Also: does each accept every document, and what each wheel pulls in.

Neither library is needed by the other's run; xgrammar is not a project
dependency, so install both into a scratch folder first:

    pip download xgrammar llguidance apache-tvm-ffi --no-deps -d /tmp/wheels
    pip install --no-deps --target /tmp/solibs /tmp/wheels/*.whl
    PYTHONPATH=/tmp/solibs:. python bench/results/structured_output/compare_grammar_libraries.py
"""

import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.provenance import describe, git_provenance, write_json
from bench.throughput import machine_info
from engine.loading.default_model import default_model_path

OUT = Path(__file__).resolve().parent
V = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}
DOCS = [
    {"name": "Alice Smith", "age": 31, "email": "alice@example.com", "role": "admin",
     "tags": ["a", "bb"], "address": {"city": "Paris", "zip": "75001"}, "score": 4.5,
     "active": True},
    {"name": "Bob", "age": 7, "role": "guest",
     "address": {"city": "New York City", "zip": "10001"}, "active": False},
    {"name": 'Carol "C" O\'Neil', "age": 150, "role": "user", "tags": [],
     "address": {"city": "Zürich", "zip": "80331"}, "score": -250.0, "active": True},
]  # fmt: skip
ANY = [
    {"x": [1, 2, {"y": None}], "z": "hello world", "w": {"deep": {"deeper": [True, 3.14]}}},
    {f"k{i}": i for i in range(20)},
]
REGEX = r"[A-Z][a-z]{2,8} [0-9]{3}-[0-9]{4}"
REPEATS = 5


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.xgr = xgr
        start = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
        self.vocab_s = time.perf_counter() - start
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.bits = xgr.allocate_token_bitmask(1, V)

    def compile(self, kind, text):
        c = self.compiler
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        return c.compile_json_schema(text) if kind == "schema" else c.compile_regex(text)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bits, 0)
        return self.bits[0]

    def accept(self, m, t):
        return m.accept_token(t)

    def ends(self, m, eos):
        return m.accept_token(eos) and m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, tokenizer_file):
        import llguidance

        self.llg = llguidance
        start = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer_file.read_text(), n_vocab=V, eos_token=2)
        self.vocab_s = time.perf_counter() - start
        self.bits = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)

    def compile(self, kind, text):
        m = self.llg.LLMatcher
        if kind == "regex":
            grammar = m.grammar_from_regex(text)
        else:
            grammar = m.grammar_from_json_schema(text if kind == "schema" else '{"type":"object"}')
        matcher = m(self.tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, grammar):
        return grammar.deep_copy()

    def fill(self, m):
        m.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        return self.bits[0]

    def accept(self, m, t):
        return m.consume_token(t)

    def ends(self, m, eos):
        return m.is_accepting() and m.consume_token(eos)


def compile_times(lib) -> dict[str, float]:
    out = {}
    for kind, text in (("schema", json.dumps(SCHEMA)), ("json_object", ""), ("regex", REGEX)):
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            lib.compile(kind, text)
            times.append(time.perf_counter() - start)
        out[f"compile_{kind}_ms"] = 1e3 * statistics.median(times)
    return out


def walk(lib, tok, kind, docs) -> dict:
    """Feed each document's tokens, filling the mask before each one."""
    grammar = lib.compile(kind, json.dumps(SCHEMA))
    fills, accepts, refused = [], [], []
    for doc in docs:
        text = json.dumps(doc, ensure_ascii=False)
        m = lib.matcher(grammar)
        for k, t in enumerate(tok.encode(text, add_special_tokens=False)):
            start = time.perf_counter()
            bits = lib.fill(m)
            fills.append(time.perf_counter() - start)
            if not (int(bits[t // 32]) >> (t % 32)) & 1:
                refused.append(f"{text!r}: token {k} {tok.decode([t])!r}")
                break
            start = time.perf_counter()
            assert lib.accept(m, t)
            accepts.append(time.perf_counter() - start)
        else:
            if not lib.ends(m, tok.eos_token_id):
                refused.append(f"{text!r}: not complete at the end")
    q = sorted(fills)
    return {
        "masks": len(fills),
        "fill_median_us": 1e6 * statistics.median(fills),
        "fill_mean_us": 1e6 * statistics.mean(fills),
        "fill_p90_us": 1e6 * q[int(0.9 * len(q))],
        "fill_max_us": 1e6 * q[-1],
        "advance_median_us": 1e6 * statistics.median(accepts),
        "refused": refused,
    }


def install_facts(dist: str) -> dict:
    d = importlib.metadata.distribution(dist)
    requires = [r for r in (d.requires or []) if "extra ==" not in r]
    return {"version": d.version, "requires": requires}


def main() -> None:
    git_provenance()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    folder = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(folder))
    results = {}
    for lib in (XGrammar(tok), LLGuidance(tok, folder / "tokenizer.json")):
        r = {"vocab_build_s": lib.vocab_s, **compile_times(lib)}
        for _ in range(3):  # warm: the first walk builds lexer states
            r["schema_walk"] = walk(lib, tok, "schema", DOCS)
            r["json_object_walk"] = walk(lib, tok, "json_object", ANY)
        r["install"] = install_facts(lib.name)
        results[lib.name] = r
        print(lib.name, json.dumps(r, indent=1))
    payload = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(), **results}
    write_json(OUT / "library_choice.json", payload)
    (OUT / "library_choice.md").write_text(report({**git_provenance(), **payload}))


def report(r: dict) -> str:
    m = r["machine"]
    head = [
        "# xgrammar or llguidance: measured on this CPU",
        "",
        f"Command: `PYTHONPATH=/tmp/solibs:. {r['command']}`  ",
        f"Date (UTC): {m['date_utc']}  ",
        f"Commit: {describe(r)}; CPU: {m['cpu_model']} ({m['cpu_count']} CPUs, shared with "
        "other work), 2 torch threads",
        "",
        "SmolLM2's 49,152-token vocabulary. Compile: median of 5 fresh compiles. Masks: "
        "one per token while feeding valid documents (SmolLM2's tokenization of json.dumps "
        "of 3 documents for the schema, 2 for any object), third pass (lexer states warm).",
        "",
        "| | xgrammar | llguidance |",
        "|---|---:|---:|",
    ]
    x, g = r["xgrammar"], r["llguidance"]
    rows = [
        ("version", x["install"]["version"], g["install"]["version"]),
        ("vocabulary build, s (once)", f"{x['vocab_build_s']:.2f}", f"{g['vocab_build_s']:.2f}"),
    ]
    for key, label in (("schema", "JSON schema"), ("json_object", "any JSON object"),
                       ("regex", "regex")):  # fmt: skip
        rows.append((f"compile {label}, ms", f"{x[f'compile_{key}_ms']:.2f}",
                     f"{g[f'compile_{key}_ms']:.2f}"))  # fmt: skip
    for key, label in (("schema_walk", "schema"), ("json_object_walk", "any object")):
        for stat in ("fill_median_us", "fill_mean_us", "fill_p90_us", "fill_max_us"):
            rows.append((f"{label}: mask {stat[5:].replace('_us', '')}, us",
                         f"{x[key][stat]:.1f}", f"{g[key][stat]:.1f}"))  # fmt: skip
        rows.append((f"{label}: advance median, us", f"{x[key]['advance_median_us']:.1f}",
                     f"{g[key]['advance_median_us']:.1f}"))  # fmt: skip
        rows.append((f"{label}: documents refused", str(len(x[key]["refused"])),
                     str(len(g[key]["refused"]))))  # fmt: skip
    rows.append(("depends on", ", ".join(x["install"]["requires"]) or "nothing",
                 ", ".join(g["install"]["requires"]) or "nothing"))  # fmt: skip
    body = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    refused = [
        f"- {lib}: {line}"
        for lib in ("xgrammar", "llguidance")
        for key in ("schema_walk", "json_object_walk")
        for line in r[lib][key]["refused"]
    ]
    return "\n".join(head + body + ["", "Refused documents:", *(refused or ["- none"]), ""])


if __name__ == "__main__":
    main()
