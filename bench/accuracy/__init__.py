"""Accuracy harness: how much quality each KV policy keeps, on real text.

`python -m bench.accuracy --help`. Each task builds its prompts and scores its
outputs in its own module (summarization, fewshot, retrieval); `runner` drives
the engine's offline API, one `llm.generate` per (policy, budget); `report`
writes the tables, CSV/JSON and plots. `python -m bench.accuracy.dtype_report`
compares the results of two dtypes item by item (`agreement` does the sums).
"""
