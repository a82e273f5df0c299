"""A load generator for OpenAI-compatible completion servers (keyserve, vLLM).

    python -m bench.serve --url http://127.0.0.1:8000 --model NAME \\
        --prompt-tokens 512 --output-tokens 128 --num-requests 64 \\
        (--concurrency 16 | --rate 2.0) [--extra-body JSON] [--tokenizer DIR] \\
        [--seed 0] [--out DIR] [--name LABEL]

Every request is a streamed POST /v1/completions whose prompt is a list of
exactly --prompt-tokens token ids (a window of the Lee news corpus, see
bench/data.py), greedy, EOS ignored, --output-tokens long. From scripts:

    result = asyncio.run(run_load(url, model, prompt_tokens=512, concurrency=16))
    print(render_table([result_a, result_b]))
"""

from bench.serve.report import render_report, render_table, write_results
from bench.serve.runner import arrival_offsets, run_load

__all__ = ["arrival_offsets", "render_report", "render_table", "run_load", "write_results"]
