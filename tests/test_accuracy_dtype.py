"""The accuracy harness in another dtype: --dtype reaches LLM and is recorded,
--resume refuses to mix dtypes, and bench.accuracy.dtype_report's agreement
arithmetic on hand-built results (and on the committed float32 results)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("gensim")
pytest.importorskip("rouge_score")

from test_accuracy_harness import FakeLLM  # noqa: E402

import engine  # noqa: E402
from bench.accuracy import __main__ as cli  # noqa: E402
from bench.accuracy import dtype_report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "accuracy"


class DtypeLLM(FakeLLM):
    """The fake engine of the harness test, saying which dtype it runs in."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.engine = SimpleNamespace(dtype=dtype, max_model_len=8192)


def test_the_dtype_flag_reaches_llm(monkeypatch) -> None:
    made: list[dict] = []
    monkeypatch.setattr(engine, "LLM", lambda **kwargs: made.append(kwargs))
    cases = [([], "float32"), (["--dtype", "bfloat16"], "bfloat16"), (["--dtype", "auto"], "auto")]
    for argv, dtype in cases:
        cli.load_llm(cli.parse_args(argv))
        assert made[-1]["dtype"] == dtype
    with pytest.raises(SystemExit):
        cli.parse_args(["--dtype", "float16"])


def _run(out: Path, llm, *extra: str) -> dict[str, Path]:
    argv = [
        "--policies", "full,h2o", "--budgets", "0.3,0.7", "--tasks", "retrieval",
        "--lengths", "300", "--depths", "0,100", "--limit", "1", "--out", str(out), *extra,
    ]  # fmt: skip
    return cli.main(argv, llm=llm)


def test_the_dtype_that_ran_is_recorded(tmp_path: Path) -> None:
    paths = _run(tmp_path, DtypeLLM(torch.bfloat16), "--dtype", "auto")
    data = json.loads(paths["json"].read_text())
    assert data["args"]["dtype"] == "auto"  # what was asked
    assert data["summary"]["dtype"] == "bfloat16"  # what the engine ran
    assert data["summary"]["cpu"]
    assert "- dtype: bfloat16" in paths["markdown"].read_text().splitlines()


def test_resume_refuses_another_dtype(tmp_path: Path) -> None:
    _run(tmp_path, DtypeLLM(torch.float32))
    with pytest.raises(SystemExit, match="ran in float32, this run in bfloat16"):
        _run(tmp_path, DtypeLLM(torch.bfloat16), "--dtype", "bfloat16", "--limit", "2", "--resume")
    llm = DtypeLLM(torch.float32)
    _run(tmp_path, llm, "--limit", "2", "--resume")
    assert {c[2] for c in llm.calls} == {2}  # the two new prompts only
    # Results from before --dtype say nothing: they ran in float32.
    path = tmp_path / "results.json"
    data = json.loads(path.read_text())
    del data["summary"]["dtype"], data["args"]["dtype"]
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="ran in float32"):
        _run(tmp_path, DtypeLLM(torch.bfloat16), "--dtype", "bfloat16", "--limit", "3", "--resume")
    _run(tmp_path, DtypeLLM(torch.float32), "--limit", "3", "--resume")


# -- the report -------------------------------------------------------------------

MC = [("fewshot/boolq/0", "A"), ("fewshot/boolq/1", "B"), ("fewshot/boolq/2", "C")]
KEYS = [(f"retrieval/2k/d0-{i}", str(11111 * (i + 1))) for i in range(4)]


def _results(folder: Path, dtype: str, mc: dict[str, list[str]], keys: dict[str, list[str]]):
    """A results.json of the harness, by hand: answers per config, in item order."""
    folder.mkdir()
    items = [{"key": k, "gold": g, "meta": {"kind": "mc"}} for k, g in MC]
    items += [{"key": k, "gold": g, "meta": {"depth": 0}} for k, g in KEYS]
    generations = {
        config: {k: f": {a}" for (k, _), a in zip(MC, mc.get(config, []), strict=False)}
        | dict(zip([k for k, _ in KEYS], keys.get(config, []), strict=False))
        for config in {*mc, *keys}
    }
    data = {
        "command": f"python -m bench.accuracy --dtype {dtype}",
        "args": {"dtype": dtype},
        "summary": {"git commit": f"commit-{dtype}", "dtype": dtype, "cpu": "CPU X (avx2)"},
        "items": items,
        "generations": generations,
    }
    (folder / "results.json").write_text(json.dumps(data))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """float32 and bfloat16 results of the same items; the reference also has
    an item the run lacks, and the run a config the reference lacks."""
    ref, run = tmp_path / "f32", tmp_path / "bf16"
    _results(
        ref,
        "float32",
        {"full@1.0": ["A", "B", "C"], "h2o@0.5": ["A", "B", "A"]},
        {
            "full@1.0": ["The pass key is 11111.", "22222", "33333", "The key is 44444"],
            "h2o@0.5": ["11111", "I do not know.", "It is 99999.", "44444"],
        },
    )
    _results(
        run,
        "bfloat16",
        {"full@1.0": ["A", "B", "D"], "h2o@0.5": ["B", "B", "A"], "keyformer@0.3": ["C"] * 3},
        {
            "full@1.0": ["11111.", "22222", "33333", "I do not know."],
            "h2o@0.5": ["11111", "I cannot say.", "99999", "12"],
            "keyformer@0.3": ["11111"] * 4,
        },
    )
    extra = {"key": "fewshot/boolq/3", "gold": "A", "meta": {"kind": "mc"}}
    data = json.loads((ref / "results.json").read_text())
    data["items"].append(extra)
    for outputs in data["generations"].values():
        outputs[extra["key"]] = ": Z"
    (ref / "results.json").write_text(json.dumps(data))
    return ref, run


def _rows(report: dict) -> dict[tuple, tuple]:
    fields = [f for f, _ in dtype_report.COLUMNS]
    return {
        (r["subtask"], r["policy"], r["budget"]): (r["n"], *(r[f] for f in fields))
        for r in report["rows"]
    }


def test_report_agreement_arithmetic(pair, tmp_path: Path) -> None:
    ref, run = pair
    out = tmp_path / "report"
    paths = dtype_report.main(["--reference", str(ref), "--run", str(run), "--out", str(out)])
    report = json.loads(paths["json"].read_text())
    third, none = 1 / 3, None
    # n, run vs ref full, ref vs ref full, run vs ref same, run vs run full, accuracies
    assert _rows(report) == {
        # bfloat16 full differs from float32 full on one item of three: 2/3
        ("boolq", "full", 1.0): (3, 2 * third, 1.0, 2 * third, 1.0, 2 * third, 1.0),
        ("boolq", "h2o", 0.5): (3, third, 2 * third, 2 * third, third, third, 2 * third),
        ("boolq", "keyformer", 0.3): (3, third, none, none, 0.0, third, none),
        ("2k", "full", 1.0): (4, 0.75, 1.0, 0.75, 1.0, 0.75, 1.0),
        # "I do not know." and "I cannot say." agree: neither names a number
        ("2k", "h2o", 0.5): (4, 0.25, 0.5, 0.75, 0.25, 0.25, 0.5),
        ("2k", "keyformer", 0.3): (4, 0.25, none, none, 0.25, 0.25, none),
    }
    assert report["full_disagreements"] == [
        {"key": "fewshot/boolq/2", "run": "D", "reference": "C", "gold": "C"},
        {"key": "retrieval/2k/d0-3", "run": "", "reference": "44444", "gold": "44444"},
    ]
    assert report["run"]["dtype"] == "bfloat16" and report["reference"]["dtype"] == "float32"
    assert [f["git commit"] for f in report["run"]["folders"]] == ["commit-bfloat16"]
    assert [f["git commit"] for f in report["reference"]["folders"]] == ["commit-float32"]
    assert report["git_commit"] and report["report_cpu"]
    md = paths["markdown"].read_text().splitlines()
    assert "| h2o | 0.5 | 3 | 0.333 | 0.667 | 0.667 | 0.333 | 0.333 | 0.667 |" in md
    assert "| keyformer | 0.3 | 4 | 0.250 |  |  | 0.250 | 0.250 |  |" in md
    assert "bfloat16 full against float32 full: 0.667." in md


def test_report_refuses_items_that_differ(pair, tmp_path: Path) -> None:
    ref, run = pair
    data = json.loads((run / "results.json").read_text())
    data["items"][0]["gold"] = "B"
    (run / "results.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="fewshot/boolq/0: gold"):
        dtype_report.main(["--reference", str(ref), "--run", str(run), "--out", str(tmp_path)])


@pytest.mark.parametrize("task", ["fewshot_lambada", "retrieval_2k"])
def test_report_scores_as_the_harness_did(task: str, tmp_path: Path) -> None:
    """On a committed float32 run against itself, the report's agreement and
    accuracy are the harness's own figures (the same scoring functions)."""
    folder = RESULTS / task
    args = ["--reference", str(folder), "--run", str(folder), "--out", str(tmp_path)]
    report = json.loads(dtype_report.main(args)["json"].read_text())
    committed = json.loads((folder / "results.json").read_text())["summary_table"]
    table = {(r["policy"], r["budget"], r["subtask"], r["metric"]): r["mean"] for r in committed}
    assert len(report["rows"]) == 21
    for row in report["rows"]:
        key = (row["policy"], row["budget"], row["subtask"])
        assert row["run_accuracy"] == pytest.approx(table[(*key, "accuracy")])
        if task.startswith("fewshot"):
            assert row["run_vs_reference_full"] == pytest.approx(table[(*key, "agreement")])
        assert row["run_vs_reference_same"] == 1.0
    assert report["full_disagreements"] == []
