"""bench.paired: the per-round ratio median, and one real run of two checkouts."""

import json
from pathlib import Path

from bench import paired

ROOT = Path(__file__).resolve().parent.parent


def test_the_figure_is_the_median_of_per_round_ratios():
    # B is 10% faster in rounds 1 and 3; round 2 ran on a slow machine for
    # both. Column medians (A 10 s, B 9.5 s) would say 1.053.
    a = [{16: 10.0}, {16: 20.0}, {16: 8.0}]
    b = [{16: 10.0 / 1.1}, {16: 19.0}, {16: 8.0 / 1.1}]
    ratios = paired.paired_ratios(a, b, 16)
    assert [round(r, 3) for r in ratios] == [1.1, 1.053, 1.1]
    args = paired.parse_args(["--a", str(ROOT), "--sizes", "16", "--rounds", "3"])
    result = paired.summarize(args, {"a": a, "b": b})
    assert round(result["sizes"][16]["median_ratio"], 3) == 1.1
    assert result["a"]["commit"] == result["b"]["commit"] != ""


def test_a_tiny_paired_run_writes_both_commits(tmp_path):
    argv = ["--a", str(ROOT), "--b", str(ROOT), "--sizes", "1,2", "--prompt-tokens", "16"]
    argv += ["--new-tokens", "2", "--rounds", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    argv += ["--temperature", "0.7", "--top-p", "0.9"]  # the sampled path, through the worker
    paired.main([*argv, "--name", "tiny"])
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert set(result["sizes"]) == {"1", "2"}
    assert all(s["a_tok_s"][0] > 0 and s["b_tok_s"][0] > 0 for s in result["sizes"].values())
    assert result["a"]["commit"].split()[0] in (tmp_path / "tiny.md").read_text()


def test_the_report_names_the_dtype_and_the_sampling():
    a, b = [{16: 10.0}], [{16: 8.0}]
    argv = ["--a", str(ROOT), "--sizes", "16", "--rounds", "1", "--dtype", "bfloat16"]
    args = paired.parse_args([*argv, "--temperature", "0.8", "--top-p", "0.9"])
    text = paired.markdown(paired.summarize(args, {"a": a, "b": b}))
    assert "bfloat16" in text and "sampled at temperature 0.8, top_p 0.9" in text
    greedy = paired.parse_args(["--a", str(ROOT), "--sizes", "16", "--rounds", "1"])
    assert "float32, CPU" in paired.markdown(paired.summarize(greedy, {"a": a, "b": b}))
    assert "greedy" in paired.markdown(paired.summarize(greedy, {"a": a, "b": b}))
