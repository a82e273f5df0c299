"""bench/bf16_agreement.py's small pieces: the first-divergence count, its
summary, the near-tie bookkeeping, the report, the CLI."""

import json

import pytest

from bench import bf16_agreement
from bench.bf16_agreement import _top2, parse_args
from bench.bf16_agreement_report import (
    Case,
    Generation,
    compare,
    first_divergence,
    summarize,
    swapped,
    write,
)
from bench.provenance import cpu_description


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([5, 6, 7], [5, 6, 7], 3),  # full agreement: every token
        ([5, 6, 7], [5, 9, 7], 1),  # a later match does not count
        ([1, 2], [3, 2], 0),  # differs at the first token
        ([5, 6], [5, 6, 7], 2),  # one a prefix of the other: the shorter's length
        ([], [1], 0),
    ],
)
def test_first_divergence_counts_the_shared_leading_tokens(a, b, expected):
    assert first_divergence(a, b) == expected
    assert first_divergence(b, a) == expected


def test_summary_median_min_and_full_agreement():
    s = summarize([16, 3, 4, 16], [16, 16, 16, 16])
    assert s == {"prompts": 4, "full": 2, "median": 10.0, "min": 3}
    # A prompt is fully in agreement against its own length, not the longest.
    assert summarize([64, 100], [64, 128])["full"] == 1
    assert summarize([], [])["median"] is None
    with pytest.raises(ValueError):
        summarize([1], [])


def test_top2_is_the_chosen_tokens_lead_over_the_best_other():
    assert _top2({7: -0.5, 9: -1.25}, 7) == (0.75, 9)
    # An exact tie broken towards token 9: its lead is 0, the runner-up is 7.
    assert _top2({7: -1.0, 9: -1.0}, 9) == (0.0, 7)


def test_swap_means_each_picked_the_others_runner_up():
    a = Generation([1, 2, 3], [1.0, 0.0, 1.0], [9, 3, 9])
    b = Generation([1, 3, 2], [1.0, 0.1, 1.0], [9, 2, 9])
    assert swapped(a, b, 1)
    c = Generation([1, 4, 2], [1.0, 0.1, 1.0], [9, 2, 9])  # 4 was not a's runner-up
    assert not swapped(a, c, 1)
    assert not swapped(a, b, 3)  # past the end


def _cases() -> list[Case]:
    return [
        Case("p0", "short", "t", [1, 2], 4),
        Case("p1", "short", "t", [3], 4),
        Case("l0", "long", "t", [4] * 8, 2),
    ]


def _runs() -> dict[str, list[Generation]]:
    same = [Generation([5, 6, 7, 8]), Generation([5, 5, 5, 5]), Generation([1, 2])]
    moved = [
        Generation([5, 6, 9, 9], [1.0, 1.0, 0.0, 1.0], [0, 0, 7, 0]),
        Generation([5, 5, 5, 5]),
        Generation([3, 2]),
    ]
    return {
        "keyserve-bf16": moved,
        "transformers-bf16": same,
        "keyserve-f32": same,
        "transformers-f32": same,
    }


def test_compare_every_pair_per_prompt_and_per_set():
    pairs = compare(_cases(), _runs())
    assert len(pairs) == 4
    main = pairs["keyserve-bf16 vs transformers-bf16"]
    assert [r["first_divergence"] for r in main["cases"]] == [2, 4, 0]
    assert main["cases"][0]["margin_a"] == 0.0
    assert main["summary"]["short"] == {"prompts": 2, "full": 1, "median": 3.0, "min": 2}
    assert main["summary"]["long"] == {"prompts": 1, "full": 0, "median": 0, "min": 0}
    control = pairs["keyserve-f32 vs transformers-f32"]
    assert control["summary"]["short"]["full"] == 2 and control["summary"]["long"]["full"] == 1
    # Only the pairs whose two runs are present.
    assert list(compare(_cases(), {k: v for k, v in _runs().items() if "f32" in k})) == [
        "keyserve-f32 vs transformers-f32"
    ]


def test_report_files(tmp_path):
    meta = {
        "command": "python -m bench.bf16_agreement --quick",
        "date_utc": "2026-01-01T00:00:00+00:00",
        "provenance": {"git_commit": "abc1234", "git_dirty": False},
        "cpu": {"cpu_model": "Test CPU", "cpu_isa": ["avx512f", "avx512_bf16"]},
        "threads": 2,
        "torch": "t",
        "transformers": "x",
        "workload": "w",
        "seconds_per_run": {"keyserve-bf16": 1.5},
    }
    paths = write(tmp_path, "r", meta, _cases(), _runs())
    data = json.loads(paths["json"].read_text())
    assert data["runs"]["keyserve-bf16"][0]["tokens"] == [5, 6, 9, 9]
    assert data["pairs"]["keyserve-bf16 vs transformers-bf16"]["cases"][2]["first_divergence"] == 0
    assert "git_commit" in data
    md = paths["markdown"].read_text()
    assert "Test CPU" in md and "avx512_bf16" in md and "--quick" in md
    assert "keyserve-bf16 1.5 s" in md
    assert "| p0 | short | 2 | 4 | 2 (0.0/None) | all | 2 (0.0/None) | all |" in md


def test_cli_quick_and_explicit_runs():
    args = parse_args(["--quick"])
    assert args.quick and args.short_tokens == 16 and args.name == "smollm2_quick"
    assert args.runs == list(bf16_agreement.RUNS)
    assert parse_args(["--runs", "keyserve-bf16,transformers-bf16"]).runs == [
        "keyserve-bf16",
        "transformers-bf16",
    ]
    with pytest.raises(SystemExit):
        parse_args(["--runs", "keyserve-auto"])
    # Every run names its dtype: "auto" may mean bfloat16 or float32 by CPU.
    assert all(dtype in ("bfloat16", "float32") for _, dtype in bf16_agreement.RUNS.values())


def test_cpu_description_names_the_model_and_the_isa_flags_that_matter():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Test CPU 9000\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    cpu = cpu_description(cpuinfo)
    assert cpu == {
        "cpu_model": "Test CPU 9000",  # the first CPU's
        "cpu_isa": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
    }
    assert cpu_description("") == {"cpu_model": None, "cpu_isa": []}


def test_main_quick_wiring(tmp_path, monkeypatch):
    """--quick end to end with stand-in runs: the 2 parity prompts, 16 tokens
    each, every run asked with its explicit dtype, the files written."""
    asked = []

    def fake(system):
        def run(dtype, cases, args):
            asked.append((system, dtype, [c.new_tokens for c in cases]))
            return [Generation(list(range(c.new_tokens)), [1.0] * c.new_tokens) for c in cases]

        return run

    monkeypatch.setattr(
        bf16_agreement, "SYSTEMS", {s: fake(s) for s in ("keyserve", "transformers")}
    )
    paths = bf16_agreement.main(["--quick", "--out", str(tmp_path)])
    assert sorted(asked) == [
        ("keyserve", "bfloat16", [16, 16]),
        ("keyserve", "float32", [16, 16]),
        ("transformers", "bfloat16", [16, 16]),
        ("transformers", "float32", [16, 16]),
    ]
    data = json.loads(paths["json"].read_text())
    assert [c["name"] for c in data["cases"]] == ["parity-0", "parity-1"]
    assert data["command"] == "python -m bench.bf16_agreement --quick --out " + str(tmp_path)
    assert set(data["cpu"]) == {"cpu_model", "cpu_isa"}
    summary = data["pairs"]["keyserve-bf16 vs transformers-bf16"]["summary"]["short"]
    assert summary == {"prompts": 2, "full": 2, "median": 16.0, "min": 16}
    assert paths["markdown"].name == "smollm2_quick.md"
