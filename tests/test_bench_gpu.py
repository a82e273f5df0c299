"""python -m bench.gpu on the CPU, in its smoke size: the same stages and the
same results files as the GPU run, on a tiny random model (CI has no GPU)."""

import json
import subprocess
from pathlib import Path

import pytest

from bench.gpu.cli import main
from bench.gpu.report import _commit_line, commit_of
from bench.gpu.shapes import SHAPES, VOCAB_SIZE, kv_bytes_per_token

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["full", "keyformer", "h2o", "streaming", "window"]
SMOKE = [
    "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
    "--prompt-tokens", "32", "--new-tokens", "4", "--prompts", "2,4",
    "--policies", ",".join(POLICIES), "--kv-cache-bytes", "16MiB",
    "--profile-decode-steps", "2", "--profile-steps", "1",
]  # fmt: skip


def _run(tmp: Path, name: str, *extra: str) -> tuple[int, dict, str]:
    out = tmp / "out"
    rc = main(
        [*SMOKE, "--cache-dir", str(tmp / "models"), "--out-dir", str(out), "--name", name, *extra]
    )
    return rc, json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_gpu")


@pytest.fixture(scope="module")
def smoke(tmp: Path) -> tuple[int, dict, str]:
    return _run(tmp, "smoke")


def test_a_row_per_policy_and_prompt_count(smoke):
    rc, report, _ = smoke
    assert rc == 0
    assert [s["status"] for s in report["stages"]] == ["ok"] * len(report["stages"])
    rows = {(r["policy"], r["prompts"]): r for r in report["rows"]}
    assert sorted(rows) == sorted((p, n) for p in POLICIES for n in (2, 4))
    for row in rows.values():
        assert row["output_tokens_per_s"] > 0
        assert row["output_tokens"] == row["expected_tokens"] == row["prompts"] * 4
        assert row["peak_running"] == row["prompts"] and not row["timed_out"]
        assert row["prompt_step"]["steps"] >= 1 and row["decode_step"]["steps"] >= 1
    assert report["transformers"]["prompts"] == 2
    assert report["transformers"]["output_tokens_per_s"] > 0
    assert report["complete"] is True


def test_the_step_profile_splits_full_and_keyformer(smoke):
    _, report, md = smoke
    assert [p["policy"] for p in report["profile"]] == ["full", "keyformer"]
    for p in report["profile"]:
        assert p["running"] == 2 and p["decode_step"]["steps"] == 2
        assert p["decode_step"]["batch_median"] == 2 and p["prompt_step"]["steps"] >= 1
        assert p["profiler"]["steps"] == 1 and p["profiler"]["kinds"] == ["decode"]
        assert p["profiler"]["gpu_busy_ms_per_step"] is None  # no GPU here
    assert "## Step profile: 2 running" in md and "## Profiler top ops: keyformer" in md


def test_the_results_name_the_commit_and_the_machine(smoke):
    _, report, md = smoke
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert report["git_commit"] == report["commit"]["hash"] == (head or None)
    assert report["machine"]["torch"] and report["machine"]["gpu"] is None
    assert report["settings"]["shape"]["vocab_size"] == VOCAB_SIZE
    assert f"git {head or 'unknown'}" in md


def test_the_markdown_table(smoke):
    _, report, md = smoke
    assert "| policy | prompts | output tok/s | x full | peak running | preemptions" in md
    table = [line for line in md.splitlines() if line.startswith(("| full |", "| keyformer |"))]
    assert len(table) == 4 + 2  # 2 policies x 2 counts, then the profile's 2 rows
    assert table[0].startswith("| full | 2 |") and " | 1.00 | " in table[0]
    assert "Floor: transformers' batched `generate`" in md


def test_a_stage_past_its_timeout_is_reported(tmp: Path, smoke):
    rc, report, md = _run(
        tmp, "timeout", "--prompts", "2", "--policies", "full", "--timeout-s", "0",
        "--transformers-prompts", "0", "--profile-running", "0",
    )  # fmt: skip
    assert rc == 0  # a timeout is a finding, not a failure
    assert report["model"]["made_now"] is False  # the smoke run's folder, reused
    (row,) = report["rows"]
    assert row["timed_out"] and row["output_tokens"] < row["expected_tokens"]
    assert report["stages"][-1] == {**report["stages"][-1], "name": "full x 2", "status": "timeout"}
    assert "(timed out)" in md


def test_stages_past_the_budget_are_skipped(tmp: Path):
    rc, report, md = _run(tmp, "budget", "--budget-s", "0")
    assert rc == 0 and report["rows"] == []
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("model", "skipped")]
    assert "| model | skipped |" in md


def test_a_copy_without_git_takes_the_commit_given():
    no_git = {"git_commit": None, "git_dirty": None}
    assert commit_of(no_git, None) == {"hash": None, "dirty": None, "source": None}
    given = commit_of(no_git, "abc1234")
    assert given == {"hash": "abc1234", "dirty": None, "source": "--commit"}
    assert _commit_line(given).startswith("abc1234 (given by --commit")
    checkout = {"git_commit": "def5678", "git_dirty": False}
    assert commit_of(checkout, "def5678")["hash"] == "def5678"
    assert commit_of(checkout, "abc1234") == {
        "hash": "def5678", "dirty": False, "source": "git", "given": "abc1234",
    }  # fmt: skip


def test_the_named_shapes():
    big = SHAPES["llama-1b"]
    assert (big.hidden_size, big.num_hidden_layers, big.head_dim) == (2048, 16, 64)
    assert (big.num_attention_heads, big.num_key_value_heads, big.intermediate_size) == (
        32,
        8,
        8192,
    )
    assert SHAPES["smollm2-135m"].num_hidden_layers == 30
    # 32 KiB of K and V a token in bfloat16: a 4 GiB pool holds 131,072 tokens.
    assert kv_bytes_per_token(big, "bfloat16") == 32 * 1024
