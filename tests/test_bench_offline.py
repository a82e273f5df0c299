"""bench.peer.offline: per-round ratios, their median, and the report's rows."""

from bench.peer import offline


def test_summary_pairs_rounds_and_takes_the_median_ratio():
    args = offline.parse_args(
        ["--vllm-python", "python", "--sizes", "16", "64", "--output-tokens", "10", "--rounds", "3"]
    )
    # Seconds per size: keyserve 2x, 1x and 4x as fast as vLLM in rounds 1-3 at N=16.
    runs = {
        "vllm": [{16: 4.0, 64: 8.0}, {16: 4.0, 64: 8.0}, {16: 8.0, 64: 8.0}],
        "keyserve": [{16: 2.0, 64: 8.0}, {16: 4.0, 64: 4.0}, {16: 2.0, 64: 16.0}],
    }
    result = offline.summarize(args, runs)
    assert result["sizes"][16]["ratios"] == [2.0, 1.0, 4.0]
    assert result["sizes"][16]["median_ratio"] == 2.0
    assert result["sizes"][16]["vllm_tok_s"] == [40.0, 40.0, 20.0]
    assert result["sizes"][64]["ratios"] == [1.0, 2.0, 0.5]
    assert result["workload"]["dtype"] == "bfloat16"
    text = offline.markdown(result)
    assert "| 16 | 40.0, 40.0, 20.0 | 80.0, 40.0, 80.0 | 2.000, 1.000, 4.000 | 2.000 |" in text
    assert "CPU:" in text
