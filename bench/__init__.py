"""Benchmarks for keyserve; see bench/README.md. Results live in bench/results/."""
