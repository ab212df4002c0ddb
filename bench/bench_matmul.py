"""Benchmark script: `python bench/bench_matmul.py --help` (same as `jax-nf4 bench`)."""

from jax_nf4.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
