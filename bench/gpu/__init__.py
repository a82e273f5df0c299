"""python -m bench.gpu: keyserve's GPU throughput table in one command.

The workload is the one behind the GPU figures in the issues (the GPU check,
shared/gpu/gpu_check.py), so the figures compare: a random-weight model of a
named shape (shapes.py) with SmolLM2's tokenizer and vocabulary, N prompts of
random token ids, ignore_eos, a fixed KV pool; every KV policy on the same
engine, transformers' batched generate as the floor, and a step profile.

    python -m bench.gpu --shape llama-1b --prompts 64,256 \\
        --policies full,keyformer,h2o,streaming,window --name h200_2026-12-05
    python -m bench.gpu --shape tiny --device cpu --dtype float32 \\
        --prompt-tokens 32 --new-tokens 4 --prompts 2,4      # the CPU smoke run

Modules: shapes (model folders, prompts), steps (per-step timing), runs (the
timed stages), report (markdown and JSON), cli (arguments and the stage loop).
"""
